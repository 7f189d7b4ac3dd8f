"""DDIM/DDPM sampling of latents (with classifier-free guidance), decoding, and export of synthetic volumes."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from medldm.config import config_from_dict
from medldm.data.io import visible
from medldm.errors import InputError
from medldm.inference.bundle import imported_diffusion_run, is_bundle
from medldm.inference.encode import decode_latents, load_autoencoder_file
from medldm.inference.export import SampleWriter, prepare_output_dir, remove_previous_outputs
from medldm.inference.graphs import GraphedUNet
from medldm.models.conditioning import conditions_from_state, with_condition_channels
from medldm.models.networks import build_scheduler, build_unet
from medldm.models.speed import apply_speed
from medldm.training.checkpoint import best_checkpoint, file_sha256, load_checkpoint

log = logging.getLogger(__name__)


def load_diffusion(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The EMA UNet of a diffusion run in eval mode, and its checkpoint metadata."""
    path = best_checkpoint(run_dir, "diffusion")
    state = load_checkpoint(path, kind="diffusion")
    cfg = config_from_dict("diffusion", state["config"])
    encoder = conditions_from_state(state["conditioning"])
    model = build_unet(cfg.model, state["latent_shape"][0], encoder.dim if encoder.keys else None, sdpa=cfg.speed.sdpa,
                       hybrid=cfg.conditioning.mode == "hybrid")
    model.load_state_dict(state["ema"])
    meta = {k: v for k, v in state.items() if k not in ("model", "ema", "optimizer", "rng")}
    meta.update(checkpoint=str(path.resolve()), sha256=file_sha256(path), cfg=cfg, encoder=encoder)
    return model.to(device).eval(), meta


SAMPLERS = ("ddim", "ddpm")


def condition_context(encoder: Any, conditions: Mapping[str, str] | None,
                      device: torch.device) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The context (1, 1, dim) for ``--condition`` pairs (None for an unconditional model), and the labels used."""
    labels = encoder.parse(conditions or {})
    if hasattr(encoder, "filled"):  # a model without "unknown" conditions: the defaults stand in, and are recorded
        labels = encoder.filled(labels)
    return (encoder.encode([labels]).to(device) if encoder.keys else None), labels


@torch.no_grad()
def sample_latents(
    unet: Callable[..., torch.Tensor],
    scheduler: DDPMScheduler | DDIMScheduler,
    noise: torch.Tensor,
    context: torch.Tensor | None,
    guidance: float = 1.0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    progress: bool = False,
    amp: bool = True,
    concat: bool = False,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` with a DDIM or DDPM scheduler (``set_timesteps`` already called).

    Guidance != 1 mixes the conditional and the null-context predictions (classifier-free guidance). When a step
    draws noise (DDPM, or DDIM with eta > 0) each sample draws it from its own generator, so a sample does not
    depend on the batch it was generated in. The UNet runs in bf16 autocast on CUDA (``amp``); the scheduler
    arithmetic stays float32. ``concat``: the UNet also takes the context as constant input channels ("hybrid").
    """
    x = noise
    guided = context is not None and guidance != 1.0
    ddpm = isinstance(scheduler, DDPMScheduler)
    step_args = {} if ddpm else {"eta": eta}
    per_sample = generators is not None and (ddpm or eta > 0)
    name = "ddpm" if ddpm else "ddim"
    for t in tqdm(scheduler.timesteps, desc=name, unit="step", leave=False, disable=not progress):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.device.type == "cuda"):
            if guided:
                xx, cc = torch.cat([x, x]), torch.cat([context, torch.zeros_like(context)])
                both = unet(with_condition_channels(xx, cc) if concat else xx, timesteps=torch.cat([tt, tt]),
                            context=cc)
                cond, uncond = both.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            else:
                pred = unet(with_condition_channels(x, context) if concat else x, timesteps=tt, context=context)
        pred = pred.float()
        if per_sample:
            x = torch.cat([scheduler.step(pred[i : i + 1], int(t), x[i : i + 1], generator=g, **step_args)[0]
                           for i, g in enumerate(generators)])
        else:
            x = scheduler.step(pred, int(t), x, **step_args)[0]
    return x


