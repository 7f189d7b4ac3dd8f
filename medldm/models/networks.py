"""Builders for the MONAI networks and noise schedulers, from configs. No training logic here."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

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


def build_scheduler(cfg: SchedulerConfig, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """The training (DDPM) or sampling (DDIM) scheduler with the configured noise schedule."""
    common: dict[str, Any] = dict(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                                  beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                  prediction_type=cfg.prediction_type, clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common)
    raise InputError(f"scheduler kind {kind!r}: use 'ddpm' or 'ddim'")
