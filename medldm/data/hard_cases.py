"""Hard cases for registration, made from any scan: what multi-site data does to a pipeline tuned on one site.

Each case takes (volume, affine, labels or None) and returns the same three, changed as a scanner, a field of view
or a header would change them. The tests run them on phantoms; benchmarks/registration_hard_cases.py on real scans.
"""

from __future__ import annotations

from collections.abc import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

Case = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]


def rotated(degrees: float | list[float], axes: str) -> Case:
    """The head lies turned in the scanner (the header says so): about world axes ``axes`` ("x", "xy", ...)."""
    def case(vol, affine, labels):
        turn = nib.affines.from_matvec(Rotation.from_euler(axes, degrees, degrees=True).as_matrix())
        return vol, turn @ affine, labels
    return case


def shifted(mm: tuple[float, float, float] = (30.0, -30.0, 30.0)) -> Case:
    """The head lies off the scanner's centre (52 mm by default)."""
    def case(vol, affine, labels):
        return vol, nib.affines.from_matvec(np.eye(3), list(mm)) @ affine, labels
    return case


def resampled(spacing: tuple[float, float, float]) -> Case:
    """The same field of view acquired at other voxel sizes (thick slices average what they cover)."""
    def case(vol, affine, labels):
        old = np.linalg.norm(affine[:3, :3], axis=0)
        scale = np.asarray(spacing, dtype=float) / old  # new voxel -> old voxel, per axis
        shape = tuple(np.floor(np.array(vol.shape) / scale).astype(int))
        offset = (scale - 1) / 2
        new = affine.copy()
        new[:3, :3] = affine[:3, :3] * scale
        new[:3, 3] = nib.affines.apply_affine(affine, offset)
        smooth = ndimage.gaussian_filter(vol, np.maximum(scale - 1, 0) / 2.0)
        out = ndimage.affine_transform(smooth, np.diag(scale), offset, output_shape=shape, order=1)
        lab = None if labels is None else ndimage.affine_transform(labels, np.diag(scale), offset,
                                                                   output_shape=shape, order=0)
        return out.astype(np.float32), new, lab
    return case


def padded(mm: float = 40.0) -> Case:
    """A larger field of view: ``mm`` more of (noisy) background on every side."""
    def case(vol, affine, labels):
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        pad = np.ceil(mm / spacing).astype(int)
        rng = np.random.default_rng(0)
        background = vol[vol <= np.percentile(vol, 20)]
        out = rng.choice(background, size=tuple(np.array(vol.shape) + 2 * pad)).astype(np.float32)
        out[tuple(slice(p, p + n) for p, n in zip(pad, vol.shape))] = vol
        new = affine.copy()
        new[:3, 3] = nib.affines.apply_affine(affine, -pad)
        lab = None if labels is None else np.pad(labels, [(p, p) for p in pad])
        return out, new, lab
    return case


def bias_field(strength: float = 0.55) -> Case:
    """A strong coil field: intensity falls by a factor of exp(2 * strength) across the head."""
    def case(vol, affine, labels):
        ramp = (np.linspace(-strength, strength, vol.shape[0])[:, None, None]
                + np.linspace(-0.5 * strength, 0.5 * strength, vol.shape[2])[None, None, :])
        return (vol * np.exp(ramp)).astype(np.float32), affine, labels
    return case


def wrong_header(vol, affine, labels):
    """A sagittal stack whose header calls it axial: the voxels roll by one axis, the affine stays the old one."""
    def roll(a):
        return None if a is None else np.ascontiguousarray(np.moveaxis(a, 0, 2))

    return roll(vol), affine, roll(labels)


CASES: dict[str, Case] = {
    "rotated 30 about x": rotated(30, "x"), "rotated 45 about y": rotated(45, "y"),
    "rotated 60 about z": rotated(60, "z"), "rotated 90 about x": rotated(90, "x"),
    "rotated 90 about y": rotated(90, "y"), "rotated 40 about x and 30 about y": rotated([40, 30], "xy"),
    "shifted 5 cm": shifted(), "2 mm": resampled((2.0, 2.0, 2.0)), "1x1x5 mm": resampled((1.0, 1.0, 5.0)),
    "larger field of view": padded(), "strong bias field": bias_field(), "sagittal stack marked axial": wrong_header,
}
