"""Train the latent diffusion UNet (stage 2) on cached, scaled posterior means."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform
from torch.optim.swa_utils import AveragedModel

from medldm.artifacts import (
    AutoencoderCheckpoint,
    AutoencoderRun,
    DatasetDir,
    DiffusionCheckpoint,
    DiffusionRun,
    LatentCache,
    file_sha256,
    load_checkpoint,
)
from medldm.config import ConfigError, DiffusionConfig, as_saved_before_the_key, config_from_dict, to_dict
from medldm.data.dataset import read_manifest
from medldm.devices import autocast
from medldm.errors import InputError
from medldm.models.conditioning import (
    ConditionEncoder,
    UnitRangeConditions,
    conditions_from_state,
    with_condition_channels,
)
from medldm.models.networks import build_scheduler, build_unet, default_sampler, set_sampling_steps
from medldm.models.ops import decode_latents, sample_latents
from medldm.models.speed import apply_speed
from medldm.training.finetune import (
    Conditions,
    Grid,
    Init,
    check_architecture,
    check_grid,
    check_options,
    check_same_parent,
    check_trainable,
    check_trainable_names,
    context_consumers,
    describe_trainable,
    finetune_conditions,
    finetune_schedule,
    freeze,
    map_context_columns,
    parent_checkpoint,
    parent_record,
)
from medldm.training.loop import Trainer, adamw, load_optimizer, make_ema, no_sync
from medldm.versions import versions
from medldm.viz import grid, three_plane

log = logging.getLogger(__name__)

# the per-timestep loss is logged in this many equal buckets of t
TIMESTEP_BUCKETS = 10


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: ε, v, or (rectified flow) the velocity from noise to data, the direction
    MONAI's ``RFlowScheduler.step`` moves along."""
    if isinstance(scheduler, RFlowScheduler):
        return latents - noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def training_timesteps(scheduler: Any, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One training timestep per latent, drawn from ``generator``: uniform over the DDPM steps; for rectified flow
    uniform or logit-normal (sigmoid of a standard normal, as MONAI's ``sample_timesteps`` draws them) in [0, T),
    then MONAI's resolution transform where the config switches it on."""
    n, dev, steps = latents.shape[0], latents.device, scheduler.num_train_timesteps
    if not isinstance(scheduler, RFlowScheduler):
        return torch.randint(0, steps, (n,), device=dev, generator=generator)
    if scheduler.sample_method == "logit-normal":
        u = torch.sigmoid(torch.randn(n, device=dev, generator=generator))
    else:
        u = torch.rand(n, device=dev, generator=generator)
    t = (u * steps).long()
    if scheduler.use_timestep_transform:
        t = timestep_transform(t, input_img_size_numel=math.prod(latents.shape[2:]),
                               base_img_size_numel=scheduler.base_img_size_numel, num_train_timesteps=steps).long()
    return t.clamp(0, steps - 1)


def loss_weights(scheduler: Any, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights: Min-SNR-γ (Hang et al. 2023) for ε or v prediction, all ones when γ = 0 and for
    rectified flow (whose timestep sampling weights the loss)."""
    if isinstance(scheduler, RFlowScheduler) or gamma <= 0:
        return torch.ones(scheduler.num_train_timesteps, dtype=torch.float32)
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1.0 - alpha_bar)
    # the ε loss is SNR-weighted MSE on x0; v carries an extra (SNR + 1)
    denominator = snr + 1.0 if scheduler.prediction_type == "v_prediction" else snr
    return (snr.clamp(max=gamma) / denominator).float()


def place_latents(z: torch.Tensor, mode: str, device: torch.device) -> tuple[torch.Tensor, str]:
    """The latent cache on the GPU when it fits (no copy per step), else in pinned host memory."""
    if device.type != "cuda":
        return z, "CPU memory"
    if mode == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        mode = "device" if z.nbytes < free / 4 else "host"
    if mode == "device":
        return z.to(device), "GPU memory"
    return z.pin_memory(), "pinned host memory (one copy per batch)"


def check_resumable(state: dict[str, Any], cfg: DiffusionConfig, cache: LatentCache, path: Path) -> None:
    """A run resumes only with its architecture, conditions, noise schedule and latents."""
    if state.get("kind") != "diffusion":
        raise InputError(f"{path} is not a diffusion checkpoint (kind={state.get('kind')!r})")
    new = to_dict(cfg)
    # the checkpoint's config with today's defaults for keys added since it was written
    old = to_dict(config_from_dict("diffusion", state["config"]))
    for section, keys in (("model", None), ("scheduler", None), ("conditioning", ("mode",))):
        for k in keys or new[section]:
            if old[section][k] != new[section][k]:
                raise ConfigError(f"--resume: diffusion.{section}.{k} is {new[section][k]} in this config but "
                                  f"{old[section][k]} in {path}; resume with the run's config.yaml")
    if state["conditioning"]["keys"] != list(cfg.conditioning.keys):
        raise ConfigError(f"--resume: diffusion.conditioning.keys is {list(cfg.conditioning.keys)} but "
                          f"{state['conditioning']['keys']} in {path}; resume with the run's config.yaml")
    check_trainable("diffusion", old, cfg, path)
    if state["autoencoder"]["sha256"] != cache.autoencoder.sha256:
        raise InputError(f"--resume: {path} was trained on the latents of another autoencoder checkpoint than the "
                         "current one; start a new diffusion run")
    # runs from before the dataset was recorded resume as they did
    if state.get("dataset_sha256", cache.dataset_sha256) != cache.dataset_sha256:
        raise InputError(f"--resume: {path} was trained on the latents of another dataset ({state['data_dir']}) than "
                         "the current cache's; resume with that dataset's latents or start a new diffusion run")


def condition_vectors(conditions: Conditions, rows: list[dict[str, Any]], source: str) -> torch.Tensor:
    """The context (B, 1, dim) of manifest rows. A model with unit-range conditions (an imported bundle) has no
    'unknown': a label the manifest leaves empty takes the model's default value."""
    if isinstance(conditions, UnitRangeConditions):
        return conditions.encode([{k: v for k, v in r.items() if v is not None and v != ""} for r in rows])
    return conditions.encode(rows, source)


def load_parent(init_from: str | Path, cfg: DiffusionConfig, data_dir: Path, reference: dict[str, Any],
                ae_run: Path) -> DiffusionCheckpoint:
    """The diffusion model a new run starts from (``--init-from``), checked before any work: the same UNet, noise
    schedule and conditioning mode, the same grid as ``data_dir``, and latents of its own autoencoder."""
    path = parent_checkpoint(init_from, "diffusion")
    parent = DiffusionCheckpoint.load(path)
    check_architecture("diffusion", parent.config_dict, cfg,
                       (("model", None), ("scheduler", None), ("conditioning", ("mode",))), path)
    if bool(parent.conditions.keys) != bool(cfg.conditioning.keys):
        had = parent.conditions.keys or "no conditions"
        raise ConfigError(f"--init-from {path} is conditioned on {had}, diffusion.conditioning.keys is "
                          f"{list(cfg.conditioning.keys)}: a conditional UNet has cross-attention layers an "
                          "unconditional one lacks, so a fine-tune keeps at least one condition, or none as its parent")
    if isinstance(parent.conditions, UnitRangeConditions) and (cfg.conditioning.drop_prob
                                                                or cfg.conditioning.drop_all_prob):
        raise ConfigError(f"--init-from {path} takes its conditions as values in [0, 1] with no 'unknown' (an "
                          "imported bundle): a dropped condition would be a value; set conditioning.drop_prob=0 "
                          "and conditioning.drop_all_prob=0")
    check_grid(Grid.of(parent.reference), Grid.of(reference), path, data_dir, parent.data_dir)
    ae_checkpoint = AutoencoderRun(ae_run).checkpoint
    sha = file_sha256(ae_checkpoint)
    if sha != parent.autoencoder.sha256:
        theirs = parent.autoencoder.run or str(Path(parent.autoencoder.checkpoint).parent.parent)
        raise InputError(f"--autoencoder {ae_run}: its checkpoint {ae_checkpoint} (SHA-256 {sha[:12]}…) is not the "
                         f"autoencoder that --init-from {path} was trained with ({parent.autoencoder.checkpoint}, "
                         f"SHA-256 {parent.autoencoder.sha256[:12]}…); a fine-tune learns in its parent's latent "
                         f"space: encode the data with the parent's autoencoder (`medldm encode --data {data_dir} "
                         f"--autoencoder {theirs}`) and pass --autoencoder {theirs}")
    return parent


def condition_layers(cfg: DiffusionConfig, latent_channels: int, context_dim: int | None) -> dict[str, int]:
    """The UNet's parameters that read the condition vector (see ``context_consumers``); none when unconditional."""
    if not context_dim:
        return {}
    return context_consumers(lambda d: build_unet(cfg.model, latent_channels, d, hybrid=cfg.conditioning.hybrid),
                             context_dim)


def initial_weights(parent: DiffusionCheckpoint, cfg: DiffusionConfig, conditions: Conditions) -> Init:
    """The parent's EMA weights (what it samples with) for a UNet with ``conditions``, and the record of it."""
    assert parent.weights is not None  # loaded with its weights
    weights = parent.weights
    if conditions.keys:
        weights = map_context_columns(weights, condition_layers(cfg, parent.latent_shape[0], conditions.dim),
                                      parent.conditions, conditions)
    return Init(weights, parent_record(parent.path, parent.sha256, parent.imported_from), parent.scale_factor)


def train_diffusion(data_dir: str | Path, ae_run: str | Path, run_dir: str | Path, cfg: DiffusionConfig,
                    resume: bool = False, init_from: str | Path | None = None) -> Path:
    """Train (or resume) a latent diffusion run; returns the path of its latest checkpoint. ``init_from`` (a
    diffusion run, a checkpoint or an imported bundle's folder) starts a new run from that model's weights: see
    docs/training.md."""
    data_dir, ae_run, run_dir = Path(data_dir), Path(ae_run), Path(run_dir)
    info = DatasetDir(data_dir).info()
    latest = DiffusionRun(run_dir).latest
    resuming = resume and latest.is_file()
    # the parent's grid and autoencoder before the latents: a fine-tune's data is encoded with the parent's
    parent = load_parent(init_from, cfg, data_dir, info["reference"], ae_run) if init_from and not resuming else None
    cache = LatentCache.checked(ae_run, data_dir)
    latent_shape = list(cache.mu.shape[1:])
    f = cfg.model.downsample_factor
    if any(s % f for s in latent_shape[1:]):
        raise ConfigError(f"diffusion.model.channels has {len(cfg.model.channels)} levels (downsampling {f}x) but the "
                          f"latents are {latent_shape}: use fewer UNet levels or a larger image shape")
    manifest = data_dir / "manifest.csv"
    # the cache was checked against this manifest's content: its rows are the latents', in order
    labelled = read_manifest(data_dir)
    train_idx = [i for i, r in enumerate(labelled) if r["split"] == "train"]
    if not train_idx:
        raise InputError(f"{manifest} has no train-split scans: preprocess again with val_fraction + test_fraction < 1")
    # validating on training latents would pick best.pt by how well the model fits what it was trained on
    val_idx = [i for i, r in enumerate(labelled) if r["split"] == "val"]
    if not val_idx:
        raise InputError(f"{manifest} has no val-split volumes: preprocess again with split.val_fraction > 0 "
                         "(the diffusion model keeps its best checkpoint by validation loss)")
    state = load_checkpoint(latest) if resuming else None
    if state is not None:
        cfg = as_saved_before_the_key("diffusion", cfg, state["config"])
        check_resumable(state, cfg, cache, latest)
        check_same_parent(state.get("init_from"), init_from, "diffusion", latest)
    check_options(cfg.train, fine_tune=parent is not None or (state or {}).get("init_from") is not None)
    # age normalisation and ranges come from the training split (kept from the checkpoint on resume, and from the
    # parent for the conditions it had); encoding every row now checks all labels before any work starts
    train_rows = [labelled[i] for i in train_idx]
    conditions: Conditions
    if state is not None:
        conditions = conditions_from_state(state["conditioning"])
    elif parent is not None:
        conditions = finetune_conditions(parent.conditions, cfg.conditioning.keys, train_rows, str(manifest),
                                         parent.path)
    else:
        conditions = ConditionEncoder.fit(cfg.conditioning.keys, train_rows, str(manifest))
    c_all = condition_vectors(conditions, labelled, str(manifest)) if conditions.keys else None
    context_dim = conditions.dim if conditions.keys else None
    check_trainable_names(lambda: build_unet(cfg.model, latent_shape[0], context_dim, hybrid=cfg.conditioning.hybrid),
                          cfg.train.trainable, set(condition_layers(cfg, latent_shape[0], context_dim)), "UNet")
    init = initial_weights(parent, cfg, conditions) if parent is not None else None
    # a fine-tune works on its parent's scale of the latents, which its weights were trained on
    scale = (init.scale_factor if init is not None else state["scale_factor"] if state and state.get("init_from")
             else cache.scale_factor)
    return DiffusionTrainer(run_dir, cfg, state, data_dir, info["reference"], AutoencoderRun(ae_run), cache,
                            conditions, c_all, labelled, train_idx, val_idx, scale, init).run(resume)


class DiffusionTrainer(Trainer):
    """The denoising loss (ε or v, optionally Min-SNR weighted) on scaled cached latents, with conditions dropped
    for classifier-free guidance; validated by the EMA model's loss at fixed noise, previewed by DDIM samples."""

    best_key, higher_is_better, desc = "best_val_loss", False, "diffusion"  # best_sample_score by samples
    ema: AveragedModel  # always kept

    def __init__(self, run_dir: Path, cfg: DiffusionConfig, state: dict[str, Any] | None, data_dir: Path,
                 reference: dict[str, Any], ae_run: AutoencoderRun, cache: LatentCache, conditions: Conditions,
                 c_all: torch.Tensor | None, labelled: list[dict[str, Any]], train_idx: list[int],
                 val_idx: list[int], scale: float, init: Init | None = None) -> None:
        super().__init__(run_dir, cfg, state)
        self.data_dir, self.reference, self.ae_run, self.cache = data_dir, reference, ae_run, cache
        self.scale, self.init = scale, init
        # the parent of a fine-tune (recorded in its checkpoints; None for a run trained from scratch)
        self.parent = init.record if init is not None else (state or {}).get("init_from")
        if self.parent is not None:
            self.tc = finetune_schedule(cfg.train)
        self.conditions, self.c_all, self.labelled = conditions, c_all, labelled
        self.train_idx, self.val_idx = train_idx, val_idx
        self.latent_shape = list(cache.mu.shape[1:])
        if cfg.selection.by == "samples":
            self.best_key = "best_sample_score"

    def build(self) -> None:
        cfg, dev = self.cfg, self.ctx.device
        self.z_all, self.where = place_latents(self.cache.mu * self.scale, cfg.latents_on, dev)
        self.c_all = self.c_all.to(self.z_all.device) if self.c_all is not None else None
        self.train_idx_t = torch.tensor(self.train_idx)
        self.hybrid = cfg.conditioning.hybrid
        context_dim = self.conditions.dim if self.conditions.keys else None
        self.model = build_unet(cfg.model, self.latent_shape[0], context_dim, sdpa=cfg.speed.sdpa,
                                hybrid=self.hybrid).to(dev)
        if self.init is not None:  # a resumed run loads its own weights instead (load)
            self.model.load_state_dict(self.init.weights)
        freeze(self.model, self.tc.trainable, set(condition_layers(cfg, self.latent_shape[0], context_dim)), "UNet")
        self.ema = make_ema(self.model, cfg.ema_decay)
        # after the EMA copy (which stays a plain module: validation and previews run it eagerly) and before the
        # optimiser (channels-last swaps the parameters' storage) and DDP
        self.speedups = apply_speed(self.model, cfg.speed, dev)
        self.scheduler = build_scheduler(cfg.scheduler)
        self.loss_weights = loss_weights(self.scheduler, cfg.min_snr_gamma).to(dev)
        # frozen parameters are not in the optimiser: no moments, no weight decay, never stepped
        self.optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], self.tc.lr,
                               self.tc.weight_decay)

    def streams(self) -> dict[str, torch.Generator]:
        # which latents (CPU generator) and the noise, timesteps and dropped conditions (device generator)
        seed, rank = self.tc.seed, self.ctx.rank
        return {"pick": torch.Generator().manual_seed(seed * 1000 + rank),
                "noise": torch.Generator(self.ctx.device).manual_seed(seed * 1000 + rank + 500)}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.ema.n_averaged.fill_(state["ema_n_averaged"])
        load_optimizer(self.optimizer, state["optimizer"])

    def start(self) -> None:
        cfg, ctx, tc = self.cfg, self.ctx, self.tc
        ae_ckpt = self.ae_run.checkpoint
        self.metadata = {
            "kind": "diffusion", "config": to_dict(cfg), "versions": versions(), "scale_factor": self.scale,
            "latent_shape": self.latent_shape, "conditioning": self.conditions.state_dict(),
            "world_size": ctx.world_size,
            "autoencoder": {"run": str(self.ae_run.path.resolve()), "checkpoint": str(ae_ckpt.resolve()),
                            "sha256": self.cache.autoencoder.sha256},
            # the grid samples are written in: that of the dataset the latents were encoded from (checked)
            "reference": self.reference, "data_dir": str(self.data_dir.resolve()),
            "dataset_sha256": self.cache.dataset_sha256,
            **({"init_from": self.parent} if self.parent is not None else {}),
        }
        self.preview = (Preview(cfg, self.conditions, [self.labelled[i] for i in self.val_idx], self.latent_shape,
                                ae_ckpt, self.scale, ctx.device)
                        if ctx.is_main and cfg.preview.every > 0 else None)
        if ctx.is_main:
            log.info("diffusion: %d train latents %s held in %s; %.1fM parameters; conditions %s; effective batch %d",
                     len(self.train_idx), self.latent_shape, self.where,
                     sum(p.numel() for p in self.model.parameters()) / 1e6,
                     self.conditions.keys or "none (unconditional)", tc.batch_size * tc.grad_accum * ctx.world_size)
            log.info("speed: %s", ", ".join(self.speedups) or "eager (no compile)")
            if self.parent is not None:
                log.info("fine-tune of %s: %s; learning-rate warm-up over %d steps (train.finetune_warmup_steps)",
                         self.parent["checkpoint"], describe_trainable(self.model, tc.trainable), tc.warmup_steps)
            if self.preview is not None:
                self.board.add_text("samples/conditions", self.preview.describe(), 0)
        self.buckets = torch.zeros(2, TIMESTEP_BUCKETS, device=ctx.device)  # loss sum and count per bucket of t
        self.scorer = None
        if ctx.is_main and cfg.selection.by == "samples":
            c_train = self.c_all[self.train_idx] if self.c_all is not None else None
            self.scorer = SampleScore(cfg, self.z_all[self.train_idx].to(ctx.device), c_train, ctx.device)

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, tc, dev, scheduler, gens = self.cfg, self.tc, self.ctx.device, self.scheduler, self.generators
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for micro in range(tc.grad_accum):
            pick = self.train_idx_t[torch.randint(len(self.train_idx), (tc.batch_size,), generator=gens["pick"])]
            pick = pick.to(self.z_all.device, non_blocking=True)  # a blocking copy would wait for the GPU every step
            z = self.z_all[pick].to(dev, non_blocking=True)
            context = None
            if self.c_all is not None:
                context = self.c_all[pick].to(dev)
                if isinstance(self.conditions, ConditionEncoder):  # unit-range conditions have no 'unknown' to drop to
                    context = self.conditions.drop(context, cfg.conditioning.drop_prob,
                                                   cfg.conditioning.drop_all_prob, gens["noise"])
            noise = torch.randn(z.shape, device=dev, generator=gens["noise"])
            t = training_timesteps(scheduler, z, gens["noise"])
            with no_sync(self.net, micro == tc.grad_accum - 1):
                with autocast(dev, tc.amp):
                    noisy = scheduler.add_noise(z, noise, t)
                    x = with_condition_channels(noisy, context) if self.hybrid and context is not None else noisy
                    pred = self.net(x, timesteps=t, context=context)
                per_sample = (pred.float() - diffusion_target(scheduler, z, noise, t)).pow(2).mean(dim=(1, 2, 3, 4))
                loss = (per_sample * self.loss_weights[t]).mean()
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
            bucket = t * TIMESTEP_BUCKETS // scheduler.num_train_timesteps
            self.buckets[0].index_add_(0, bucket, per_sample.detach())
            self.buckets[1].index_add_(0, bucket, torch.ones_like(per_sample))
        return {"loss": loss_sum}

    def log(self, step: int, losses: dict[str, torch.Tensor], seconds_per_step: float) -> None:
        self.board.add_scalar("train/loss", losses["loss"].item(), step)
        width = self.scheduler.num_train_timesteps // TIMESTEP_BUCKETS
        for b, (total, count) in enumerate(self.buckets.T.tolist()):
            if count:
                self.board.add_scalar(f"loss_by_timestep/t{b * width:04d}-{(b + 1) * width - 1:04d}", total / count,
                                       step)
        self.buckets.zero_()
        self.progress.set_postfix(loss=f"{losses['loss'].item():.4f}")

    def validate(self, step: int) -> float:
        dev, c_all = self.ctx.device, self.c_all
        val = validation_loss(self.ema.module, self.scheduler, self.z_all[self.val_idx].to(dev), self.hybrid,
                              None if c_all is None else c_all[self.val_idx].to(dev), self.tc.seed)
        self.board.add_scalar("val/loss_ema", val, step)
        if self.scorer is None:
            log.info("step %d: validation loss (EMA weights) %.4f", step, val)
            return val
        # the raw weights' score is logged beside the EMA's: which of the two samples better is worth seeing
        score, raw = self.scorer(self.ema.module), self.scorer(self.model)
        self.board.add_scalar("val/sample_score_ema", score, step)
        self.board.add_scalar("val/sample_score_raw", raw, step)
        log.info("step %d: validation loss (EMA weights) %.4f; sample score %.3f (EMA weights; raw weights %.3f; "
                 "training latents score 1)", step, val, score, raw)
        return score

    def after_validation(self, step: int, final: bool) -> None:
        if self.preview is not None and (step % self.cfg.preview.every == 0 or final):
            self.board.add_image("samples/ddim_ema", self.preview(self.ema.module), step, dataformats="HW")

    def weights(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict()}

    def training_state(self) -> dict[str, Any]:
        # bf16 autocast needs no gradient scaler, so there is no scaler state to keep
        return {"ema_n_averaged": int(self.ema.n_averaged), "optimizer": self.optimizer.state_dict()}


@torch.no_grad()
def validation_loss(model: torch.nn.Module, scheduler: Any, z: torch.Tensor, hybrid: bool, context: torch.Tensor | None,
                    seed: int, repeats: int = 4) -> float:
    """Unweighted denoising loss on validation latents at fixed noise and timesteps (comparable across steps)."""
    model.eval()
    gen = torch.Generator(z.device).manual_seed(seed + 12345)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(z.shape, device=z.device, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=z.device, generator=gen)
        noisy = scheduler.add_noise(z, noise, t)
        x = with_condition_channels(noisy, context) if hybrid and context is not None else noisy
        pred = model(x, timesteps=t, context=context)
        total += F.mse_loss(pred.float(), diffusion_target(scheduler, z, noise, t)).item()
    return total / repeats


def latent_features(z: torch.Tensor) -> torch.Tensor:
    """Per latent: each channel's spread and its coarse layout (the channel averaged over 3 x 3 x 3 blocks)."""
    return torch.cat([z.flatten(2).std(dim=2), F.adaptive_avg_pool3d(z, 3).flatten(1)], dim=1)


class SampleScore:
    """How far fixed-seed samples of a model lie from the training latents, as the squared z-score of their
    ``latent_features`` against the training latents' (mean over features and samples; training latents score
    about 1). Samples that drift off the latent distribution (a spread of 3-6 where the data has 1-2, noise that
    fills the box) score far above 1; so does a model that has not learnt the layout yet."""

    def __init__(self, cfg: DiffusionConfig, train_latents: torch.Tensor, train_context: torch.Tensor | None,
                 device: torch.device) -> None:
        sc = cfg.selection
        features = latent_features(train_latents.float())
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        self.scheduler = build_scheduler(cfg.scheduler, default_sampler(cfg.scheduler))
        set_sampling_steps(self.scheduler, sc.steps, list(train_latents.shape[1:]))
        gen = torch.Generator().manual_seed(cfg.train.seed + 7919)
        self.noise = torch.randn(sc.num, *train_latents.shape[1:], generator=gen).to(device)
        # the conditions of training scans spread over the split, the same ones at every validation
        pick = torch.linspace(0, len(train_latents) - 1, sc.num).round().long()
        self.context = train_context[pick.to(train_context.device)].to(device) if train_context is not None else None
        self.hybrid, self.amp = cfg.conditioning.hybrid, cfg.train.amp

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module) -> float:
        unet.eval()
        z = sample_latents(unet, self.scheduler, self.noise, self.context, amp=self.amp, concat=self.hybrid)
        return (((latent_features(z.float()) - self.mean) / self.std) ** 2).mean().item()


