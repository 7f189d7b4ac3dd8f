"""Brain extraction: the scan's own brain mask, by a trained network (deepbet) or by the rough erosion fallback."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from medldm.config import BrainExtractionConfig, PreprocessConfig
from medldm.errors import InputError

log = logging.getLogger(__name__)

DEEPBET_MISSING = ("brain_extraction.method=deepbet needs the deepbet package (a trained brain-extraction network "
                   "whose weights ship inside its wheel, nothing is downloaded): pip install -e '.[deepbet]' in a "
                   "clone or pip install deepbet; or set brain_extraction.method=rough (erosion, weaker on some scans)")


def deepbet_available() -> bool:
    return importlib.util.find_spec("deepbet") is not None


def resolve_method(cfg: PreprocessConfig) -> PreprocessConfig:
    """The config with brain_extraction.method=auto replaced by the method this machine runs.

    Resolved before the settings are hashed, so installing deepbet later redoes the scans masked without it."""
    method = cfg.brain_extraction.method
    if method == "auto":
        method = "deepbet" if deepbet_available() else "rough"
        if method == "rough" and (cfg.registration.enabled or cfg.brain_mask):
            log.warning("brain_extraction.method=auto: deepbet is not installed, so the rough erosion mask is used "
                        "(it mis-registers some scans; pip install -e '.[deepbet]' for the trained network)")
    elif method == "deepbet" and not deepbet_available():
        raise InputError(DEEPBET_MISSING)
    return replace(cfg, brain_extraction=replace(cfg.brain_extraction, method=method))


_NETWORKS: dict[str, object] = {}


def _deepbet():
    if "deepbet" not in _NETWORKS:
        if not deepbet_available():
            raise InputError(DEEPBET_MISSING)
        import warnings

        from deepbet import BrainExtraction

        with warnings.catch_warnings():  # deepbet's TorchScript files: torch.jit.load warns that it is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            _NETWORKS["deepbet"] = BrainExtraction(no_gpu=True)  # preprocessing runs on CPU workers
    return _NETWORKS["deepbet"]


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(volume with its axes in RAS order, the orientation transform that undoes it)."""
    ornt = nib.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    return np.ascontiguousarray(ras), nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)


def deepbet_mask(volume: np.ndarray, affine: np.ndarray, cfg: BrainExtractionConfig) -> np.ndarray:
    """deepbet's brain mask of a T1 volume (any orientation: it is shown the network in RAS, as it was trained)."""
    import torch

    bet = _deepbet()
    ras, back = _to_ras(np.nan_to_num(volume.astype(np.float32)), affine)
    size = cfg.network_size
    with torch.inference_mode():
        try:
            probability = bet.run_model(ras, shape=(size, size, size))
        except AssertionError as e:  # deepbet asserts when its first network finds no brain at all
            raise InputError(f"brain extraction (deepbet) found no brain in the scan ({e})") from None
    mask = probability > cfg.threshold
    if not mask.any():
        raise InputError("brain extraction (deepbet) found no brain in the scan")
    mask = bet.postprocess(mask)  # the largest component, with its holes (ventricles) filled
    return np.ascontiguousarray(nib.orientations.apply_orientation(mask, back)).astype(bool)


def rough_brain_mask(volume: np.ndarray, affine: np.ndarray, erode_mm: float = 8.0) -> np.ndarray:
    """A rough skull strip: erode the head until the brain comes apart from the scalp (the dark skull between
    them), keep the largest piece, grow it back. Fails where the skull is thin or bright, or the neck is large."""
    spacing = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
    steps = max(1, int(round(erode_mm / spacing)))
    mask = volume > threshold_otsu(volume)
    core = ndimage.binary_erosion(mask, iterations=steps)
    labels, n = ndimage.label(core)
    if n == 0:
        return mask
    core = labels == (1 + int(np.argmax(ndimage.sum(core, labels, range(1, n + 1)))))
    return ndimage.binary_fill_holes(ndimage.binary_dilation(core, iterations=steps) & mask)


def brain_mask(volume: np.ndarray, affine: np.ndarray, cfg: BrainExtractionConfig) -> np.ndarray:
    """The scan's brain mask with the configured method (``auto`` must have been resolved: see resolve_method)."""
    if cfg.method == "deepbet":
        return deepbet_mask(volume, affine, cfg)
    if cfg.method == "rough":
        return rough_brain_mask(volume, affine)
    raise InputError(f"brain_extraction.method={cfg.method!r} was not resolved (call resolve_method first)")
