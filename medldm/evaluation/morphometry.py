"""Morphometry on the dataset's grid: tissue classes (CSF, grey, white matter), brain volume, ventricle size.

Every volume of a dataset (real or synthetic) lies on the same grid (the template's, when the data are
registered), so one measurement applies to all of them and their distributions can be compared:

* **intracranial mask**: voxels above ``FOREGROUND`` (3 % of the [0, 1] range: the skull-stripped volumes'
  background is 0, their darkest CSF above it), holes filled, the largest connected part;
* **tissue classes** inside it: three intensity classes (CSF < grey < white matter on T1) by scikit-image's
  multi-Otsu thresholds (``method="otsu"``) or a three-component Gaussian mixture fitted by EM from them
  (``method="gmm"``); benchmarks/RESULTS.md compares their stability on real scans;
* **brain volume**: grey + white matter in ml (on the template grid: an affinely registered dataset measures it
  relative to the template's head size, the same for every volume);
* **ventricle size**: CSF in a central region of the grid, a box at fixed fractions of the bounding box of the
  real (test) volumes' mean intracranial mask (around the lateral ventricles in MNI152 space: x -25..25,
  y -45..25, z -5..35 mm).

On volumes that are not skull-stripped the "intracranial" mask is the head and the classes are the head's; the
result says so (``skull_stripped: false``) and the report marks the measures as head measures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, stats

from medldm.errors import InputError

FOREGROUND = 0.03
MEASURES = {"brain_ml": "brain (grey + white matter), ml", "csf_ml": "CSF inside the brain mask, ml",
            "gm_ml": "grey matter, ml", "wm_ml": "white matter, ml", "csf_fraction": "CSF share of the brain mask",
            "ventricle_ml": "ventricular CSF (central region), ml"}
# further per-volume statistics (for the plausibility check)
INTENSITY = {"intracranial_ml": "intracranial volume, ml", "gm_fraction": "grey-matter share of the brain mask",
             "foreground_mean": "mean intensity inside the brain mask", "contrast": "white minus CSF mean intensity"}
# the central region as fractions of the mean brain mask's bounding box along x, y, z (RAS voxel order)
CENTRAL_BOX = ((0.32, 0.68), (0.34, 0.74), (0.35, 0.65))


def intracranial_mask(volume: np.ndarray) -> np.ndarray:
    """The brain (or head) of a [0, 1] volume: above ``FOREGROUND``, holes filled, the largest connected part."""
    mask = volume > FOREGROUND
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_fill_holes(mask)
    # the darkest CSF at the brain's edge (skull-stripped scans keep it, above 0 and below FOREGROUND): one shell
    return mask | (ndimage.binary_dilation(mask) & (volume > 0))


def tissue_classes(volume: np.ndarray, mask: np.ndarray, method: str = "otsu") -> np.ndarray:
    """0 outside ``mask``, 1 CSF, 2 grey matter, 3 white matter (three intensity classes inside the mask)."""
    from skimage.filters import threshold_multiotsu

    values = volume[mask]
    out = np.zeros(volume.shape, np.uint8)
    if values.size < 10 or np.ptp(values) <= 0:
        out[mask] = 1
        return out
    try:
        t = threshold_multiotsu(values, classes=3)
    except ValueError:  # fewer than three intensities (a constant or two-valued volume): no tissue classes
        out[mask] = 1
        return out
    classes = np.digitize(values, t)
    if method == "gmm":
        classes = _gmm(values.astype(np.float64), classes)
    elif method != "otsu":
        raise InputError(f"tissue classes: method {method!r} is not otsu or gmm")
    out[mask] = classes + 1
    return out


def _gmm(values: np.ndarray, start: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Three 1D Gaussians fitted by EM from a hard start; each value to its most probable class (kept ordered)."""
    weight = np.array([np.mean(start == k) for k in range(3)]) + 1e-6
    mean = np.array([values[start == k].mean() if np.any(start == k) else values.mean() for k in range(3)])
    var = np.array([values[start == k].var() if np.sum(start == k) > 1 else values.var() for k in range(3)]) + 1e-6
    for _ in range(iterations):
        log_p = np.log(weight) - 0.5 * np.log(2 * np.pi * var) - (values[:, None] - mean) ** 2 / (2 * var)
        log_p -= log_p.max(axis=1, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=1, keepdims=True)
        total = resp.sum(axis=0) + 1e-9
        weight, mean = total / len(values), (resp * values[:, None]).sum(axis=0) / total
        var = (resp * (values[:, None] - mean) ** 2).sum(axis=0) / total + 1e-6
    order = np.argsort(mean)  # keep CSF < GM < WM whatever EM did to the components
    return np.argsort(order)[np.argmax(log_p, axis=1)]


