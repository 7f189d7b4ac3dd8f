"""Export synthetic volumes: NIfTI (and DICOM) in the dataset's reference space, JSON sidecars, PNG previews,
samples.csv and a contact sheet, and optionally the files that make the folder a medldm dataset. Each volume is
written as soon as it is decoded, each file atomically; sampling.json and plan.csv let a killed run be resumed."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from medldm import __version__
from medldm.data.dataset import MANIFEST_COLUMNS
from medldm.data.io import (
    INTEGER_LEVELS,
    new_uid,
    read_json,
    save_dicom_series,
    save_volume,
    to_integer,
    visible,
    write_csv,
    write_json,
)
from medldm.errors import InputError
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

DESCRIP = f"SYNTHETIC medldm {__version__}"
FORMATS = ("nifti", "dicom", "both")
DTYPES = ("int16", "float32")
# what a previous `medldm sample` leaves in its output folder; nothing else there is touched
OUTPUT_PATTERNS = ("sample_*.nii.gz", "sample_*.json", "sample_*.png", "sample_*_dicom", "samples.csv",
                   "contact_sheet*.png", "sampling.json", "plan.csv", "manifest.csv", "preprocess.json",
                   "index.html", "view")  # the last two: the folder's page (medldm view)
SHEET_PAGE = 64  # volumes per contact sheet (16 rows of 4); more go to contact_sheet_2.png, ...
CSV_FIELDS = ["file", "dicom", "seed", "conditions"]
# a synthetic dataset's manifest: the columns of `medldm preprocess`'s, and which rows are synthetic
DATASET_COLUMNS = [*MANIFEST_COLUMNS, "synthetic"]
# what must be the same for a resumed run to make the volumes an uninterrupted one would
RESUME_KEYS = ("diffusion_sha256", "autoencoder_sha256", "sampler", "steps", "eta", "guidance", "batch_size",
               "seed", "format", "dtype", "device", "decode_device", "cohort", "as_dataset")


def sample_stem(seed: int | str) -> str:
    """The name every file of one sample starts with: sample_SEED (at least four digits)."""
    return f"sample_{int(seed):04d}"


def prepare_output_dir(out_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Check before any sampling that ``out_dir`` can be written and holds no earlier samples (unless ``overwrite``,
    or ``resume`` of the run recorded there)."""
    out_dir = Path(out_dir)
    if overwrite and resume:
        raise InputError("--overwrite starts again and --resume continues: give one of them")
    if (out_dir / "manifest.csv").is_file() and not (out_dir / "sampling.json").is_file():
        raise InputError(f"--out {out_dir} is a dataset (it has a manifest.csv that `medldm sample` did not write): "
                         "choose another folder; samples never replace a dataset")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medldm-write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"--out {out_dir}: cannot write there ({e.strerror or e}); "
                         "choose a folder you can write to") from None
    earlier = previous_outputs(out_dir)
    if earlier and resume and not (out_dir / "sampling.json").is_file():
        raise InputError(f"--resume: {out_dir} holds samples but no sampling.json (they were made by an older medldm, "
                         "which did not record its run); pass --overwrite to start again or choose another folder")
    if earlier and not overwrite and not resume:
        raise FileExistsError(f"--out {out_dir} already holds {len(earlier)} files of earlier samples "
                              f"(e.g. {earlier[0].name}); pass --resume to continue that run, --overwrite to replace "
                              "them, or choose another folder")
    return out_dir


def previous_outputs(out_dir: Path) -> list[Path]:
    return sorted(p for pattern in OUTPUT_PATTERNS for p in visible(out_dir, pattern))


