"""What a trained model says about single patients, measured on held-out scans: counterfactual ageing, the inversion
round trip, and anomaly maps of planted lesions.

    python benchmarks/patient_checks.py --data DATASET --run LDM_RUN --out OUT [--num 6] [--years 20] [--steps 50]
                                        [--lesion-mm 16] [--lesion dark|bright] [--seed 0]

For each of the first ``--num`` test-split scans of DATASET (the dataset the run was trained on; those with an age
first), through the
documented commands (`medldm counterfactual`, `medldm anomaly`, one subprocess each):

1. counterfactual ageing: the scan at its own age + ``--years`` (clipped to the model's training range); the
   morphometric change against the reconstruction under its own labels (ventricles, CSF, brain; real brains gain
   ventricle and CSF volume and lose brain volume with age) and the round trip's SSIM;
2. anomaly: the scan as it is, and with a planted lesion (a sphere of ``--lesion-mm`` diameter at a seeded place
   well inside the brain; ``dark``: as dark as the darkest 2 % of the brain, like a T1-hypointense lesion; ``bright``:
   as bright as the brightest 1 %); is the map's peak in the lesion, and does the lesioned scan score higher.

OUT/patient_checks.json holds every number; OUT/<scan>/ the volumes and PNGs (look at them: counterfactual.png,
clean/anomaly.png, lesion/anomaly.png).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def medldm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medldm", *args], check=True, stdout=subprocess.DEVNULL)


def plant_lesion(scan: Path, out: Path, diameter_mm: float, kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """A dark or bright sphere at a random place well inside the brain (its whole ball in the eroded brain mask)."""
    from scipy import ndimage

    from medldm.inference.patient import brain_mask

    image = nib.load(scan)
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    spacing = np.asarray(image.header.get_zooms()[:3], dtype=float)
    radius_vox = diameter_mm / 2 / spacing
    inside = brain_mask(data, erode=int(math.ceil(radius_vox.max())) + 1)
    candidates = np.argwhere(inside)
    centre = candidates[rng.integers(len(candidates))]
    ijk = np.indices(data.shape).transpose(1, 2, 3, 0)
    ball = (((ijk - centre) / radius_vox) ** 2).sum(-1) <= 1.0
    brain = data[ndimage.binary_erosion(data > 0.05)]
    value = float(np.percentile(brain, 2 if kind == "dark" else 99))
    data[ball] = value
    nib.save(nib.Nifti1Image(data, image.affine), out)
    return {"centre_voxel": centre.tolist(), "voxels": int(ball.sum()), "value": value, "ball": ball}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num", type=int, default=6)
    p.add_argument("--years", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lesion-mm", type=float, default=16.0)
    p.add_argument("--lesion", choices=("dark", "bright"), default="dark")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from medldm.artifacts import DiffusionRun
    from medldm.data.dataset import read_manifest

    ldm = DiffusionRun(args.run).load(mmap=True)
    age_max = ldm.conditions.numeric["age"]["max"] if "age" in ldm.conditions.keys else None  # type: ignore[union-attr]
    test = sorted((r for r in read_manifest(args.data) if r["split"] == "test"), key=lambda r: r.get("age") is None)
    test = test[: args.num]
    rng = np.random.default_rng(args.seed)
    results: list[dict[str, Any]] = []
    start = time.monotonic()
    for row in test:
        scan = args.data / row["image"]
        name = Path(row["image"]).name.split(".")[0]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        one: dict[str, Any] = {"image": row["image"], "age": row.get("age"), "sex": row.get("sex")}
        if age_max is not None and row.get("age") is not None:
            target = min(float(row["age"]) + args.years, math.floor(age_max * 10) / 10)
            medldm("counterfactual", str(scan), str(out / "counterfactual.nii.gz"), "--run", str(args.run),
                   "--steps", str(args.steps), "--condition", f"age={target:g}")
            side = json.loads((out / "counterfactual.json").read_text(encoding="utf-8"))
            one["counterfactual"] = {"to_age": target, "change": side["morphometry"]["change"],
                                     "round_trip_ssim": side["round_trip"]["ssim_vs_reconstruction"],
                                     "round_trip_latent_error": side["round_trip"]["latent_relative_error"]}
        lesion = plant_lesion(scan, out / "lesion_input.nii.gz", args.lesion_mm, args.lesion, rng)
        ball = lesion.pop("ball")
        scores = {}
        # the scan's own labels for both (the lesioned copy is in no manifest)
        labels = [f"{k}={row[k]}" for k in ldm.conditions.keys if row.get(k) is not None]
        for kind, path in (("clean", scan), ("lesion", out / "lesion_input.nii.gz")):
            medldm("anomaly", str(path), str(out / kind), "--run", str(args.run), "--steps", str(args.steps),
                   *(["--labels", *labels] if labels else []))
            record = json.loads((out / kind / "anomaly.json").read_text(encoding="utf-8"))
            scores[kind] = record["score"]
            if kind == "lesion":
                peak = tuple(record["peak_voxel"])
                amap = np.asarray(nib.load(out / kind / "anomaly_map.nii.gz").get_fdata())
                one["lesion"] = {**lesion, "peak_voxel": list(peak), "peak_in_lesion": bool(ball[peak]),
                                 "peak_distance_voxels": float(np.linalg.norm(np.subtract(peak,
                                                                                         lesion["centre_voxel"]))),
                                 "map_mean_in_lesion": float(amap[ball].mean()),
                                 "map_mean_in_brain": record["mean_in_brain"]}
        one["scores"] = scores
        results.append(one)
        print(json.dumps({k: v for k, v in one.items() if k != "lesion"} | {"peak_in_lesion":
                                                                            one["lesion"]["peak_in_lesion"]}))
    ageing = [r["counterfactual"]["change"] for r in results if "counterfactual" in r]
    summary = {
        "scans": len(results), "minutes": round((time.monotonic() - start) / 60, 1), "years": args.years,
        "steps": args.steps, "lesion_mm": args.lesion_mm, "lesion": args.lesion,
        "ageing": {k: {"mean": float(np.mean([c[k] for c in ageing])), "positive": sum(c[k] > 0 for c in ageing)}
                   for k in ("ventricle_ml", "csf_ml", "brain_ml", "csf_fraction") if ageing},
        "round_trip_ssim_min": min((r["counterfactual"]["round_trip_ssim"] for r in results if "counterfactual" in r),
                                   default=None),
        "peak_in_lesion": sum(r["lesion"]["peak_in_lesion"] for r in results),
        "lesion_scores_higher": sum(r["scores"]["lesion"] > r["scores"]["clean"] for r in results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "patient_checks.json").write_text(json.dumps({"summary": summary, "scans": results}, indent=1),
                                                  encoding="utf-8")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