def central_region(mean_mask: np.ndarray) -> np.ndarray:
    """The box around the lateral ventricles: ``CENTRAL_BOX`` fractions of the mean mask's bounding box."""
    region = np.zeros(mean_mask.shape, bool)
    inside = np.argwhere(mean_mask > 0.5)
    if inside.size == 0:
        return region
    lo, hi = inside.min(axis=0), inside.max(axis=0) + 1
    box = tuple(slice(int(round(a + f0 * (b - a))), int(round(a + f1 * (b - a))))
                for a, b, (f0, f1) in zip(lo, hi, CENTRAL_BOX))
    region[box] = True
    return region


@dataclass
class Morphometry:
    """Measures volumes of one dataset grid: voxel size, the central region, the tissue-class method."""

    voxel_ml: float
    region: np.ndarray
    method: str = "otsu"

    @classmethod
    def for_dataset(cls, affine: np.ndarray, training: Iterable[np.ndarray], method: str = "otsu") -> Morphometry:
        """The central region from the mean intracranial mask of real volumes on the dataset's grid (``medldm
        evaluate`` passes the test volumes, which it holds in memory)."""
        total: np.ndarray | None = None
        n = 0
        for v in training:  # a running sum: a thousand full-size masks need not be held at once
            mask = intracranial_mask(v).astype(np.float32)
            total, n = (mask if total is None else total + mask), n + 1
        if not n:
            raise InputError("morphometry: no volumes to define the central region on")
        assert total is not None  # n > 0: the loop summed at least one mask
        return cls(abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0, central_region(total / n), method)

    def __call__(self, volume: np.ndarray) -> dict[str, float]:
        """The ``MEASURES`` of one volume, and the intensity statistics the plausibility check uses (NaN if empty)."""
        mask = intracranial_mask(volume)
        if mask.sum() < 10:
            return {k: float("nan") for k in (*MEASURES, *INTENSITY)}
        classes = tissue_classes(volume, mask, self.method)
        counts = np.bincount(classes.ravel(), minlength=4).astype(float)
        total = counts[1:].sum()
        mean = [float(volume[classes == k].mean()) if counts[k] else float("nan") for k in (1, 2, 3)]
        return {"brain_ml": float(counts[2] + counts[3]) * self.voxel_ml, "csf_ml": counts[1] * self.voxel_ml,
                "gm_ml": counts[2] * self.voxel_ml, "wm_ml": counts[3] * self.voxel_ml,
                "csf_fraction": float(counts[1] / total), "ventricle_ml": self.ventricles(classes),
                "intracranial_ml": total * self.voxel_ml, "gm_fraction": float(counts[2] / total),
                "foreground_mean": float(volume[mask].mean()), "contrast": mean[2] - mean[0]}

    def ventricles(self, classes: np.ndarray) -> float:
        """CSF-class volume in the central region. Smoothing lowers it (on real IXI 4 mm scans blurred by 0.7 voxel
        it fell by 75 %: thin ventricles blur into the surrounding white matter), and decoded samples are
        smoother than scans; so ``medldm evaluate`` also measures the real test volumes after the autoencoder, which
        smooths them as it smooths samples."""
        return float((self.region & (classes == 1)).sum()) * self.voxel_ml


def distances(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Wasserstein-1 and Kolmogorov-Smirnov distance (with its p-value) between two sets of a measure."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"wasserstein": None, "ks": None, "ks_p": None, "n": [int(len(a)), int(len(b))]}
    ks = stats.ks_2samp(a, b)
    return {"wasserstein": float(stats.wasserstein_distance(a, b)), "ks": float(ks.statistic),
            "ks_p": float(ks.pvalue), "n": [int(len(a)), int(len(b))]}


def yardstick(train: Sequence[float] | np.ndarray, test: Sequence[float], n: int, draws: int = 50, seed: int = 0
              ) -> dict[str, Any]:
    """Train-vs-test distances at the synthetic set's size: the mean over ``draws`` random subsets of ``n`` training
    values (distances between small sets are large by chance alone, so the yardstick must be as small)."""
    train = np.asarray(train, float)
    train = train[np.isfinite(train)]
    if n >= len(train):
        return distances(train, test)
    rng = np.random.default_rng(seed)
    runs = [distances(rng.choice(train, n, replace=False), test) for _ in range(draws)]
    if runs[0]["ks"] is None:
        return runs[0]
    return {"wasserstein": float(np.mean([r["wasserstein"] for r in runs])),
            "ks": float(np.mean([r["ks"] for r in runs])),
            "ks_p": float(np.median([r["ks_p"] for r in runs])), "n": [int(n), runs[0]["n"][1]], "draws": draws}


def summary(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max())}
