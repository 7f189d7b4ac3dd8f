"""Preprocessing: one scan -> checked, oriented, resampled, bias-corrected, (registered, skull-stripped),
normalised, cropped volume; a whole download -> a dataset dir with manifest, QC and failures."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import socket
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForeground, Orientation, ResizeWithPadOrCrop, Spacing, SpatialCrop
from tqdm.auto import tqdm

from medldm import __version__
from medldm.config import PreprocessConfig, to_dict
from medldm.data.brain import brain_mask, resolve_method, rough_brain_mask
from medldm.data.dataset import MANIFEST_COLUMNS
from medldm.data.discovery import ScanRecord, discover_scans
from medldm.data.intensity import head_mask, n4_correct, normalise
from medldm.data.io import content_sha256, load_volume, read_json, save_volume, write_csv, write_json
from medldm.data.qc import assess, write_qc
from medldm.data.registration import (
    Registration,
    Template,
    load_template,
    register_to_template,
    template_sha256,
    tilt_degrees,
    to_scan_grid,
)
from medldm.data.splits import assign_splits
from medldm.errors import InputError, UserError
from medldm.versions import versions
from medldm.viz import save_png, three_plane

log = logging.getLogger(__name__)

# settings that do not change a preprocessed volume, so changing them does not redo the work
_NOT_PER_SCAN = ("split", "qc", "diagnosis_map", "description_patterns", "preferred_types", "one_scan_per_visit")


def config_hash(cfg: PreprocessConfig) -> str:
    """Hash of every setting that shapes a preprocessed volume (a rerun redoes scans whose hash differs)."""
    per_scan = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_PER_SCAN}
    return hashlib.sha256(json.dumps(per_scan, sort_keys=True).encode()).hexdigest()[:16]


def _is_head(x: torch.Tensor) -> torch.Tensor:
    # after [0, 1] normalisation air is near 0; a low threshold keeps the scalp
    return x > 0.05


def _crop_to_shape(volume: np.ndarray, affine: np.ndarray,
                   shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the head, keep its top when it is taller than ``shape`` (the neck goes, never the brain), pad/crop
    to ``shape``; MONAI updates the affine at each step."""
    image = CropForeground(select_fn=_is_head, margin=2, allow_smaller=True)(
        MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine)))
    size = image.shape[3]
    if size > shape[2]:
        image = SpatialCrop(roi_start=(0, 0, size - shape[2]), roi_end=(*image.shape[1:3], size))(image)
    # MONAI's transforms are typed as returning a Tensor: they return the MetaTensor they were given
    image = cast(MetaTensor, ResizeWithPadOrCrop(spatial_size=shape)(image))
    return image[0].numpy().astype(np.float32), image.affine.numpy().astype(np.float64)


@dataclass
class Preprocessed:
    """One preprocessed scan: the volume, its affine, its statistics (for QC and the sidecar), its brain mask."""

    volume: np.ndarray
    affine: np.ndarray
    stats: dict[str, Any]
    # the scan's own brain mask on the output grid (None when there is no brain extraction: no registration)
    brain: np.ndarray | None = None


