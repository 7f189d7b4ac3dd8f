"""Train the latent diffusion UNet (stage 2) on cached, scaled posterior means."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medldm.config import ConfigError, DiffusionConfig, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest
from medldm.inference.encode import latents_path
from medldm.models.conditioning import ConditionEncoder
from medldm.models.networks import build_scheduler, build_unet
from medldm.training.checkpoint import (
    autoencoder_checkpoint,
    file_sha256,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medldm.training.dist import barrier, init_distributed
from medldm.training.loop import (
    Deadline,
    NonFiniteGuard,
    autocast,
    finish_run,
    make_ema,
    no_sync,
    prepare_run_dir,
    seed_everything,
)
from medldm.versions import versions

log = logging.getLogger(__name__)


def load_latents(ae_run: Path) -> dict[str, Any]:
    """The latent cache of an autoencoder run, checked against the run's current checkpoint."""
    path = latents_path(ae_run)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `medldm encode --data DATA --autoencoder {ae_run}` first")
    cache = load_checkpoint(path)
    current = file_sha256(autoencoder_checkpoint(ae_run))
    if cache["autoencoder_sha256"] != current:
        raise ValueError(f"{path} was encoded with another autoencoder checkpoint than {autoencoder_checkpoint(ae_run)}"
                         f": run `medldm encode` again")
    return cache


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def train_diffusion(data_dir: str | Path, ae_run: str | Path, run_dir: str | Path, cfg: DiffusionConfig,
                    resume: bool = False) -> Path:
    """Train (or resume) a latent diffusion run; returns the path of its latest checkpoint."""
    data_dir, ae_run, run_dir = Path(data_dir), Path(ae_run), Path(run_dir)
    info = read_dataset_info(data_dir)
    cache = load_latents(ae_run)
    latent_shape = list(cache["mu"].shape[1:])
    f = cfg.model.downsample_factor
    if any(s % f for s in latent_shape[1:]):
        raise ConfigError(f"diffusion.model.channels has {len(cfg.model.channels)} levels (downsampling {f}x) but the "
                          f"latents are {latent_shape}: use fewer UNet levels or a larger image shape")
    rows = {r["image"]: r for r in read_manifest(data_dir)}
    missing = [im for im in cache["images"] if im not in rows]
    if missing:
        raise ValueError(f"{len(missing)} latents have no row in {data_dir}/manifest.csv (e.g. {missing[0]}): "
                         "encode this dataset with `medldm encode` again")
    labelled = [rows[im] for im in cache["images"]]
    train_idx = [i for i, r in enumerate(labelled) if r["split"] == "train"]
    val_idx = [i for i, r in enumerate(labelled) if r["split"] == "val"] or train_idx[:4]

    ctx = init_distributed()
    tc = cfg.train
    latest = prepare_run_dir(run_dir, cfg, resume) if ctx.is_main else run_dir / "checkpoints" / "latest.pt"
    barrier(ctx)

    encoder = ConditionEncoder.fit(cfg.conditioning.keys, [labelled[i] for i in train_idx])
    scale = cache["scale_factor"]
    # latents are small: the whole set lives on the device, no file reads per step
    z_all = (cache["mu"] * scale).to(ctx.device)
    c_all = encoder.encode(labelled).to(ctx.device) if encoder.keys else None
    log.info("training on %d latents %s held in %s memory", len(train_idx), latent_shape, ctx.device.type)
    train_idx_t = torch.tensor(train_idx, device=ctx.device)

    # identical initial weights (and EMA copies) on every rank; per-rank randomness afterwards
    torch.manual_seed(tc.seed)
    model = build_unet(cfg.model, latent_shape[0], encoder.dim if encoder.keys else None).to(ctx.device)
    ema = make_ema(model, cfg.ema_decay)
    seed_everything(tc.seed + ctx.rank)
    scheduler = build_scheduler(cfg.scheduler, "ddpm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, best_val = 0, float("inf")
    if resume:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(state["ema_n_averaged"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_val = state["step"], state["best_val_loss"]
        set_rng_state(state["rng"])
        log.info("resumed %s at step %d", run_dir, step)
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    gen = torch.Generator(ctx.device).manual_seed(tc.seed * 1000 + ctx.rank + step)

    ae_ckpt = autoencoder_checkpoint(ae_run)
    meta = {
        "kind": "diffusion", "config": to_dict(cfg), "versions": versions(), "scale_factor": scale,
        "latent_shape": latent_shape, "conditioning": encoder.state_dict(),
        "autoencoder": {"run": str(ae_run.resolve()), "checkpoint": str(ae_ckpt.resolve()),
                        "sha256": cache["autoencoder_sha256"]},
        "reference": info["reference"], "data_dir": str(data_dir.resolve()),
    }

    def checkpoint(name: str) -> None:
        save_checkpoint(run_dir / "checkpoints" / name, {
            **meta, "model": model.state_dict(), "ema": ema.module.state_dict(),
            "ema_n_averaged": int(ema.n_averaged), "optimizer": optimizer.state_dict(), "step": step,
            "best_val_loss": best_val, "rng": rng_state()})

    writer = SummaryWriter(run_dir / "tensorboard") if ctx.is_main else None
    guard = NonFiniteGuard()
    progress = tqdm(total=tc.steps, initial=step, desc="diffusion", unit="step", disable=not ctx.is_main)
    net.train()
    deadline = Deadline(tc.time_limit_minutes)
    while step < tc.steps:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(tc.grad_accum):
            pick = train_idx_t[torch.randint(len(train_idx), (tc.batch_size,), device=ctx.device, generator=gen)]
            z = z_all[pick]
            context = encoder.drop(c_all[pick], cfg.conditioning.drop_prob, gen) if c_all is not None else None
            noise = torch.randn(z.shape, device=ctx.device, generator=gen)
            t = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=ctx.device, generator=gen)
            with no_sync(net, micro == tc.grad_accum - 1):
                with autocast(ctx.device, tc.amp):
                    pred = net(scheduler.add_noise(z, noise, t), timesteps=t, context=context)
                    loss = F.mse_loss(pred.float(), diffusion_target(scheduler, z, noise, t))
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
        loss = loss_sum
        step += 1
        progress.update(1)
        if guard.ok(loss, step):
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
        final = step == tc.steps or deadline.reached(ctx)

        if writer and step % tc.log_every == 0:
            writer.add_scalar("train/loss", loss.item(), step)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % tc.val_every == 0 or final:
            if ctx.is_main:
                val = validation_loss(ema.module, scheduler, z_all[val_idx], None if c_all is None else c_all[val_idx],
                                      tc.seed)
                writer.add_scalar("val/loss_ema", val, step)
                log.info("step %d: val loss (EMA) %.4f", step, val)
                if val < best_val:
                    best_val = val
                    checkpoint("best.pt")
            net.train()
        if ctx.is_main and (step % tc.checkpoint_every == 0 or final):
            checkpoint("latest.pt")
        if final and step < tc.steps:
            log.info("train.time_limit_minutes=%g reached at step %d: continue with --resume", tc.time_limit_minutes,
                     step)
            break
    finish_run(ctx, progress, writer, guard, step)
    return latest


@torch.no_grad()
def validation_loss(model: torch.nn.Module, scheduler: Any, z: torch.Tensor, context: torch.Tensor | None,
                    seed: int, repeats: int = 4) -> float:
    """Denoising loss on validation latents at fixed noise and timesteps (comparable across steps)."""
    model.eval()
    gen = torch.Generator(z.device).manual_seed(seed + 12345)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(z.shape, device=z.device, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=z.device, generator=gen)
        pred = model(scheduler.add_noise(z, noise, t), timesteps=t, context=context)
        total += F.mse_loss(pred.float(), diffusion_target(scheduler, z, noise, t)).item()
    return total / repeats