def remove_previous_outputs(out_dir: Path) -> None:
    """Delete what an earlier `medldm sample` wrote into ``out_dir`` (and nothing else)."""
    for p in previous_outputs(out_dir):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def record_run(out_dir: Path, settings: dict[str, Any], plan: list[dict[str, Any]], resume: bool) -> set[int]:
    """Write the run's settings and plan (sampling.json, plan.csv); with ``resume`` and a run recorded there, check
    that this run is the same one continued and return the seeds of the samples it already finished."""
    recorded = out_dir / "sampling.json"
    done: set[int] = set()
    if resume and recorded.is_file():
        before = read_json(recorded)
        changed = [k for k in RESUME_KEYS if before.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise InputError(f"--resume: {out_dir} was sampled with {k}={before.get(k)!r}, this run has "
                             f"{settings.get(k)!r}; resume with the first run's options (see its sampling.json) "
                             "or choose another folder")
        done = finished_seeds(out_dir, settings["format"])
        old_plan = [{k: str(v) for k, v in r.items()} for r in _read_csv(out_dir / "plan.csv")]
        new_plan = [{k: str(v) for k, v in r.items()} for r in plan]
        for i, (a, b) in enumerate(zip(old_plan, new_plan)):
            if a != b:
                raise InputError(f"--resume: sample {i} of {out_dir} was planned as {a}, now {b} (the conditions "
                                 "file or dataset changed?); resume with the same inputs or choose another folder")
        by_seed = {int(r["seed"]) for r in plan}
        lost = sorted(done - by_seed)
        if lost:
            raise InputError(f"--resume: {out_dir} holds {len(done)} finished samples, --num {len(plan)} would "
                             f"leave out seed {lost[0]} and {len(lost) - 1} more; give --num {len(old_plan)} or more")
    write_json(recorded, settings)
    if plan:
        write_csv(out_dir / "plan.csv", list(plan[0]), plan)
    return done


def finished_seeds(out_dir: Path, fmt: str) -> set[int]:
    """Seeds that samples.csv lists and whose files are all there (anything else is made again)."""
    done = set()
    for row in _read_csv(out_dir / "samples.csv"):
        stem = sample_stem(row["seed"])
        files = [out_dir / f"{stem}.json", out_dir / f"{stem}.png"]
        files += [out_dir / f"{stem}.nii.gz"] if fmt in ("nifti", "both") else []
        files += [out_dir / f"{stem}_dicom"] if fmt in ("dicom", "both") else []
        if all(f.exists() for f in files):
            done.add(int(row["seed"]))
    return done


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class SampleWriter:
    """Writes each decoded volume as ``sample_SEED`` files; ``samples.csv`` always lists exactly the finished ones.

    NIfTI: the reference affine as qform and sform (code 1), ``descrip`` "SYNTHETIC medldm <version>", int16
    (value = round(intensity x 4095), scl_slope 1/4095, so readers get the [0, 1] intensities of the preprocessed
    data) or float32. DICOM: one classic MR series per volume with the same integers (no rescale), new UIDs and
    patient fields that say SYNTHETIC. With ``dataset`` (``preprocess.json``'s content and ``splits``: seed,
    val_fraction, test_fraction) the folder is also a medldm dataset: ``manifest.csv`` lists the finished samples
    with their conditions, a split and ``synthetic`` 1. ``done`` (seed -> index) are samples of a resumed run that
    are already there.
    """

    def __init__(self, out_dir: Path, reference: dict[str, Any], provenance: dict[str, Any],
                 fmt: str = "nifti", dtype: str = "int16", dataset: dict[str, Any] | None = None,
                 done: Mapping[int, int] | None = None) -> None:
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if dataset is not None and fmt == "dicom":
            raise InputError("--as-dataset lists NIfTI volumes in manifest.csv: use --format nifti or both")
        self.out_dir, self.fmt, self.dtype = out_dir, fmt, dtype
        self.affine = np.asarray(reference["affine"], dtype=np.float64)
        self.shape = list(reference["shape"])
        self.reference_image = reference.get("image")
        self.provenance = provenance
        self.versions = versions()
        self.created = dt.datetime.now(dt.timezone.utc)
        self.rows: dict[int, dict[str, Any]] = {}  # index -> samples.csv row, written in index order
        self.manifest: dict[int, dict[str, Any]] = {}
        self.dataset = dataset
        self.tiles: list[np.ndarray] = []  # previews of the contact sheet page being filled
        self.pages = 0
        self.resumed = bool(done)
        if dataset is not None:
            write_json(out_dir / "preprocess.json", {k: v for k, v in dataset.items() if k != "splits"})
        if done:
            by_seed = {int(r["seed"]): r for r in _read_csv(out_dir / "samples.csv")}
            listed = {r["image"]: r for r in _read_csv(out_dir / "manifest.csv")}
            for seed, index in done.items():
                self.rows[index] = by_seed[seed]
                if dataset is not None:  # killed between samples.csv and manifest.csv: made from the sidecar
                    self.manifest[index] = listed.get(f"{sample_stem(seed)}.nii.gz") or self._manifest_row(
                        seed, index, _side_conditions(out_dir / f"{sample_stem(seed)}.json"))

    def write(self, volume: np.ndarray, seed: int, conditions: Mapping[str, Any] | None = None,
              index: int | None = None) -> Path:
        """Write one volume with its sidecar and preview; returns the NIfTI path (the DICOM folder if DICOM only).
        ``conditions``: this sample's (default: the run's, from the provenance); ``index``: its place in the run."""
        if list(volume.shape) != self.shape:
            raise InputError(f"sample shape {list(volume.shape)} differs from the reference {self.shape}")
        if conditions is None:
            conditions = self.provenance.get("conditions", {})
        index = len(self.rows) if index is None else index
        stem = sample_stem(seed)
        nifti = self.out_dir / f"{stem}.nii.gz"
        dicom = self.out_dir / f"{stem}_dicom"
        side: dict[str, Any] = {"synthetic": True, "seed": seed, "index": index, **self.provenance,
                                "conditions": dict(conditions), "intensity": self.intensity(),
                                "versions": self.versions, "created": self.created.isoformat(timespec="seconds"),
                                "reference_image": self.reference_image}
        if self.fmt in ("nifti", "both"):
            save_volume(nifti, volume, self.affine, descrip=DESCRIP, dtype=self.dtype)
            side["file"] = nifti.name
        if self.fmt in ("dicom", "both"):
            tags = self.dicom_tags(seed, conditions)
            save_dicom_series(dicom, to_integer(volume, "int16"), self.affine, tags)
            side["dicom"] = {"folder": dicom.name, "slices": volume.shape[2], "study_instance_uid": tags["0020|000d"],
                             "series_instance_uid": tags["0020|000e"], "patient_id": tags["0010|0020"]}
        write_json(self.out_dir / f"{stem}.json", side)
        preview = three_plane(volume)
        save_png(self.out_dir / f"{stem}.png", preview)
        if not self.resumed:  # a resumed run's sheets are made again from all previews at the end
            self.tiles.append(preview)
            if len(self.tiles) == SHEET_PAGE:
                self._save_sheet()
        self.rows[index] = {"file": side.get("file", ""), "dicom": dicom.name if "dicom" in side else "",
                            "seed": seed, "conditions": json.dumps(dict(conditions))}
        write_csv(self.out_dir / "samples.csv", CSV_FIELDS, [self.rows[i] for i in sorted(self.rows)])
        if self.dataset is not None:
            self.manifest[index] = self._manifest_row(seed, index, conditions)
            write_csv(self.out_dir / "manifest.csv", DATASET_COLUMNS, [self.manifest[i] for i in sorted(self.manifest)])
        return nifti if self.fmt != "dicom" else dicom

    def _manifest_row(self, seed: int, index: int, conditions: Mapping[str, Any]) -> dict[str, Any]:
        from medldm.inference.cohort import assign_split

        assert self.dataset is not None
        splits = self.dataset["splits"]
        stem = sample_stem(seed)
        return {"subject_id": stem, "session": "synthetic", "image": f"{stem}.nii.gz",
                **{k: conditions.get(k, "") for k in ("age", "sex", "diagnosis")},
                "split": assign_split(index, splits["seed"], splits["val_fraction"], splits["test_fraction"]),
                "qc_status": "synthetic", "tiv_ml": "", "source": f"{stem}.json",
                "source_sha256": self.provenance.get("diffusion_sha256", ""), "synthetic": 1}

    def close(self) -> None:
        """The last contact sheet page (four volumes per row); every page of a resumed run, from the previews."""
        if self.resumed:
            self._rebuild_sheets()
        elif self.tiles:
            self._save_sheet()

    def _save_sheet(self) -> None:
        self.pages += 1
        name = "contact_sheet.png" if self.pages == 1 else f"contact_sheet_{self.pages}.png"
        save_png(self.out_dir / name, grid(self.tiles, columns=4))
        self.tiles = []

    def _rebuild_sheets(self) -> None:
        for old in visible(self.out_dir, "contact_sheet*.png"):
            old.unlink()
        tile_shape = three_plane(np.zeros(self.shape, dtype=np.float32)).shape
        self.pages, self.tiles = 0, []
        for i in sorted(self.rows):
            png = iio.imread(self.out_dir / f"{sample_stem(self.rows[i]['seed'])}.png")
            k = png.shape[0] // tile_shape[0]  # save_png upscaled it by a whole factor
            self.tiles.append(png[::k, ::k])
            if len(self.tiles) == SHEET_PAGE:
                self._save_sheet()
        if self.tiles:
            self._save_sheet()

    def intensity(self) -> str:
        levels = INTEGER_LEVELS["int16"][1]
        text = "[0, 1] as in the preprocessed training data (0 = background)"
        if self.fmt in ("nifti", "both"):
            text += (f"; NIfTI int16 stores round(value x {levels}) with scl_slope 1/{levels}"
                     if self.dtype == "int16" else "; NIfTI float32")
        if self.fmt in ("dicom", "both"):
            text += f"; DICOM pixels are round(value x {levels}) (0..{levels}, no rescale)"
        return text

    def dicom_tags(self, seed: int, conditions: Mapping[str, Any]) -> dict[str, str]:
        """Series-level DICOM tags: new UIDs per volume; every human-readable field says synthetic."""
        date, time = self.created.strftime("%Y%m%d"), self.created.strftime("%H%M%S")
        levels = INTEGER_LEVELS["int16"][1]
        series_uid = new_uid()
        tags = {
            "0008|0008": "DERIVED\\SECONDARY\\OTHER\\SYNTHETIC",  # value 4 on is the implementation's own
            "0008|0020": date, "0008|0021": date, "0008|0023": date, "0008|0030": time, "0008|0031": time,
            "0008|0060": "MR",
            "0008|0070": "medldm (synthetic image generator)",
            "0008|1030": "SYNTHETIC brain MRI",
            "0008|103e": f"{DESCRIP} seed {seed}",
            "0010|0010": "SYNTHETIC^MEDLDM",
            "0010|0020": f"SYNTH-{series_uid[-12:]}",
            "0010|0030": "",
            "0010|0040": {"M": "M", "F": "F"}.get(str(conditions.get("sex", "")), "O"),
            "0012|0062": "YES",  # patient identity removed: there never was one
            "0012|0063": "synthetic image, generated by medldm; no patient data",
            "0008|0033": time,  # the MR IOD's other required attributes are save_dicom_series' defaults
            "0020|000d": new_uid(), "0020|000e": series_uid, "0020|0052": new_uid(),
            "0020|4000": f"SYNTHETIC image generated by medldm {__version__} (seed {seed}); not a patient",
            "0028|1050": str(levels // 2), "0028|1051": str(levels),
        }
        if "age" in conditions:
            tags["0010|1010"] = f"{min(int(round(float(conditions['age']))), 999):03d}Y"
        return tags


def _side_conditions(path: Path) -> dict[str, Any]:
    return dict(read_json(path).get("conditions") or {}) if path.is_file() else {}
