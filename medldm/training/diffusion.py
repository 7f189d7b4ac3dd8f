"""Train the latent diffusion UNet (stage 2) on cached, scaled posterior means."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medldm.config import ConfigError, DiffusionConfig, config_from_dict, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest
from medldm.errors import InputError
from medldm.inference.encode import dataset_sha256, decode_latents, latents_path, load_autoencoder_file
from medldm.inference.sample import sample_latents
from medldm.models.conditioning import ConditionEncoder, with_condition_channels
from medldm.models.networks import build_scheduler, build_unet
from medldm.models.speed import apply_speed
from medldm.training.checkpoint import autoencoder_checkpoint, file_sha256, load_checkpoint, save_checkpoint
from medldm.training.curves import LossCurves
from medldm.training.dist import barrier, init_distributed
from medldm.training.loop import (
    Deadline,
    NonFiniteGuard,
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
    restore_rng_states,
    seed_everything,
    set_warmup_lr,
    stopped_by_time_limit,
    update_ema,
)
from medldm.versions import versions
from medldm.viz import grid, three_plane

log = logging.getLogger(__name__)

# the per-timestep loss is logged in this many equal buckets of t
TIMESTEP_BUCKETS = 10


def load_latents(ae_run: Path, data_dir: Path) -> dict[str, Any]:
    """The latent cache of an autoencoder run, checked against the run's current checkpoint and against the dataset
    ``data_dir`` (by the content of its manifest.csv and preprocess.json: two preprocessings of the same scans share
    image names, and the reference grid that samples are written in comes from ``data_dir``)."""
    path = latents_path(ae_run)
    again = f"run `medldm encode --data {data_dir} --autoencoder {ae_run}` again"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `medldm encode --data {data_dir} --autoencoder {ae_run}` first")
    cache = load_checkpoint(path)
    current = file_sha256(autoencoder_checkpoint(ae_run))
    if cache["autoencoder_sha256"] != current:
        raise InputError(f"{path} was encoded with another autoencoder checkpoint than {autoencoder_checkpoint(ae_run)}"
                         f": {again}")
    recorded = cache.get("dataset_sha256")
    if recorded is None:
        raise InputError(f"{path} does not record which dataset it was encoded from (an older medldm wrote it): "
                         f"{again}")
    changed = [name for name, sha in dataset_sha256(data_dir).items() if recorded.get(name) != sha]
    if changed:
        files = " and ".join(str(data_dir / name) for name in changed)
        source = cache.get("data_dir", "another dataset")
        if Path(source) == data_dir.resolve():
            raise InputError(f"{path} was encoded from {source}, and {files} changed since: {again}")
        raise InputError(f"{path} was encoded from {source}, not from {data_dir} ({files} "
                         f"{'differs' if len(changed) == 1 else 'differ'} from what it was encoded with): {again}")
    return cache


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def loss_weights(scheduler: Any, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights: Min-SNR-γ (Hang et al. 2023) for ε or v prediction, all ones when γ = 0."""
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1.0 - alpha_bar)
    if gamma <= 0:
        return torch.ones_like(snr, dtype=torch.float32)
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


def check_resumable(state: dict[str, Any], cfg: DiffusionConfig, cache: dict[str, Any], path: Path) -> None:
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
    if state["autoencoder"]["sha256"] != cache["autoencoder_sha256"]:
        raise InputError(f"--resume: {path} was trained on the latents of another autoencoder checkpoint than the "
                         "current one; start a new diffusion run")
    # runs from before the dataset was recorded resume as they did
    if state.get("dataset_sha256", cache["dataset_sha256"]) != cache["dataset_sha256"]:
        raise InputError(f"--resume: {path} was trained on the latents of another dataset ({state['data_dir']}) than "
                         "the current cache's; resume with that dataset's latents or start a new diffusion run")


