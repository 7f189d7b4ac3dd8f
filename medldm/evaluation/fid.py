"""FID on 3D features from a local MedicalNet ResNet (MONAI's ResNet in the MedicalNet layout); never downloads.

MedicalNet releases (Chen et al. 2019, "Med3D") are `.pth` files holding ``{"state_dict": {"module.conv1...": ...}}``
with a segmentation head; the encoder weights are taken, the head is ignored. Features are the global average
pool of the last stage (MONAI ``feed_forward=False``), compared with MONAI's ``FIDMetric``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from monai.metrics import FIDMetric
from monai.networks import nets
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

from medldm.errors import InputError

DEPTHS = (10, 18, 34, 50, 101, 152, 200)


def medicalnet(depth: int, weights: str | Path | None = None) -> torch.nn.Module:
    """A MONAI ResNet with MedicalNet's shortcut and bias settings, with the encoder weights of a local file."""
    if depth not in DEPTHS:
        raise InputError(f"evaluate.fid_depth={depth}: MedicalNet ResNets have depth {DEPTHS}")
    bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    model = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                            shortcut_type=shortcut, bias_downsample=bias_downsample)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.fid_weights: {path} not found (a MedicalNet resnet_{depth} .pth; "
                                    "nothing is downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = model.state_dict()
        missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if missing:
            raise InputError(f"evaluate.fid_weights: {path} does not fit a MedicalNet resnet{depth} "
                             f"({len(missing)} tensors missing or of another shape, e.g. {missing[0]}); "
                             "check evaluate.fid_depth")
        model.load_state_dict({k: state[k] for k in own})
    return model.eval()


@torch.no_grad()
def features(model: torch.nn.Module, volumes: Iterable[torch.Tensor], device: torch.device | str = "cpu",
             batch_size: int = 4) -> torch.Tensor:
    """(N, F) pooled features of (1, X, Y, Z) volumes, read from ``volumes`` ``batch_size`` at a time."""
    model = model.to(device)
    out, it = [], iter(volumes)
    while batch := list(itertools.islice(it, batch_size)):
        out.append(model(torch.stack(batch).float().to(device)).float().cpu())
    return torch.cat(out)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (MONAI ``FIDMetric``)."""
    return float(FIDMetric()(a, b))
