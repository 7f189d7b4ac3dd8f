"""Repack a preprocessed medldm dataset with uint8 images (scl_slope 1/255), e.g. to carry it to a GPU machine.

    python benchmarks/pack_dataset.py DATA_DIR OUT_DIR [--downsample 2]

Images are [0, 1] floats; uint8 keeps them to 1/255 (0.4 %), far below what the autoencoder reconstructs,
and makes a 120-scan 2 mm dataset a quarter of its float32 size. manifest.csv and preprocess.json are copied.
``--downsample F`` averages F^3 blocks (2 mm -> 4 mm) and rescales the affines and the reference space, for
experiments that must fit a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.transform import downscale_local_mean
from tqdm import tqdm

from medldm.data.dataset import read_manifest
from medldm.data.io import save_volume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--downsample", type=int, default=1, help="average FxFxF blocks (default 1: keep the grid)")
    args = ap.parse_args()
    f = args.downsample
    # voxel i of the coarse grid is the mean of fine voxels f*i .. f*i+f-1: its centre is f*i + (f-1)/2
    coarse = np.diag([f, f, f, 1.0])
    coarse[:3, 3] = (f - 1) / 2
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for name in ("manifest.csv", "preprocess.json"):
        shutil.copy2(args.data / name, args.out / name)
    info = json.loads((args.data / "preprocess.json").read_text())
    info["config"]["output_dtype"] = "uint8"
    if f > 1:
        ref = info["reference"]
        if any(s % f for s in ref["shape"]):
            raise SystemExit(f"--downsample {f} does not divide the volume shape {ref['shape']}")
        ref["affine"] = (np.asarray(ref["affine"]) @ coarse).tolist()
        ref["shape"] = [s // f for s in ref["shape"]]
        ref["spacing"] = [s * f for s in ref["spacing"]]
        info["config"]["shape"], info["config"]["spacing"] = ref["shape"], ref["spacing"]
    (args.out / "preprocess.json").write_text(json.dumps(info, indent=1))
    for row in tqdm(read_manifest(args.data), desc="pack", unit="volume"):
        img = nib.load(args.data / row["image"])
        data = np.asarray(img.dataobj, dtype=np.float32)
        if f > 1:
            data = downscale_local_mean(data, (f, f, f))
        save_volume(args.out / row["image"], data, img.affine @ coarse, dtype="uint8")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
