"""Speed levers applied in place to a built MONAI network: regional compile, recompute, channels-last layout.

None of them changes the parameters or their names, so checkpoints load and save as before. Which lever helps how
much is measured by ``benchmarks/gpu_bench.py``; the choice of device is the caller's.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from typing import cast

import torch
from monai.networks.blocks import SpatialAttentionBlock, Upsample
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLDownsample
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    SpatialTransformer,
)
from torch.utils.checkpoint import checkpoint

from medldm.config import SpeedConfig

log = logging.getLogger(__name__)

# the UNet's repeated blocks; the glue between them (skip concatenation, time embedding) stays eager
UNET_REGIONS = (DiffusionUNetResnetBlock, SpatialTransformer, SpatialAttentionBlock, DiffusionUnetDownsample, Upsample)
# enough compiled variants for every block shape of a network at a training and a sampling batch size; past the
# limit dynamo would silently run the block eagerly
RECOMPILE_LIMIT = 64


def regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that are compiled one by one: every block of the autoencoder's encoder and decoder, and the
    residual, attention and resampling blocks of the UNet."""
    if isinstance(model, AutoencoderKL):
        # MONAI types encoder and decoder as plain Modules: their blocks are a ModuleList
        return [*cast(torch.nn.ModuleList, model.encoder.blocks), *cast(torch.nn.ModuleList, model.decoder.blocks)]
    if isinstance(model, DiffusionModelUNet):
        found: list[torch.nn.Module] = []

        def visit(module: torch.nn.Module) -> None:
            for child in module.children():
                if isinstance(child, UNET_REGIONS):
                    found.append(child)
                else:
                    visit(child)

        visit(model)
        return found
    raise TypeError(f"no compile regions defined for {type(model).__name__}")


def _traced_forward(self: torch.nn.Module, *args, **kwargs):
    # A forward defined outside torch: dynamo starts tracing at this frame. Compiling a module whose forward is
    # torch's own (nn.Sequential's, GroupNorm's, which MONAI's Convolution and UpSample use) produces no graph.
    return type(self).forward(self, *args, **kwargs)


def _recomputed_forward(self: torch.nn.Module, *args, **kwargs):
    # checkpoint() switches dynamo off when torch's _call_impl calls it directly; called from this frame (traced
    # when the block is compiled) it becomes part of the compiled graph instead
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def compile_regions(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every region of ``model`` in place; returns how many.

    Blocks of the same class and shapes share one compiled graph (dynamo treats parameters as inputs), so a network
    compiles in seconds rather than minutes, and the kernels land in inductor's on-disk cache
    (``TORCHINDUCTOR_CACHE_DIR``) for the next run. Shapes are static: one graph per shape, no dynamic kernels."""
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    blocks = regions(model)
    for block in blocks:
        if "forward" not in block.__dict__:  # keep a recompute wrapper; it is traced the same way
            block.forward = types.MethodType(_traced_forward, block)
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def autoencoder_levels(model: AutoencoderKL) -> Iterator[tuple[torch.nn.Module, int]]:
    """Every encoder and decoder block with its resolution level (0 = full resolution)."""
    level = 0
    for block in cast(torch.nn.ModuleList, model.encoder.blocks):
        yield block, level
        if isinstance(block, AEKLDownsample):
            level += 1  # the downsampling keeps its full-resolution input: it belongs to the level above
    for block in cast(torch.nn.ModuleList, model.decoder.blocks):
        if isinstance(block, Upsample):
            level -= 1  # the upsampling's large tensors are at the resolution it produces
        yield block, level


def recompute_levels(model: AutoencoderKL, levels: int) -> int:
    """Recompute the blocks of the ``levels`` highest-resolution levels in the backward pass instead of keeping their
    activations (selective activation checkpointing); returns how many blocks. Each such block keeps only its input.
    Under no_grad (validation, encoding, decoding) the blocks run as usual."""
    count = 0
    for block, level in autoencoder_levels(model):
        if level < levels:
            # a method of the instance: parameter names stay the same, and a deep copy rebinds it to the copy
            block.forward = types.MethodType(_recomputed_forward, block)
            count += 1
    return count


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])


def channels_last(model: torch.nn.Module) -> None:
    """Convolution weights and the network's inputs in the NDHWC ("channels last 3D") layout."""
    # Module.to takes memory_format (torch parses it in _parse_to), but none of torch's overloads of it names it
    model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    entries = [model.encoder, model.decoder] if isinstance(model, AutoencoderKL) else [model]
    for entry in entries:
        entry.register_forward_pre_hook(_channels_last_input)


def compiles(speed: SpeedConfig, device: torch.device) -> bool:
    """Whether ``speed.compile`` asks for compilation on ``device``: "auto" is a CUDA GPU that Triton supports
    (compute capability 7.0 or newer, Triton installed); elsewhere it runs eagerly and says so."""
    if speed.compile != "auto":
        return speed.compile == "on"
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401  (inductor's GPU code generator; in the CUDA wheels of torch)
    except ImportError:
        log.warning("speed.compile=auto: Triton is not installed, so the networks run without torch.compile")
        return False
    if torch.cuda.get_device_capability(device) < (7, 0):
        log.warning("speed.compile=auto: %s is too old for Triton, so the networks run without torch.compile",
                    torch.cuda.get_device_name(device))
        return False
    return True


def apply_speed(model: torch.nn.Module, speed: SpeedConfig, device: torch.device, training: bool = True,
                backend: str = "inductor") -> list[str]:
    """Apply the levers of ``speed`` that fit ``device`` to ``model`` in place, in the order that works (recompute,
    then layout, then compile); returns what was applied, for the log. Call it after making any EMA copy: the
    copy should stay a plain module."""
    applied = []
    if training and speed.recompute_levels and isinstance(model, AutoencoderKL):
        n = recompute_levels(model, speed.recompute_levels)
        applied.append(f"recompute {n} blocks of the top {speed.recompute_levels} level(s)")
    if speed.channels_last and device.type == "cuda":
        channels_last(model)
        applied.append("channels-last 3D")
    if compiles(speed, device):
        applied.append(f"compiled {compile_regions(model, backend)} regions ({backend})")
    return applied