class Preview:
    """The same few samples (DDIM, or Euler steps for rectified flow; fixed seeds, the conditions of the first
    validation scans), decoded to images."""

    def __init__(self, cfg: DiffusionConfig, conditions: Conditions, val_rows: list[dict[str, Any]],
                 latent_shape: list[int], ae_checkpoint: Path, scale: float, device: torch.device) -> None:
        pc = cfg.preview
        self.device, self.scale, self.guidance, self.amp = device, scale, pc.guidance, cfg.train.amp
        self.hybrid = cfg.conditioning.hybrid
        self.decoder = AutoencoderCheckpoint.load(ae_checkpoint).model(device)
        self.scheduler = build_scheduler(cfg.scheduler, default_sampler(cfg.scheduler))
        set_sampling_steps(self.scheduler, pc.ddim_steps, latent_shape)
        self.labels = [{k: val_rows[i % len(val_rows)].get(k) for k in conditions.keys} for i in range(pc.num)]
        self.context = (condition_vectors(conditions, self.labels, "preview").to(device) if conditions.keys
                        else None)
        self.noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(cfg.train.seed + i))
                                  for i in range(pc.num)]).to(device)

    def describe(self) -> str:
        return "  \n".join(f"sample {i}: " + (", ".join(f"{k}={v if v is not None else 'unknown'}"
                                                          for k, v in labels.items()) or "unconditional")
                           for i, labels in enumerate(self.labels))

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module) -> np.ndarray:
        unet.eval()
        tiles = []
        for i in range(len(self.noise)):
            context = self.context[i:i + 1] if self.context is not None else None
            with autocast(self.device, self.amp):
                z = sample_latents(unet, self.scheduler, self.noise[i:i + 1], context, self.guidance, amp=self.amp,
                                   concat=self.hybrid)
                x = decode_latents(self.decoder, z / self.scale)
            tiles.append(three_plane(x[0, 0].cpu().numpy()))
        return grid(tiles, columns=1)
