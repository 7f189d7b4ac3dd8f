"""Train the KL autoencoder (stage 1): L1 + KL + patch-adversarial (+ perceptual / SSIM) on volumes or patches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import SSIMLoss
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medldm.config import AutoencoderConfig, ConfigError, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, split_rows, volume_dataset
from medldm.errors import InputError
from medldm.evaluation.metrics import VolumeMetrics
from medldm.inference.encode import reconstruct
from medldm.models.networks import build_autoencoder, build_discriminator
from medldm.models.speed import apply_speed
from medldm.training.checkpoint import load_checkpoint, save_checkpoint
from medldm.training.curves import LossCurves
from medldm.training.dist import DistContext, barrier, init_distributed
from medldm.training.loop import (
    Deadline,
    NonFiniteGuard,
    ResumableBatches,
    StepLog,
    adamw,
    autocast,
    check_replicas,
    finish_run,
    gather_rng_states,
    load_optimizer,
    make_ema,
    no_sync,
    prepare_run_dir,
    random_patches,
    restore_rng_states,
    seed_everything,
    set_warmup_lr,
    stopped_by_time_limit,
    update_ema,
)
from medldm.training.losses import adversarial_loss, build_perceptual_loss, kl_loss
from medldm.versions import versions
from medldm.viz import three_plane

log = logging.getLogger(__name__)


def check_shapes(cfg: AutoencoderConfig, image_shape: list[int]) -> None:
    """The volume must halve cleanly at every autoencoder level, and hold the patch and the window."""
    f = cfg.model.downsample_factor
    if any(s % f for s in image_shape):
        raise ConfigError(f"autoencoder.model.channels has {len(cfg.model.channels)} levels (downsampling {f}x) "
                          f"but the dataset's volumes are {image_shape}: set preprocess.shape to multiples of {f} "
                          "or change autoencoder.model.channels")
    for key, size in (("patch_size", cfg.patch_size), ("sliding_window.roi_size", cfg.sliding_window.roi_size)):
        if size and any(p > s for p, s in zip(size, image_shape)):
            raise ConfigError(f"autoencoder.{key}={list(size)} is larger than the dataset's volumes {image_shape}: "
                              f"choose at most {image_shape}, or [] for whole volumes")
    if cfg.adversarial_weight > 0:
        size = list(cfg.patch_size or image_shape)
        if not _discriminator_fits(cfg, size):
            least = next((s for s in range(8, 1025, 8) if _discriminator_fits(cfg, [s] * 3)), None)
            raise ConfigError(f"autoencoder.discriminator.num_layers={cfg.discriminator.num_layers} downsamples "
                              f"training inputs of {size} to nothing: use inputs of at least {least} voxels per side "
                              "(patch_size) or fewer discriminator layers")


def _discriminator_fits(cfg: AutoencoderConfig, size: list[int]) -> bool:
    # a dry run on the meta device: shapes only, no memory, no compute
    with torch.device("meta"):
        disc = build_discriminator(cfg.discriminator)
        try:
            disc(torch.empty(1, 1, *size))
        except (ValueError, RuntimeError):
            return False
    return True


def check_resumable(state: dict[str, Any], cfg: AutoencoderConfig, path: Path) -> None:
    """A run resumes only with the architecture it was trained with."""
    if state.get("kind") != "autoencoder":
        raise InputError(f"{path} is not an autoencoder checkpoint (kind={state.get('kind')!r})")
    new = to_dict(cfg)
    for section, keys in (("model", None), ("discriminator", ("channels", "num_layers"))):
        old_s, new_s = state["config"].get(section, {}), new[section]
        for k in keys or new_s:
            if k in old_s and old_s[k] != new_s[k]:
                raise ConfigError(f"--resume: autoencoder.{section}.{k} is {new_s[k]} in this config but "
                                  f"{old_s[k]} in {path}; resume with the run's config.yaml, or start a new run")
    if (state.get("discriminator") is None) != (cfg.adversarial_weight == 0):
        raise ConfigError(f"--resume: autoencoder.adversarial_weight switches the discriminator "
                          f"{'on' if cfg.adversarial_weight else 'off'} but {path} was trained the other way")
    if (state.get("ema") is None) != (cfg.ema_decay == 0):
        raise ConfigError(f"--resume: autoencoder.ema_decay switches the EMA {'on' if cfg.ema_decay else 'off'} "
                          f"but {path} was trained the other way")


def train_autoencoder(data_dir: str | Path, run_dir: str | Path, cfg: AutoencoderConfig, resume: bool = False) -> Path:
    """Train (or resume) an autoencoder run; returns the path of its latest checkpoint."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    info = read_dataset_info(data_dir)
    image_shape = info["reference"]["shape"]
    check_shapes(cfg, image_shape)
    rows = read_manifest(data_dir)
    train_rows, val_rows = split_rows(rows, "train"), split_rows(rows, "val")
    for split, chosen in (("train", train_rows), ("val", val_rows)):
        if not chosen:
            raise InputError(f"{data_dir}/manifest.csv has no {split}-split volumes: preprocess again with "
                             "split.val_fraction > 0 (the autoencoder keeps its best checkpoint by validation SSIM)")
    latest = run_dir / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest, kind="autoencoder", resume=True) if resume and latest.is_file() else None
    if state is not None:
        check_resumable(state, cfg, latest)

    ctx = init_distributed()
    tc = cfg.train
    if ctx.is_main:
        prepare_run_dir(run_dir, cfg, resume)
    barrier(ctx)

    # identical initial weights on every rank (DDP broadcasts them anyway; the EMA copy is made before that)
    torch.manual_seed(tc.seed)
    model = build_autoencoder(cfg.model, sdpa=cfg.speed.sdpa).to(ctx.device)
    disc = build_discriminator(cfg.discriminator).to(ctx.device) if cfg.adversarial_weight > 0 else None
    ema = make_ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # after the EMA copy (which stays a plain module) and before the optimiser (channels-last swaps the parameters'
    # storage) and DDP
    speedups = apply_speed(model, cfg.speed, ctx.device)
    opt_g = adamw(model.parameters(), tc.lr, tc.weight_decay)
    opt_d = adamw(disc.parameters(), cfg.discriminator.lr) if disc is not None else None
    perceptual = build_perceptual_loss(cfg)
    perceptual = perceptual.to(ctx.device) if perceptual is not None else None
    ssim_loss = SSIMLoss(spatial_dims=3, data_range=1.0) if cfg.ssim_weight > 0 else None
    adv = adversarial_loss()
    # per-rank random streams: the KL sampling noise (global torch RNG) and the patch positions
    seed_everything(tc.seed + ctx.rank)
    patch_gen = torch.Generator().manual_seed(tc.seed * 1000 + ctx.rank)
    step, best_ssim, skipped = 0, -1.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer(opt_g, state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            load_optimizer(opt_d, state["optimizer_d"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
            ema.n_averaged.fill_(state["ema_n_averaged"])
        step, best_ssim, skipped = state["step"], state["best_val_ssim"], state.get("skipped_nonfinite", 0)
        restore_rng_states(ctx, state["rng"], {"patch": patch_gen})
        log.info("resumed %s at step %d", run_dir, step)
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    net_d = DistributedDataParallel(disc) if disc is not None and ctx.world_size > 1 else disc
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions

    train_ds = volume_dataset(data_dir, train_rows, cache_rate=cfg.cache_rate)
    val_ds = volume_dataset(data_dir, val_rows) if ctx.is_main else None
    data = ResumableBatches(train_ds, tc.batch_size, ctx, tc.seed, tc.num_workers)
    batches = data.batches(start=step * tc.grad_accum)
    writer = SummaryWriter(run_dir / "tensorboard") if ctx.is_main else None
    curves = LossCurves(run_dir) if ctx.is_main else None
    guard = NonFiniteGuard(ctx.device, skipped=skipped)
    deadline = Deadline(tc.time_limit_minutes)
    metrics = VolumeMetrics(image_shape)
    meta = {"kind": "autoencoder", "config": to_dict(cfg), "versions": versions(), "data_dir": str(data_dir.resolve()),
            "image_shape": image_shape, "world_size": ctx.world_size}
    if ctx.is_main:
        log.info("autoencoder: %d train / %d val volumes %s, %s, %.1fM parameters, effective batch %d", len(train_rows),
                 len(val_rows), image_shape, f"patches {cfg.patch_size}" if cfg.patch_size else "whole volumes",
                 sum(p.numel() for p in model.parameters()) / 1e6, tc.batch_size * tc.grad_accum * ctx.world_size)
        log.info("speed: %s", ", ".join(speedups) or "eager (no compile, no recompute)")

    def saved_weights() -> dict[str, Any]:
        return {"model": model.state_dict(), "discriminator": disc.state_dict() if disc is not None else None,
                "ema": ema.module.state_dict() if ema is not None else None}

    def checkpoint(name: str, rngs: list[dict[str, Any]], replicas: list[str] | None) -> None:
        save_checkpoint(run_dir / "checkpoints" / name, {
            **meta, **saved_weights(), "optimizer": opt_g.state_dict(),
            "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
            "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
            "step": step, "best_val_ssim": best_ssim, "skipped_nonfinite": guard.skipped, "rng": rngs,
            "replicas": replicas})

    progress = tqdm(total=tc.steps, initial=step, desc="autoencoder", unit="step", disable=not ctx.is_main)
    net.train()
    step_log = StepLog(step)
    while step < tc.steps:
        set_warmup_lr(opt_g, tc.lr, tc.warmup_steps, step)
        adv_on = disc is not None and step >= cfg.adversarial_start
        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            last = micro == tc.grad_accum - 1
            x = random_patches(next(batches)["image"], cfg.patch_size, patch_gen).to(ctx.device, non_blocking=True)
            with no_sync(net, last):
                with autocast(ctx.device, tc.amp):
                    recon, mu, sigma = net(x)
                    recon = recon.float()
                    terms = {"l1": (recon - x).abs().mean(), "kl": kl_loss(mu.float(), sigma.float())}
                    loss = terms["l1"] + cfg.kl_weight * terms["kl"]
                    if perceptual is not None:
                        terms["perceptual"] = perceptual(recon, x)
                        loss = loss + cfg.perceptual_weight * terms["perceptual"]
                    if ssim_loss is not None:
                        terms["ssim"] = ssim_loss(recon, x)
                        loss = loss + cfg.ssim_weight * terms["ssim"]
                    if adv_on:
                        # the generator's view of the discriminator: gradients reach the reconstruction, not D
                        frozen = {k: v.detach() for k, v in disc.named_parameters()} | dict(disc.named_buffers())
                        logits = functional_call(disc, frozen, (recon,))[-1]
                        terms["adv_g"] = adv(logits.float(), target_is_real=True, for_discriminator=False)
                        loss = loss + cfg.adversarial_weight * terms["adv_g"]
                    terms["loss"] = loss
                (loss / tc.grad_accum).backward()
            if adv_on:
                with no_sync(net_d, last):
                    with autocast(ctx.device, tc.amp):
                        # one forward for fake and real, so DDP sees each discriminator parameter used once
                        logits = net_d(torch.cat([recon.detach(), x]))[-1].float()
                        fake, real = logits[: len(x)], logits[len(x):]
                        d_loss = 0.5 * (adv(fake, target_is_real=False, for_discriminator=True)
                                        + adv(real, target_is_real=True, for_discriminator=True))
                        terms["adv_d"] = d_loss
                    (cfg.adversarial_weight * d_loss / tc.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / tc.grad_accum
        step += 1
        progress.update(1)
        guard.step([(opt_g, model.parameters())] + ([(opt_d, disc.parameters())] if adv_on else []), tc.grad_clip)
        if ema is not None:
            update_ema(ema, model)

        final = step == tc.steps or deadline.reached(ctx)
        if step % tc.log_every == 0 or final:
            guard.check(step)  # on every rank: the one place the loop reads the skip counts
        if writer and (step % tc.log_every == 0 or final):
            sec_per_step = step_log.write(writer, step, opt_g, guard, ctx.device)
            for k, v in totals.items():
                writer.add_scalar(f"train/{k}", v.item(), step)
            volumes_per_s = tc.batch_size * tc.grad_accum * ctx.world_size / sec_per_step
            progress.set_postfix(loss=f"{totals['loss'].item():.4f}", l1=f"{totals['l1'].item():.4f}",
                                 vol_s=f"{volumes_per_s:.1f}")
        is_val = step % tc.val_every == 0 or final
        is_ckpt = step % tc.checkpoint_every == 0 or final
        if is_val or is_ckpt:
            rngs = gather_rng_states(ctx, {"patch": patch_gen})  # collectives: every rank takes part
            replicas = check_replicas(ctx, step, saved_weights())
        if is_val and ctx.is_main:
            val = validate(ema.module if ema is not None else model, val_ds, metrics, cfg, ctx, writer, step)
            log.info("step %d: validation SSIM %.4f, MS-SSIM %.4f, PSNR %.2f dB, L1 %.4f%s", step, val["ssim"],
                     val["ms_ssim"], val["psnr"], val["l1"], " (EMA weights)" if ema is not None else "")
            if val["ssim"] > best_ssim:
                best_ssim = val["ssim"]
                checkpoint("best.pt", rngs, replicas)
            net.train()
        if is_ckpt and ctx.is_main:
            checkpoint("latest.pt", rngs, replicas)
            writer.flush()
            curves.draw()  # loss.png from the scalars TensorBoard has, the whole run's after a resume
        if is_val or is_ckpt:
            barrier(ctx)
        if stopped_by_time_limit(tc.time_limit_minutes, step, tc.steps, final):
            break
    finish_run(ctx, progress, writer, guard, step)
    return latest


@torch.no_grad()
def validate(model: torch.nn.Module, dataset: Dataset, metrics: VolumeMetrics, cfg: AutoencoderConfig,
             ctx: DistContext, writer: SummaryWriter | None = None, step: int = 0) -> dict[str, float]:
    """SSIM, MS-SSIM, PSNR and L1 of whole-volume reconstructions (sliding window when training on patches)."""
    model.eval()
    scores: dict[str, list[float]] = {"ssim": [], "ms_ssim": [], "psnr": [], "l1": []}
    for i, item in enumerate(dataset):
        x = item["image"][None].to(ctx.device)
        with autocast(ctx.device, cfg.train.amp):
            recon = reconstruct(model, x, cfg)
        recon = recon.float().clamp(0, 1)
        m = metrics(recon[0], x[0])
        for k in ("ssim", "ms_ssim", "psnr"):
            scores[k].append(m[k])
        scores["l1"].append(m["mae"])
        if writer is not None and i == 0:
            a, b = x[0, 0].cpu().numpy(), recon[0, 0].cpu().numpy()
            picture = np.concatenate([three_plane(a), three_plane(b), three_plane(np.abs(a - b), vmax=0.25)])
            writer.add_image("val/input_reconstruction_error", picture, step, dataformats="HW")
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    if writer is not None:
        for k, v in out.items():
            writer.add_scalar(f"val/{k}", v, step)
    return out
