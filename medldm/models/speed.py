"""Speed levers applied in place to a built MONAI network: regional compile, recompute, channels-last layout.

None of them changes the parameters or their names, so checkpoints load and save as before. Which lever helps how
much is measured by ``benchmarks/gpu_bench.py``; the choice of device is the caller's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from monai.networks.blocks import SpatialAttentionBlock, Upsample
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLDownsample
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, DiffusionUnetDownsample, SpatialTransformer
from torch.utils.checkpoint import checkpoint

from medldm.config import SpeedConfig

# the UNet's repeated blocks; the glue between them (skip concatenation, time embedding) stays eager
UNET_REGIONS = (DiffusionUNetResnetBlock, SpatialTransformer, SpatialAttentionBlock, DiffusionUnetDownsample, Upsample)
# enough compiled variants for every block shape of a network at a training and a sampling batch size; past the
# limit dynamo would silently run the block eagerly
RECOMPILE_LIMIT = 64


def regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that are compiled one by one: every block of the autoencoder's encoder and decoder, and the
    residual, attention and resampling blocks of the UNet."""
    if isinstance(model, AutoencoderKL):
        return [*model.encoder.blocks, *model.decoder.blocks]
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


def compile_regions(model: torch.nn.Module, backend: str = "inductor", fallback: bool = False) -> int:
    """``torch.compile`` every region of ``model`` in place; returns how many.

    Blocks of the same class and shapes share one compiled graph (dynamo treats parameters as inputs), so a network
    compiles in seconds rather than minutes, and the kernels land in inductor's on-disk cache
    (``TORCHINDUCTOR_CACHE_DIR``) for the next run. Shapes are static: one graph per shape, no dynamic kernels.
    ``fallback``: a block that fails to compile (say, a GPU too old for Triton) runs eagerly, with dynamo's warning,
    instead of stopping the run (a process-wide dynamo setting)."""
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if fallback:
        dynamo_config.suppress_errors = True
    blocks = regions(model)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def autoencoder_levels(model: AutoencoderKL) -> Iterator[tuple[torch.nn.Module, int]]:
    """Every encoder and decoder block with its resolution level (0 = full resolution)."""
    level = 0
    for block in model.encoder.blocks:
        yield block, level
        if isinstance(block, AEKLDownsample):
            level += 1  # the downsampling keeps its full-resolution input: it belongs to the level above
    for block in model.decoder.blocks:
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
            # on the instance, so parameter names stay the same; compile traces through it
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            count += 1
    return count


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])


def channels_last(model: torch.nn.Module) -> None:
    """Convolution weights and the network's inputs in the NDHWC ("channels last 3D") layout."""
    model.to(memory_format=torch.channels_last_3d)
    entries = [model.encoder, model.decoder] if isinstance(model, AutoencoderKL) else [model]
    for entry in entries:
        entry.register_forward_pre_hook(_channels_last_input)


def compiles(speed: SpeedConfig, device: torch.device) -> bool:
    """Whether ``speed.compile`` asks for compilation on ``device`` ("auto" is CUDA only)."""
    return speed.compile == "on" or (speed.compile == "auto" and device.type == "cuda")


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
        # "auto" falls back to eager where compilation fails; "on" lets the error stop the run
        n = compile_regions(model, backend, fallback=speed.compile == "auto")
        applied.append(f"compiled {n} regions ({backend})")
    return applied
