"""One patient's scan asked of a diffusion model: inversion to noise, counterfactual labels, anomaly maps."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.artifacts import DiffusionRun, load_checkpoint
from medldm.cli import main
from medldm.data.dataset import read_manifest
from medldm.inference.patient import anomaly_scan, brain_mask, counterfactual_scan, invert_scan
from medldm.inference.scan import reconstruct_scan
from medldm.models.networks import build_scheduler, default_sampler, set_sampling_steps
from medldm.models.ops import invert_latents, sample_latents

from .conftest import train_age_range


def _medldm(*args):
    """The command as a user types it, in its own process."""
    subprocess.run([sys.executable, "-m", "medldm", *map(str, args)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def scan(dataset):
    """A preprocessed test-split volume, with its manifest row."""
    row = next(r for r in read_manifest(dataset) if r["split"] == "test")
    return dataset / row["image"]


@pytest.mark.parametrize("run", ["ldm_run", "ddpm_run"])  # rectified flow (Euler) and DDIM
def test_inversion_round_trip_is_small_and_shrinks_with_steps_and_refinement(request, run):
    ldm = DiffusionRun(request.getfixturevalue(run)).load()
    unet = ldm.unet("cpu")
    z0 = torch.randn([1, *ldm.latent_shape], generator=torch.Generator().manual_seed(0))
    context = ldm.conditions.encode([{}]) if ldm.conditions.keys else None
    errors = {}
    for steps, refine in [(10, 0), (50, 0), (50, 2)]:
        scheduler = build_scheduler(ldm.config.scheduler, default_sampler(ldm.config.scheduler))
        set_sampling_steps(scheduler, steps, ldm.latent_shape)
        noise = invert_latents(unet, scheduler, z0, context, refine=refine, concat=ldm.hybrid)
        back = sample_latents(unet, scheduler, noise, context, concat=ldm.hybrid)
        errors[steps, refine] = float((back - z0).norm() / z0.norm())
    assert errors[50, 2] < errors[50, 0] < errors[10, 0]
    assert errors[50, 2] < 2e-3  # measured: 1.7e-4 (Euler), 6.9e-4 (DDIM)


def test_invert_writes_the_noise_and_the_round_trip(scan, dataset, ldm_run, tmp_path, caplog):
    _medldm("invert", scan, tmp_path / "s.inv", "--run", ldm_run, "--steps", 20)  # as a user types it
    record = json.loads((tmp_path / "s.inv.json").read_text(encoding="utf-8"))
    state = load_checkpoint(tmp_path / "s.inv")
    assert state["kind"] == "inversion" and list(state["noise"].shape) == list(state["latent"].shape)
    assert record["labels_from"].endswith(f"manifest.csv ({scan.relative_to(scan.parents[1])})")
    trip = record["round_trip"]
    assert trip["latent_relative_error"] < 0.01 and trip["ssim_vs_reconstruction"] > 0.99
    assert record["steps"] == 20
    # a scan's own age outside the training range is a fact, not a request: clipped to the range, with a warning
    oldest = max(train_age_range(dataset))
    record = invert_scan(scan, tmp_path / "o.inv", ldm_run, steps=3, labels={"age": str(oldest + 30), "sex": "F"})
    assert record["labels"]["age"] == pytest.approx(oldest) and "outside the model's training range" in caplog.text


def test_counterfactual_with_the_scans_own_labels_is_its_reconstruction(scan, dataset, ldm_run, ae_run, tmp_path):
    row = next(r for r in read_manifest(dataset) if dataset / r["image"] == scan)
    reconstruct_scan(scan, tmp_path / "recon.nii.gz", ae_run)
    same = counterfactual_scan(scan, tmp_path / "same.nii.gz", ldm_run, {"age": str(row["age"])}, steps=20)
    assert same["old_conditions"] == same["new_conditions"]
    np.testing.assert_allclose(nib.load(tmp_path / "same.nii.gz").get_fdata(),
                               nib.load(tmp_path / "recon.nii.gz").get_fdata(), atol=0.02)
    older = max(train_age_range(dataset))
    _medldm("counterfactual", scan, tmp_path / "old.nii.gz", "--run", ldm_run, "--steps", 20, "--condition",
            f"age={older}")
    side = json.loads((tmp_path / "old.json").read_text(encoding="utf-8"))
    assert side["new_conditions"]["age"] == older and side["old_conditions"]["age"] == row["age"]
    assert side["counterfactual"] is True and "not a prognosis" in side["disclaimer"]
    assert set(side["morphometry"]["change"]) >= {"ventricle_ml", "brain_ml", "csf_ml"}
    image = nib.load(tmp_path / "old.nii.gz")
    assert image.header["descrip"].tobytes().startswith(f"COUNTERFACTUAL medldm age={older}".encode())
    np.testing.assert_allclose(image.affine, nib.load(scan).affine, atol=1e-6)
    # the barely trained test model hardly uses its conditions: the new age changes the volume, a little
    assert not np.array_equal(image.get_fdata(), nib.load(tmp_path / "same.nii.gz").get_fdata())
    assert (tmp_path / "old.png").is_file()


def test_counterfactual_refuses_labels_the_model_was_not_trained_on(scan, dataset, ldm_run, tmp_path, capsys):
    too_old = max(train_age_range(dataset)) + 30
    assert main(["counterfactual", str(scan), str(tmp_path / "x.nii.gz"), "--run", str(ldm_run),
                 "--condition", f"age={too_old}"]) == 2
    assert "outside the training range" in capsys.readouterr().err
    assert main(["counterfactual", str(scan), str(tmp_path / "x.nii.gz"), "--run", str(ldm_run),
                 "--condition", "handedness=L"]) == 2
    assert "handedness" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def _lesioned(scan, out, centre, radius=3.0, value=1.0):
    image = nib.load(scan)
    data = image.get_fdata().astype(np.float32)
    ijk = np.indices(data.shape).transpose(1, 2, 3, 0)
    blob = np.linalg.norm(ijk - np.asarray(centre), axis=-1) <= radius
    data[blob] = value
    nib.save(nib.Nifti1Image(data, image.affine), out)
    return blob


def test_anomaly_map_is_higher_in_a_planted_lesion_and_stays_in_the_brain(scan, ldm_run, tmp_path):
    """Plumbing on the barely trained test model (its autoencoder reconstructs poorly, so the map is high
    everywhere): where the peak lands with a trained model is measured by benchmarks/patient_checks.py."""
    brain = nib.load(scan).get_fdata() > 0.05
    centre = np.round(np.argwhere(brain).mean(axis=0) + [4, 3, 2]).astype(int)  # off-centre, inside the brain
    blob = _lesioned(scan, tmp_path / "lesion.nii.gz", centre)
    clean = anomaly_scan(scan, tmp_path / "clean", ldm_run, steps=20, seeds=2)
    _medldm("anomaly", tmp_path / "lesion.nii.gz", tmp_path / "found", "--run", ldm_run, "--steps", 20, "--seeds", 2)
    found = json.loads((tmp_path / "found" / "anomaly.json").read_text(encoding="utf-8"))
    maps = [nib.load(tmp_path / d / "anomaly_map.nii.gz").get_fdata() for d in ("clean", "found")]
    assert maps[1][blob].mean() > maps[0][blob].mean() + 0.05 and clean["score"] < found["score"]
    volume = nib.load(tmp_path / "lesion.nii.gz").get_fdata()
    assert brain_mask(volume)[blob].all()  # the lesion is in the brain
    inside = brain_mask(volume, erode=3)  # the map's mask at sigma 1: the brain less its edge
    assert maps[1].min() >= 0 and not ((maps[1] > 0) & ~inside).any()
    assert found["score"] == pytest.approx(maps[1].max(), rel=1e-4)
    assert found["p99_in_brain"] == pytest.approx(np.percentile(maps[1][inside], 99), rel=1e-4)
    healthy = nib.load(tmp_path / "found" / "pseudo_healthy.nii.gz")
    np.testing.assert_allclose(healthy.affine, nib.load(scan).affine, atol=1e-6)
    assert (tmp_path / "found" / "anomaly.png").is_file()
    assert found["strength"] == 0.4 and found["seeds"] == 2 and found["labels_from"] == "unknown"
