"""Does an age-conditioned model follow its condition? Trends of a measured quantity against age.

The quantities are the morphometry measures (medldm.evaluation.morphometry: CSF share, ventricle and brain
volume), applied alike to samples (against their requested age) and real volumes (against their true age).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def age_trend(ages: Sequence[float], values: Sequence[float], seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Pearson correlation and least-squares slope (per decade) of a measured quantity against age.

    With ``seeds`` (samples drawn from the same start noise at several ages), also the within-seed correlation:
    ages and values centred per seed, so the differences between seeds, which dwarf an age effect in a small
    sample, drop out and what is left is what the requested age changed.
    """
    a, v = np.asarray(ages, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(a) & np.isfinite(v)
    a, v = a[keep], v[keep]
    if len(np.unique(a)) < 3:
        return {"n": int(len(a)), "pearson_r": None, "slope_per_decade": None,
                "skipped": "fewer than 3 different ages"}
    out = {"n": int(len(a)), "pearson_r": float(np.corrcoef(a, v)[0, 1]),
           "slope_per_decade": float(np.polyfit(a, v, 1)[0] * 10)}
    if seeds is not None:
        s = np.asarray(seeds)[keep]
        repeated = [k for k in np.unique(s) if len(np.unique(a[s == k])) >= 2]
        if repeated:
            mask = np.isin(s, repeated)
            ca, cv = a[mask].copy(), v[mask].copy()
            for k in repeated:
                ca[s[mask] == k] -= a[s == k].mean()
                cv[s[mask] == k] -= v[s == k].mean()
            out.update(within_seed_r=float(np.corrcoef(ca, cv)[0, 1]), seeds_at_several_ages=len(repeated),
                       within_seed_slope_per_decade=float(np.polyfit(ca, cv, 1)[0] * 10))
    return out
