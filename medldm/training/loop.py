"""The training loop both stages run (:class:`Trainer`) and its pieces: run-dir setup, EMA, the non-finite-loss
guard, exact resume (batches, random streams), replica checks, the time limit, logging."""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medldm.artifacts import save_checkpoint
from medldm.config import TrainConfig, save_config
from medldm.data.io import visible
from medldm.errors import StoppedError
from medldm.training.curves import LossCurves
from medldm.training.dist import DistContext, barrier, cleanup, init_distributed

log = logging.getLogger(__name__)


class NonFiniteLossError(StoppedError):
    """Training produced non-finite losses several steps in a row."""


class NonFiniteGuard:
    """Skip every optimiser step whose gradients are not finite; stop the run after ``limit`` such steps in a row.

    The decision is made on the device: :meth:`step` hands the flag to the fused AdamW as ``found_inf`` (as
    ``GradScaler`` does), which then leaves the weights and moments untouched, so the loop never waits for the GPU.
    The flag comes from the gradient norm, which DDP has already made the same on every rank. The counts are read
    only when the loop logs (:meth:`check`)."""

    def __init__(self, device: torch.device, limit: int = 5, skipped: int = 0) -> None:
        self.limit = limit
        self.in_a_row = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)
        self.count = torch.full((), float(skipped), device=device)
        self.reported = skipped

    def step(self, steps: Sequence[tuple[torch.optim.Optimizer, Iterable[torch.Tensor]]], grad_clip: float) -> None:
        """Clip the gradients of each (fused AdamW, parameters) pair and step them all, or none of them when any
        gradient is NaN/inf (a generator and its discriminator are skipped together, and counted once)."""
        norms = [torch.nn.utils.clip_grad_norm_(params, grad_clip) for _, params in steps]
        bad = (~torch.isfinite(torch.stack([n.to(self.count.device) for n in norms]))).any().float()
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.count += bad
        for optimizer, _ in steps:
            # read by the fused kernel (GradScaler sets it the same way); not an attribute torch declares
            optimizer.found_inf = bad  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]

    @property
    def skipped(self) -> int:
        return int(self.count.item())

    def check(self, step: int) -> None:
        """Log the steps skipped since the last check; raise :class:`NonFiniteLossError` after ``limit`` in a row.
        Every rank calls it at the same steps (the counts agree), so all of them stop together."""
        skipped = self.skipped
        if skipped > self.reported:
            log.warning("by step %d: %d step(s) with non-finite gradients skipped (%d in all)", step,
                        skipped - self.reported, skipped)
            self.reported = skipped
        longest = int(self.longest.item())
        if longest >= self.limit:
            raise NonFiniteLossError(f"{longest} steps in a row with non-finite gradients by step {step}: lower "
                                     "train.lr, check the data for NaNs, or set train.amp=false")


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """The fused AdamW (one kernel for all parameters; on CUDA and CPU) that :class:`NonFiniteGuard` relies on."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an AdamW state for the fused kernel: checkpoints written before medldm used it say fused=None (and keep
    the step counts on the CPU), and moments saved with another memory layout (channels-last on or off since) take
    the layout of their parameter, as the fused kernel requires."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            saved = optimizer.state.get(p, {})
            for key, value in saved.items():
                if key == "step":
                    saved[key] = value.to(p.device, torch.float32)
                elif isinstance(value, torch.Tensor) and value.shape == p.shape:
                    saved[key] = torch.empty_like(p).copy_(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """EMA of the weights (``ema.module``, ``ema.n_averaged``), updated by :func:`update_ema`."""
    ema = AveragedModel(model, use_buffers=True)
    cast(Any, ema).decay = decay  # a plain float beside the module (not a buffer: not in the state dict)
    return ema


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module) -> None:
    """One EMA step; the decay warms up ((1+n)/(10+n)) so short runs are not dominated by the init.

    Done here rather than by ``AveragedModel.update_parameters``, which copies its step counter to the GPU every
    step (a copy that waits for the GPU); the counter stays in host memory."""
    n = int(ema.n_averaged)
    averaged = [*ema.module.parameters(), *ema.module.buffers()]
    current = [t.detach() for t in (*model.parameters(), *model.buffers())]
    if n == 0:
        torch._foreach_copy_(averaged, current)
    else:
        d = min(cast(float, ema.decay), (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
    ema.n_averaged += 1


def learning_rate(tc: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step``: linear warm-up, then constant or cosine decay to
    ``lr * min_lr_ratio`` at ``train.steps``; a function of the step, so resuming is exact."""
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "cosine":
        span = max(1, tc.steps - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return tc.lr


def set_lr(optimizer: torch.optim.Optimizer, tc: TrainConfig, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(tc, step)


def prepare_run_dir(run_dir: Path, cfg: Any, resume: bool) -> Path:
    """Create the run dir; refuse to overwrite an existing run unless resuming. Returns the latest checkpoint path."""
    latest = run_dir / "checkpoints" / "latest.pt"
    if resume and not latest.is_file():
        raise FileNotFoundError(f"--resume: {latest} does not exist (an imported run has none: it cannot be "
                                "trained further); start the run without --resume")
    existing = visible(run_dir / "checkpoints", "*.pt")
    if not resume and existing:
        raise FileExistsError(f"{run_dir} already holds a run ({existing[0]}); pass --resume to continue it "
                              "or choose another --run-dir")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return latest


class ResumableBatches:
    """Batches in an order fixed by (seed, epoch), so a resumed run reads exactly the batches it would have read.

    Every rank gets its own shard of each epoch (DistributedSampler, also with one process); ``batches(start)``
    starts after ``start`` batches without loading the skipped ones."""

    def __init__(self, dataset: Dataset, batch_size: int, ctx: DistContext, seed: int, num_workers: int) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.sampler: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                                                   shuffle=True, seed=seed)
        per_rank = self.sampler.num_samples
        # drop a ragged last batch, unless that would leave nothing
        self.drop_last = per_rank >= batch_size
        self.per_epoch = per_rank // batch_size if self.drop_last else 1

    def batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[offset * self.batch_size:]
            yield from DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices,
                                  num_workers=self.num_workers, drop_last=self.drop_last,
                                  pin_memory=torch.cuda.is_available())
            epoch, offset = epoch + 1, 0