def train_diffusion(data_dir: str | Path, ae_run: str | Path, run_dir: str | Path, cfg: DiffusionConfig,
                    resume: bool = False) -> Path:
    """Train (or resume) a latent diffusion run; returns the path of its latest checkpoint."""
    data_dir, ae_run, run_dir = Path(data_dir), Path(ae_run), Path(run_dir)
    info = read_dataset_info(data_dir)
    cache = load_latents(ae_run, data_dir)
    latent_shape = list(cache["mu"].shape[1:])
    f = cfg.model.downsample_factor
    if any(s % f for s in latent_shape[1:]):
        raise ConfigError(f"diffusion.model.channels has {len(cfg.model.channels)} levels (downsampling {f}x) but the "
                          f"latents are {latent_shape}: use fewer UNet levels or a larger image shape")
    manifest = data_dir / "manifest.csv"
    # load_latents found this manifest's content unchanged since encoding: its rows are the latents', in order
    labelled = read_manifest(data_dir)
    train_idx = [i for i, r in enumerate(labelled) if r["split"] == "train"]
    if not train_idx:
        raise InputError(f"{manifest} has no train-split scans: preprocess again with val_fraction + test_fraction < 1")
    # validating on training latents would pick best.pt by how well the model fits what it was trained on
    val_idx = [i for i, r in enumerate(labelled) if r["split"] == "val"]
    if not val_idx:
        raise InputError(f"{manifest} has no val-split volumes: preprocess again with split.val_fraction > 0 "
                         "(the diffusion model keeps its best checkpoint by validation loss)")
    latest = run_dir / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest) if resume and latest.is_file() else None
    if state is not None:
        check_resumable(state, cfg, cache, latest)
    # age normalisation and ranges come from the training split (kept from the checkpoint on resume);
    # encoding every row now checks all labels before any work starts
    encoder = (ConditionEncoder.from_state_dict(state["conditioning"]) if state is not None
               else ConditionEncoder.fit(cfg.conditioning.keys, [labelled[i] for i in train_idx], str(manifest)))
    c_all = encoder.encode(labelled, str(manifest)) if encoder.keys else None

    ctx = init_distributed()
    tc = cfg.train
    if ctx.is_main:
        prepare_run_dir(run_dir, cfg, resume)
    barrier(ctx)

    scale = cache["scale_factor"]
    z_all, where = place_latents(cache["mu"] * scale, cfg.latents_on, ctx.device)
    c_all = c_all.to(z_all.device) if c_all is not None else None
    train_idx_t = torch.tensor(train_idx)

    # identical initial weights (and EMA copies) on every rank; per-rank randomness afterwards
    torch.manual_seed(tc.seed)
    hybrid = cfg.conditioning.mode == "hybrid"
    model = build_unet(cfg.model, latent_shape[0], encoder.dim if encoder.keys else None,
                       sdpa=cfg.speed.sdpa, hybrid=hybrid).to(ctx.device)
    ema = make_ema(model, cfg.ema_decay)
    # after the EMA copy (which stays a plain module: validation and previews run it eagerly) and before the
    # optimiser (channels-last swaps the parameters' storage) and DDP
    speedups = apply_speed(model, cfg.speed, ctx.device)
    seed_everything(tc.seed + ctx.rank)
    # which latents (CPU generator) and the noise, timesteps and dropped conditions (device generator)
    gens = {"pick": torch.Generator().manual_seed(tc.seed * 1000 + ctx.rank),
            "noise": torch.Generator(ctx.device).manual_seed(tc.seed * 1000 + ctx.rank + 500)}
    scheduler = build_scheduler(cfg.scheduler, "ddpm")
    weights = loss_weights(scheduler, cfg.min_snr_gamma).to(ctx.device)
    optimizer = adamw(model.parameters(), tc.lr, tc.weight_decay)
    step, best_val, skipped = 0, float("inf"), 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(state["ema_n_averaged"])
        load_optimizer(optimizer, state["optimizer"])
        step, best_val, skipped = state["step"], state["best_val_loss"], state.get("skipped_nonfinite", 0)
        restore_rng_states(ctx, state["rng"], gens)
        log.info("resumed %s at step %d", run_dir, step)
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    ae_ckpt = autoencoder_checkpoint(ae_run)
    meta = {
        "kind": "diffusion", "config": to_dict(cfg), "versions": versions(), "scale_factor": scale,
        "latent_shape": latent_shape, "conditioning": encoder.state_dict(), "world_size": ctx.world_size,
        "autoencoder": {"run": str(ae_run.resolve()), "checkpoint": str(ae_ckpt.resolve()),
                        "sha256": cache["autoencoder_sha256"]},
        # the grid samples are written in: that of the dataset the latents were encoded from (load_latents checked)
        "reference": info["reference"], "data_dir": str(data_dir.resolve()), "dataset_sha256": cache["dataset_sha256"],
    }

    def saved_weights() -> dict[str, Any]:
        return {"model": model.state_dict(), "ema": ema.module.state_dict()}

    def checkpoint(name: str, rngs: list[dict[str, Any]], replicas: list[str] | None) -> None:
        # bf16 autocast needs no gradient scaler, so there is no scaler state to keep
        save_checkpoint(run_dir / "checkpoints" / name, {
            **meta, **saved_weights(), "ema_n_averaged": int(ema.n_averaged), "optimizer": optimizer.state_dict(),
            "step": step, "best_val_loss": best_val, "skipped_nonfinite": guard.skipped, "rng": rngs,
            "replicas": replicas})

    writer = SummaryWriter(run_dir / "tensorboard") if ctx.is_main else None
    curves = LossCurves(run_dir) if ctx.is_main else None
    preview = (Preview(cfg, encoder, [labelled[i] for i in val_idx], latent_shape, ae_ckpt, scale, ctx.device)
               if ctx.is_main and cfg.preview.every > 0 else None)
    guard = NonFiniteGuard(ctx.device, skipped=skipped)
    deadline = Deadline(tc.time_limit_minutes)
    if ctx.is_main:
        log.info("diffusion: %d train latents %s held in %s; %.1fM parameters; conditions %s; effective batch %d",
                 len(train_idx), latent_shape, where, sum(p.numel() for p in model.parameters()) / 1e6,
                 encoder.keys or "none (unconditional)", tc.batch_size * tc.grad_accum * ctx.world_size)
        log.info("speed: %s", ", ".join(speedups) or "eager (no compile)")
        if preview is not None:
            writer.add_text("samples/conditions", preview.describe(), 0)
    buckets = torch.zeros(2, TIMESTEP_BUCKETS, device=ctx.device)  # loss sum and count per bucket of t
    progress = tqdm(total=tc.steps, initial=step, desc="diffusion", unit="step", disable=not ctx.is_main)
    net.train()
    step_log = StepLog(step)
    while step < tc.steps:
        set_warmup_lr(optimizer, tc.lr, tc.warmup_steps, step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(tc.grad_accum):
            pick = train_idx_t[torch.randint(len(train_idx), (tc.batch_size,), generator=gens["pick"])]
            pick = pick.to(z_all.device, non_blocking=True)  # a blocking copy would wait for the GPU every step
            z = z_all[pick].to(ctx.device, non_blocking=True)
            context = None
            if c_all is not None:
                context = encoder.drop(c_all[pick].to(ctx.device), cfg.conditioning.drop_prob,
                                       cfg.conditioning.drop_all_prob, gens["noise"])
            noise = torch.randn(z.shape, device=ctx.device, generator=gens["noise"])
            t = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=ctx.device,
                              generator=gens["noise"])
            with no_sync(net, micro == tc.grad_accum - 1):
                with autocast(ctx.device, tc.amp):
                    noisy = scheduler.add_noise(z, noise, t)
                    pred = net(with_condition_channels(noisy, context) if hybrid else noisy, timesteps=t,
                               context=context)
                per_sample = (pred.float() - diffusion_target(scheduler, z, noise, t)).pow(2).mean(dim=(1, 2, 3, 4))
                loss = (per_sample * weights[t]).mean()
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
            bucket = t * TIMESTEP_BUCKETS // scheduler.num_train_timesteps
            buckets[0].index_add_(0, bucket, per_sample.detach())
            buckets[1].index_add_(0, bucket, torch.ones_like(per_sample))
        step += 1
        progress.update(1)
        guard.step([(optimizer, model.parameters())], tc.grad_clip)
        update_ema(ema, model)
        final = step == tc.steps or deadline.reached(ctx)
        if step % tc.log_every == 0 or final:
            guard.check(step)  # on every rank: the one place the loop reads the skip counts

        if writer and (step % tc.log_every == 0 or final):
            step_log.write(writer, step, optimizer, guard, ctx.device)
            writer.add_scalar("train/loss", loss_sum.item(), step)
            width = scheduler.num_train_timesteps // TIMESTEP_BUCKETS
            for b, (total, count) in enumerate(buckets.T.tolist()):
                if count:
                    writer.add_scalar(f"loss_by_timestep/t{b * width:04d}-{(b + 1) * width - 1:04d}", total / count,
                                      step)
            buckets.zero_()
            progress.set_postfix(loss=f"{loss_sum.item():.4f}")
        is_val = step % tc.val_every == 0 or final
        is_ckpt = step % tc.checkpoint_every == 0 or final
        if is_val or is_ckpt:
            rngs = gather_rng_states(ctx, gens)  # collectives: every rank takes part
            replicas = check_replicas(ctx, step, saved_weights())
        if is_val and ctx.is_main:
            val = validation_loss(ema.module, scheduler, z_all[val_idx].to(ctx.device), hybrid,
                                  None if c_all is None else c_all[val_idx].to(ctx.device), tc.seed)
            writer.add_scalar("val/loss_ema", val, step)
            log.info("step %d: validation loss (EMA weights) %.4f", step, val)
            if val < best_val:
                best_val = val
                checkpoint("best.pt", rngs, replicas)
        if preview is not None and (step % cfg.preview.every == 0 or final):
            writer.add_image("samples/ddim_ema", preview(ema.module), step, dataformats="HW")
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
        pred = model(with_condition_channels(noisy, context) if hybrid else noisy, timesteps=t, context=context)
        total += F.mse_loss(pred.float(), diffusion_target(scheduler, z, noise, t)).item()
    return total / repeats


class Preview:
    """The same few DDIM samples (fixed seeds, the conditions of the first validation scans), decoded to images."""

    def __init__(self, cfg: DiffusionConfig, encoder: ConditionEncoder, val_rows: list[dict[str, Any]],
                 latent_shape: list[int], ae_checkpoint: Path, scale: float, device: torch.device) -> None:
        pc = cfg.preview
        self.device, self.scale, self.guidance, self.amp = device, scale, pc.guidance, cfg.train.amp
        self.hybrid = cfg.conditioning.mode == "hybrid"
        self.decoder, _ = load_autoencoder_file(ae_checkpoint, device)
        self.scheduler = build_scheduler(cfg.scheduler, "ddim")
        self.scheduler.set_timesteps(pc.ddim_steps)  # on the CPU: int(t) then never waits for the GPU
        self.labels = [{k: val_rows[i % len(val_rows)].get(k) for k in encoder.keys} for i in range(pc.num)]
        self.context = encoder.encode(self.labels).to(device) if encoder.keys else None
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
