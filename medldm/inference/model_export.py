"""Export a run's networks for deployment: the autoencoder's decoder and the diffusion UNet, as TorchScript or ONNX,
each checked against the PyTorch module on a fresh input."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medldm.artifacts import AutoencoderRun, DiffusionRun, run_kind
from medldm.data.io import staging_dir, write_json
from medldm.errors import InputError, StoppedError
from medldm.versions import versions

if TYPE_CHECKING:
    from monai.networks.nets import AutoencoderKL

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
# float32 on the CPU: the exported graph must reproduce the module to this, relative to the output's largest value
TOLERANCE = 1e-4


class Decoder(torch.nn.Module):
    """The autoencoder's decoder alone: latent (B, C, x, y, z) -> volume (B, 1, X, Y, Z)."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


class PositionalUNet(torch.nn.Module):
    """The UNet with positional inputs (latent, timesteps, context), as exported graphs need them."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps=timesteps, context=context)


class UnconditionalPositionalUNet(PositionalUNet):
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.unet(x, timesteps=timesteps)


def _onnx_runtime() -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise InputError("--format onnx needs the onnx, onnxscript and onnxruntime packages: "
                         "`pip install -e \".[onnx]\"` in a clone (or pip install onnx onnxscript "
                         "onnxruntime)") from None
    return onnxruntime


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], check: tuple[torch.Tensor, ...],
            names: list[str], path: Path, fmt: str) -> float:
    """Write ``module`` to ``path``; returns the largest difference from PyTorch on the ``check`` inputs, relative to
    the largest output value (at least 1)."""
    with torch.no_grad():
        expected = module(*check)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(path))
        with torch.no_grad():
            got = torch.jit.load(str(path))(*check)
    else:
        runtime = _onnx_runtime()
        program = torch.onnx.export(module, example, input_names=names, output_names=["output"], dynamo=True)
        assert program is not None  # the dynamo exporter returns the program (only the old one returns None)
        program.save(str(path))
        session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, check)})[0])
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1.0))


def export_model(run_dir: str | Path, fmt: str = "torchscript", out_dir: str | Path | None = None,
                 autoencoder_run: str | Path | None = None) -> list[Path]:
    """Export the decoder (of an autoencoder run, or of a diffusion run's autoencoder) and, for a diffusion run, the
    UNet, at the run's shapes with batch 1, into ``out_dir`` (default RUN/export); ``export.json`` lists inputs,
    shapes and the measured difference from PyTorch. A difference above ``TOLERANCE`` is an error."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _onnx_runtime()  # before any work
    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    kind = run_kind(run)  # no weights read
    suffix = ".pt" if fmt == "torchscript" else ".onnx"
    gen = torch.Generator().manual_seed(0)
    # (name, module, example inputs, check inputs, input names, checkpoint it came from)
    jobs: list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], list[str], str]] = []
    # what a deployment needs beside the graphs: divide the sampled latents by scale_factor before decoding
    usage: dict[str, Any] = {}
    if kind == "diffusion":
        ldm = DiffusionRun(run).load()
        unet = ldm.unet("cpu")
        ae = ldm.load_autoencoder(autoencoder_run)
        latent = ldm.latent_shape
        conditions = ldm.conditions
        x_channels = latent[0] + (conditions.dim if ldm.hybrid else 0)

        def unet_inputs() -> tuple[torch.Tensor, ...]:
            x = torch.randn(1, x_channels, *latent[1:], generator=gen)
            t = torch.randint(0, ldm.config.scheduler.num_train_timesteps, (1,), generator=gen)
            if not conditions.keys:
                return x, t
            return x, t, torch.rand(1, 1, conditions.dim, generator=gen)

        usage = {"scale_factor": ldm.scale_factor, "latent_shape": latent, "scheduler": ldm.config_dict["scheduler"],
                 "conditioning": {"mode": ldm.config.conditioning.mode, **conditions.state_dict()},
                 "reference": ldm.reference}
        module: torch.nn.Module = PositionalUNet(unet) if conditions.keys else UnconditionalPositionalUNet(unet)
        names = ["x", "timesteps", "context"][: 3 if conditions.keys else 2]
        jobs.append(("unet", module, unet_inputs(), unet_inputs(), names, ldm.resolved))
    elif kind == "autoencoder":
        ae = AutoencoderRun(run).load()
        latent = ae.latent_shape
    else:
        raise InputError(f"{run}: not a medldm autoencoder or diffusion run (kind={kind!r})")
    jobs.append(("decoder", Decoder(ae.model("cpu")), (torch.randn(1, *latent, generator=gen),),
                 (torch.randn(1, *latent, generator=gen),), ["z"], ae.resolved))

    manifest: dict[str, Any] = {"format": fmt, "tolerance": TOLERANCE, "versions": versions(), **usage,
                                "networks": {}}
    # every graph is written and checked in a hidden folder and moved in only when all pass: a crash or a failed
    # check leaves no half-written or wrong graph, and export.json always describes the graphs beside it (a folder,
    # not temporary names, because ONNX records the name of its data file inside the graph)
    stage = staging_dir(out / "export.json")  # one that a killed export left is removed when export.json is written
    try:
        for name, module, example, check, names, checkpoint in jobs:
            staged = stage / f"{name}{suffix}"
            diff = _export(module.eval(), example, check, names, staged, fmt)
            if not diff <= TOLERANCE:
                raise StoppedError(f"the exported {name} differs from PyTorch by {diff:.3g} (> {TOLERANCE:g}), so "
                                   f"nothing was written to {out}; try the other --format, or report it with the "
                                   "versions of torch and onnx")
            # ONNX keeps weights over 2 GB (the brain-LDM UNet) in a data file beside the graph
            files = [staged] + [f for f in (staged.with_name(staged.name + ".data"),) if f.is_file()]
            manifest["networks"][name] = {"files": [f.name for f in files],
                                          "inputs": {n: list(t.shape) for n, t in zip(names, check)},
                                          "checkpoint": checkpoint, "max_relative_difference": diff}
            log.info("%s checked (max difference from PyTorch %.2g)", name, diff)
        paths = []
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
            paths.append(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_json(out / "export.json", manifest)
    return paths
