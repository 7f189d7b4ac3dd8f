"""`medldm evaluate` at cohort size: wall time and peak memory of the CLI for N synthetic samples.

    python benchmarks/evaluate_scale.py --out OUT [--num 1000 10000] [--data DATASET] [--phantoms 12]
                                        [--timeout SECONDS] [--set KEY=VALUE ...]

Without ``--data`` a tiny phantom dataset (the default preprocess config: 32^3 at 6 mm) is made in OUT/dataset.
For each N, OUT/samples_N gets N synthetic volumes on the dataset's grid (a val or test volume, never a training
one, with its intensity scaled by a few percent and noise inside the head; every 25th is pure noise, so some are
implausible), each with a JSON sidecar (seed, requested age); they are kept for a rerun. Then
`medldm evaluate --data DATASET --out OUT/report_N --samples OUT/samples_N` runs as a subprocess, as a user runs it;
its wall time and peak RSS (``os.wait4``) go to OUT/evaluate_scale.json and a printed Markdown table (the machine
and date with them). Timings include whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from medldm.data.dataset import read_dataset_info, read_manifest
from medldm.data.io import load_volume, save_volume, visible, write_json

NOISE_EVERY = 25  # every 25th sample is uniform noise: the implausible ones the verdict sheet shows first


def make_dataset(out: Path, phantoms: int) -> Path:
    """A tiny phantom dataset with train, val and test splits (reused when it is already there)."""
    from medldm.config import load_config
    from medldm.data.phantoms import write_phantoms
    from medldm.data.preprocess import preprocess_dataset

    data = out / "dataset"
    if (data / "manifest.csv").is_file():
        return data
    write_phantoms(out / "raw", phantoms, layout="adni", seed=0)
    cfg = load_config("preprocess", None, ["split.val_fraction=0.2", "split.test_fraction=0.3"])
    preprocess_dataset(out / "raw", data, cfg, workers=2)
    return data


def write_samples(data: Path, folder: Path, num: int) -> None:
    """``num`` synthetic volumes on the dataset's grid with sidecars; an existing complete set is kept."""
    if len(visible(folder, "*.nii.gz")) == num:
        return
    rows = [r for r in read_manifest(data) if r["split"] != "train"]  # bases that are not copies of training brains
    volumes = [load_volume(data / r["image"])[0] for r in rows]
    ages = [r["age"] for r in rows if r.get("age") is not None] or [70.0]
    affine = np.asarray(read_dataset_info(data)["reference"]["affine"])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        rng = np.random.default_rng(i)
        if i % NOISE_EVERY == NOISE_EVERY - 1:
            v = rng.uniform(0, 1, volumes[0].shape)
        else:
            base = volumes[i % len(volumes)]
            noise = rng.normal(0, 0.02, base.shape) * (base > 0)
            v = np.clip(base * rng.uniform(0.97, 1.03) + noise, 0, 1)
        save_volume(folder / f"sample_{i:05d}.nii.gz", v, affine, descrip="SYNTHETIC evaluate_scale", dtype="int16")
        sidecar = {"seed": i, "conditions": {"age": f"{ages[i % len(ages)]:g}"}}
        (folder / f"sample_{i:05d}.json").write_text(json.dumps(sidecar), encoding="utf-8")


def run_evaluate(data: Path, samples: Path, report: Path, overrides: list[str], timeout: float) -> dict[str, Any]:
    """`medldm evaluate` as a subprocess: wall seconds, peak RSS (MiB) and exit code."""
    cmd = [sys.executable, "-m", "medldm", "evaluate", "--data", str(data), "--out", str(report),
           "--samples", str(samples), *[a for o in overrides for a in ("--set", o)]]
    report.mkdir(parents=True, exist_ok=True)
    with (report.parent / f"{report.name}.log").open("w", encoding="utf-8") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline, status, usage = start + timeout, None, None
        while status is None:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                status = None
                if time.perf_counter() > deadline:
                    proc.kill()
                time.sleep(0.2)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert usage is not None  # set with status
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "returncode": proc.returncode,
            "timed_out": wall > timeout, "command": " ".join(cmd)}


def summary(report: Path) -> dict[str, Any]:
    gen = json.loads((report / "report.json").read_text(encoding="utf-8"))["generation"]
    return {"plausible": gen["plausibility"]["plausible"], "flagged": len(gen["memorisation"]["flagged"]),
            "sheet": gen["plausibility"].get("sheet"), "pairs": gen["synthetic"]["pairs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--data", type=Path, help="a medldm dataset dir (default: a tiny phantom one in OUT)")
    parser.add_argument("--phantoms", type=int, default=12, help="phantom subjects when there is no --data")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per evaluate run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluate config override, passed on")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or make_dataset(args.out, args.phantoms)
    result: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
        "dataset": str(data.resolve()), "shape": read_dataset_info(data)["reference"]["shape"], "runs": []}
    for num in args.num:
        samples = args.out / f"samples_{num}"
        write_samples(data, samples, num)
        row = {"num": num, **run_evaluate(data, samples, args.out / f"report_{num}", args.overrides, args.timeout)}
        row["s_per_sample"] = row["wall_s"] / num
        if row["returncode"] == 0:
            row.update(summary(args.out / f"report_{num}"))
        result["runs"].append(row)
        write_json(args.out / "evaluate_scale.json", result)
    print(f"\n{result['date']}, {result['processor']}, {result['cpus']} CPUs, samples of {result['shape']}\n")
    print("| samples | wall s | s per sample | peak RSS MiB | exit |\n|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['num']} | {r['wall_s']:.1f} | {r['s_per_sample']:.4f} | {r['peak_rss_mib']:.0f} | "
              f"{'timed out' if r['timed_out'] else r['returncode']} |")


if __name__ == "__main__":
    main()