def sample_run(
    run_dir: str | Path,
    out_dir: str | Path,
    num: int,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    conditions: Mapping[str, str] | None = None,
    guidance: float = 1.0,
    batch_size: int = 4,
    decode_device: str | None = None,
    autoencoder_run: str | Path | None = None,
    fmt: str = "nifti",
    dtype: str = "int16",
    overwrite: bool = False,
    device: str | None = None,
    eager: bool = False,
) -> list[Path]:
    """Sample ``num`` volumes from a diffusion run and export each as it is decoded (see ``SampleWriter``).

    ``steps`` defaults to 50 for DDIM; DDPM always runs every training timestep. Sample i uses seed ``seed + i``
    whatever the batch size. Volumes are decoded one at a time on ``decode_device`` (default: the sampling
    device; "cpu" when a GPU is too small for one decode). Everything that can be checked (output folder,
    conditions, options) is checked before sampling starts. ``autoencoder_run`` (a run dir or checkpoint file) is
    where to find the autoencoder when the run was moved from where it was trained. ``run_dir`` may also be a
    downloaded MONAI bundle folder, imported into it on first use. On CUDA the UNet is replayed as
    a CUDA graph and both networks are compiled as the diffusion run's ``speed`` section says; ``eager`` switches
    both off.
    """
    if num < 1 or batch_size < 1 or (steps is not None and steps < 1):
        raise InputError("--num, --steps and --batch-size must be >= 1")
    if not eta >= 0 or not math.isfinite(eta):  # "not >=": NaN passes every comparison
        raise InputError(f"--eta {eta}: use a finite number >= 0")
    if not math.isfinite(guidance):
        raise InputError(f"--guidance {guidance}: use a finite number (1 = no guidance)")
    if sampler not in SAMPLERS:
        raise InputError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    dev = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    decode_dev = resolve_device(decode_device, "--decode-device") if decode_device else dev
    out_dir = prepare_output_dir(out_dir, overwrite)
    if is_bundle(run_dir):  # a downloaded MONAI bundle: imported on first use
        run_dir = imported_diffusion_run(run_dir)
        # found by its hash next to the diffusion run, also after the bundle folder was moved or copied
        autoencoder_run = autoencoder_run or run_dir.parent / "autoencoder"
    unet, meta = load_diffusion(run_dir, dev)
    ae_path = find_autoencoder(meta["autoencoder"], autoencoder_run)  # hashed there: the recorded SHA-256
    autoencoder, ae_meta = load_autoencoder_file(ae_path, decode_dev, sha256=meta["autoencoder"]["sha256"])
    encoder = meta["encoder"]
    context_one, labels = condition_context(encoder, conditions, dev)
    if guidance != 1.0 and not getattr(encoder, "guidance", True):
        raise InputError(f"--guidance {guidance:g}: this model was trained without dropping its conditions, so it has "
                         "no unconditional prediction to guide with; leave --guidance at 1")
    if guidance != 1.0 and not labels:
        log.warning("--guidance %.2f has no effect without --condition", guidance)
        guidance = 1.0
    scheduler = build_scheduler(meta["cfg"].scheduler, sampler)
    steps = _check_steps(sampler, steps, meta["cfg"].scheduler.num_train_timesteps, eta)
    scheduler.set_timesteps(steps)  # timesteps on the CPU: int(t) then never waits for the GPU
    latent_shape, scale, reference = meta["latent_shape"], meta["scale_factor"], meta["reference"]
    speed = meta["cfg"].speed
    if eager:
        speed = dataclasses.replace(speed, compile="off", cuda_graphs=False)
    speedups = (apply_speed(unet, speed, dev, training=False)
                + apply_speed(autoencoder, speed, decode_dev, training=False))
    net = unet
    if speed.cuda_graphs and dev.type == "cuda":
        net = GraphedUNet(unet)
        speedups.append("UNet replayed as a CUDA graph")
    log.info("speed: %s", ", ".join(speedups) or "eager")

    provenance = {
        "sampler": sampler.upper(), "steps": steps, "eta": eta if sampler == "ddim" else None, "guidance": guidance,
        "conditions": labels, "diffusion_checkpoint": meta["checkpoint"], "diffusion_sha256": meta["sha256"],
        "autoencoder_checkpoint": ae_meta["checkpoint"], "autoencoder_sha256": ae_meta["sha256"],
        "scale_factor": scale, "device": str(dev), "decode_device": str(decode_dev),
        "precision": "bf16 autocast on CUDA" if "cuda" in (dev.type, decode_dev.type) else "float32",
        "format": fmt, "dtype": dtype, "speed": ", ".join(speedups) or "eager",
        "diffusion_config": meta["config"], "autoencoder_config": ae_meta["config"],
    }
    writer = SampleWriter(out_dir, reference, provenance, fmt, dtype)
    if overwrite:
        remove_previous_outputs(out_dir)

    paths: list[Path] = []
    timer = {"diffusion": 0.0, "decode": 0.0, "export": 0.0}
    start = time.perf_counter()
    with tqdm(total=num, desc="sample", unit="volume") as progress:
        for first in range(0, num, batch_size):
            seeds = list(range(seed + first, seed + min(first + batch_size, num)))
            gens = [torch.Generator(dev).manual_seed(s) for s in seeds]
            noise = torch.stack([torch.randn(latent_shape, generator=g, device=dev) for g in gens])
            context = context_one.expand(len(seeds), -1, -1) if context_one is not None else None
            with _timed(timer, "diffusion", dev):
                z = sample_latents(net, scheduler, noise, context, guidance, eta, gens, progress=True,
                                   concat=meta["cfg"].conditioning.mode == "hybrid")
            with _timed(timer, "decode", decode_dev), torch.autocast("cuda", dtype=torch.bfloat16,
                                                                     enabled=decode_dev.type == "cuda"):
                volumes = decode_latents(autoencoder, z.to(decode_dev) / scale).cpu().numpy()
            with _timed(timer, "export", torch.device("cpu")):
                paths.extend(writer.write(v[0], s) for v, s in zip(volumes, seeds))
            progress.update(len(seeds))
    writer.close()
    total = time.perf_counter() - start
    log.info("%d volumes in %.1f s: %.2f s per volume (diffusion %.2f, decode %.2f, export %.2f) -> %s", num, total,
             total / num, *(timer[k] / num for k in ("diffusion", "decode", "export")), out_dir)
    return paths


