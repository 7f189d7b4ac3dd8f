"""Intensity steps of preprocessing: head mask, N4 bias-field correction, robust [0, 1] normalisation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from medldm.config import N4Config
from medldm.data.io import itk_threads, to_sitk
from medldm.errors import InputError


def head_mask(volume: np.ndarray) -> np.ndarray:
    """The head: above Otsu's threshold, holes filled, largest connected component (drops stray noise)."""
    mask = volume > threshold_otsu(volume)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def n4_correct(volume: np.ndarray, affine: np.ndarray, cfg: N4Config) -> np.ndarray:
    """N4 bias-field correction: the field is fitted on a shrunk image and divided out at full resolution."""
    volume = np.clip(volume, 0, None)
    head = head_mask(volume)
    # fitted on the head's bounding box (with a margin) only: N4's time grows with the voxels it is given, and the
    # air around a head is half of a typical field of view; the air outside the box is left as it is
    if not head.any():
        return _n4_box(volume, np.ones(volume.shape, bool), affine, cfg)
    margin = cfg.shrink_factor * 2
    box = tuple(slice(max(0, int(i.min()) - margin), int(i.max()) + 1 + margin) for i in np.nonzero(head))
    corner = nib.affines.apply_affine(affine, [b.start for b in box])
    box_affine = affine.copy()
    box_affine[:3, 3] = corner
    out = volume.copy()
    out[box] = _n4_box(volume[box], head[box], box_affine, cfg)
    return out


def _n4_box(volume: np.ndarray, head: np.ndarray, affine: np.ndarray, cfg: N4Config) -> np.ndarray:
    import SimpleITK as sitk  # preprocessing only; keeps GPU code paths free of SimpleITK

    image = to_sitk(np.ascontiguousarray(volume), affine)
    mask = to_sitk(np.ascontiguousarray(head).astype(np.float32), affine)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    shrink = [cfg.shrink_factor] * 3
    small, small_mask = sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink)
    with itk_threads(1):  # the same field whatever the machine (see itk_threads)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(list(cfg.iterations))
        corrector.SetConvergenceThreshold(cfg.convergence_threshold)
        corrector.Execute(small, small_mask)
        log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    return (volume / np.exp(log_field)).astype(np.float32)


def normalise(volume: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, list[float]]:
    """Map the [low, high] percentiles of the voxels inside ``mask`` to [0, 1], clipping; returns the window too."""
    values = volume[mask] if mask.any() else volume.ravel()
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        raise InputError(f"flat intensities inside the head ({lo:.3g} at both percentiles {list(percentiles)})")
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), [float(lo), float(hi)]
