"""PNG pictures of volumes: three-plane views and contact sheets (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from medldm.data.io import atomic_write
from medldm.errors import InputError


def three_plane(volume: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices of a RAS volume side by side, as uint8 (subject right on the right,
    A/S up)."""
    v = np.clip((np.asarray(volume, dtype=np.float32) - vmin) / max(vmax - vmin, 1e-8), 0, 1)
    x, y, z = (s // 2 for s in v.shape)
    # array axes are (R, A, S): rotate so anterior/superior point up on the screen
    views = [np.rot90(v[:, :, z]), np.rot90(v[:, y, :]), np.rot90(v[x, :, :])]
    h = max(p.shape[0] for p in views)
    views = [np.pad(p, ((0, h - p.shape[0]), (0, 2))) for p in views]
    return (np.concatenate(views, axis=1) * 255).round().astype(np.uint8)


def grid(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Tile equally typed 2D uint8 images into one sheet (padding smaller tiles)."""
    if not tiles:
        raise InputError("grid: no images to tile")
    h = max(t.shape[0] for t in tiles) + 2
    w = max(t.shape[1] for t in tiles) + 2
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * h, min(columns, len(tiles)) * w), dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h : r * h + t.shape[0], c * w : c * w + t.shape[1]] = t
    return sheet


def save_png(path: str | Path, image: np.ndarray, min_size: int = 256) -> None:
    """Save a uint8 image, upscaled by an integer factor (at most 8) so small volumes stay visible."""
    k = min(8, max(1, int(np.ceil(min_size / min(image.shape[:2])))))
    if k > 1:
        image = np.kron(image, np.ones((k, k), dtype=np.uint8))
    with atomic_write(path) as tmp:
        iio.imwrite(str(tmp), image, extension=".png")


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure atomically, in the format its suffix names (.png by default)."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
