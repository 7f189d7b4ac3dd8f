"""Pieces shared by both trainers: run-dir setup, EMA, the non-finite-loss guard, logging."""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from medldm.config import save_config
from medldm.training.dist import DistContext, barrier, cleanup

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses several steps in a row."""


class NonFiniteGuard:
    """Skip a step whose loss is NaN/inf; stop the run after ``limit`` such steps in a row."""

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.skipped = 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(f"{self.in_a_row} non-finite losses in a row at step {step}: lower train.lr, "
                                     "check the data for NaNs, or set train.amp=false")
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA only; the CPU runs float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """EMA of the weights; the decay warms up ((1+n)/(10+n)) so short runs are not dominated by the init."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def prepare_run_dir(run_dir: Path, cfg: Any, resume: bool) -> Path:
    """Create the run dir; refuse to overwrite an existing run unless resuming. Returns the latest checkpoint path."""
    latest = run_dir / "checkpoints" / "latest.pt"
    if resume and not latest.is_file():
        raise FileNotFoundError(f"--resume: {latest} does not exist; start the run without --resume")
    if not resume and latest.is_file():
        raise FileExistsError(f"{run_dir} already holds a run ({latest}); pass --resume to continue it "
                              "or choose another --run directory")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return latest


def infinite_batches(loader: torch.utils.data.DataLoader, sampler: Any = None):
    """Yield batches forever; a DistributedSampler gets a new epoch each pass."""
    epoch = 0
    while True:
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def finish_run(ctx: DistContext, progress: Any, writer: Any, guard: NonFiniteGuard, step: int) -> None:
    """Close the progress bar and TensorBoard writer, then leave the process group together."""
    progress.close()
    if writer:
        writer.add_scalar("train/skipped_nonfinite", guard.skipped, step)
        writer.close()
    barrier(ctx)
    cleanup(ctx)