def _check_steps(sampler: str, steps: int | None, train_steps: int, eta: float) -> int:
    if sampler == "ddpm":
        # MONAI's DDPM step assumes consecutive timesteps, so a shorter DDPM chain would be silently wrong
        if steps not in (None, train_steps):
            raise InputError(f"--sampler ddpm runs all {train_steps} training timesteps; drop --steps {steps} "
                             "or use --sampler ddim for fewer steps")
        if eta:
            raise InputError("--eta applies to DDIM only; DDPM steps are always stochastic")
        return train_steps
    steps = 50 if steps is None else steps
    if steps > train_steps:
        raise InputError(f"--steps {steps} is more than the {train_steps} timesteps the model was trained with")
    return steps


def find_autoencoder(trained_with: dict[str, str], where: str | Path | None = None) -> Path:
    """The autoencoder checkpoint a diffusion model was trained with: the recorded path, or the file in ``where``
    (a run dir or a checkpoint) with the recorded SHA-256; a clear error when neither is that file."""
    want = trained_with["sha256"]
    if where is None:
        path = Path(trained_with["checkpoint"])
        if not path.is_file():
            raise FileNotFoundError(f"the autoencoder checkpoint {path} that this diffusion model was trained with is "
                                    "missing (run dirs moved?); pass --autoencoder AE_RUN")
        if file_sha256(path) != want:
            raise InputError(f"the autoencoder checkpoint {path} changed since this diffusion model was trained on its "
                             "latents; restore that file, pass --autoencoder with a copy of it, or retrain")
        return path
    where = Path(where)
    candidates = [where] if where.is_file() else visible(where / "checkpoints", "*.pt")
    for path in candidates:
        if file_sha256(path) == want:
            return path
    raise InputError(f"--autoencoder {where}: none of {[c.name for c in candidates]} is the checkpoint this diffusion "
                     f"model was trained with (SHA-256 {want[:12]}…, was {trained_with['checkpoint']})")


def resolve_device(name: str, flag: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"{flag} {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{flag} {name}: this machine has no CUDA GPU (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {name}: use cpu, cuda or cuda:N")
    return dev


@contextmanager
def _timed(timer: dict[str, float], key: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous; time it where it finishes
    timer[key] += time.perf_counter() - start
