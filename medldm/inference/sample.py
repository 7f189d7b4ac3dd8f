"""DDIM sampling of latents (with classifier-free guidance) and decoding to volumes."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medldm.config import config_from_dict
from medldm.inference.encode import load_autoencoder_file
from medldm.inference.export import write_samples
from medldm.models.conditioning import ConditionEncoder
from medldm.models.networks import build_scheduler, build_unet
from medldm.training.checkpoint import best_checkpoint, file_sha256, load_checkpoint

log = logging.getLogger(__name__)


def load_diffusion(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The EMA UNet of a diffusion run in eval mode, and its checkpoint metadata."""
    path = best_checkpoint(run_dir, "diffusion")
    state = load_checkpoint(path)
    if state.get("kind") != "diffusion":
        raise ValueError(f"{path} is not a diffusion checkpoint (kind={state.get('kind')!r})")
    cfg = config_from_dict("diffusion", state["config"])
    encoder = ConditionEncoder.from_state_dict(state["conditioning"])
    model = build_unet(cfg.model, state["latent_shape"][0], encoder.dim if encoder.keys else None)
    model.load_state_dict(state["ema"])
    meta = {k: v for k, v in state.items() if k not in ("model", "ema", "optimizer", "rng")}
    meta.update(checkpoint=str(path.resolve()), sha256=file_sha256(path), cfg=cfg, encoder=encoder)
    return model.to(device).eval(), meta


@torch.no_grad()
def ddim_sample(
    unet: torch.nn.Module,
    scheduler: Any,
    noise: torch.Tensor,
    context: torch.Tensor | None,
    guidance: float = 1.0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from ``noise``; ``scheduler.set_timesteps`` must have been called.

    Guidance > 1 mixes the conditional and the null-context predictions (classifier-free guidance).
    With eta > 0 each sample draws its step noise from its own generator, so a sample does not depend
    on the batch it was generated in.
    """
    x = noise
    guided = context is not None and guidance != 1.0
    for t in tqdm(scheduler.timesteps, desc="ddim", leave=False, disable=not progress):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if guided:
            both = unet(torch.cat([x, x]), timesteps=torch.cat([tt, tt]),
                        context=torch.cat([context, torch.zeros_like(context)]))
            cond, uncond = both.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        else:
            pred = unet(x, timesteps=tt, context=context)
        pred = pred.float()
        if eta > 0 and generators is not None:
            x = torch.cat([scheduler.step(pred[i : i + 1], int(t), x[i : i + 1], eta=eta, generator=g)[0]
                           for i, g in enumerate(generators)])
        else:
            x, _ = scheduler.step(pred, int(t), x, eta=eta)
    return x


def sample_run(
    run_dir: str | Path,
    out_dir: str | Path,
    num: int,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    conditions: Mapping[str, str] | None = None,
    guidance: float = 1.0,
    batch_size: int = 4,
    device: str | None = None,
) -> list[Path]:
    """Sample ``num`` volumes from a diffusion run and export them (NIfTI, JSON sidecar, PNG) to ``out_dir``."""
    if num < 1 or steps < 1 or batch_size < 1:
        raise ValueError("--num, --steps and --batch-size must be >= 1")
    if eta < 0:
        raise ValueError("--eta must be >= 0")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet, meta = load_diffusion(run_dir, dev)
    ae_info = meta["autoencoder"]
    autoencoder, ae_meta = load_autoencoder_file(ae_info["checkpoint"], dev)
    if ae_meta["sha256"] != ae_info["sha256"]:
        raise ValueError(f"the autoencoder checkpoint {ae_meta['checkpoint']} changed since this diffusion model was "
                         "trained on its latents; restore that file or retrain the diffusion model")
    encoder: ConditionEncoder = meta["encoder"]
    labels = encoder.parse(conditions or {})
    context_one = encoder.encode([labels]).to(dev) if encoder.keys else None
    if guidance != 1.0 and not labels:
        log.warning("--guidance %.2f has no effect without --condition", guidance)
    scheduler = build_scheduler(meta["cfg"].scheduler, "ddim")
    scheduler.set_timesteps(steps, device=dev)

    latent_shape = meta["latent_shape"]
    scale = meta["scale_factor"]
    volumes, seeds = [], []
    start = time.perf_counter()
    for first in tqdm(range(0, num, batch_size), desc="sample", unit="batch"):
        idx = list(range(first, min(first + batch_size, num)))
        # one generator per sample: sample i is the same volume whatever the batch size
        gens = [torch.Generator(dev).manual_seed(seed + i) for i in idx]
        noise = torch.stack([torch.randn(latent_shape, generator=g, device=dev) for g in gens])
        context = context_one.expand(len(idx), -1, -1) if context_one is not None else None
        z = ddim_sample(unet, scheduler, noise, context, guidance if labels else 1.0, eta, gens, progress=True)
        with torch.no_grad():
            x = autoencoder.decode(z / scale).float().clamp(0, 1)
        volumes.extend(v[0].cpu().numpy() for v in x)
        seeds.extend(seed + i for i in idx)
    elapsed = time.perf_counter() - start
    log.info("sampled %d volumes in %.1f s (%.2f s per volume)", num, elapsed, elapsed / num)

    provenance = {
        "steps": steps, "eta": eta, "guidance": guidance, "conditions": labels, "scheduler": "DDIM",
        "diffusion_checkpoint": meta["checkpoint"], "diffusion_sha256": meta["sha256"],
        "autoencoder_checkpoint": ae_meta["checkpoint"], "autoencoder_sha256": ae_meta["sha256"],
        "scale_factor": scale, "diffusion_config": meta["config"], "seconds_per_volume": elapsed / num,
    }
    return write_samples(out_dir, volumes, seeds, meta["reference"], provenance)
