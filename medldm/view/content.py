"""What each kind of page shows, read from the files its stage wrote (no stage's internals): a dataset's QC table,
a run's curves and previews, samples with their conditions and real comparisons, an evaluation's verdicts."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from medldm.data.io import atomic_write, read_json, visible
from medldm.view.volumes import VolumeStore

log = logging.getLogger(__name__)

# the QC table's columns, in this order (manifest labels after the identity); the rest of summary.csv is left out
QC_COLUMNS = (("image", "scan"), ("subject_id", "subject"), ("session", None), ("split", None),
              ("qc_status", "QC"), ("age", None), ("sex", None), ("diagnosis", None),
              ("registration_correlation", "reg. r"), ("registration_dice", "reg. Dice"), ("tiv_ml", "TIV ml"),
              ("foreground_ml", "foreground ml"), ("foreground_mean", "foreground mean"),
              ("input_shape", "input shape"), ("input_spacing", "input mm"), ("input_axcodes", "input axes"),
              ("flags", None))
STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2}
# the columns that are measurements: only these become numbers ("001", a subject ID, stays the text it is)
QC_NUMERIC = ("age", "registration_correlation", "registration_dice", "tiv_ml", "foreground_ml", "foreground_mean")


def _number(value: Any) -> Any:
    """A CSV cell as a number where it is one (sorting by value, not by text)."""
    if isinstance(value, str):
        try:
            f = float(value)
            return f if math.isfinite(f) else value
        except ValueError:
            return value
    return value


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _rel(path: Path, folder: Path) -> str | None:
    """``path`` relative to the page's folder (a link that works wherever the folder goes), None outside it.

    Symbolic links are not followed: a dataset folder of links to scans elsewhere still links its own entries,
    which the server (serving the folder) can reach; a file named ``..foo`` is inside."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder)))
    # a URL: a file name with "#", "?" or "%" in it is still that file
    return None if rel.parts[:1] == ("..",) else quote(rel.as_posix())


def _volume(store: VolumeStore, path: Path, folder: Path, name: str | None = None) -> dict[str, Any]:
    return {"key": store.add(path), "url": _rel(path, folder), "name": name or path.name}


