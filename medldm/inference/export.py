"""Export synthetic volumes: NIfTI in the dataset's reference space, JSON sidecars, PNG previews, samples.csv."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medldm import __version__
from medldm.data.io import save_volume, write_json
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

DESCRIP = f"SYNTHETIC medldm {__version__}"


def write_samples(out_dir: str | Path, volumes: Sequence[np.ndarray], seeds: Sequence[int],
                  reference: dict[str, Any], provenance: dict[str, Any]) -> list[Path]:
    """Write ``sample_XXXX.nii.gz`` + ``.json`` + ``.png`` per volume, ``samples.csv`` and ``contact_sheet.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(reference["affine"], dtype=np.float64)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    paths, tiles, rows = [], [], []
    for volume, seed in zip(volumes, seeds):
        if list(volume.shape) != list(reference["shape"]):
            raise ValueError(f"sample shape {list(volume.shape)} differs from the reference {reference['shape']}")
        stem = f"sample_{seed:04d}"
        path = out_dir / f"{stem}.nii.gz"
        save_volume(path, volume, affine, descrip=DESCRIP)
        write_json(out_dir / f"{stem}.json", {"synthetic": True, "file": path.name, "seed": seed, **provenance,
                                              "versions": versions(), "created": created,
                                              "reference_image": reference.get("image")})
        preview = three_plane(volume)
        save_png(out_dir / f"{stem}.png", preview)
        tiles.append(preview)
        paths.append(path)
        rows.append({"file": path.name, "seed": seed, "conditions": json.dumps(provenance.get("conditions", {}))})
    with (out_dir / "samples.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "seed", "conditions"])
        writer.writeheader()
        writer.writerows(rows)
    save_png(out_dir / "contact_sheet.png", grid(tiles, columns=4))
    return paths
