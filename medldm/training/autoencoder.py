"""Train the KL autoencoder (stage 1): L1 + KL on preprocessed volumes."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from monai.metrics import SSIMMetric
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medldm.config import AutoencoderConfig, ConfigError, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, split_rows, volume_dataset
from medldm.inference.encode import reconstruct
from medldm.models.networks import build_autoencoder
from medldm.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medldm.training.dist import barrier, init_distributed
from medldm.training.loop import (
    NonFiniteGuard,
    autocast,
    finish_run,
    infinite_batches,
    prepare_run_dir,
    seed_everything,
)
from medldm.versions import versions

log = logging.getLogger(__name__)


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def check_shapes(cfg: AutoencoderConfig, image_shape: list[int]) -> None:
    """The volume must halve cleanly at every autoencoder level."""
    f = cfg.model.downsample_factor
    if any(s % f for s in image_shape):
        raise ConfigError(f"autoencoder.model.channels has {len(cfg.model.channels)} levels (downsampling {f}x) "
                          f"but the dataset's volumes are {image_shape}: set preprocess.shape to multiples of {f} "
                          "or change autoencoder.model.channels")


def train_autoencoder(data_dir: str | Path, run_dir: str | Path, cfg: AutoencoderConfig, resume: bool = False) -> Path:
    """Train (or resume) an autoencoder run; returns the path of its latest checkpoint."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    info = read_dataset_info(data_dir)
    check_shapes(cfg, info["reference"]["shape"])
    rows = read_manifest(data_dir)
    train_rows, val_rows = split_rows(rows, "train"), split_rows(rows, "val")
    if not train_rows:
        raise ValueError(f"{data_dir}/manifest.csv has no train-split volumes")
    val_ds = volume_dataset(data_dir, val_rows or train_rows[:2])

    ctx = init_distributed()
    tc = cfg.train
    seed_everything(tc.seed + ctx.rank)
    latest = prepare_run_dir(run_dir, cfg, resume) if ctx.is_main else run_dir / "checkpoints" / "latest.pt"
    barrier(ctx)

    train_ds = volume_dataset(data_dir, train_rows)
    sampler = DistributedSampler(train_ds, ctx.world_size, ctx.rank, seed=tc.seed) if ctx.world_size > 1 else None
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=tc.num_workers, drop_last=len(train_ds) > tc.batch_size,
                        generator=torch.Generator().manual_seed(tc.seed))
    model = build_autoencoder(cfg.model).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, best_ssim = 0, -1.0
    if resume:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_ssim = state["step"], state["best_val_ssim"]
        set_rng_state(state["rng"])
        log.info("resumed %s at step %d", run_dir, step)
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model

    writer = SummaryWriter(run_dir / "tensorboard") if ctx.is_main else None
    guard = NonFiniteGuard()
    batches = infinite_batches(loader, sampler)
    meta = {"kind": "autoencoder", "config": to_dict(cfg), "versions": versions(), "data_dir": str(data_dir.resolve()),
            "image_shape": info["reference"]["shape"]}

    def checkpoint(name: str) -> None:
        save_checkpoint(run_dir / "checkpoints" / name, {
            **meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "best_val_ssim": best_ssim, "rng": rng_state()})

    progress = tqdm(total=tc.steps, initial=step, desc="autoencoder", unit="step", disable=not ctx.is_main)
    net.train()
    while step < tc.steps:
        x = next(batches)["image"].to(ctx.device)
        with autocast(ctx.device, tc.amp):
            recon, mu, sigma = net(x)
            l1 = (recon.float() - x).abs().mean()
            kl = kl_loss(mu.float(), sigma.float())
            loss = l1 + cfg.kl_weight * kl
        step += 1
        progress.update(1)
        if not guard.ok(loss, step):
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()

        if writer and step % tc.log_every == 0:
            writer.add_scalar("train/l1", l1.item(), step)
            writer.add_scalar("train/kl", kl.item(), step)
            writer.add_scalar("train/loss", loss.item(), step)
            progress.set_postfix(l1=f"{l1.item():.4f}")
        if step % tc.val_every == 0 or step == tc.steps:
            if ctx.is_main:
                val = validate(model, val_ds, ctx.device)
                writer.add_scalar("val/l1", val["l1"], step)
                writer.add_scalar("val/ssim", val["ssim"], step)
                log.info("step %d: val L1 %.4f, SSIM %.4f", step, val["l1"], val["ssim"])
                if val["ssim"] > best_ssim:
                    best_ssim = val["ssim"]
                    checkpoint("best.pt")
            net.train()
        if ctx.is_main and (step % tc.checkpoint_every == 0 or step == tc.steps):
            checkpoint("latest.pt")
    finish_run(ctx, progress, writer, guard, step)
    return latest


@torch.no_grad()
def validate(model: torch.nn.Module, dataset: Dataset, device: torch.device) -> dict[str, float]:
    """Mean L1 and SSIM of full-volume reconstructions."""
    model.eval()
    metric = SSIMMetric(spatial_dims=3, data_range=1.0)
    l1s, ssims = [], []
    for item in dataset:
        x = item["image"][None].to(device)
        recon = reconstruct(model, x).clamp(0, 1)
        l1s.append((recon - x).abs().mean().item())
        ssims.append(metric(recon, x).mean().item())
    return {"l1": sum(l1s) / len(l1s), "ssim": sum(ssims) / len(ssims)}
