"""Loss terms of the autoencoder: KL, patch-adversarial (MONAI), perceptual from local weights only, SSIM."""

from __future__ import annotations

import logging

import torch
from monai.losses import PatchAdversarialLoss

from medldm.config import AutoencoderConfig, ConfigError

log = logging.getLogger(__name__)


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def adversarial_loss() -> PatchAdversarialLoss:
    # least squares (LSGAN) is the choice of the brain-LDM papers: stabler than the hinge/BCE variants in 3D
    return PatchAdversarialLoss(criterion="least_squares")


def build_perceptual_loss(cfg: AutoencoderConfig) -> torch.nn.Module | None:
    """MONAI's fake-3D ResNet-50 perceptual loss from ``cfg.perceptual_weights``, or None (and say why)."""
    if cfg.perceptual_weight == 0:
        return None
    if not cfg.perceptual_weights:
        log.warning("perceptual loss off: autoencoder.perceptual_weights is empty. Nothing is downloaded; to use it, "
                    "set it to a local torchvision ResNet-50 state dict (e.g. ImageNet resnet50-11ad3fa6.pth or "
                    "RadImageNet converted to torchvision keys) and install torchvision")
        return None
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ConfigError("autoencoder.perceptual_weights is set but torchvision is not installed: "
                          "`pip install torchvision` (matching your torch), or set perceptual_weights to ''") from None
    from monai.losses import PerceptualLoss

    key = cfg.perceptual_state_dict_key or None
    try:
        loss = PerceptualLoss(spatial_dims=3, network_type="resnet50", is_fake_3d=True, pretrained=True,
                              pretrained_path=cfg.perceptual_weights, pretrained_state_dict_key=key)
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"autoencoder.perceptual_weights: {cfg.perceptual_weights} is not a torchvision ResNet-50 "
                          f"state dict{f' under key {key!r}' if key else ''} ({type(e).__name__}: {e})") from None
    log.info("perceptual loss on: ResNet-50 weights from %s", cfg.perceptual_weights)
    return loss.eval()
