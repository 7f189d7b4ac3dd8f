"""Is a synthetic volume a brain? A verdict per volume from references the real data give, never a fixed score.

Two independent signals, each judged against real volumes of the same dataset:

1. **Off the data manifold.** Every real test volume (an unseen subject) has a nearest training volume at some
   SSIM; a real brain that is not in the training set never comes much further. A sample whose nearest-training
   SSIM is below both the ``percentile`` (1st) of the real test volumes' and their median minus ``z`` robust
   standard deviations (1.4826 MAD; ``z`` widened for small references, see ``prediction_limit``) is further
   from every training brain than real unseen brains are: noise, blotches, a scrambled or misplaced head. (Both
   floors must be crossed, so a small test split, whose 1st percentile is its minimum, does not reject a sample
   that is only as far as the furthest real subject.)
2. **Statistics outside the real range.** Intensity and tissue statistics of the volume (intracranial
   volume, mean intensity inside it, tissue shares and the white/CSF contrast: ``STATISTICS``) against those
   of the real volumes (training and test): outside their range *and* more than ``z`` robust SDs from their
   median is implausible: a constant or empty volume, a shifted or scaled intensity, a head without tissue
   contrast. (Outside the range alone would reject one real brain in every few dozen; the robust SD alone,
   estimated from a few volumes, can be smaller than the real spread; it is taken as at least ``RELATIVE_SD``
   of the median.)

As a yardstick each real test volume gets the same verdict with itself left out of every reference (its SSIM
floor and statistics ranges come from the other volumes): the rule's false alarms on real unseen brains. A
planted copy of a training volume is plausible (and flagged by the memorisation check instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

# the per-volume statistics (computed by medldm.evaluation.morphometry.Morphometry) judged against real volumes'
STATISTICS = {"intracranial_ml": "intracranial volume (ml)", "foreground_mean": "mean intensity inside the brain mask",
              "csf_fraction": "CSF share of the brain mask", "gm_fraction": "grey-matter share of the brain mask",
              "contrast": "white minus CSF mean intensity"}


# the least spread assumed of any statistic: registration makes real brains nearly one size (on IXI at 4 mm the
# intracranial volumes of 108 scans lie within -6 % and +3 % of their median), and a brain 6 % smaller is a brain; the
# statistics are there to catch what is far from any brain (a blank, a box of noise, a shifted intensity)
RELATIVE_SD = 0.05


def prediction_limit(z: float, n: int) -> float:
    """``z`` robust SDs widened for a reference of only ``n`` volumes: the Student-t prediction interval of the
    same two-sided probability (t with n - 1 degrees of freedom, times sqrt(1 + 1/n)). A median and SD estimated
    from 8 volumes make 3.5 into 6.3; from 100, into 3.6. Without it a real brain fails for a small reference."""
    from scipy import stats

    if n < 2:
        return float("inf")
    return float(stats.t.ppf(stats.norm.cdf(z), n - 1) * np.sqrt(1 + 1 / n))


def robust_reference(values: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, robust SD (1.4826 MAD, at least ``RELATIVE_SD`` of the median) and range of every statistic."""
    out = {}
    for key in STATISTICS:
        v = np.array([x.get(key, np.nan) for x in values], float)
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        median = float(np.median(v))
        scale = max(1.4826 * float(np.median(np.abs(v - median))), RELATIVE_SD * max(abs(median), 1e-3))
        out[key] = {"median": median, "scale": scale, "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
    return out


def ssim_floor(real_nearest: Sequence[float], percentile: float, z: float) -> dict[str, float]:
    """The nearest-training SSIM below which a volume is further from the training set than real unseen ones."""
    r = np.asarray(real_nearest, float)
    r = r[np.isfinite(r)]
    if len(r) < 2:  # one volume says nothing about the spread: no floor
        return {"floor": float("-inf"), "percentile": float("-inf"), "median_minus_z": float("-inf"),
                "z_used": float("inf"), "n": int(len(r))}
    median = float(np.median(r))
    spread = 1.4826 * float(np.median(np.abs(r - median)))
    limit = prediction_limit(z, len(r))
    low_percentile, low_z = float(np.percentile(r, percentile)), median - limit * spread
    return {"floor": min(low_percentile, low_z), "percentile": low_percentile, "median_minus_z": low_z,
            "z_used": limit, "n": int(len(r))}


def verdict(nearest_ssim: float, stats: dict[str, float], floor: dict[str, float],
            reference: dict[str, dict[str, float]], z: float, percentile: float) -> dict[str, Any]:
    """Plausible or not, with every reason and the robust z of each statistic."""
    reasons, zs = [], {}
    if not np.isfinite(stats.get("intracranial_ml", 0.0)):
        reasons.append("no brain: nothing above the background")
    elif not np.isfinite(stats.get("contrast", 0.0)):
        reasons.append("no tissue contrast: one intensity class inside the brain mask")
    if nearest_ssim < floor["floor"]:
        reasons.append(f"off the data manifold: nearest-training SSIM {nearest_ssim:.3f} < {floor['floor']:.3f} "
                       f"(reference volumes: percentile {percentile:g} {floor['percentile']:.3f}, median - "
                       f"{floor.get('z_used', z):.1f} robust SD {floor['median_minus_z']:.3f})")
    for key, ref in reference.items():
        value = stats.get(key, float("nan"))
        if not np.isfinite(value):
            continue
        zs[key] = (value - ref["median"]) / ref["scale"]
        # robust_reference stores the count of volumes under "n"
        if abs(zs[key]) > prediction_limit(z, cast(int, ref.get("n", 1000))) and not ref["min"] <= value <= ref["max"]:
            reasons.append(f"{STATISTICS[key]} {value:.4g} is {zs[key]:+.1f} robust SD from the reference volumes' "
                           f"median {ref['median']:.4g} and outside their range {ref['min']:.4g}-{ref['max']:.4g}")
    return {"plausible": not reasons, "reasons": reasons, "nearest_train_ssim": nearest_ssim, "statistics": stats,
            "z": zs}
