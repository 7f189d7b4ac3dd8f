"""`medldm sample`: DDIM/DDPM sampling of latents (with classifier-free guidance), decoding, export of volumes."""

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
from tqdm.auto import tqdm

from medldm import __version__
from medldm.artifacts import DiffusionCheckpoint, DiffusionRun
from medldm.data.io import read_json
from medldm.devices import autocast, resolve_device
from medldm.errors import InputError
from medldm.inference.bundle import imported_diffusion_run, is_bundle
from medldm.inference.cohort import Cohort, plan_rows, plan_samples
from medldm.inference.cuda_graphs import GraphedUNet
from medldm.inference.sample_writer import (
    RESUME_KEYS,
    SampleWriter,
    prepare_output_dir,
    record_run,
    remove_previous_outputs,
    sample_stem,
)
from medldm.models.conditioning import UnitRangeConditions
from medldm.models.networks import SAMPLERS, build_scheduler, default_sampler, set_sampling_steps
from medldm.models.ops import decode_latents, sample_latents
from medldm.models.speed import apply_speed
from medldm.versions import versions

log = logging.getLogger(__name__)

# default steps of each sampler (ddpm always runs every training timestep)
DEFAULT_STEPS = {"ddim": 50, "rflow": 10}


def sample_run(
    run_dir: str | Path,
    out_dir: str | Path,
    num: int | None = None,
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
    cohort: Cohort | None = None,
    resume: bool = False,
    as_dataset: bool = False,
) -> list[Path]:
    """Sample ``num`` volumes from a diffusion run and export each as it is decoded (see ``SampleWriter``); returns
    every sample's path, in plan order.

    Conditions are the same ``conditions`` for every sample, or per sample from a ``cohort`` (a CSV, or drawn from a
    dataset's labels; see medldm.inference.cohort). ``sampler`` defaults to the model's (DDIM for DDPM-trained
    models, rflow for rectified flow); ``steps`` to 50 for DDIM and 10 for rflow; DDPM always runs every training
    timestep. Sample i uses seed ``seed + i`` (unless the cohort's file gives seeds), whatever the batch size.
    ``resume`` continues the run recorded in ``out_dir`` (sampling.json, plan.csv) to ``num``: the same batches are
    denoised again where a sample is missing, so the volumes are those an uninterrupted run writes. ``as_dataset``
    also writes manifest.csv and preprocess.json, so that ``out_dir`` is a medldm dataset. Volumes are decoded one at
    a time on ``decode_device`` (default: the sampling device; "cpu" when a GPU is too small for one decode).
    Everything that can be checked (output folder, every sample's conditions, options) is checked before sampling
    starts. ``autoencoder_run`` (a run dir or checkpoint file) is where to find the autoencoder when the run was moved
    from where it was trained. ``run_dir`` may also be a downloaded MONAI bundle folder, imported into it on first
    use. On CUDA the UNet is replayed as a CUDA graph and both networks are compiled as the diffusion run's ``speed``
    section says; ``eager`` switches both off.
    """
    if (num is not None and num < 1) or batch_size < 1 or (steps is not None and steps < 1):
        raise InputError("--num, --steps and --batch-size must be >= 1")
    if not eta >= 0 or not math.isfinite(eta):  # "not >=": NaN passes every comparison
        raise InputError(f"--eta {eta}: use a finite number >= 0")
    if not math.isfinite(guidance):
        raise InputError(f"--guidance {guidance}: use a finite number (1 = no guidance)")
    if sampler is not None and sampler not in (*SAMPLERS["ddpm"], *SAMPLERS["rflow"]):
        raise InputError(f"--sampler {sampler!r}: use ddim, ddpm or rflow")
    if cohort is not None and conditions:
        raise InputError("give the conditions once: --condition for all samples, or a cohort")
    cohort = cohort or Cohort(condition=dict(conditions or {}))
    dev = resolve_device(device, "--device")
    decode_dev = resolve_device(decode_device, "--decode-device") if decode_device else dev
    out_dir = prepare_output_dir(out_dir, overwrite, resume)
    if is_bundle(run_dir):  # a downloaded MONAI bundle: imported on first use
        run_dir = imported_diffusion_run(run_dir)
        # found by its hash next to the diffusion run, also after the bundle folder was moved or copied
        autoencoder_run = autoencoder_run or run_dir.parent / "autoencoder"
    ldm = DiffusionRun(run_dir).load()
    plan = plan_samples(cohort, ldm.conditions, num, seed)  # every row checked before the networks are loaded
    unet = ldm.unet(dev)
    ae = ldm.load_autoencoder(autoencoder_run)  # found by the recorded SHA-256
    autoencoder = ae.model(decode_dev)
    conditional = any(p.labels for p in plan) and not isinstance(ldm.conditions, UnitRangeConditions)
    if guidance != 1.0 and not getattr(ldm.conditions, "guidance", True):
        raise InputError(f"--guidance {guidance:g}: this model was trained without dropping its conditions, so it has "
                         "no unconditional prediction to guide with; leave --guidance at 1")
    if guidance != 1.0 and not conditional:
        log.warning("--guidance %.2f has no effect without conditions", guidance)
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
        "diffusion_checkpoint": ldm.resolved, "diffusion_sha256": ldm.sha256,
        "autoencoder_checkpoint": ae.resolved, "autoencoder_sha256": ae.sha256,
        "scale_factor": scale, "device": str(dev), "decode_device": str(decode_dev),
        "precision": "bf16 autocast on CUDA" if "cuda" in (dev.type, decode_dev.type) else "float32",
        "format": fmt, "dtype": dtype, "speed": ", ".join(speedups) or "eager",
        "diffusion_config": ldm.config_dict, "autoencoder_config": ae.config_dict,
    }
    settings = {key: provenance[key] for key in ("diffusion_checkpoint", "autoencoder_checkpoint", *RESUME_KEYS)
                if key in provenance}
    settings.update(num=len(plan), batch_size=batch_size, seed=seed, cohort=cohort.describe(), as_dataset=as_dataset,
                    conditions=list(ldm.conditions.keys), medldm=__version__)
    dataset = _dataset_info(ldm, settings) if as_dataset else None
    if overwrite:
        remove_previous_outputs(out_dir)
    done = record_run(out_dir, settings, plan_rows(plan, ldm.conditions.keys), resume)
    writer = SampleWriter(out_dir, ldm.reference, provenance, fmt, dtype, dataset,
                          done={p.seed: p.index for p in plan if p.seed in done})
    if done:
        log.info("resuming %s: %d of %d samples are there", out_dir, len(done), len(plan))

    timer = {"diffusion": 0.0, "decode": 0.0, "export": 0.0}
    start, made = time.perf_counter(), 0
    with tqdm(total=len(plan), desc="sample", unit="volume", initial=len(done)) as progress:
        # fixed batches (as an uninterrupted run has them): one with a missing sample is denoised again as a whole
        for first in range(0, len(plan), batch_size):
            batch = plan[first:first + batch_size]
            if all(p.seed in done for p in batch):
                continue
            gens = [torch.Generator(dev).manual_seed(p.seed) for p in batch]
            noise = torch.stack([torch.randn(latent_shape, generator=g, device=dev) for g in gens])
            context = ldm.conditions.encode([p.labels for p in batch]).to(dev) if ldm.conditions.keys else None
            with _timed(timer, "diffusion", dev):
                z = sample_latents(net, scheduler, noise, context, guidance, eta, gens, progress=True,
                                   concat=ldm.hybrid)
            with _timed(timer, "decode", decode_dev), autocast(decode_dev):
                volumes = decode_latents(autoencoder, z.to(decode_dev) / scale).cpu().numpy()
            with _timed(timer, "export", torch.device("cpu")):
                for v, p in zip(volumes, batch):
                    if p.seed not in done:
                        writer.write(v[0], p.seed, p.labels, p.index)
                        made += 1
                        progress.update(1)
    writer.close()
    total = time.perf_counter() - start
    if made:
        log.info("%d volumes in %.1f s: %.2f s per volume (diffusion %.2f, decode %.2f, export %.2f) -> %s", made,
                 total, total / made, *(timer[k] / made for k in ("diffusion", "decode", "export")), out_dir)
    suffix = ".nii.gz" if fmt != "dicom" else "_dicom"
    return [out_dir / f"{sample_stem(p.seed)}{suffix}" for p in plan]


def _dataset_info(ldm: DiffusionCheckpoint, settings: dict[str, Any]) -> dict[str, Any]:
    """preprocess.json of a dataset of samples: the model's reference space, the preprocessing of the data it was
    trained on (as recorded there, when that dataset is still there) and how the samples were made."""
    trained_on = Path(ldm.data_dir) if ldm.data_dir else None
    source: dict[str, Any] = {}
    if trained_on is not None and (trained_on / "preprocess.json").is_file():
        source = read_json(trained_on / "preprocess.json")
    split = (source.get("config") or {}).get("split") or {}
    return {"synthetic": {"sampling": "sampling.json", "diffusion_checkpoint": settings["diffusion_checkpoint"],
                          "diffusion_sha256": settings["diffusion_sha256"],
                          "trained_on": str(trained_on) if trained_on else None},
            "reference": ldm.reference, "config": source.get("config") or {},
            "template_sha256": source.get("template_sha256"), "versions": versions(),
            "splits": {"seed": settings["seed"], "val_fraction": float(split.get("val_fraction", 0.15)),
                       "test_fraction": float(split.get("test_fraction", 0.15))}}


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