def _same_space(store: VolumeStore, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two volumes lie on one grid in world space (a registered dataset's scans and its samples do): only
    then does an overlay compare the same anatomy voxel by voxel."""
    ia, ib = store.info(a["key"]), store.info(b["key"])
    return bool(ia and ib and ia["shape"] == ib["shape"] and np.allclose(ia["affine"], ib["affine"], atol=1e-3))


def _notes(store: VolumeStore, what: str) -> list[str]:
    if not store.skipped:
        return []
    return [f"{store.skipped} {what} are not embedded for the 3D viewer (the cap is --max-volumes {store.limit}): "
            "rerun `medldm view` with a larger cap, or open the page with `medldm view --serve`, which shows every "
            "volume from its file."]


def _page(folder: Path, kind: str, title: str, subtitle: str, store: VolumeStore, body: dict[str, Any],
          notes: list[str]) -> dict[str, Any]:
    store.finish()
    volumes = {k: {f: v[f] for f in ("shape", "spacing_mm", "axcodes")} for k, v in store.entries.items()}
    return {"kind": kind, "title": title, "subtitle": subtitle, kind: body, "volumes": volumes, "notes": notes}


# ---- dataset ----------------------------------------------------------------------------------------------------

def dataset(folder: Path, max_volumes: int | None = None, **_: Any) -> dict[str, Any]:
    """The QC table (summary.csv joined with the manifest's labels), flagged scans first, each row a volume."""
    manifest = {r["image"]: r for r in _read_csv(folder / "manifest.csv")}
    summary_csv = folder / "qc" / "summary.csv"
    rows = _read_csv(summary_csv) if summary_csv.is_file() else [dict(r) for r in manifest.values()]
    for r in rows:
        for k in ("age", "sex", "diagnosis"):
            r.setdefault(k, (manifest.get(r["image"]) or {}).get(k, ""))
    rows.sort(key=lambda r: (STATUS_ORDER.get(r.get("qc_status", ""), 3), r["image"]))
    store = VolumeStore(folder / "view", max_volumes)
    out = []
    for r in rows:
        row: dict[str, Any] = {k: _number(r.get(k, "")) if k in QC_NUMERIC else r.get(k, "") for k, _ in QC_COLUMNS}
        row["volume"] = _volume(store, folder / r["image"], folder, r["image"])
        out.append(row)
    present = [(k, label) for k, label in QC_COLUMNS if any(r.get(k) not in ("", None) for r in out)]
    columns = [{"key": k, "label": label or k, "numeric": all(isinstance(r[k], float) or r[k] in ("", None)
                                                            for r in out)} for k, label in present]
    counts = {s: sum(r.get("qc_status") == s for r in out) for s in STATUS_ORDER}
    figures = [{"src": _rel(p, folder), "caption": "QC contact sheet: axial, coronal and sagittal mid-slices"}
               for p in visible(folder / "qc", "overview*.png")]
    info = read_json(folder / "preprocess.json") if (folder / "preprocess.json").is_file() else {}
    splits = info.get("splits") or {}
    subtitle = (f"Preprocessed dataset: {len(out)} scans of {len({r['subject_id'] for r in out})} subjects; "
                f"QC {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail"
                + (f"; splits {', '.join(f'{k} {v}' for k, v in splits.items())}" if splits else ""))
    return _page(folder, "dataset", f"medldm dataset: {folder.resolve().name}", subtitle, store,
                 {"rows": out, "columns": columns, "counts": counts, "figures": figures},
                 _notes(store, "scans"))


# ---- training run ---------------------------------------------------------------------------------------------

def run(folder: Path, **_: Any) -> dict[str, Any]:
    """Loss curves and validation scores (the TensorBoard scalars), preview images over time, checkpoints."""
    import yaml

    store = VolumeStore(folder / "view", 0)
    config_text = (folder / "config.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(config_text) or {}
    scalars: dict[str, list[list[float]]] = {}
    previews: dict[str, list[dict[str, Any]]] = {}
    if (folder / "tensorboard").is_dir():
        scalars, previews = _events(folder)
    steps_done = max((int(p[-1][0]) for p in scalars.values() if p), default=0)
    total = (config.get("train") or {}).get("steps")
    kind = "diffusion" if "scheduler" in config else "autoencoder"
    checkpoints = [{"name": p.name, "bytes": p.stat().st_size} for p in visible(folder / "checkpoints", "*.pt")]
    figures = [{"src": _rel(p, folder), "caption": "the loss curves as drawn during training"}
               for p in visible(folder, "loss.png")]
    summary = (f"{kind} training run: step {steps_done}" + (f" of {total}" if total else "")
               + f"; {len(checkpoints)} checkpoint(s)")
    notes = [] if scalars else ["no TensorBoard scalars in tensorboard/ yet"]
    return _page(folder, "run", f"medldm {kind} run: {folder.resolve().name}", summary, store,
                 {"note": "Curves: the logged values (faint) and TensorBoard's smoothing (0.9); validation scores "
                          "in red. loss.png and TensorBoard (tensorboard --logdir) show the same scalars.",
                  "scalars": scalars, "previews": previews,
                  "figures": figures, "checkpoints": checkpoints, "config": config_text}, notes)


def _events(folder: Path) -> tuple[dict[str, list[list[float]]], dict[str, list[dict[str, Any]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 1,
                                                                          "histograms": 1})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run may log a step twice: the latest
        points = [[s, by_step[s]] for s in sorted(by_step) if math.isfinite(by_step[s])]
        if points:  # a tag with no finite value (a diverged run logs NaN) has no curve to draw
            scalars[tag] = points
    previews: dict[str, list[dict[str, Any]]] = {}
    out = folder / "view" / "previews"
    keep = set()
    for tag in events.Tags()["images"]:
        safe = re.sub(r"[^A-Za-z0-9_-]+", "_", tag)
        by_step = {e.step: e.encoded_image_string for e in events.Images(tag)}
        for step in sorted(by_step):
            path = out / f"{safe}_{step:08d}.png"
            keep.add(path.name)
            if not path.is_file() or path.stat().st_size != len(by_step[step]):
                with atomic_write(path) as tmp:
                    tmp.write_bytes(by_step[step])
            previews.setdefault(tag, []).append({"step": step, "src": f"view/previews/{path.name}"})
    for old in visible(out, "*.png") if out.is_dir() else []:
        if old.name not in keep:
            old.unlink()
    return scalars, previews


# ---- samples --------------------------------------------------------------------------------------------------

def samples(folder: Path, max_volumes: int | None = None, data_dir: str | Path | None = None, compare: bool = True,
            **_: Any) -> dict[str, Any]:
    """A grid per folder of samples (this one and those inside it), each with its conditions; beside each, its
    nearest training volume (SSIM) and a real test scan of the same age, sex and diagnosis where conditioned."""
    groups = [d for d in [folder, *sorted(c for c in folder.iterdir() if c.is_dir())] if visible(d, "sample_*.json")]
    store = VolumeStore(folder / "view", max_volumes)
    found: list[tuple[Path, dict[str, Any]]] = []
    for d in groups:
        for side_path in visible(d, "sample_*.json"):
            side = read_json(side_path)
            nii = d / str(side.get("file") or side_path.name.replace(".json", ".nii.gz"))
            found.append((nii, side))
    notes: list[str] = []
    dataset_dir = Path(data_dir) if data_dir else _samples_dataset([s for _, s in found])
    compared = _comparisons([n for n, _ in found], [s for _, s in found], dataset_dir, compare, notes)
    out_groups = []
    for d in groups:
        items = []
        for (nii, side), extra in zip(found, compared):
            if nii.parent != d:
                continue
            png = nii.with_name(nii.name.replace(".nii.gz", ".png"))
            stem = nii.name.removesuffix(".nii.gz")
            item: dict[str, Any] = {"name": stem if d == folder else f"{d.name}/{stem}",
                    "conditions": side.get("conditions") or {}, "seed": side.get("seed"),
                    "guidance": side.get("guidance"), "png": _rel(png, folder) if png.is_file() else None,
                    "volume": _sample_volume(store, nii, side, folder)}
            for k in ("nearest", "same_age"):
                if extra.get(k):
                    real = {n: v for n, v in extra[k].items() if n != "path"}
                    real["volume"] = _volume(store, extra[k]["path"], folder, extra[k]["name"])
                    real["same_space"] = _same_space(store, item["volume"], real["volume"])
                    item[k] = real
            items.append(item)
        sampling = read_json(d / "sampling.json") if (d / "sampling.json").is_file() else {}
        note = ", ".join(f"{k} {sampling[k]}" for k in ("sampler", "steps", "guidance") if sampling.get(k) is not None)
        title = folder.resolve().name if d == folder else f"{folder.resolve().name}/{d.name}"
        out_groups.append({"folder": title, "samples": items, "note": note})
    n = sum(len(g["samples"]) for g in out_groups)
    subtitle = f"Synthetic volumes: {n} samples in {len(out_groups)} folder(s)"
    summary = ("Click a sample to scroll through it in 3D"
               + (", beside its nearest training volume (by SSIM, as medldm evaluate finds it) and a real test "
                  "scan of the same age (and sex and diagnosis, where the sample was conditioned on them)"
                  if any(c for c in compared) else "") + ". Every volume here is SYNTHETIC unless labelled real.")
    return _page(folder, "samples", f"medldm samples: {folder.resolve().name}", subtitle, store,
                 {"groups": out_groups, "summary": summary}, notes + _notes(store, "volumes"))


def _sample_volume(store: VolumeStore, nii: Path, side: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A sample's volume: its NIfTI, or its DICOM series where ``sample --format dicom`` wrote only that (embedded
    only: a served page cannot hand NiiVue a folder of slices)."""
    if nii.is_file():
        return _volume(store, nii, folder)
    series = (side.get("dicom") or {}).get("folder")
    if series and (nii.parent / series).is_dir():
        return {"key": store.add(nii.parent / series), "url": None, "name": str(series)}
    return {"key": None, "url": None, "name": nii.name}


def _samples_dataset(sides: list[dict[str, Any]]) -> Path | None:
    """The dataset the samples' autoencoder was trained on, as its checkpoint records it."""
    from medldm.artifacts import AutoencoderCheckpoint

    for path in {s.get("autoencoder_checkpoint") for s in sides} - {None}:
        try:
            data_dir = AutoencoderCheckpoint.load(str(path), mmap=True).data_dir
        except Exception as e:  # moved or deleted: the page shows the samples alone
            log.info("view: %s not read (%s)", path, e)
            continue
        if data_dir and (Path(data_dir) / "manifest.csv").is_file():
            return Path(data_dir)
    return None


def _comparisons(files: list[Path], sides: list[dict[str, Any]], data_dir: Path | None, compare: bool,
                 notes: list[str]) -> list[dict[str, Any]]:
    """For each sample: its nearest training volume and a real test scan like it (by its conditions)."""
    if not compare or not files:
        return [{} for _ in files]
    if data_dir is None:
        notes.append("the samples' dataset is not known (their autoencoder's checkpoint names none that exists): "
                     "give `medldm view --data DATASET` to see them beside real scans")
        return [{} for _ in files]
    from medldm.data.dataset import read_dataset_info, read_manifest, split_rows

    rows = read_manifest(data_dir)
    train, test = split_rows(rows, "train"), split_rows(rows, "test")
    out: list[dict[str, Any]] = [{} for _ in files]
    for i, side in enumerate(sides):
        match = _like(side.get("conditions") or {}, test)
        if match is not None:
            row, how = match
            out[i]["same_age"] = {"path": data_dir / row["image"], "name": row["image"], "split": "test",
                                  "description": how}
    try:
        nearest = _nearest(files, train, data_dir, read_dataset_info(data_dir)["reference"])
    except Exception as e:  # a sample off the dataset's grid, an unreadable scan: the rest of the page stands
        notes.append(f"nearest training volumes not found ({type(e).__name__}: {e})")
        return out
    except KeyboardInterrupt:  # the search reads the training split (minutes on a large cohort): Ctrl-C skips it
        log.warning("view: nearest training search interrupted; the page shows the samples without it")
        notes.append("the nearest-training search was interrupted: run `medldm view` on this folder to add it")
        return out
    for i, (j, ssim) in enumerate(nearest):
        if j is not None:
            out[i]["nearest"] = {"path": data_dir / train[j]["image"], "name": train[j]["image"], "ssim": ssim}
    return out


def _like(conditions: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """The real scan closest in age among those of the sample's sex and diagnosis (any, where none matches)."""
    try:
        age = float(conditions["age"])
    except (KeyError, TypeError, ValueError):
        return None
    aged = [r for r in rows if isinstance(r.get("age"), float)]
    pool = [r for r in aged if all(str(r.get(k)) == str(conditions[k]) for k in ("sex", "diagnosis")
                                   if conditions.get(k) not in (None, ""))] or aged
    if not pool:
        return None
    best = min(pool, key=lambda r: (abs(r["age"] - age), r["image"]))
    labels = ", ".join(str(best[k]) for k in ("sex", "diagnosis") if best.get(k))
    return best, f"age {best['age']:g}" + (f", {labels}" if labels else "")


def _nearest(files: list[Path], train: list[dict[str, Any]], data_dir: Path,
             reference: dict[str, Any]) -> list[tuple[int | None, float | None]]:
    """The nearest training volume by SSIM of each sample (medldm evaluate's search and settings)."""
    import torch
    from tqdm.auto import tqdm

    from medldm.config import EvaluateConfig
    from medldm.data.io import load_volume
    from medldm.evaluation.memorisation import NearestTraining
    from medldm.evaluation.metrics import VolumeMetrics
    from medldm.evaluation.samples import sample_files

    cfg = EvaluateConfig()
    usable = set(sample_files(sorted({f.parent for f in files}), reference))
    metrics = VolumeMetrics(reference["shape"], cfg.kernel_size, cfg.kernel_sigma)

    def load(i: int) -> torch.Tensor:
        return torch.from_numpy(load_volume(data_dir / train[i]["image"])[0])[None]

    search = NearestTraining(load, len(train), metrics, cfg.prefilter_factor, cfg.nearest_candidates)
    out: list[tuple[int | None, float | None]] = []
    log.info("view: finding each sample's nearest training volume among %d (Ctrl-C skips it)", len(train))
    for f in tqdm(files, desc="page: nearest training", unit="sample"):
        if f not in usable:
            out.append((None, None))
            continue
        j, ssim = search(torch.from_numpy(load_volume(f, allow_empty=True)[0])[None])
        out.append((j, round(float(ssim), 4)))
    return out


# ---- evaluation -----------------------------------------------------------------------------------------------

def evaluation(folder: Path, max_volumes: int | None = None, **_: Any) -> dict[str, Any]:
    """The verdict table, every sample's scores (flagged first, each beside its nearest training volume), the
    per-subject reconstruction scores and the plots."""
    from medldm.evaluation.report import verdict_table

    report = read_json(folder / "report.json")
    store = VolumeStore(folder / "view", max_volumes)
    data_dir = Path(report.get("data_dir", ""))
    verdicts = []
    for line in verdict_table(report):
        cells = [c.strip().replace("**", "").replace("`", "") for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "question":
            verdicts.append(dict(zip(("question", "result", "yardstick", "reading"), cells)))
    gen = report.get("generation") or {}
    flagged, every = [], []
    if gen:
        dirs = [Path(d) for d in gen.get("samples_dirs", [])]
        mem = {m["file"]: m for m in gen["memorisation"]["synthetic"]}
        plaus = {p["file"]: p for p in gen["plausibility"]["synthetic"]}
        for name in gen["files"]:
            path = _sample_path(name, dirs)
            m, p = mem.get(name, {}), plaus.get(name, {})
            why = ([f"possibly memorised (SSIM {m['ssim']:.3f} to its nearest training volume)"] if m.get("flagged")
                   else []) + ([f"not a brain: {'; '.join(p.get('reasons') or [])}"] if p.get("plausible") is False
                               else [])
            side = path.with_name(path.name.replace(".nii.gz", ".json")) if path else None
            row = {"name": name, "plausible": "yes" if p.get("plausible") else "no" if p else "",
                   "conditions": (read_json(side).get("conditions") or {}) if side and side.is_file() else {},
                   "why": "; ".join(why), "nearest_ssim": m.get("ssim"), "_flag": bool(why)}
            if m.get("nearest_train_image"):
                row["nearest"] = {"name": m["nearest_train_image"], "ssim": round(m["ssim"], 4),
                                  "path": data_dir / m["nearest_train_image"]}
            every.append((row, path))
        every.sort(key=lambda rp: (not rp[0]["_flag"], rp[0]["name"]))
        for row, path in every:
            row["volume"] = _volume(store, path, folder, row["name"]) if path else {"key": None, "url": None,
                                                                                   "name": row["name"]}
            if row.get("nearest"):
                nearest = row["nearest"]
                nearest["volume"] = _volume(store, nearest.pop("path"), folder, nearest["name"])
                nearest["same_space"] = _same_space(store, row["volume"], nearest["volume"])
            if row["_flag"]:
                flagged.append(row)
    tables = []
    if every:
        tables.append({"title": "Every sample (click one: beside its nearest training volume)",
                       "columns": [{"key": "name"}, {"key": "plausible"}, {"key": "nearest_ssim", "label":
                                   "SSIM to nearest training", "numeric": True}, {"key": "why"}],
                       "rows": [r for r, _ in every]})
    rec = report.get("reconstruction") or {}
    if rec.get("per_subject"):
        tables.append({"title": "Autoencoder reconstruction, per test subject",
                       "columns": [{"key": "image"}] + [{"key": k, "numeric": True}
                                                        for k in ("ssim", "ms_ssim", "psnr", "mae")],
                       "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                for r in rec["per_subject"]]})
    figures = [{"src": _rel(p, folder), "caption": p.stem.replace("_", " ")} for p in visible(folder, "*.png")]
    n = gen.get("num_samples")
    subtitle = "Evaluation" + (f" of {n} samples" if n else "") + (" and the autoencoder" if rec else "") \
        + f" against {report.get('test_volumes')} real test volumes" + (f"; {len(flagged)} flagged" if gen else "")
    summary = (f"Dataset: {report.get('data_dir')}. The full report: report.md and report.json in this folder."
               + (" Click a sample to see it beside its nearest training volume." if every else ""))
    return _page(folder, "evaluation", f"medldm evaluation: {folder.resolve().name}", subtitle, store,
                 {"summary": summary, "verdicts": verdicts, "has_samples": bool(every), "flagged": flagged,
                  "tables": tables,
                  "figures": figures}, _notes(store, "volumes"))


def _sample_path(name: str, dirs: list[Path]) -> Path | None:
    """A report's sample name (``file`` or, with several folders, ``folder/file``) as the file it names."""
    for d in dirs:
        path = d / name if len(dirs) == 1 else d.parent / name
        if path.is_file():
            return path
    return None


COLLECT: dict[str, Callable[..., dict[str, Any]]] = {"dataset": dataset, "run": run, "samples": samples,
                                                     "evaluation": evaluation}