def preprocess_scan(data: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig,
                    template: Template | None = None) -> Preprocessed:
    """One scan -> float32 volume of cfg.shape in [0, 1], its affine, statistics for QC and its brain mask."""
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    if spacing_in.max() > cfg.max_input_spacing:
        raise InputError(f"voxel spacing {np.round(spacing_in, 2).tolist()} mm is coarser than "
                         f"max_input_spacing={cfg.max_input_spacing} mm: too low resolution for a T1 model")
    if cfg.brain_extraction.method == "auto":
        cfg = resolve_method(cfg)
    stats: dict[str, Any] = {"input_shape": list(data.shape), "input_spacing": np.round(spacing_in, 3).tolist(),
                             "input_axcodes": "".join(nib.aff2axcodes(affine))}
    image = MetaTensor(torch.as_tensor(data, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    image = Compose([
        Orientation(axcodes=cfg.orientation.upper(), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=cfg.spacing, mode="bilinear"),
    ])(image)
    volume, affine = image[0].numpy().astype(np.float32), image.affine.numpy().astype(np.float64)
    if cfg.n4.enabled:
        volume = n4_correct(volume, affine, cfg.n4)
    brain = None
    if template is not None:
        reg, native_brain, passes = _register(volume, affine, template, cfg)
        stats["brain_extraction"] = cfg.brain_extraction.method
        stats["brain_masks_drawn"] = passes
        stats["tiv_ml"] = round(float(native_brain.sum()) * float(np.prod(cfg.spacing)) / 1000.0, 1)
        stats.update(registration_metric=round(reg.metric, 5), registration_correlation=round(reg.correlation, 4),
                     registration_dice=None if reg.dice is None else round(reg.dice, 4),
                     registration_scales=reg.scales, registration_start=reg.start,
                     registration_problem=reg.problem, registration_matrix=np.round(reg.matrix, 5).tolist())
        volume, affine, brain = reg.image, template.affine, reg.mask
        # the scan's own brain where a network drew it; the template's where the rough mask is all there is
        keep = brain if cfg.brain_extraction.method == "deepbet" else template.mask
        if cfg.brain_mask:
            volume = volume * keep
        mask = keep if cfg.brain_mask else head_mask(volume)
        assert mask is not None  # PreprocessConfig.validate: brain_mask needs a template with a brain mask
        volume, window = normalise(volume, mask, cfg.percentiles)
    else:
        volume, window = normalise(volume, head_mask(volume), cfg.percentiles)
        volume, affine = _crop_to_shape(volume, affine, cfg.shape)
        mask = head_mask(volume) if volume.any() else volume > 0
    if not volume.any():
        raise InputError("empty after preprocessing (no head above the background)")
    mask = mask & (volume > 0.05)  # tissue actually present, also inside a fixed template mask
    stats.update(intensity_window=[round(v, 3) for v in window],
                 foreground_ml=round(float(mask.sum()) * float(np.prod(cfg.spacing)) / 1000.0, 1),
                 foreground_mean=round(float(volume[mask].mean()) if mask.any() else 0.0, 4))
    return Preprocessed(volume, affine, stats, brain)


# a brain-extraction network sees the head as trained (upright) within this; a scan tipped further is extracted
# again on the registered (upright) grid, and registered again with that mask
_MAX_TILT = 20.0
_MAX_DRAWN = 4
# the pose of a mask drawn on the scan's own grid: no template->scan transform (a pose, not a volume's affine)
_DRAWN_ON_THE_SCANS_GRID = np.eye(4)


def _register(volume: np.ndarray, affine: np.ndarray, template: Template, cfg: PreprocessConfig
              ) -> tuple[Registration, np.ndarray, int]:
    """Brain mask, then registration; (the best registration, the brain mask on the scan's grid, masks drawn)."""
    be = cfg.brain_extraction
    drawn = 0

    def attempt(brain: np.ndarray, pose: np.ndarray | None) -> tuple[Registration, np.ndarray]:
        # pose: the template->scan matrix of the grid the mask was drawn on (identity: the scan's own; None: not
        # drawn by the network). deepbet, trained on upright heads, misses the brain of a scan tipped by 30 degrees
        # or more (Dice 0.6-0.7 on IXI): once registration has found how the head lies, the network is shown the
        # head upright, and the scan is registered again with that mask, while that improves the fit
        nonlocal drawn
        reg = register_to_template(volume, affine, brain, template, cfg.registration)
        while be.method == "deepbet" and drawn < _MAX_DRAWN and (
                pose is None or tilt_degrees(np.linalg.inv(pose) @ reg.matrix) > _MAX_TILT):
            upright = brain_mask(reg.image, template.affine, be)
            drawn += 1
            again = to_scan_grid(upright, template, reg.matrix, volume.shape, affine) > 0.5
            if not again.any():
                break
            second = register_to_template(volume, affine, again, template, cfg.registration)
            if second.correlation <= reg.correlation:
                break
            reg, brain, pose = second, again, reg.matrix
        return reg, brain

    brain = brain_mask(volume, affine, be)
    drawn += 1 if be.method == "deepbet" else 0
    reg, brain = attempt(brain, _DRAWN_ON_THE_SCANS_GRID)
    if be.method == "deepbet" and reg.correlation < cfg.qc.min_correlation:
        # the network's first mask led the fit astray (a head tipped far enough that the mask took in the scalp):
        # start again from the erosion mask, which does not care how the head lies, and let the network redraw
        other, other_brain = attempt(rough_brain_mask(volume, affine), None)
        if other.correlation > reg.correlation:
            reg, brain = other, other_brain
    return reg, brain, drawn


def preprocess_volume(data: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig,
                      template: Template | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One scan -> (float32 volume of cfg.shape in [0, 1], its affine, statistics for QC)."""
    out = preprocess_scan(data, affine, cfg, template)
    return out.volume, out.affine, out.stats


def _source_digest(path: Path) -> str | None:
    """The SHA-256 of a scan (file, or a DICOM folder's files), or None where it cannot be read (loading it then
    says why)."""
    try:
        return content_sha256(path)
    except OSError:
        return None


@dataclass
class _Job:
    scan: ScanRecord
    out_path: Path
    qc_png: Path
    cfg: PreprocessConfig
    cfg_hash: str
    # SHA-256 of the registration template's files (None: no registration)
    template_sha256: str | None = None

    @property
    def stem(self) -> str:
        return self.out_path.name.removesuffix(".nii.gz")

    @property
    def sidecar(self) -> Path:
        """Written last after a success: an image without it is redone."""
        return self.out_path.with_name(f"{self.stem}.json")

    @property
    def mask_path(self) -> Path:
        """The scan's own brain mask on the output grid (uint8), where brain extraction ran."""
        return self.out_path.parent.parent / "masks" / self.out_path.name

    @property
    def failure_record(self) -> Path:
        """Written instead of the image when the scan fails, so an assembly lists the failure without redoing it."""
        return self.out_path.with_name(f"{self.stem}.failed.json")


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (1-based) of ``count`` deterministic shares of a cohort's scans, for a SLURM array job."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not sep or shard is None or not 1 <= shard.index <= shard.count:
            raise InputError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 3/10 for the third of "
                             "ten shards (shards are numbered from 1)")
        return shard

    def owns(self, stem: str) -> bool:
        return shard_of(stem, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(stem: str, count: int) -> int:
    """The shard (1..count) that preprocesses the scan written as ``images/<stem>.nii.gz``.

    A hash of the scan's own output name, not its position in the discovered list: shards that discover a
    cohort which is still growing still agree on who owns each scan, so no two write the same file."""
    return 1 + int(hashlib.sha256(stem.encode()).hexdigest()[:12], 16) % count


# a damaged sidecar stands in for what changed: the scan is redone, and the run says why
_DAMAGED = "damaged sidecar"


def _made_from(job: _Job, source_sha: str | None) -> dict[str, Any]:
    """What a scan's output is made from, as its sidecar (and failure record) records it."""
    return {"config_hash": job.cfg_hash, "source": str(job.scan.path), "source_sha256": source_sha,
            "template_sha256": job.template_sha256}


def _changes(previous: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between what made an earlier result and what would make it now (empty: the same)."""
    def place(source: Any) -> str | None:
        # the same file however the input dir was spelled (relative, absolute, through a symlink)
        return str(Path(source).resolve()) if isinstance(source, str) and source else None

    changed = []
    if previous.get("config_hash") != now["config_hash"]:
        changed.append("config")
    if place(previous.get("source")) != place(now["source"]):
        changed.append("source path")
    if previous.get("source_sha256") != now["source_sha256"]:
        changed.append("source content")
    if previous.get("template_sha256") != now["template_sha256"]:
        changed.append("template")
    return changed


def _read_record(path: Path) -> dict[str, Any] | None:
    """A sidecar or failure record, or None when it is damaged (not JSON, or not the object medldm writes)."""
    try:
        record = read_json(path)
    except InputError:
        return None
    return record if isinstance(record, dict) else None


def _recorded_result(job: _Job, source_sha: str | None, failures_too: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """The result an earlier run (or shard) left for this scan, when it was made from this source (path and
    content) with these settings and this template; else (None, what changed since it was made: empty if none was)."""
    now = _made_from(job, source_sha)
    changed: list[str] = []
    if job.out_path.is_file() and job.sidecar.is_file():
        previous = _read_record(job.sidecar)
        changed = [_DAMAGED] if previous is None or "stats" not in previous else _changes(previous, now)
        if not changed:
            assert previous is not None  # a record that could not be read is _DAMAGED
            if not job.qc_png.is_file():  # qc/ was deleted: redraw the picture, keep the volume
                save_png(job.qc_png, three_plane(load_volume(job.out_path)[0]))
            return {**previous, "resumed": True}, []
    if failures_too and job.failure_record.is_file():
        previous = _read_record(job.failure_record)
        if previous is not None and "error" in previous:
            failure_changed = _changes(previous, now)
            if not failure_changed:
                return {"error": previous["error"], "resumed": True}, []
            changed = changed or failure_changed
    return None, changed


def _run_job(job: _Job) -> dict[str, Any]:
    """Preprocess one scan to its output file (or reuse it); never raises: a bad scan is a result with an error.

    The result says what ``changed`` when an earlier output of this scan was there but made from something else."""
    source_sha = _source_digest(job.scan.path)  # once per run: it decides the resume and goes into the sidecar
    previous, changed = _recorded_result(job, source_sha, failures_too=False)  # earlier failures are tried again
    if previous is not None:
        return previous
    try:
        data, affine = load_volume(job.scan.path, first_volume_of_4d=job.cfg.use_first_volume_of_4d)
        if source_sha is None:  # readable now, but not when it was hashed: hash it again, or fail with the reason
            source_sha = content_sha256(job.scan.path)
        template = load_template(job.cfg) if job.cfg.registration.enabled else None
        out = preprocess_scan(data, affine, job.cfg, template)
        save_volume(job.out_path, out.volume, out.affine, descrip=f"medldm {__version__} preprocessed",
                    dtype=job.cfg.output_dtype)
        if out.brain is not None:
            save_volume(job.mask_path, out.brain.astype(np.uint8), out.affine, descrip="medldm brain mask",
                        dtype="uint8")
        else:
            job.mask_path.unlink(missing_ok=True)
        save_png(job.qc_png, three_plane(out.volume))
        # the template this process registered to (the same as the run's, unless it was replaced meanwhile)
        result = {**_made_from(job, source_sha), "template_sha256": template.sha256 if template else None,
                  "stats": out.stats}
        write_json(job.sidecar, result)  # last: an image without its sidecar is redone by the next run
        job.failure_record.unlink(missing_ok=True)
        return {**result, "resumed": False, "changed": changed}
    except Exception as e:  # one bad scan must not stop a batch of thousands
        error = f"{job.scan.path}: {e}"
        if not isinstance(e, (UserError, OSError, RuntimeError, MemoryError)):  # ITK's failures are RuntimeErrors
            # not a property of the scan: the stack goes to the log so that a bug does not pass for bad input
            log.error("%s: unexpected %s (a bug in medldm? please report it)", job.scan.path, type(e).__name__,
                      exc_info=True)
        # what an earlier run made of this scan with other settings is stale now
        for stale in (job.sidecar, job.out_path, job.qc_png, job.mask_path):
            stale.unlink(missing_ok=True)
        try:
            write_json(job.failure_record, {**_made_from(job, source_sha), "error": error})
        except OSError as write_error:
            log.warning("%s: cannot record the failure (%s)", job.failure_record, write_error)
        return {"error": error, "resumed": False, "changed": changed}


def _say_redone(jobs: list[_Job], results: list[dict[str, Any]]) -> int:
    """Log each scan preprocessed again because its earlier output was made from something else; how many were."""
    redone = [(j, r["changed"]) for j, r in zip(jobs, results) if r.get("changed")]
    for j, changed in redone:
        if changed == [_DAMAGED]:
            log.warning("%s is damaged: %s was preprocessed again", j.sidecar, j.scan.path)
        else:
            log.info("images/%s was made from something else: preprocessed again from %s (changed: %s)",
                     j.out_path.name, j.scan.path, ", ".join(changed))
    return len(redone)


def _one_thread() -> None:
    """Worker setup: one thread each for torch and SimpleITK, so N workers use N cores."""
    import SimpleITK as sitk

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _previous_splits(output_dir: Path) -> dict[str, str]:
    path = output_dir / "manifest.csv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {r["subject_id"]: r["split"] for r in csv.DictReader(f)}


def preprocess_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    cfg: PreprocessConfig,
    metadata: str | Path | None = None,
    adnimerge: str | Path | None = None,
    workers: int = 1,
    shard: Shard | None = None,
    assemble: bool = False,
) -> dict[str, Any]:
    """Discover, preprocess and split every scan under ``input_dir``; write the dataset dir; return a summary.

    Rerunning on the same output dir keeps a scan's output when it was made from the same source (path and
    SHA-256) with the same per-scan settings and template, redoes it otherwise (and says why), and keeps every
    earlier subject in its split. With ``shard`` only that shard's scans are preprocessed and only their
    per-scan files are written; ``assemble`` preprocesses nothing and builds the dataset from those files.
    """
    # absolute: sidecars and the manifest record where each scan came from, and a rerun or --assemble from
    # another working directory must find the same paths there
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir)
    cfg = resolve_method(cfg)  # brain_extraction.method=auto becomes what runs here, before the settings are hashed
    if shard is not None and assemble:
        raise InputError("--shard and --assemble exclude each other: run the shards first, then --assemble once")
    if output_dir.resolve().is_relative_to(input_dir.resolve()):
        raise InputError(f"output dir {output_dir} is inside the input dir {input_dir}: the next run would "
                         "discover its own outputs; choose an output dir outside the input")
    template_sha = None
    if cfg.registration.enabled:
        # a missing template is one clear error now, not one per scan; an assembly only needs to know which it was
        template_sha = template_sha256(cfg.registration) if assemble else load_template(cfg).sha256
    found = discover_scans(input_dir, metadata=metadata, adnimerge=adnimerge,
                           description_patterns=cfg.description_patterns, preferred_types=cfg.preferred_types,
                           one_scan_per_visit=cfg.one_scan_per_visit)
    for where, what in found.warnings:
        log.warning("%s: %s", where, what)
    if not found.scans:
        reasons = "; ".join(f"{p}: {r}" for p, r in found.skipped[:5])
        raise InputError(f"no usable scans found under {input_dir}" + (f" ({reasons})" if reasons else ""))
    cfg_hash = config_hash(cfg)
    jobs = _plan_jobs(found.scans, output_dir, cfg, cfg_hash, template_sha)

    if shard is not None:
        return _run_shard(output_dir, [j for j in jobs if shard.owns(j.stem)], shard, workers, len(jobs), cfg_hash)
    if assemble:
        results = _recorded_results(output_dir, jobs, workers)
    else:
        log.info("preprocessing %d scans with %d worker(s)", len(jobs), workers)
        results = _process(jobs, workers)
    return _write_dataset(input_dir, output_dir, cfg, jobs, results, found.skipped, metadata, adnimerge)


def _plan_jobs(scans: list[ScanRecord], output_dir: Path, cfg: PreprocessConfig, cfg_hash: str,
               template_sha: str | None = None) -> list[_Job]:
    visits = Counter((s.subject_id, s.session) for s in scans)
    jobs = []
    for scan in scans:
        # subject_session names the file; the image id is added only where a visit has several scans
        stem = f"{scan.subject_id}_{scan.session}"
        if visits[(scan.subject_id, scan.session)] > 1:
            stem += f"_{scan.image_id}"
        stem = _safe_name(stem)
        jobs.append(_Job(scan, output_dir / "images" / f"{stem}.nii.gz", output_dir / "qc" / "scans" / f"{stem}.png",
                         cfg, cfg_hash, template_sha))
    return jobs


def _process(jobs: list[_Job], workers: int, desc: str = "preprocess") -> list[dict[str, Any]]:
    if workers > 1 and len(jobs) > 1:
        # fork (as torch's DataLoader does) works from scripts and notebooks without a __main__ guard
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_one_thread) as pool:
            return list(tqdm(pool.map(_run_job, jobs), total=len(jobs), desc=desc, unit="scan"))
    return [_run_job(j) for j in tqdm(jobs, desc=desc, unit="scan")]


def _shard_record(output_dir: Path, shard: Shard) -> Path:
    return output_dir / "shards" / f"shard_{shard.index:04d}_of_{shard.count:04d}.json"


def _run_shard(output_dir: Path, jobs: list[_Job], shard: Shard, workers: int, total: int,
               cfg_hash: str) -> dict[str, Any]:
    """Preprocess one shard's scans; its per-scan files and ``shards/<shard>.json`` are all it writes."""
    counts = {count for _, count in _shard_records(output_dir, cfg_hash)} - {shard.count}
    if counts:  # e.g. one task of an array resubmitted alone, which SLURM reports as an array of one
        raise InputError(f"{output_dir / 'shards'} holds records of {sorted(counts)} shards made with these settings, "
                         f"but this is --shard {shard}: use the same N (with scripts/slurm_preprocess.sbatch: "
                         f"--export=ALL,SHARDS={min(counts)}), or delete {output_dir / 'shards'} to split the "
                         "cohort anew")
    log.info("shard %s: preprocessing %d of the %d scans with %d worker(s)", shard, len(jobs), total, workers)
    record = _shard_record(output_dir, shard)
    summary: dict[str, Any] = {"shard": str(shard), "finished": False, "config_hash": cfg_hash,
                               "num_scans": len(jobs), "of_scans": total, "images": [j.out_path.name for j in jobs],
                               "host": socket.gethostname(), "versions": versions()}
    write_json(record, summary)  # "started": an assembly can name a shard that never finished
    started = time.time()
    results = _process(jobs, workers, desc=f"shard {shard}")
    failures = [{"path": str(j.scan.path), "error": r["error"]} for j, r in zip(jobs, results) if "error" in r]
    for f in failures:
        log.warning("failed: %s", f["error"])
    summary.update(finished=True, resumed=sum(r["resumed"] for r in results), redone_changed=_say_redone(jobs, results),
                   failures=failures, seconds=round(time.time() - started, 1))
    write_json(record, summary)
    return summary


def _shard_records(output_dir: Path, cfg_hash: str) -> dict[tuple[int, int], bool]:
    """(index, count) -> finished, for every shard that ran into ``output_dir`` with these settings."""
    records = {}
    for path in (output_dir / "shards").glob("shard_*_of_*.json"):
        try:
            r = read_json(path)
            if r.get("config_hash") == cfg_hash:
                index, count = map(int, r["shard"].split("/"))
                records[(index, count)] = bool(r.get("finished"))
        except (InputError, AttributeError, KeyError, ValueError):
            continue  # a damaged record names no shard
    return records


def _recorded_results(output_dir: Path, jobs: list[_Job], workers: int = 1) -> list[dict[str, Any]]:
    """Every scan's result as the shards left it, made from the scan as it is now; an error naming what is missing
    or was made from something else (and whose it is) otherwise."""
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib lets go of the GIL: the sources are read side by side
        digests = list(pool.map(_source_digest, [j.scan.path for j in jobs]))
    recorded = [_recorded_result(j, sha, failures_too=True) for j, sha in zip(jobs, digests)]
    results = [r for r, _ in recorded]
    missing = [(j, changed) for j, (r, changed) in zip(jobs, recorded) if r is None]
    if not missing:
        log.info("assembling %d scans from their per-scan results (none preprocessed here)", len(jobs))
        return cast("list[dict[str, Any]]", results)  # none missing: every result is a record
    records = _shard_records(output_dir, missing[0][0].cfg_hash)
    where = ""
    if records:
        n = Counter(count for _, count in records).most_common(1)[0][0]
        owners = sorted({shard_of(j.stem, n) for j, _ in missing})
        unfinished = [i for i in owners if not records.get((i, n))]
        where = (f"; they belong to shard(s) {', '.join(f'{i}/{n}' for i in owners[:20])}"
                 + (f", of which {', '.join(f'{i}/{n}' for i in unfinished[:20])} never finished"
                    if unfinished else ""))
    examples = ", ".join(str(j.scan.path) + (f" ({', '.join(changed)} changed since its result was made)" if changed
                                             else "") for j, changed in missing[:3])
    raise InputError(f"--assemble: {len(missing)} of {len(jobs)} scans have no result made from their current source "
                     f"with these settings and template in {output_dir / 'images'} (e.g. {examples}){where}: run those "
                     "shards again with the same config (--shard I/N), or run without --assemble to preprocess the "
                     "missing scans here")


def _write_dataset(input_dir: Path, output_dir: Path, cfg: PreprocessConfig, jobs: list[_Job],
                   results: list[dict[str, Any]], skipped: list[tuple[str, str]], metadata: str | Path | None,
                   adnimerge: str | Path | None) -> dict[str, Any]:
    """manifest.csv, splits, failures.csv, preprocess.json and qc/ from every scan's result."""
    failures = [(str(j.scan.path), r["error"]) for j, r in zip(jobs, results) if "error" in r]
    done = [(j, r) for j, r in zip(jobs, results) if "error" not in r]
    for _, err in failures:
        log.warning("failed: %s", err)
    _write_failures(output_dir / "failures.csv", failures)
    if not done:
        raise InputError(f"all {len(jobs)} scans failed to preprocess; first error: {failures[0][1]}")
    resumed = sum(r["resumed"] for _, r in done)
    if resumed:
        log.info("%d scans were already preprocessed from the same source with these settings and were kept", resumed)
    redone = _say_redone(jobs, results)
    if redone:
        log.info("%d scans were preprocessed again: their earlier output was made from another source, config "
                 "or template (or its sidecar was damaged)", redone)

    # QC first: a scan whose registration failed is kept out of the splits (by default), so no split is drawn for it
    verdicts = assess([r["stats"] for _, r in done], cfg.qc)
    excluded = [cfg.qc.exclude_failed and status == "fail" for status, _ in verdicts]
    diagnosis = {j.scan.subject_id: _map_diagnosis(j.scan.diagnosis, cfg) for (j, _), x in zip(done, excluded) if not x}
    split = assign_splits(diagnosis, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed,
                          stratify=cfg.split.stratify, previous=_previous_splits(output_dir))
    rows = []
    for (j, r), x, (status, _) in zip(done, excluded, verdicts):
        s = j.scan
        tiv = r["stats"].get("tiv_ml")
        rows.append({
            "subject_id": s.subject_id, "session": s.session, "image": f"images/{j.out_path.name}",
            "age": "" if s.age is None else f"{s.age:.2f}", "sex": s.sex or "",
            "diagnosis": _map_diagnosis(s.diagnosis, cfg) or "", "split": "excluded" if x else split[s.subject_id],
            "qc_status": status, "tiv_ml": "" if tiv is None else tiv,
            "source": str(s.path), "source_sha256": r["source_sha256"],
        })
    _write_manifest(output_dir / "manifest.csv", rows)
    qc_failed = [{"image": row["image"], "source": row["source"], "split": row["split"], "reasons": reasons}
                 for row, (status, reasons) in zip(rows, verdicts) if status == "fail"]
    for f in qc_failed:
        log.warning("QC failed%s: %s (%s)", ", excluded" if f["split"] == "excluded" else "", f["image"],
                    "; ".join(f["reasons"]))

    # synthetic volumes are written on the grid of the first training volume (the template grid when registered)
    reference = next((r for r in rows if r["split"] == "train"), rows[0])
    ref_affine = cast("nib.spatialimages.SpatialImage", nib.load(str(output_dir / reference["image"]))).affine
    info = {
        "config": to_dict(cfg),
        "config_hash": jobs[0].cfg_hash,
        # the registration template's content (None: no registration); latents made from the data depend on it
        "template_sha256": jobs[0].template_sha256,
        "versions": versions(),
        "input_dir": str(input_dir.resolve()),
        "metadata": str(metadata) if metadata else None,
        "adnimerge": str(adnimerge) if adnimerge else None,
        "num_scans": len(rows),
        "num_subjects": len({r["subject_id"] for r in rows}),
        "resumed": resumed,
        # scans whose earlier output was there but made from another source, config or template: redone
        "redone_changed": redone,
        "splits": {k: sum(r["split"] == k for r in rows) for k in ("train", "val", "test", "excluded")},
        "qc": {status: sum(v[0] == status for v in verdicts) for status in ("pass", "warn", "fail")},
        "qc_failed": qc_failed,
        "failures": [{"path": p, "error": e} for p, e in failures],
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "reference": {"image": reference["image"], "affine": ref_affine.tolist(), "shape": list(cfg.shape),
                      "spacing": list(cfg.spacing)},
    }
    write_json(output_dir / "preprocess.json", info)
    info["outliers"] = write_qc(output_dir, rows, [r["stats"] for _, r in done], verdicts)
    if all(excluded):
        raise InputError(f"all {len(done)} preprocessed scans failed registration QC (e.g. {qc_failed[0]['image']}: "
                         f"{'; '.join(qc_failed[0]['reasons'])}): see {output_dir / 'qc' / 'index.html'}")
    return info


def _map_diagnosis(raw: str | None, cfg: PreprocessConfig) -> str | None:
    table = {k.upper(): v for k, v in cfg.diagnosis_map.items()}
    return table.get(raw.strip().upper()) if raw else None


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(path, list(MANIFEST_COLUMNS), rows)


def _write_failures(path: Path, failures: list[tuple[str, str]]) -> None:
    """failures.csv: one row per failed scan (a header alone when none failed, so a stale list never stays)."""
    write_csv(path, ["path", "error"], [{"path": p, "error": e} for p, e in failures])
