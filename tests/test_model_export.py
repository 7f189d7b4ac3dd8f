"""A trained run's decoder and UNet export to TorchScript and ONNX and compute what the PyTorch modules compute."""

import json

import numpy as np
import pytest
import torch

from medldm.artifacts import AutoencoderRun, DiffusionRun
from medldm.inference.model_export import TOLERANCE, export_model


def test_torchscript_export_reproduces_the_decoder_and_the_unet(ldm_run, ae_run, tmp_path):
    paths = export_model(ldm_run, "torchscript", tmp_path)
    assert sorted(p.name for p in paths) == ["decoder.pt", "unet.pt"]
    manifest = json.loads((tmp_path / "export.json").read_text(encoding="utf-8"))
    assert manifest["tolerance"] == TOLERANCE
    assert all(n["max_relative_difference"] <= TOLERANCE for n in manifest["networks"].values())
    # what a deployment needs besides the graphs
    assert manifest["scale_factor"] == DiffusionRun(ldm_run).load(mmap=True).scale_factor != 1.0
    assert manifest["conditioning"]["mode"] == "crossattn" and manifest["conditioning"]["keys"]
    assert manifest["scheduler"]["num_train_timesteps"] == 1000
    # loaded on its own, on inputs it was not traced with
    unet = DiffusionRun(ldm_run).load().unet()
    scripted = torch.jit.load(str(tmp_path / "unet.pt"))
    shapes = manifest["networks"]["unet"]["inputs"]
    x, t, c = torch.randn(shapes["x"]), torch.tensor([123]), torch.rand(shapes["context"])
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x, t, c), unet(x, timesteps=t, context=c), atol=1e-5)
    decoder = torch.jit.load(str(tmp_path / "decoder.pt"))
    autoencoder = AutoencoderRun(ae_run).load().model()
    z = torch.randn(manifest["networks"]["decoder"]["inputs"]["z"])
    with torch.no_grad():
        np.testing.assert_allclose(decoder(z), autoencoder.decode(z), atol=1e-5)


def test_onnx_export_of_an_autoencoder_run_is_checked_with_onnxruntime(ae_run, tmp_path):
    paths = export_model(ae_run, "onnx", tmp_path)
    assert [p.name for p in paths] == ["decoder.onnx"]
    manifest = json.loads((tmp_path / "export.json").read_text(encoding="utf-8"))
    assert manifest["networks"]["decoder"]["max_relative_difference"] <= TOLERANCE
    with pytest.raises(ValueError, match="--format 'savedmodel': use one of torchscript, onnx"):
        export_model(ae_run, "savedmodel", tmp_path)