def random_patches(x: torch.Tensor, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """One random crop of ``size`` from each volume of a (B, C, X, Y, Z) batch; whole volumes when size is empty."""
    if not size:
        return x
    crops = []
    for v in x:
        starts = [int(torch.randint(0, s - p + 1, (1,), generator=generator)) for s, p in zip(v.shape[1:], size)]
        crops.append(v[:, starts[0]:starts[0] + size[0], starts[1]:starts[1] + size[1], starts[2]:starts[2] + size[2]])
    return torch.stack(crops)


def gather_rng_states(ctx: DistContext, extra: dict[str, torch.Generator]) -> list[dict[str, Any]]:
    """The RNG states of every rank (global torch/CUDA and the named generators), for an exact resume."""
    state = rng_state() | {name: g.get_state() for name, g in extra.items()}
    if ctx.world_size == 1:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def weights_fingerprint(states: dict[str, dict[str, torch.Tensor] | None]) -> str:
    """SHA-256 over the bytes of every tensor of the named state dicts: equal exactly when the weights are
    bit-identical. ``states`` is what a checkpoint holds, e.g. {"model": ..., "ema": ...}."""
    h = hashlib.sha256()
    for name in sorted(states):
        for key, tensor in sorted((states[name] or {}).items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}.{key}:{t.dtype}:{tuple(tensor.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return h.hexdigest()


def check_replicas(ctx: DistContext, step: int, states: dict[str, dict[str, torch.Tensor] | None]) -> list[str] | None:
    """Under DDP, every rank's weights fingerprint (a collective: every rank takes part); an error when they differ.

    DDP keeps replicas equal only as long as every rank computes the same update from the same all-reduced
    gradients; a rank-dependent code path or a broken all-reduce would otherwise go unnoticed, and rank 0 alone
    saves. The list is stored in the checkpoint, so anyone can check that each rank held the saved weights."""
    if ctx.world_size == 1:
        return None
    mine = weights_fingerprint(states)
    every: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    differ = [r for r, fp in enumerate(every) if fp != every[0]]
    if differ:  # every rank sees the same list, so all of them stop here together
        raise RuntimeError(f"DDP replicas diverged at step {step}: the weights of rank(s) {differ} differ from rank "
                           f"0's (fingerprints {every}); the run stops before saving them. Report this with the "
                           "run's config.yaml; --resume continues from the last checkpoint")
    return every


def restore_rng_states(ctx: DistContext, states: list[dict[str, Any]], extra: dict[str, torch.Generator]) -> None:
    """Undo :func:`gather_rng_states` on this rank; a run resumed on a different number of GPUs reseeds instead."""
    if len(states) != ctx.world_size:
        log.warning("checkpoint was written by %d process(es), resuming on %d: the run continues with fresh "
                    "random streams (not bit-identical to an uninterrupted run)", len(states), ctx.world_size)
        return
    state = states[ctx.rank]
    set_rng_state(state)
    for name, g in extra.items():
        if name in state:  # a stream added since the checkpoint was written starts from its seed
            g.set_state(state[name])


class Deadline:
    """``train.time_limit_minutes`` as a flag all ranks agree on (rank 0's clock decides)."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60.0 * minutes if minutes > 0 else None

    def reached(self, ctx: DistContext) -> bool:
        if self.end is None:
            return False
        hit = time.monotonic() > self.end
        if ctx.world_size == 1:
            return hit  # no device tensor, no host sync
        flag = torch.tensor([float(hit)], device=ctx.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())


class StepLog:
    """What both trainers log every ``train.log_every`` steps besides their losses: lr, step time, skips, memory."""

    def __init__(self, step: int) -> None:
        self.time, self.step = time.perf_counter(), step

    def write(self, writer: Any, step: int, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard,
              device: torch.device) -> float:
        """Log the scalars at ``step``; returns the mean seconds per step since the last call."""
        now = time.perf_counter()
        seconds = (now - self.time) / max(step - self.step, 1)
        self.time, self.step = now, step
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/seconds_per_step", seconds, step)
        writer.add_scalar("train/skipped_nonfinite", guard.skipped, step)
        if device.type == "cuda":
            writer.add_scalar("train/gpu_max_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30, step)
        return seconds


def rng_state() -> dict[str, Any]:
    """The global torch RNG states of this process (CPU, and its current CUDA device)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def no_sync(module: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on the micro-batches before the last one of an accumulated step."""
    if not sync and hasattr(module, "no_sync"):
        return cast(DistributedDataParallel, module).no_sync()
    return nullcontext()


class Trainer:
    """One training run: the setup and the periodic log / validate / checkpoint / time-limit tail that both stages
    share. A stage subclasses it with what is its own, in the order the loop calls it:

    ``build()``             networks, EMA, speed-ups, optimisers, losses; after ``torch.manual_seed(train.seed)``, so
                            every rank starts from the same weights
    ``streams()``           the stage's random generators; after ``seed_everything(train.seed + rank)``
    ``load(state)``         weights and optimiser states of the checkpoint being resumed
    ``wrap()``              DDP wrappers
    ``start()``             data, pictures, the lines that say what is trained (``writer`` exists on rank 0)
    ``train_step(step)``    the forward and backward passes of one optimiser step -> the detached losses to log
    ``optimizer_steps()``   the (optimiser, parameters) pairs to step after it
    ``log(step, losses, seconds_per_step)``, ``validate(step)`` -> score (rank 0), ``after_validation(step, final)``
    ``weights()``, ``training_state()``: what a checkpoint holds besides ``metadata`` and the loop's own state

    Each stage keeps its best checkpoint by its validation score (``best_key``, higher or lower is better).
    """

    best_key: str
    higher_is_better: bool
    desc: str
    # set by build(): the network whose weights the EMA follows, its EMA (or None) and the optimiser warmed up
    model: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module  # the model as trained (DDP-wrapped under torchrun)
    metadata: dict[str, Any]

    def __init__(self, run_dir: Path, cfg: Any, state: dict[str, Any] | None) -> None:
        self.run_dir, self.cfg, self.tc, self.state = run_dir, cfg, cfg.train, state
        self.writer: SummaryWriter | None = None
        self.generators: dict[str, torch.Generator] = {}

    @property
    def board(self) -> SummaryWriter:
        """The TensorBoard writer; only rank 0 logs, and only rank 0 calls what uses it."""
        assert self.writer is not None
        return self.writer

    # --- what each stage provides ---
    def build(self) -> None:
        raise NotImplementedError

    def streams(self) -> dict[str, torch.Generator]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def wrap(self) -> None:
        self.net = DistributedDataParallel(self.model) if self.ctx.world_size > 1 else self.model

    def start(self) -> None:
        pass

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def optimizer_steps(self) -> list[tuple[torch.optim.Optimizer, Iterable[torch.Tensor]]]:
        return [(self.optimizer, self.model.parameters())]

    def log(self, step: int, losses: dict[str, torch.Tensor], seconds_per_step: float) -> None:
        pass

    def validate(self, step: int) -> float:
        raise NotImplementedError

    def after_validation(self, step: int, final: bool) -> None:
        pass

    def weights(self) -> dict[str, Any]:
        raise NotImplementedError

    def training_state(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- the loop ---
    def run(self, resume: bool) -> Path:
        """Train (or resume) to ``train.steps`` or the time limit; returns the path of the latest checkpoint."""
        tc, run_dir = self.tc, self.run_dir
        latest = run_dir / "checkpoints" / "latest.pt"
        self.ctx = ctx = init_distributed()
        if ctx.is_main:
            prepare_run_dir(run_dir, self.cfg, resume)
        barrier(ctx)
        torch.manual_seed(tc.seed)
        self.build()
        seed_everything(tc.seed + ctx.rank)
        self.generators = self.streams()
        step, best, skipped = 0, (-1.0 if self.higher_is_better else float("inf")), 0
        if self.state is not None:
            self.load(self.state)
            step, best = self.state["step"], self.state.get(self.best_key, best)
            if self.best_key not in self.state:
                log.warning("%s holds no %s (written with another checkpoint selection): best.pt is chosen afresh "
                            "from here on", run_dir, self.best_key)
            skipped = self.state.get("skipped_nonfinite", 0)
            restore_rng_states(ctx, self.state["rng"], self.generators)
            log.info("resumed %s at step %d", run_dir, step)
        self.step = step
        self.wrap()
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        self.writer = writer = SummaryWriter(run_dir / "tensorboard") if ctx.is_main else None
        curves = LossCurves(run_dir) if ctx.is_main else None
        self.start()
        guard = NonFiniteGuard(ctx.device, skipped=skipped)
        deadline = Deadline(tc.time_limit_minutes)

        def checkpoint(name: str, rngs: list[dict[str, Any]], replicas: list[str] | None) -> None:
            save_checkpoint(run_dir / "checkpoints" / name, {
                **self.metadata, **self.weights(), **self.training_state(), "step": step, self.best_key: best,
                "skipped_nonfinite": guard.skipped, "rng": rngs, "replicas": replicas})

        self.progress = progress = tqdm(total=tc.steps, initial=step, desc=self.desc, unit="step",
                                        disable=not ctx.is_main)
        self.net.train()
        step_log = StepLog(step)
        while step < tc.steps:
            set_lr(self.optimizer, tc, step)
            losses = self.train_step(step)
            step += 1
            self.step = step
            progress.update(1)
            guard.step(self.optimizer_steps(), tc.grad_clip)
            if self.ema is not None:
                update_ema(self.ema, self.model)
            final = step == tc.steps or deadline.reached(ctx)
            if step % tc.log_every == 0 or final:
                guard.check(step)  # on every rank: the one place the loop reads the skip counts
                if writer:
                    self.log(step, losses, step_log.write(writer, step, self.optimizer, guard, ctx.device))
            is_val = step % tc.val_every == 0 or final
            is_ckpt = step % tc.checkpoint_every == 0 or final
            if is_val or is_ckpt:
                rngs = gather_rng_states(ctx, self.generators)  # collectives: every rank takes part
                replicas = check_replicas(ctx, step, self.weights())
            if is_val and ctx.is_main:
                score = self.validate(step)
                if (score > best) if self.higher_is_better else (score < best):
                    best = score
                    checkpoint("best.pt", rngs, replicas)
            self.after_validation(step, final)
            self.net.train()
            if is_ckpt and writer is not None and curves is not None:  # rank 0
                checkpoint("latest.pt", rngs, replicas)
                writer.flush()
                curves.draw()  # loss.png from the scalars TensorBoard has, the whole run's after a resume
            if is_val or is_ckpt:
                barrier(ctx)
            if final and step < tc.steps:
                log.info("train.time_limit_minutes=%g reached at step %d: continue with --resume",
                         tc.time_limit_minutes, step)
                break
        if tc.steps == 0:  # an --init-from run of 0 steps: its starting point is the checkpoint (nothing validated)
            rngs = gather_rng_states(ctx, self.generators)
            if ctx.is_main:
                checkpoint("latest.pt", rngs, None)
        # close the progress bar and TensorBoard writer, then leave the process group together
        progress.close()
        if writer:
            writer.add_scalar("train/skipped_nonfinite", guard.skipped, step)
            writer.close()
        self.unwrap()
        barrier(ctx)
        cleanup(ctx)
        return latest

    def unwrap(self) -> None:
        """Drop the DDP wrappers (and with them the last references to the process group outside torch), so that
        the group is torn down inside ``cleanup``, while every rank is there. Torn down later, when the trainer is
        freed after one rank has already exited, gloo's teardown waited for that rank for ever (1 launch in 7 on
        two busy cores)."""
        for name, value in list(vars(self).items()):
            if isinstance(value, DistributedDataParallel):
                setattr(self, name, value.module)
        gc.collect()
