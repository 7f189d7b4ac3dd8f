"""The evaluation's numbers as one picture: score histograms (synthetic vs real) and the age check scatter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SYNTHETIC, REAL = "#d62728", "#1f77b4"


def score_plots(path: str | Path, generation: dict[str, Any]) -> None:
    """Three panels: pairwise MS-SSIM, nearest-training SSIM (with the flagging threshold), CSF share vs age."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    real = generation.get("real_test") or {}
    _hist(ax1, {"synthetic": generation["synthetic"]["ms_ssim_scores"], "real test": real.get("ms_ssim_scores", [])},
          "pairwise MS-SSIM (lower = more diverse)")
    mem = generation["memorisation"]
    _hist(ax2, {"synthetic": [e["ssim"] for e in mem["synthetic"]], "real test": [e["ssim"] for e in mem["real_test"]]},
          "SSIM to the nearest training volume")
    ax2.axvline(mem["threshold_ssim"], color="k", linestyle="--",
                label=f"flag above {mem['threshold_ssim']:.3f} ({len(mem['flagged'])} flagged)")
    ax2.legend(fontsize=8)
    cond = generation["conditioning"]
    ages, values = np.array(cond["requested_ages"], dtype=float), np.array(cond["synthetic_values"], dtype=float)
    ax3.scatter(ages, values, color=SYNTHETIC, label=_label("synthetic (requested age)", cond["synthetic"]), s=18)
    if "real_ages" in cond:
        ax3.scatter(cond["real_ages"], cond["real_values"], color=REAL, s=18,
                    label=_label("real test (true age)", cond["real_test"]))
    ax3.set(xlabel="age (years)", ylabel="CSF-like share of the head", title="age check")
    ax3.legend(fontsize=8)
    if not np.isfinite(ages).any():
        ax3.text(0.5, 0.5, "samples have no requested age", ha="center", va="center", transform=ax3.transAxes)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _hist(ax: Any, sets: dict[str, list[float]], title: str) -> None:
    values = [v for vs in sets.values() for v in vs]
    bins = np.linspace(min(values), max(values) + 1e-6, 30) if values else 10
    for (name, vs), color in zip(sets.items(), (SYNTHETIC, REAL)):
        if vs:
            ax.hist(vs, bins=bins, alpha=0.55, color=color, density=True, label=f"{name} (n={len(vs)})")
    ax.set(title=title, ylabel="density")
    ax.legend(fontsize=8)


def _label(name: str, trend: dict[str, Any]) -> str:
    return f"{name}, r={trend['pearson_r']:+.2f}" if trend.get("pearson_r") is not None else name
