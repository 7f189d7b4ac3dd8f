"""One scan through the models: reconstruct, compress/decompress, denoise (SDEdit), the forward-process picture, and
loss.png of every training run."""

import json

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.artifacts import load_checkpoint, save_checkpoint
from medldm.cli import main
from medldm.data.dataset import read_manifest
from medldm.inference.sample import sample_run
from medldm.inference.scan import compress_scan, decompress_latent, denoise_scan, reconstruct_scan, show_noising
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


@pytest.mark.parametrize("run", ["ldm_run", "ddpm_run"])  # rectified flow and DDIM
def test_denoise_ends_are_reconstruction_and_a_fresh_sample(request, scan, ae_run, run, tmp_path):
    ldm_run = request.getfixturevalue(run)
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
    # 4 DDIM steps are 999, 749, 499, 249: noised to 499 (the first at or below 0.5 x 999), denoised from there;
    # 4 rectified-flow steps are 1000, 750, 500, 250: 500 is above 499.5, so noised to 250
    assert (sidecar["t_start"], sidecar["denoising_steps"]) == ((499, 2) if run == "ddpm_run" else (250, 1))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--strength"):
            denoise_scan(scan, tmp_path / "x.nii.gz", ldm_run, strength=bad)


@pytest.mark.parametrize("run, strength, steps, t_start, denoising_steps", [
    ("ddpm_run", 0.3, 50, 299, 15),  # the README's example
    ("ddpm_run", 0.7, 4, 499, 2),  # DDIM steps 999, 749, 499, 249
    ("ddpm_run", 0.05, 50, 39, 2),
    ("ddpm_run", 0.9, 5, 799, 4),  # DDIM steps 999, 799, 599, 399, 199
    ("short_schedule_run", 0.8, 5, 15, 4),
    ("short_schedule_run", 0.25, 10, 3, 2),
    # where a timestep lies between strength x (T - 1) and its rounding (denoise once rounded and started there)
    ("short_schedule_run", 0.72, 4, 9, 2),  # DDIM steps 19, 14, 9, 4; 0.72 x 19 = 13.68
])
def test_denoise_starts_at_the_first_ddim_timestep_at_or_below_strength_times_t_minus_1(
        request, scan, tmp_path, monkeypatch, run, strength, steps, t_start, denoising_steps):
    import medldm.inference.scan as scan_module

    run_dir = request.getfixturevalue(run)
    train_steps = load_checkpoint(run_dir / "checkpoints" / "latest.pt")["config"]["scheduler"]["num_train_timesteps"]
    # the rule as the README gives it: the DDIM grid from T - 1 down in steps of T // steps
    grid = (train_steps - 1) - np.arange(steps) * (train_steps // steps)
    below = grid[grid <= strength * (train_steps - 1)]
    assert (int(below[0]), len(below)) == (t_start, denoising_steps)  # the table above is the rule
    ran = []  # the timesteps the UNet was run at

    def recording(unet, scheduler, *args, **kwargs):
        ran.append([int(t) for t in scheduler.timesteps])
        return real(unet, scheduler, *args, **kwargs)

    real = scan_module.sample_latents
    monkeypatch.setattr(scan_module, "sample_latents", recording)
    denoise_scan(scan, tmp_path / "d.nii.gz", run_dir, strength=strength, steps=steps, seed=1)
    sidecar = json.loads((tmp_path / "d.json").read_text(encoding="utf-8"))
    assert (sidecar["t_start"], sidecar["denoising_steps"]) == (t_start, denoising_steps)
    assert ran == [below.tolist()]


def _one_side_darker(raw, out):
    """The raw scan with its right half (world x above the head's midline) at 30 %: a mirrored result shows."""
    img = nib.load(raw)
    data = img.get_fdata()
    ijk = np.indices(data.shape).reshape(3, -1)
    x_mm = (img.affine[0, :3] @ ijk + img.affine[0, 3]).reshape(data.shape)
    midline = np.median(x_mm[data > 0.1 * data.max()])
    nib.save(nib.Nifti1Image(np.where(x_mm > midline, 0.3 * data, data).astype(np.float32), img.affine), out)
    return out


def _correlation_in(mask, a, b):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def test_a_raw_scan_is_preprocessed_like_the_training_data_and_can_go_back_to_its_grid(raw_adni, ae_run, tmp_path,
                                                                                        monkeypatch):
    from nibabel.processing import resample_from_to

    import medldm.inference.scan as scan_module

    raw = _one_side_darker(sorted(raw_adni.rglob("*.nii"))[0], tmp_path / "one_side_darker.nii")
    raw_img = nib.load(raw)
    assert nib.aff2axcodes(raw_img.affine) != ("R", "A", "S")  # voxel axes not the model grid's: mix-ups show
    reconstruct_scan(raw, tmp_path / "model_grid.nii.gz", ae_run)
    model_grid = nib.load(tmp_path / "model_grid.nii.gz")
    assert model_grid.shape == tuple(load_checkpoint(ae_run / "checkpoints" / "latest.pt")["image_shape"])
    reconstruct_scan(raw, tmp_path / "native.nii.gz", ae_run, native=True)
    native = nib.load(tmp_path / "native.nii.gz")
    assert native.shape == raw_img.shape[:3]
    np.testing.assert_allclose(native.affine, raw_img.affine, atol=1e-4)
    # the voxels: the model-grid result resampled by nibabel (scipy) through the two affines, wherever the scan's
    # voxels fall inside the model grid; a mirrored, shifted or axis-swapped resample misses by far more
    expected = resample_from_to(model_grid, (raw_img.shape[:3], raw_img.affine), order=1).get_fdata()
    ijk = np.indices(raw_img.shape[:3]).reshape(3, -1)
    at = (np.linalg.inv(model_grid.affine) @ raw_img.affine)[:3] @ np.vstack([ijk, np.ones(ijk.shape[1])])
    inside = np.all((at >= 1) & (at <= np.array(model_grid.shape)[:, None] - 2), axis=0).reshape(raw_img.shape[:3])
    assert inside.mean() > 0.2
    np.testing.assert_allclose(native.get_fdata()[inside], expected[inside], atol=1e-4)
    # compress, then decompress onto the scan's grid: the same volume
    compress_scan(raw, tmp_path / "s.latent", ae_run)
    decompress_latent(tmp_path / "s.latent", tmp_path / "back.nii.gz", native=True)
    back = nib.load(tmp_path / "back.nii.gz")
    np.testing.assert_allclose(back.affine, raw_img.affine, atol=1e-4)
    np.testing.assert_allclose(back.get_fdata(), native.get_fdata(), atol=1e-5)
    # and back to the scan itself: with an autoencoder that returns its input, preprocessing then --native gives
    # the scan (less its resolution) where its head is, and not its mirror image
    monkeypatch.setattr(scan_module, "_encode", lambda model, cfg, volume, device: torch.from_numpy(volume)[None, None])
    monkeypatch.setattr(scan_module, "_decode", lambda model, z: z[0, 0].numpy())
    reconstruct_scan(raw, tmp_path / "identity.nii.gz", ae_run, native=True)
    same, original = nib.load(tmp_path / "identity.nii.gz").get_fdata(), raw_img.get_fdata()
    head = original > 0.1 * original.max()
    left_right = int(np.argmax(np.abs(raw_img.affine[0, :3])))  # the voxel axis that runs along world x
    r, mirrored = (_correlation_in(head, v, original) for v in (same, np.flip(same, left_right)))
    assert r > 0.8 and mirrored < 0.5, f"correlation with the scan {r:.2f}, of the mirror image {mirrored:.2f}"


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
