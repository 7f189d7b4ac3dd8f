"""Builders for the MONAI networks and noise schedulers, from configs. No training logic here."""

from __future__ import annotations

import math
from typing import Any, TypeAlias

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medldm.config import AutoencoderModelConfig, DiscriminatorConfig, SchedulerConfig, UNetConfig
from medldm.errors import InputError


def build_autoencoder(cfg: AutoencoderModelConfig, sdpa: bool = False) -> AutoencoderKL:
    """3D KL autoencoder, one input/output channel; ``sdpa`` runs its attention blocks (if any) with torch's
    scaled_dot_product_attention (same weights, fused kernels)."""
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        attention_levels=tuple(cfg.attention_levels),
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_nonlocal_attn,
        use_checkpoint=cfg.activation_checkpointing,
        use_flash_attention=sdpa,
    )


def build_discriminator(cfg: DiscriminatorConfig) -> PatchDiscriminator:
    """3D patch discriminator for the adversarial term; instance norm keeps it independent of the batch size."""
    return PatchDiscriminator(spatial_dims=3, in_channels=1, out_channels=1, channels=cfg.channels,
                              num_layers_d=cfg.num_layers, norm="INSTANCE")


def build_unet(cfg: UNetConfig, latent_channels: int, context_dim: int | None, sdpa: bool = False,
               hybrid: bool = False) -> DiffusionModelUNet:
    """3D diffusion UNet on latents; ``context_dim`` switches cross-attention conditioning on, ``hybrid`` also takes
    the context as extra input channels, ``sdpa`` runs the attention with torch's scaled_dot_product_attention
    (same weights, flash / memory-efficient kernels)."""
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels + ((context_dim or 0) if hybrid else 0),
        out_channels=latent_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=tuple(cfg.num_head_channels),
        norm_num_groups=cfg.norm_num_groups,
        with_conditioning=context_dim is not None,
        cross_attention_dim=context_dim,
        resblock_updown=cfg.resblock_updown,
        upcast_attention=cfg.upcast_attention,
        # torch's fused attention would compute in bf16 under autocast, undoing upcast_attention
        use_flash_attention=sdpa and not cfg.upcast_attention,
    )


Scheduler: TypeAlias = "DDPMScheduler | DDIMScheduler | RFlowScheduler"

# the samplers of each scheduler.kind; the first is the default
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "rflow": ("rflow",)}


def default_sampler(cfg: SchedulerConfig) -> str:
    """DDIM for a DDPM-trained model, Euler steps along the flow for a rectified-flow one."""
    return SAMPLERS[cfg.kind][0]


def build_scheduler(cfg: SchedulerConfig, sampler: str | None = None) -> Scheduler:
    """The training scheduler of ``scheduler.kind`` (``sampler`` None), or the sampler a model trained with it runs:
    ddim or ddpm for kind ddpm, rflow for kind rflow."""
    if sampler is not None and sampler not in SAMPLERS[cfg.kind]:
        raise InputError(f"sampler {sampler!r} does not fit a model trained with scheduler.kind={cfg.kind}: use "
                         f"{' or '.join(SAMPLERS[cfg.kind])}")
    if cfg.kind == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=True,
                              sample_method=cfg.timestep_sampling, use_timestep_transform=cfg.timestep_transform,
                              base_img_size_numel=cfg.transform_base_numel, spatial_dim=3)
    common: dict[str, Any] = dict(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                                  beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                  prediction_type=cfg.prediction_type, clip_sample=False)
    if sampler == "ddim":
        return DDIMScheduler(**common)
    return DDPMScheduler(**common)


def set_sampling_steps(scheduler: Scheduler, steps: int, latent_shape: list[int] | tuple[int, ...]) -> None:
    """The ``steps`` timesteps a sampler visits, on the CPU (``int(t)`` then never waits for a GPU).

    DDIM: evenly spaced by ``T // steps`` from T - 1 down, the spacing MONAI's ``DDIMScheduler.step`` assumes when it
    computes the previous timestep (its own ``set_timesteps`` spaces them by (T - 1) / (steps - 1), so at 10 steps
    each step landed 11 timesteps above the next one and the last left visible noise). ``sample_latents`` returns
    the last step's prediction of the clean latent, so the chain ends at t = 0 whatever ``steps`` is. DDPM runs every
    training timestep. Rectified flow: from pure noise (t = T) in equal steps, MONAI's resolution transform
    applied when the config asks for it."""
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(steps, input_img_size_numel=math.prod(latent_shape[1:]))
        return
    scheduler.set_timesteps(steps)
    if isinstance(scheduler, DDIMScheduler):
        ratio = scheduler.num_train_timesteps // steps
        scheduler.timesteps = (scheduler.num_train_timesteps - 1) - torch.arange(steps) * ratio
