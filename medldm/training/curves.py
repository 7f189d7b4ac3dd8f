"""``loss.png``: a run's loss curves, drawn from the same scalars TensorBoard shows (its event files), so a resumed
run's picture covers the whole run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medldm.data.io import atomic_write

log = logging.getLogger(__name__)

# train/* scalars that are not losses
NOT_LOSSES = ("train/lr", "train/seconds_per_step", "train/skipped_nonfinite", "train/gpu_max_memory_gib")
SMOOTHING = 0.9  # TensorBoard's default exponential smoothing


def read_scalars(tensorboard_dir: str | Path, events: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of a TensorBoard folder as (steps, values), the latest value per step (a resumed run may
    have logged a step twice). ``events``: an EventAccumulator kept from an earlier call, which then reads only
    what was written since."""
    if events is None:
        events = _accumulator(tensorboard_dir)
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        steps = np.array(sorted(by_step))
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=float))
    return out


def _accumulator(tensorboard_dir: str | Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # its "no path found after ..." notes at every incremental read are noise in a training log
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    # scalars only: the preview images are not kept
    return EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1,
                                                                 "histograms": 1})


def smoothed(values: np.ndarray, weight: float = SMOOTHING) -> np.ndarray:
    """TensorBoard's debiased exponential moving average."""
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last, norm = weight * last + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def loss_plot(run_dir: str | Path, events: Any = None) -> list[str]:
    """Write ``RUN/loss.png`` (one panel per loss, raw and smoothed, then the validation scores); returns the panel
    titles. Nothing is written before the first logged step. ``events`` as in :func:`read_scalars`."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir / "tensorboard", events)
    losses = sorted(t for t in scalars if t.startswith("train/") and t not in NOT_LOSSES)
    panels = [*(t for t in losses if t == "train/loss"), *(t for t in losses if t != "train/loss"),
              *sorted(t for t in scalars if t.startswith("val/"))]
    if not panels:
        return []
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4 * columns, 3 * rows), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, tag in zip(axes, panels):
        steps, values = scalars[tag]
        if tag.startswith("train/"):
            ax.plot(steps, values, color="#1f77b4", alpha=0.3, linewidth=0.8, label="logged")
            ax.plot(steps, smoothed(values), color="#1f77b4", linewidth=1.8, label=f"smoothed ({SMOOTHING})")
            if (values > 0).all() and values.max() > 10 * values.min():
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.plot(steps, values, "o-", color="#d62728", markersize=3)
        ax.set(title=tag, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: up to step {max(scalars[t][0][-1] for t in panels)}")
    # rewritten at every checkpoint: atomically, so a crash never leaves half a picture
    with atomic_write(run_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    return panels


class LossCurves:
    """``loss.png`` during training: the event files are read incrementally, and a failure to draw is a warning,
    never the end of the run."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.events = _accumulator(self.run_dir / "tensorboard")

    def draw(self) -> None:
        try:
            loss_plot(self.run_dir, self.events)
        except Exception as e:  # a picture is not worth a training run
            log.warning("loss.png not drawn (%s: %s)", type(e).__name__, e)
