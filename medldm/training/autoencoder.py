"""Train the KL autoencoder (stage 1): L1 + KL + patch-adversarial (+ perceptual / SSIM) on volumes or patches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.losses import SSIMLoss
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter

from medldm.artifacts import AutoencoderCheckpoint, AutoencoderRun, DatasetDir, load_checkpoint
from medldm.config import AutoencoderConfig, ConfigError, to_dict
from medldm.data.dataset import read_manifest, split_rows, volume_dataset
from medldm.devices import autocast
from medldm.errors import InputError
from medldm.evaluation.metrics import VolumeMetrics
from medldm.models.networks import build_autoencoder, build_discriminator
from medldm.models.ops import reconstruct
from medldm.models.speed import apply_speed
from medldm.training.dist import DistContext
from medldm.training.finetune import (
    Grid,
    Init,
    autoencoder_grid,
    check_architecture,
    check_grid,
    check_options,
    check_same_parent,
    check_trainable,
    check_trainable_names,
    describe_trainable,
    finetune_schedule,
    freeze,
    parent_checkpoint,
    parent_record,
)
from medldm.training.loop import (
    ResumableBatches,
    Trainer,
    adamw,
    load_optimizer,
    make_ema,
    no_sync,
    random_patches,
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
    check_trainable("autoencoder", state["config"], cfg, path)


def load_parent(init_from: str | Path, cfg: AutoencoderConfig, data_dir: Path, reference: dict[str, Any]) -> Init:
    """The autoencoder a new run starts from (``--init-from``): its weights (the EMA's when it kept one), checked to
    be of this config's architecture and trained on the grid of ``data_dir``."""
    path = parent_checkpoint(init_from, "autoencoder")
    parent = AutoencoderCheckpoint.load(path)
    check_architecture("autoencoder", parent.config_dict, cfg, (("model", None),), path)
    check_grid(autoencoder_grid(parent.reference, parent.image_shape, parent.data_dir, path), Grid.of(reference),
               path, data_dir, parent.data_dir)
    assert parent.weights is not None  # loaded with its weights
    return Init(parent.weights, parent_record(path, parent.sha256, parent.imported_from))


def train_autoencoder(data_dir: str | Path, run_dir: str | Path, cfg: AutoencoderConfig, resume: bool = False,
                      init_from: str | Path | None = None) -> Path:
    """Train (or resume) an autoencoder run; returns the path of its latest checkpoint. ``init_from`` (an
    autoencoder run, a checkpoint or an imported bundle's folder) starts a new run from its weights: see
    docs/training.md."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    reference = DatasetDir(data_dir).info()["reference"]
    image_shape = reference["shape"]
    latest = AutoencoderRun(run_dir).latest
    resuming = resume and latest.is_file()
    init = load_parent(init_from, cfg, data_dir, reference) if init_from and not resuming else None
    check_shapes(cfg, image_shape)
    rows = read_manifest(data_dir)
    train_rows, val_rows = split_rows(rows, "train"), split_rows(rows, "val")
    for split, chosen in (("train", train_rows), ("val", val_rows)):
        if not chosen:
            raise InputError(f"{data_dir}/manifest.csv has no {split}-split volumes: preprocess again with "
                             "split.val_fraction > 0 (the autoencoder keeps its best checkpoint by validation SSIM)")
    state = load_checkpoint(latest, kind="autoencoder", resume=True) if resuming else None
    if state is not None:
        check_resumable(state, cfg, latest)
        check_same_parent(state.get("init_from"), init_from, "autoencoder", latest)
    check_options(cfg.train, fine_tune=init is not None or (state or {}).get("init_from") is not None)
    check_trainable_names(lambda: build_autoencoder(cfg.model), cfg.train.trainable, set(), "autoencoder")
    return AutoencoderTrainer(run_dir, cfg, state, data_dir, reference, train_rows, val_rows, init).run(resume)


class AutoencoderTrainer(Trainer):
    """L1 + KL (+ perceptual, SSIM) on volumes or random patches, with a patch discriminator from
    ``adversarial_start``; validated by whole-volume SSIM (the EMA weights when the run keeps an EMA)."""

    best_key, higher_is_better, desc = "best_val_ssim", True, "autoencoder"

    def __init__(self, run_dir: Path, cfg: AutoencoderConfig, state: dict[str, Any] | None, data_dir: Path,
                 reference: dict[str, Any], train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]],
                 init: Init | None = None) -> None:
        super().__init__(run_dir, cfg, state)
        self.data_dir, self.train_rows, self.val_rows = data_dir, train_rows, val_rows
        self.reference, self.image_shape, self.init = reference, list(reference["shape"]), init
        # the parent of a fine-tune (recorded in its checkpoints; None for a run trained from scratch)
        self.parent = init.record if init is not None else (state or {}).get("init_from")
        if self.parent is not None:
            self.tc = finetune_schedule(cfg.train)

    def build(self) -> None:
        cfg, tc, dev = self.cfg, self.tc, self.ctx.device
        self.model = build_autoencoder(cfg.model, sdpa=cfg.speed.sdpa).to(dev)
        if self.init is not None:  # a resumed run loads its own weights instead (load)
            self.model.load_state_dict(self.init.weights)
        freeze(self.model, tc.trainable, set(), "autoencoder")
        # a fine-tune's discriminator starts afresh: it learns to tell the new data from its reconstructions
        self.disc = build_discriminator(cfg.discriminator).to(dev) if cfg.adversarial_weight > 0 else None
        self.ema = make_ema(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # after the EMA copy (which stays a plain module) and before the optimiser (channels-last swaps the
        # parameters' storage) and DDP
        self.speedups = apply_speed(self.model, cfg.speed, dev)
        # frozen parameters are not in the optimiser: no moments, no weight decay, never stepped
        self.optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], tc.lr, tc.weight_decay)
        self.opt_d = adamw(self.disc.parameters(), cfg.discriminator.lr) if self.disc is not None else None
        perceptual = build_perceptual_loss(cfg)
        self.perceptual = perceptual.to(dev) if perceptual is not None else None
        self.ssim_loss = (SSIMLoss(spatial_dims=3, data_range=1.0, win_size=cfg.ssim_window)
                          if cfg.ssim_weight > 0 else None)
        self.adv = adversarial_loss()

    def streams(self) -> dict[str, torch.Generator]:
        # besides the global torch RNG (the KL sampling noise): the patch positions
        seed = self.tc.seed * 1000 + self.ctx.rank
        return {"patch": torch.Generator().manual_seed(seed), "flip": torch.Generator().manual_seed(seed + 500)}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer(self.optimizer, state["optimizer"])
        if self.disc is not None:
            assert self.opt_d is not None  # built with the discriminator
            self.disc.load_state_dict(state["discriminator"])
            load_optimizer(self.opt_d, state["optimizer_d"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(state["ema_n_averaged"])

    def wrap(self) -> None:
        ddp = self.ctx.world_size > 1
        self.net = DistributedDataParallel(self.model) if ddp else self.model
        self.net_d = DistributedDataParallel(self.disc) if self.disc is not None and ddp else self.disc

    def start(self) -> None:
        cfg, tc, ctx = self.cfg, self.tc, self.ctx
        train_ds = volume_dataset(self.data_dir, self.train_rows, cache_rate=cfg.cache_rate)
        self.val_ds = volume_dataset(self.data_dir, self.val_rows) if ctx.is_main else None
        self.batches = ResumableBatches(train_ds, tc.batch_size, ctx, tc.seed, tc.num_workers).batches(
            start=self.step * tc.grad_accum)
        self.metrics = VolumeMetrics(self.image_shape)
        self.metadata = {"kind": "autoencoder", "config": to_dict(cfg), "versions": versions(),
                         "data_dir": str(self.data_dir.resolve()), "image_shape": self.image_shape,
                         "reference": self.reference, "world_size": ctx.world_size,
                         **({"init_from": self.parent} if self.parent is not None else {})}
        if ctx.is_main:
            log.info("autoencoder: %d train / %d val volumes %s, %s, %.1fM parameters, effective batch %d",
                     len(self.train_rows), len(self.val_rows), self.image_shape,
                     f"patches {cfg.patch_size}" if cfg.patch_size else "whole volumes",
                     sum(p.numel() for p in self.model.parameters()) / 1e6,
                     tc.batch_size * tc.grad_accum * ctx.world_size)
            log.info("speed: %s", ", ".join(self.speedups) or "eager (no compile, no recompute)")
            if self.parent is not None:
                log.info("fine-tune of %s: %s; learning-rate warm-up over %d steps (train.finetune_warmup_steps)",
                         self.parent["checkpoint"], describe_trainable(self.model, tc.trainable), tc.warmup_steps)

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, tc, dev, disc, adv = self.cfg, self.tc, self.ctx.device, self.disc, self.adv
        self.adv_on = adv_on = disc is not None and step >= cfg.adversarial_start
        self.optimizer.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            last = micro == tc.grad_accum - 1
            x = random_patches(next(self.batches)["image"], cfg.patch_size, self.generators["patch"])
            if cfg.flip_prob > 0:
                flip = torch.rand(len(x), generator=self.generators["flip"]) < cfg.flip_prob
                x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(2), x)
            x = x.to(dev, non_blocking=True)
            with no_sync(self.net, last):
                with autocast(dev, tc.amp):
                    recon, mu, sigma = self.net(x)
                    recon = recon.float()
                    terms = {"l1": (recon - x).abs().mean(), "kl": kl_loss(mu.float(), sigma.float())}
                    loss = terms["l1"] + cfg.kl_weight * terms["kl"]
                    if self.perceptual is not None:
                        terms["perceptual"] = self.perceptual(recon, x)
                        loss = loss + cfg.perceptual_weight * terms["perceptual"]
                    if self.ssim_loss is not None:
                        terms["ssim"] = self.ssim_loss(recon, x)
                        loss = loss + cfg.ssim_weight * terms["ssim"]
                    if adv_on:
                        assert disc is not None
                        # the generator's view of the discriminator: gradients reach the reconstruction, not D
                        frozen = {k: v.detach() for k, v in disc.named_parameters()} | dict(disc.named_buffers())
                        logits = functional_call(disc, frozen, (recon,))[-1]
                        terms["adv_g"] = adv(logits.float(), target_is_real=True, for_discriminator=False)
                        loss = loss + cfg.adversarial_weight * terms["adv_g"]
                    terms["loss"] = loss
                (loss / tc.grad_accum).backward()
            if adv_on:
                assert self.net_d is not None
                with no_sync(self.net_d, last):
                    with autocast(dev, tc.amp):
                        # one forward for fake and real, so DDP sees each discriminator parameter used once
                        logits = self.net_d(torch.cat([recon.detach(), x]))[-1].float()
                        fake, real = logits[: len(x)], logits[len(x):]
                        d_loss = 0.5 * (adv(fake, target_is_real=False, for_discriminator=True)
                                        + adv(real, target_is_real=True, for_discriminator=True))
                        terms["adv_d"] = d_loss
                    (cfg.adversarial_weight * d_loss / tc.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / tc.grad_accum
        return totals

    def optimizer_steps(self) -> list[tuple[torch.optim.Optimizer, Any]]:
        # a generator and its discriminator are stepped (or skipped) together
        steps: list[tuple[torch.optim.Optimizer, Any]] = [(self.optimizer, self.model.parameters())]
        if self.adv_on:
            assert self.opt_d is not None and self.disc is not None
            steps.append((self.opt_d, self.disc.parameters()))
        return steps

    def log(self, step: int, losses: dict[str, torch.Tensor], seconds_per_step: float) -> None:
        for k, v in losses.items():
            self.board.add_scalar(f"train/{k}", v.item(), step)
        volumes_per_s = self.tc.batch_size * self.tc.grad_accum * self.ctx.world_size / seconds_per_step
        self.progress.set_postfix(loss=f"{losses['loss'].item():.4f}", l1=f"{losses['l1'].item():.4f}",
                                  vol_s=f"{volumes_per_s:.1f}")

    def validate(self, step: int) -> float:
        ema = self.ema
        assert self.val_ds is not None  # rank 0 validates
        val = validate(ema.module if ema is not None else self.model, self.val_ds, self.metrics, self.cfg, self.ctx,
                       self.writer, step)
        log.info("step %d: validation SSIM %.4f, MS-SSIM %.4f, PSNR %.2f dB, L1 %.4f%s", step, val["ssim"],
                 val["ms_ssim"], val["psnr"], val["l1"], " (EMA weights)" if ema is not None else "")
        return val["ssim"]

    def weights(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),
                "discriminator": self.disc.state_dict() if self.disc is not None else None,
                "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "optimizer_d": self.opt_d.state_dict() if self.opt_d is not None else None,
                "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0}


@torch.no_grad()
def validate(model: torch.nn.Module, dataset: Dataset, metrics: VolumeMetrics, cfg: AutoencoderConfig,
             ctx: DistContext, writer: SummaryWriter | None = None, step: int = 0) -> dict[str, float]:
    """SSIM, MS-SSIM, PSNR and L1 of whole-volume reconstructions (sliding window when training on patches)."""
    model.eval()
    scores: dict[str, list[float]] = {"ssim": [], "ms_ssim": [], "psnr": [], "l1": []}
    for i, item in enumerate(cast(Sequence[dict[str, Any]], dataset)):  # a MONAI dataset: a sequence of dicts
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
