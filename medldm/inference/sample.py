"""`medldm sample`: DDIM/DDPM sampling of latents (with classifier-free guidance), decoding, export of volumes."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medldm.artifacts import DiffusionRun
from medldm.devices import autocast, resolve_device
from medldm.errors import InputError
from medldm.inference.bundle import imported_diffusion_run, is_bundle
from medldm.inference.cuda_graphs import GraphedUNet
from medldm.inference.sample_writer import SampleWriter, prepare_output_dir, remove_previous_outputs
from medldm.models.conditioning import condition_context
from medldm.models.networks import SAMPLERS, build_scheduler, default_sampler, set_sampling_steps
from medldm.models.ops import decode_latents, sample_latents
from medldm.models.speed import apply_speed

log = logging.getLogger(__name__)

# default steps of each sampler (ddpm always runs every training timestep)
DEFAULT_STEPS = {"ddim": 50, "rflow": 10}


def sample_run(
    run_dir: str | Path,
    out_dir: str | Path,
    num: int,
    sampler: str | None = None,
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

    ``sampler`` defaults to the model's (DDIM for DDPM-trained models, rflow for rectified flow); ``steps`` to 50
    for DDIM and 10 for rflow; DDPM always runs every training timestep. Sample i uses seed ``seed + i``
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
    if sampler is not None and sampler not in (*SAMPLERS["ddpm"], *SAMPLERS["rflow"]):
        raise InputError(f"--sampler {sampler!r}: use ddim, ddpm or rflow")
    dev = resolve_device(device, "--device")
    decode_dev = resolve_device(decode_device, "--decode-device") if decode_device else dev
    out_dir = prepare_output_dir(out_dir, overwrite)
    if is_bundle(run_dir):  # a downloaded MONAI bundle: imported on first use
        run_dir = imported_diffusion_run(run_dir)
        # found by its hash next to the diffusion run, also after the bundle folder was moved or copied
        autoencoder_run = autoencoder_run or run_dir.parent / "autoencoder"
    ldm = DiffusionRun(run_dir).load()
    unet = ldm.unet(dev)
    ae = ldm.load_autoencoder(autoencoder_run)  # found by the recorded SHA-256
    autoencoder = ae.model(decode_dev)
    context_one, labels = condition_context(ldm.conditions, conditions, dev)
    if guidance != 1.0 and not getattr(ldm.conditions, "guidance", True):
        raise InputError(f"--guidance {guidance:g}: this model was trained without dropping its conditions, so it has "
                         "no unconditional prediction to guide with; leave --guidance at 1")
    if guidance != 1.0 and not labels:
        log.warning("--guidance %.2f has no effect without --condition", guidance)
        guidance = 1.0
    sampler = sampler or default_sampler(ldm.config.scheduler)
    kind = ldm.config.scheduler.kind
    if sampler not in SAMPLERS[kind]:
        raise InputError(f"--sampler {sampler}: {run_dir} was trained with scheduler.kind={kind}; use --sampler "
                         f"{' or '.join(SAMPLERS[kind])} (or leave --sampler out)")
    scheduler = build_scheduler(ldm.config.scheduler, sampler)
    steps = _check_steps(sampler, steps, ldm.config.scheduler.num_train_timesteps, eta)
    latent_shape, scale = ldm.latent_shape, ldm.scale_factor
    set_sampling_steps(scheduler, steps, latent_shape)
    speed = ldm.config.speed
    if eager:
        speed = dataclasses.replace(speed, compile="off", cuda_graphs=False)
    speedups = (apply_speed(unet, speed, dev, training=False)
                + apply_speed(autoencoder, speed, decode_dev, training=False))
    net: Callable[..., torch.Tensor] = unet
    if speed.cuda_graphs and dev.type == "cuda":
        net = GraphedUNet(unet)
        speedups.append("UNet replayed as a CUDA graph")
    log.info("speed: %s", ", ".join(speedups) or "eager")

    provenance = {
        "sampler": sampler.upper(), "steps": steps, "eta": eta if sampler == "ddim" else None, "guidance": guidance,
        "conditions": labels, "diffusion_checkpoint": ldm.resolved, "diffusion_sha256": ldm.sha256,
        "autoencoder_checkpoint": ae.resolved, "autoencoder_sha256": ae.sha256,
        "scale_factor": scale, "device": str(dev), "decode_device": str(decode_dev),
        "precision": "bf16 autocast on CUDA" if "cuda" in (dev.type, decode_dev.type) else "float32",
        "format": fmt, "dtype": dtype, "speed": ", ".join(speedups) or "eager",
        "diffusion_config": ldm.config_dict, "autoencoder_config": ae.config_dict,
    }
    writer = SampleWriter(out_dir, ldm.reference, provenance, fmt, dtype)
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
                                   concat=ldm.hybrid)
            with _timed(timer, "decode", decode_dev), autocast(decode_dev):
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
    if eta and sampler == "rflow":
        raise InputError("--eta applies to DDIM only; rectified-flow sampling is deterministic")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if steps > train_steps:
        raise InputError(f"--steps {steps} is more than the {train_steps} timesteps the model was trained with")
    return steps


@contextmanager
def _timed(timer: dict[str, float], key: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous; time it where it finishes
    timer[key] += time.perf_counter() - start
