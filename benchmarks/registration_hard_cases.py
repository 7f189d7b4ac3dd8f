"""Registration of hard cases made from real scans: does each register, or is it flagged? None may be silently wrong.

    python benchmarks/registration_hard_cases.py IXI_DIR [--n 5] [--config configs/preprocess/ixi.yaml] [--out DIR]

Takes the first N scans of a flat folder with participants.csv (e.g. ../shared/data/ixi-t1-2mm), makes every case of
medldm.data.hard_cases from each (rotations of 30-90 degrees, a 5 cm shift, 2 mm and 1x1x5 mm voxels, a larger field of
view, a strong bias field, a sagittal stack marked axial), preprocesses them with the config (N4, brain extraction,
registration to MNI152: needs nilearn and deepbet) and compares each with the same scan preprocessed as it came.
A case is *right* when its registered brain mask has Dice >= 0.9 with the unchanged scan's. Prints a Markdown table:
right and passed, flagged (failed QC), and wrong but passed (silent: must be 0). With --out, writes a three-plane
picture of every case for a look.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medldm.config import load_config
from medldm.data.brain import resolve_method
from medldm.data.hard_cases import CASES
from medldm.data.io import load_volume
from medldm.data.preprocess import _one_thread, preprocess_scan
from medldm.data.qc import assess
from medldm.data.registration import load_template
from medldm.viz import grid, save_png, three_plane

_STATE: dict = {}


def _job(args: tuple[str, str, str, list[str]]) -> dict:
    path, case, config, overrides = args
    cfg = resolve_method(load_config("preprocess", config, overrides))
    template = load_template(cfg)
    vol, affine = load_volume(path)
    if case != "as acquired":
        vol, affine, _ = CASES[case](vol, affine, None)
    start = time.perf_counter()
    try:
        out = preprocess_scan(vol, affine, cfg, template)
    except ValueError as e:
        return {"path": path, "case": case, "error": str(e)}
    return {"path": path, "case": case, "seconds": time.perf_counter() - start, "stats": out.stats,
            "brain": out.brain, "picture": three_plane(out.volume)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--config", default="configs/preprocess/ixi.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for a picture of every case")
    args = parser.parse_args()
    # a 1x1x5 mm stack is coarser than ixi.yaml's input limit (3 mm): allowed here, since that is the case
    overrides = ["max_input_spacing=5.5"]
    cfg = load_config("preprocess", args.config, overrides)
    with (args.data / "participants.csv").open() as f:
        paths = [str(args.data / r["file"]) for r in list(csv.DictReader(f))[: args.n]]
    jobs = [(p, c, args.config, overrides) for p in paths for c in ["as acquired", *CASES]]
    with ProcessPoolExecutor(args.workers, initializer=_one_thread) as pool:
        results = list(pool.map(_job, jobs))
    reference = {r["path"]: r for r in results if r["case"] == "as acquired"}
    table = {c: {"right, passed": 0, "flagged": 0, "wrong, passed (silent)": 0, "error": 0}
             for c in ["as acquired", *CASES]}
    rows = []
    for r in results:
        counts = table[r["case"]]
        if "error" in r:
            counts["error"] += 1
            rows.append((Path(r["path"]).name, r["case"], "error", r["error"][:80], "", ""))
            continue
        ref = reference[r["path"]]["brain"]
        dice = 2 * (r["brain"] & ref).sum() / (r["brain"].sum() + ref.sum())
        [(status, reasons)] = assess([r["stats"]], cfg.qc)  # the absolute floors (a cohort's z needs a cohort)
        right = dice >= 0.9
        if status == "fail":
            counts["flagged"] += 1
        elif right:
            counts["right, passed"] += 1
        else:
            counts["wrong, passed (silent)"] += 1
        s = r["stats"]
        rows.append((Path(r["path"]).name, r["case"], status, f"{s['registration_correlation']:.3f}",
                     f"{dice:.3f}", f"{r['seconds']:.1f}"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for p in paths:
            tiles = [r["picture"] for r in results if r["path"] == p and "picture" in r]
            save_png(args.out / (Path(p).name.removesuffix(".nii.gz") + ".png"), grid(tiles, columns=4), min_size=0)
    print(f"\nRegistration hard cases, {args.config}, {len(paths)} scans of {args.data.name}, "
          f"{platform.machine()} {os.cpu_count()} cores, {dt.date.today()}\n")
    print("| case | " + " | ".join(next(iter(table.values()))) + " |")
    print("|---" * (1 + len(next(iter(table.values())))) + "|")
    for case, counts in table.items():
        print(f"| {case} | " + " | ".join(str(v) for v in counts.values()) + " |")
    seconds = [float(r[5]) for r in rows if r[5]]
    print(f"\nseconds per case (one core): median {np.median(seconds):.1f}, max {max(seconds):.1f}\n")
    print("| scan | case | QC | correlation | Dice with as-acquired | s |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
