"""Preprocessing: one scan -> oriented, resampled, normalised, cropped volume; a whole download -> dataset dir."""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForeground, Orientation, ResizeWithPadOrCrop, ScaleIntensityRangePercentiles, Spacing
from tqdm.auto import tqdm

from medldm.config import PreprocessConfig, to_dict
from medldm.data.dataset import MANIFEST_COLUMNS
from medldm.data.discovery import ScanRecord, discover_scans
from medldm.data.io import atomic_path, load_volume, save_volume, write_json
from medldm.data.splits import assign_splits
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

log = logging.getLogger(__name__)


def _is_head(x: torch.Tensor) -> torch.Tensor:
    # after [0, 1] normalisation, air is near 0; a low threshold keeps the scalp
    return x > 0.05


def scan_transform(cfg: PreprocessConfig) -> Compose:
    """MONAI transforms applied to one channel-first MetaTensor scan."""
    lo, hi = cfg.percentiles
    return Compose([
        Orientation(axcodes=cfg.orientation.upper(), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=cfg.spacing, mode="bilinear"),
        ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
        # centre the head, not the field of view, before the fixed-size crop/pad
        CropForeground(select_fn=_is_head, margin=2, allow_smaller=True),
        ResizeWithPadOrCrop(spatial_size=cfg.shape),
    ])


def preprocess_volume(data: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess an array with its affine; returns (float32 volume of cfg.shape, its affine)."""
    image = MetaTensor(torch.as_tensor(data, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    out = scan_transform(cfg)(image)
    return out[0].numpy().astype(np.float32), out.affine.numpy().astype(np.float64)


@dataclass
class _Job:
    scan: ScanRecord
    out_path: Path
    cfg: PreprocessConfig


def _run_job(job: _Job) -> tuple[str | None, str | None]:
    """Preprocess one scan to its output file; returns (error, None) or (None, out_path)."""
    try:
        data, affine = load_volume(job.scan.path)
        volume, out_affine = preprocess_volume(data, affine, job.cfg)
        if float(volume.max()) <= 0.0:
            return f"{job.scan.path}: empty after preprocessing (no head found above the background)", None
        save_volume(job.out_path, volume, out_affine, descrip=f"medldm preprocessed {job.scan.image_id}")
        return None, str(job.out_path)
    except Exception as e:  # one bad scan must not stop a batch of thousands
        return f"{job.scan.path}: {e}", None


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def preprocess_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    cfg: PreprocessConfig,
    metadata: str | Path | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Discover, preprocess and split every scan under ``input_dir``; write the dataset dir; return a summary."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    found = discover_scans(input_dir, metadata=metadata, description_patterns=cfg.description_patterns)
    if not found.scans:
        reasons = "; ".join(f"{p}: {r}" for p, r in found.skipped[:5])
        raise ValueError(f"no usable scans found under {input_dir}" + (f" ({reasons})" if reasons else ""))
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    visits = Counter((s.subject_id, s.session) for s in found.scans)
    jobs = []
    for scan in found.scans:
        # subject_session names the file; the image id is added only where a visit has several scans
        stem = f"{scan.subject_id}_{scan.session}"
        if visits[(scan.subject_id, scan.session)] > 1:
            stem += f"_{scan.image_id}"
        name = _safe_name(stem) + ".nii.gz"
        jobs.append(_Job(scan, images_dir / name, cfg))
    log.info("preprocessing %d scans with %d worker(s)", len(jobs), workers)
    if workers > 1:
        # fork (as torch's DataLoader does) works from scripts and notebooks without a __main__ guard;
        # one thread per worker so that N workers use N cores
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            results = list(tqdm(pool.map(_run_job, jobs), total=len(jobs), desc="preprocess", unit="scan"))
    else:
        results = [_run_job(j) for j in tqdm(jobs, desc="preprocess", unit="scan")]

    failures = [(str(j.scan.path), err) for j, (err, _) in zip(jobs, results) if err]
    done = [j for j, (err, _) in zip(jobs, results) if not err]
    for path, err in failures:
        log.warning("failed: %s", err)
    if not done:
        raise ValueError(f"all {len(jobs)} scans failed to preprocess; first error: {failures[0][1]}")

    split = assign_splits((j.scan.subject_id for j in done), cfg.split.val_fraction, cfg.split.test_fraction,
                          cfg.split.seed)
    rows = []
    for j in done:
        s = j.scan
        dx = cfg.diagnosis_map.get(s.diagnosis.strip().upper()) if s.diagnosis else None
        rows.append({
            "subject_id": s.subject_id, "session": s.session, "image": f"images/{j.out_path.name}",
            "age": "" if s.age is None else f"{s.age:.2f}", "sex": s.sex or "", "diagnosis": dx or "",
            "split": split[s.subject_id], "source": str(s.path),
        })
    _write_manifest(output_dir / "manifest.csv", rows)
    if failures:
        _write_failures(output_dir / "failures.csv", failures)

    # synthetic volumes are written on the grid of the first training volume
    reference = next((r for r in rows if r["split"] == "train"), rows[0])
    ref_affine = nib.load(str(output_dir / reference["image"])).affine
    counts = {k: sum(r["split"] == k for r in rows) for k in ("train", "val", "test")}
    info = {
        "config": to_dict(cfg),
        "versions": versions(),
        "input_dir": str(input_dir.resolve()),
        "metadata": str(metadata) if metadata else None,
        "num_scans": len(rows),
        "num_subjects": len(split),
        "splits": counts,
        "failures": [{"path": p, "error": e} for p, e in failures],
        "skipped": [{"path": p, "reason": r} for p, r in found.skipped],
        "reference": {"image": reference["image"], "affine": ref_affine.tolist(), "shape": list(cfg.shape),
                      "spacing": list(cfg.spacing)},
    }
    write_json(output_dir / "preprocess.json", info)
    _write_qc(output_dir, rows)
    return info


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = atomic_path(path)
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_failures(path: Path, failures: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "error"])
        writer.writerows(failures)


def _write_qc(output_dir: Path, rows: list[dict[str, Any]], limit: int = 48) -> None:
    """qc/overview.png: three mid-planes of (up to ``limit``) preprocessed volumes, manifest order."""
    tiles = [three_plane(load_volume(output_dir / r["image"])[0]) for r in rows[:limit]]
    save_png(output_dir / "qc" / "overview.png", grid(tiles, columns=4))
