"""Preprocessing speed: seconds per scan and scans per minute with 1 and 2 workers.

    python benchmarks/preprocess_speed.py IXI_DIR WORK_DIR [--config configs/preprocess/ixi.yaml]

IXI_DIR is a flat folder with participants.csv (e.g. ../shared/data/ixi-t1-2mm). Runs (1) N scans with 1 worker,
(2) all scans with 2 workers, (3) 1 mm ADNI-sized volumes (IXI scans resampled to 1 mm, about 240x240x180)
with 1 and 2 workers through the ADNI config, all with the full pipeline (N4 + affine registration to
MNI152 + brain mask; needs nilearn: `pip install -e ".[mni]"`). Prints a Markdown table for benchmarks/RESULTS.md.
The outputs of run (2) keep their QC sheet.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medldm.config import load_config
from medldm.data.preprocess import preprocess_dataset


def subset(src: Path, dst: Path, n: int, one_mm: bool = False) -> Path:
    """A flat folder with the first ``n`` scans of ``src`` (resampled to 1 mm when asked)."""
    (dst / "images").mkdir(parents=True, exist_ok=True)
    with (src / "participants.csv").open() as f:
        rows = list(csv.DictReader(f))[:n]
    for r in rows:
        target = dst / r["file"]
        if one_mm:
            img = nib.load(src / r["file"])
            zoom = np.array(img.header.get_zooms()[:3])
            data = ndimage.zoom(np.asanyarray(img.dataobj, dtype=np.float32), zoom, order=1)
            affine = img.affine.copy()
            affine[:3, :3] /= zoom
            nib.save(nib.Nifti1Image(data, affine), target)
        else:
            shutil.copy(src / r["file"], target)
    with (dst / "participants.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def run(name: str, data: Path, out: Path, cfg, workers: int, table: list) -> None:
    start = time.perf_counter()
    info = preprocess_dataset(data, out, cfg, workers=workers)
    seconds = time.perf_counter() - start
    n = info["num_scans"] + len(info["failures"])
    shape = nib.load(next((data / "images").iterdir())).shape
    table.append((name, "x".join(map(str, shape)), workers, n, seconds / n * workers, n / seconds * 60,
                  len(info["failures"]), len(info["outliers"])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ixi", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--config", type=Path, default=Path("configs/preprocess/ixi.yaml"))
    parser.add_argument("--config-1mm", type=Path, default=Path("configs/preprocess/adni.yaml"),
                        help="config for the 1 mm volumes (ADNI: 1.5 mm output in MNI space)")
    parser.add_argument("--n", type=int, default=12, help="scans in the 1-worker run")
    parser.add_argument("--n-1mm", type=int, default=4)
    parser.add_argument("--only-1mm", action="store_true", help="skip the 2 mm runs")
    args = parser.parse_args()
    cfg = load_config("preprocess", args.config)
    cfg_1mm = load_config("preprocess", args.config_1mm)
    table: list = []
    one_mm = subset(args.ixi, args.work / "in_1mm", args.n_1mm, one_mm=True)
    if not args.only_1mm:
        small = subset(args.ixi, args.work / "in_small", args.n)
        run("IXI 2 mm", small, args.work / "out_small_w1", cfg, 1, table)
        run("IXI 2 mm, all", args.ixi, args.work / "out_all_w2", cfg, 2, table)
    run("IXI resampled to 1 mm", one_mm, args.work / "out_1mm_w1", cfg_1mm, 1, table)
    run("IXI resampled to 1 mm", one_mm, args.work / "out_1mm_w2", cfg_1mm, 2, table)
    cpu = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\nPreprocessing speed, {args.config.name} / {args.config_1mm.name} (1 mm), {cpu}, {dt.date.today()}\n")
    print("| input | shape | workers | scans | s per scan per worker | scans per minute | failed | flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| {} | {} | {} | {} | {:.1f} | {:.1f} | {} | {} |".format(*row))


if __name__ == "__main__":
    main()
