"""The tensor functions both training and inference run: reconstruct, posterior mean, decode, the reverse process.

Pure functions of networks and tensors (no files, no run directories), so that a trainer's validation and a command
that writes volumes compute exactly the same thing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from tqdm.auto import tqdm

from medldm.config import AutoencoderConfig
from medldm.devices import autocast
from medldm.models.conditioning import with_condition_channels
from medldm.models.networks import Scheduler


def window_size(cfg: AutoencoderConfig) -> list[int]:
    """The sliding-window ROI of an autoencoder config: sliding_window.roi_size, else patch_size, else [] (whole)."""
    return list(cfg.sliding_window.roi_size or cfg.patch_size)


def _windowed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              cfg: AutoencoderConfig | None) -> torch.Tensor:
    # whole volume unless the config's window is smaller; MONAI blends windows (and rescales a smaller output)
    roi = window_size(cfg) if cfg is not None else []
    if cfg is None or not roi or all(r >= s for r, s in zip(roi, x.shape[2:])):
        return fn(x)
    sw = cfg.sliding_window
    return cast(torch.Tensor, sliding_window_inference(x, roi, sw.batch_size, fn, overlap=sw.overlap, mode="gaussian"))


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor, cfg: AutoencoderConfig | None = None) -> torch.Tensor:
    """Decode the posterior mean (the deterministic reconstruction); window by window when ``cfg`` asks for it."""
    ae = cast(AutoencoderKL, model)  # or a wrapper of one (compiled, DDP) with the same methods
    return _windowed(lambda p: ae.decode(ae.encode(p)[0]).float(), x, cfg)


@torch.no_grad()
def posterior_mean(model: torch.nn.Module, x: torch.Tensor, cfg: AutoencoderConfig | None = None) -> torch.Tensor:
    """μ of a batch; window by window (blended at latent resolution) when ``cfg`` asks for it."""
    ae = cast(AutoencoderKL, model)
    return _windowed(lambda p: ae.encode(p)[0].float(), x, cfg)


@torch.no_grad()
def decode_latents(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Volumes (float32, clamped to [0, 1]) from unscaled latents, one volume at a time: the peak memory is one
    decode whatever the batch. (Tiles would need less, but GroupNorm would then normalise each tile with its own
    statistics, which leaves a visible grid: benchmarks/RESULTS.md.)"""
    ae = cast(AutoencoderKL, model)
    return torch.cat([ae.decode(one).float().clamp(0, 1) for one in z.split(1)])


