"""A simple measured quantity per volume, for checking that an age-conditioned model follows its condition.

Ventricles and sulci widen with age, so the dark (CSF-like) share of the brain grows: on T1 volumes in [0, 1]
it is the share of the head/brain voxels (above ``background``) darker than half of their median intensity.
Crude, but monotone in ventricle size, and the same measurement is applied to real volumes as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def csf_fraction(volume: np.ndarray, background: float = 0.05) -> float:
    """Share of the voxels inside the head (> ``background``) darker than half of their median intensity."""
    inside = volume[volume > background]
    if inside.size == 0:
        return float("nan")
    return float((inside < 0.5 * np.median(inside)).mean())


def age_trend(ages: Sequence[float], values: Sequence[float]) -> dict[str, Any]:
    """Pearson correlation and least-squares slope (per decade) of a measured quantity against age."""
    a, v = np.asarray(ages, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(a) & np.isfinite(v)
    a, v = a[keep], v[keep]
    if len(np.unique(a)) < 3:
        return {"n": int(len(a)), "pearson_r": None, "slope_per_decade": None,
                "skipped": "fewer than 3 different ages"}
    return {"n": int(len(a)), "pearson_r": float(np.corrcoef(a, v)[0, 1]),
            "slope_per_decade": float(np.polyfit(a, v, 1)[0] * 10)}
