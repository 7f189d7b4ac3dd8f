"""One scan through the models: reconstruct, compress/decompress, denoise (SDEdit), the forward-process picture, and
loss.png of every training run."""

import json

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.cli import main
from medldm.data.dataset import read_manifest
from medldm.inference.sample import sample_run
from medldm.inference.scan import compress_scan, decompress_latent, denoise_scan, reconstruct_scan, show_noising
from medldm.training.checkpoint import load_checkpoint, save_checkpoint
from medldm.training.curves import loss_plot


@pytest.fixture
def scan(dataset):
    """A preprocessed test-split volume."""
    row = next(r for r in read_manifest(dataset) if r["split"] == "test")
    return dataset / row["image"]


def test_compress_and_decompress_keep_the_geometry_and_equal_reconstruct(scan, ae_run, tmp_path, capsys):
    assert main(["compress", str(scan), str(tmp_path / "s.latent"), "--autoencoder", str(ae_run)]) == 0
    printed = capsys.readouterr().out
    assert "fewer values than the volume" in printed and "round trip SSIM" in printed
    decompress_latent(tmp_path / "s.latent", tmp_path / "back.nii.gz")
    quality = reconstruct_scan(scan, tmp_path / "recon.nii.gz", ae_run)
    back, recon, original = nib.load(tmp_path / "back.nii.gz"), nib.load(tmp_path / "recon.nii.gz"), nib.load(scan)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-6)
    np.testing.assert_allclose(back.get_fdata(), recon.get_fdata(), atol=1e-5)  # one code path
    assert 0 < quality["ssim"] <= 1 and quality["psnr"] > 0
    sidecar = json.loads((tmp_path / "recon.json").read_text(encoding="utf-8"))
    assert sidecar["synthetic"] is False and sidecar["ssim"] == pytest.approx(quality["ssim"])
    assert iio.imread(tmp_path / "recon.png").ndim >= 2  # input | reconstruction | difference
    # float16 halves the file; a latent of another autoencoder is refused
    small = compress_scan(scan, tmp_path / "h.latent", ae_run, float16=True)
    assert small["latent_bytes"] < (tmp_path / "s.latent").stat().st_size
    state = load_checkpoint(tmp_path / "s.latent")
    state["autoencoder_sha256"] = "0" * 64
    save_checkpoint(tmp_path / "other.latent", state)
    with pytest.raises(ValueError, match="encoded by another autoencoder"):
        decompress_latent(tmp_path / "other.latent", tmp_path / "x.nii.gz", autoencoder_run=ae_run)


def test_denoise_ends_are_reconstruction_and_a_fresh_sample(scan, ae_run, ldm_run, tmp_path):
    reconstruct_scan(scan, tmp_path / "recon.nii.gz", ae_run)
    denoise_scan(scan, tmp_path / "d0.nii.gz", ldm_run, strength=0.0, steps=3)
    np.testing.assert_allclose(nib.load(tmp_path / "d0.nii.gz").get_fdata(),
                               nib.load(tmp_path / "recon.nii.gz").get_fdata(), atol=1e-5)
    denoise_scan(scan, tmp_path / "d1.nii.gz", ldm_run, strength=1.0, steps=3, seed=7)
    sample = sample_run(ldm_run, tmp_path / "samples", num=1, steps=3, seed=7, dtype="float32", device="cpu")[0]
    np.testing.assert_allclose(nib.load(tmp_path / "d1.nii.gz").get_fdata(), nib.load(sample).get_fdata(), atol=1e-5)
    assert nib.load(tmp_path / "d1.nii.gz").header["descrip"].tobytes().startswith(b"SYNTHETIC")  # nothing of the scan
    out = denoise_scan(scan, tmp_path / "d.nii.gz", ldm_run, strength=0.5, steps=4, seed=1)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, nib.load(scan).affine, atol=1e-6)  # the input's geometry
    assert img.header["descrip"].tobytes().startswith(b"PROCESSED medldm denoise strength=0.5")
    halfway = img.get_fdata()
    assert not np.allclose(halfway, nib.load(tmp_path / "d0.nii.gz").get_fdata(), atol=1e-3)
    sidecar = json.loads((tmp_path / "d.json").read_text(encoding="utf-8"))
    assert sidecar["strength"] == 0.5 and sidecar["synthetic"] is False and (tmp_path / "d.png").is_file()
    # noised to the first DDIM timestep at or below 0.5 x 999, and denoised from there only
    assert 0 < sidecar["t_start"] <= 500 and 0 < sidecar["denoising_steps"] < 4
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--strength"):
            denoise_scan(scan, tmp_path / "x.nii.gz", ldm_run, strength=bad)


def test_a_raw_scan_is_preprocessed_like_the_training_data_and_can_go_back_to_its_grid(raw_adni, ae_run, tmp_path):
    raw = sorted(raw_adni.rglob("*.nii"))[0]
    raw_img = nib.load(raw)
    reconstruct_scan(raw, tmp_path / "model_grid.nii.gz", ae_run)
    assert nib.load(tmp_path / "model_grid.nii.gz").shape == tuple(load_checkpoint(
        ae_run / "checkpoints" / "latest.pt")["image_shape"])
    reconstruct_scan(raw, tmp_path / "native.nii.gz", ae_run, native=True)
    native = nib.load(tmp_path / "native.nii.gz")
    assert native.shape == raw_img.shape[:3]
    np.testing.assert_allclose(native.affine, raw_img.affine, atol=1e-4)
    assert native.get_fdata().max() > 0.1  # the head is where the scan has it


def test_show_noising_has_one_column_per_timestep(scan, ldm_run, tmp_path):
    panels = show_noising(scan, tmp_path / "noising.png", ldm_run)
    latent_channels = load_checkpoint(ldm_run / "checkpoints" / "latest.pt")["latent_shape"][0]
    assert panels == 6 * (1 + latent_channels)  # decoded image + each latent channel at t = 0 ... 999
    assert iio.imread(tmp_path / "noising.png").shape[1] > iio.imread(tmp_path / "noising.png").shape[0]


def test_every_training_run_draws_its_loss_curves(ae_run, ldm_run):
    for run, expected in ((ae_run, {"train/loss", "train/l1", "train/kl", "val/ssim"}), (ldm_run, {"train/loss",
                                                                                                  "val/loss_ema"})):
        assert (run / "loss.png").is_file()  # written at each checkpoint and at the end
        assert expected <= set(loss_plot(run))
    assert torch.tensor(iio.imread(ae_run / "loss.png").shape[:2]).min() > 200
