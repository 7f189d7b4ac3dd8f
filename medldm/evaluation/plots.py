"""The evaluation's numbers as one picture: score histograms (synthetic vs real) and the age check scatter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medldm.viz import save_figure

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
    ax3.set(xlabel="age (years)", ylabel=cond.get("quantity", "CSF-like share of the head"),
            title="age check (plausible samples)")
    ax3.legend(fontsize=8)
    if not np.isfinite(ages).any():
        ax3.text(0.5, 0.5, "no plausible sample with a requested age", ha="center", va="center",
                 transform=ax3.transAxes)
    save_figure(fig, path)


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


SHEET_TILES = 64  # a sheet of ten thousand tiles is a 100-megapixel picture nobody can read


def sheet_order(verdicts: list[dict[str, Any]], limit: int = SHEET_TILES) -> list[int]:
    """The samples a verdict sheet shows: the implausible ones first, then plausible ones, ``limit`` in all; where
    there are more, each group is spread evenly over the set (sample dirs in order: one per requested age, say)."""
    bad = [i for i, v in enumerate(verdicts) if not v["plausible"]]
    good = [i for i, v in enumerate(verdicts) if v["plausible"]]
    bad = _spread(bad, limit)
    return bad + _spread(good, limit - len(bad))


def _spread(indices: list[int], k: int) -> list[int]:
    if len(indices) <= k:
        return indices
    return [indices[j] for j in np.linspace(0, len(indices) - 1, k).round().astype(int)] if k > 0 else []


def verdict_sheet(path: str | Path, tile: Callable[[int], np.ndarray], names: list[str],
                  verdicts: list[dict[str, Any]], columns: int = 4, limit: int = SHEET_TILES) -> list[int]:
    """Synthetic volumes (three planes, ``tile(i)`` of sample i) framed green when plausible, red with its first reason
    when not: every implausible one first, ``limit`` tiles at most (``sheet_order``). Returns the samples shown."""
    from matplotlib.figure import Figure

    shown = sheet_order(verdicts, limit)
    n, bad = len(verdicts), sum(not v["plausible"] for v in verdicts)
    rows = max(1, -(-len(shown) // columns))
    fig = Figure(figsize=(4.2 * columns, 1.9 * rows + 0.4), dpi=90, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    fig.suptitle(f"plausible {n - bad} of {n} (green); not a brain by the data's references: {bad} (red)"
                 + (f"; {len(shown)} shown, the implausible first" if len(shown) < n else ""))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, i in zip(axes, shown):
        v = verdicts[i]
        ax.imshow(tile(i), cmap="gray", vmin=0, vmax=255)  # three_plane tiles are uint8
        ax.set_frame_on(True)
        colour = "#2ca02c" if v["plausible"] else SYNTHETIC
        for spine in ax.spines.values():
            spine.set(color=colour, linewidth=3)
        why = "" if v["plausible"] else "\n" + v["reasons"][0].split(":")[0][:60]
        ax.set_title(f"{names[i]} (SSIM {v['nearest_train_ssim']:.2f}){why}", fontsize=7, color=colour)
    save_figure(fig, path)
    return shown


def morphometry_plot(path: str | Path, morph: dict[str, Any]) -> None:
    """One panel per measure: the values of training, real test, reconstructed test and plausible synthetic volumes."""
    from matplotlib.figure import Figure

    measures = list(morph["measures"])
    fig = Figure(figsize=(3.3 * len(measures), 3.6), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    sets = (("train", "train", "#7f7f7f"), ("real_test", "test", REAL),
            ("reconstructed_test", "test via AE", "#9467bd"), ("synthetic", "synthetic", SYNTHETIC))
    rng = np.random.default_rng(0)
    for ax, m in zip(axes, measures):
        summary = morph["distances"][m]["summary"]
        shown = [(key, label, colour) for key, label, colour in sets if key in summary]
        for pos, (key, _label, colour) in enumerate(shown):
            values: list[float] | np.ndarray = [x[m] for x in (morph.get(key) or [])]
            if key == "synthetic":  # only the plausible samples are compared
                values = [x[m] for x, ok in zip(morph["synthetic"], morph.get("plausible") or []) if ok]
            values = np.asarray(values, float)
            values = values[np.isfinite(values)]
            ax.scatter(pos + rng.uniform(-0.15, 0.15, len(values)), values, s=10, color=colour, alpha=0.7)
            if len(values):
                ax.hlines(np.median(values), pos - 0.3, pos + 0.3, color="k", linewidth=1.5)
        ax.set_xticks(range(len(shown)), [label for _, label, _ in shown], rotation=30, fontsize=8)
        d = morph["distances"][m]
        ks, yard = d["synthetic_vs_test"]["ks"], d["train_vs_test"]["ks"]
        ax.set_title(f"{morph['measures'][m]}\nKS {ks if ks is None else f'{ks:.2f}'} "
                     f"(train vs test {yard if yard is None else f'{yard:.2f}'})", fontsize=8)
    save_figure(fig, path)