@torch.no_grad()
def sample_latents(
    unet: Callable[..., torch.Tensor],
    scheduler: Scheduler,
    noise: torch.Tensor,
    context: torch.Tensor | None,
    guidance: float = 1.0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    progress: bool = False,
    amp: bool = True,
    concat: bool = False,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` with a DDIM, DDPM or rectified-flow scheduler (timesteps set by
    ``set_sampling_steps``, or a tail of them to start part-way).

    Guidance != 1 mixes the conditional and the null-context predictions (classifier-free guidance). When a step
    draws noise (DDPM, or DDIM with eta > 0) each sample draws it from its own generator, so a sample does not
    depend on the batch it was generated in. DDIM's last step returns its prediction of the clean latent (t = 0);
    rectified flow steps to the next timestep, the last one to 0. The UNet runs in bf16 autocast on CUDA (``amp``);
    the scheduler arithmetic stays float32. ``concat``: the UNet also takes the context as constant input
    channels ("hybrid").
    """
    x = noise
    ddpm = isinstance(scheduler, DDPMScheduler)
    flow = isinstance(scheduler, RFlowScheduler)
    step_args: dict[str, Any] = {} if ddpm or flow else {"eta": eta}
    per_sample = generators is not None and (ddpm or (eta > 0 and not flow))
    name = "ddpm" if ddpm else "rflow" if flow else "ddim"
    timesteps = [int(t) for t in scheduler.timesteps]
    for i, t in enumerate(tqdm(timesteps, desc=name, unit="step", leave=False, disable=not progress)):
        last = i == len(timesteps) - 1
        if flow:
            step_args = {"next_timestep": 0 if last else timesteps[i + 1]}
        pred = _prediction(unet, x, t, context, concat, amp, guidance)
        # DDIM's step returns (previous sample, predicted clean sample): the last step keeps the clean one
        keep = 1 if last and not (ddpm or flow) else 0
        if per_sample:
            assert generators is not None
            x = torch.cat([scheduler.step(pred[j : j + 1], t, x[j : j + 1], generator=g, **step_args)[keep]
                           for j, g in enumerate(generators)])
        else:
            x = scheduler.step(pred, t, x, **step_args)[keep]
    return x


def _prediction(unet: Callable[..., torch.Tensor], x: torch.Tensor, t: int, context: torch.Tensor | None,
                concat: bool, amp: bool, guidance: float = 1.0) -> torch.Tensor:
    """The UNet's float32 output at (x, t); guidance != 1 mixes the conditional and the null-context predictions
    (classifier-free guidance), both from one batched call."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    with autocast(x.device, amp):
        if guidance != 1.0 and context is not None:
            xx, cc = torch.cat([x, x]), torch.cat([context, torch.zeros_like(context)])
            both = unet(with_condition_channels(xx, cc) if concat else xx, timesteps=torch.cat([tt, tt]), context=cc)
            cond, uncond = both.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        else:
            pred = unet(with_condition_channels(x, context) if concat and context is not None else x,
                        timesteps=tt, context=context)
    return pred.float()


def _ddim_epsilon(scheduler: DDIMScheduler, pred: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """The noise a DDIM model's output implies at (x, t), whatever it was trained to predict."""
    a = scheduler.alphas_cumprod[t].to(x.device)
    if scheduler.prediction_type == "epsilon":
        return pred
    if scheduler.prediction_type == "v_prediction":
        return a.sqrt() * pred + (1 - a).sqrt() * x
    return (x - a.sqrt() * pred) / (1 - a).sqrt()  # "sample": the model predicts the clean latent


@torch.no_grad()
def invert_latents(
    unet: Callable[..., torch.Tensor],
    scheduler: Scheduler,
    z0: torch.Tensor,
    context: torch.Tensor | None,
    refine: int = 2,
    progress: bool = False,
    amp: bool = True,
    concat: bool = False,
) -> torch.Tensor:
    """The start latent from which :func:`sample_latents` (guidance 1, deterministic, the same timesteps) returns
    ``z0``: each of the sampler's steps run backwards, last step first.

    A sampler step x_lo = f(x_hi, model(x_hi, t_hi)) is implicit in x_hi. Plain DDIM inversion (MONAI's
    ``DDIMScheduler.reversed_step``) evaluates the model at the known x_lo instead, which leaves an error at every
    step; ``refine`` fixed-point iterations x_hi <- f⁻¹(x_lo, model(x_hi, t_hi)) shrink it (0: plain inversion).
    DDIM (a DDPM-trained model) and rectified flow (Euler steps); DDPM's sampler draws noise and has no inverse."""
    if isinstance(scheduler, DDPMScheduler):
        raise ValueError("DDPM sampling draws fresh noise at every step and cannot be inverted: invert with DDIM")
    timesteps = [int(t) for t in scheduler.timesteps]
    x = z0.float()
    for i in tqdm(reversed(range(len(timesteps))), total=len(timesteps), desc="invert", unit="step", leave=False,
                  disable=not progress):
        t_lo = timesteps[i + 1] if i + 1 < len(timesteps) else None  # None: the end of sampling (t = 0)
        x_hi = _step_back(unet, scheduler, x, x, timesteps[i], t_lo, context, concat, amp)  # the model at x_lo
        for _ in range(refine):
            x_hi = _step_back(unet, scheduler, x_hi, x, timesteps[i], t_lo, context, concat, amp)
        x = x_hi
    return x


def _step_back(unet: Callable[..., torch.Tensor], scheduler: Scheduler, x_hi: torch.Tensor, x_lo: torch.Tensor,
               t_hi: int, t_lo: int | None, context: torch.Tensor | None, concat: bool, amp: bool) -> torch.Tensor:
    """The x_hi that the sampler step from t_hi takes to ``x_lo``, with the model evaluated at the guess ``x_hi``."""
    pred = _prediction(unet, x_hi, t_hi, context, concat, amp)
    if isinstance(scheduler, RFlowScheduler):  # Euler: x_lo = x_hi + v(x_hi, t_hi) (t_hi - t_lo) / T
        return x_lo - pred * ((t_hi - (t_lo or 0)) / scheduler.num_train_timesteps)
    # DDIM: x_lo = sqrt(a_lo) x0(x_hi) + sqrt(1 - a_lo) eps(x_hi), solved for x_hi; the last step returns the clean
    # prediction itself (a_lo = 1)
    ddim = cast(DDIMScheduler, scheduler)
    a_hi = ddim.alphas_cumprod[t_hi].to(x_lo.device)
    a_lo = ddim.alphas_cumprod[t_lo].to(x_lo.device) if t_lo is not None else a_hi.new_ones(())
    eps = _ddim_epsilon(ddim, pred, x_hi, t_hi)
    return (a_hi / a_lo).sqrt() * (x_lo - (1 - a_lo).sqrt() * eps) + (1 - a_hi).sqrt() * eps
