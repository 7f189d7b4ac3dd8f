"""Runs written by an earlier medldm keep working: tests/old_runs/0.1.0 was written by medldm 0.1.0 before the
artifacts module and the checkpoint schema version existed (tests/old_runs/make_old_runs.py says how). They load,
sample, decode, reconstruct and resume with today's code, after being moved from where they were written."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.artifacts import SCHEMA_VERSION, AutoencoderRun, DiffusionRun, LatentCache, load_checkpoint

OLD = Path(__file__).parent / "old_runs" / "0.1.0"


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """A copy in a new place: the paths the runs recorded (under /tmp/old_runs) no longer hold them."""
    out = tmp_path_factory.mktemp("old") / "runs"
    shutil.copytree(OLD, out)
    return out


def test_the_files_are_schema_1(old):
    for path in (old / "autoencoder/checkpoints/best.pt", old / "diffusion/checkpoints/latest.pt",
                 old / "autoencoder/latents/latents.pt", old / "scan.latent"):
        state = load_checkpoint(path)
        assert "schema" not in state and state.get("versions", {}).get("medldm", "0.1.0") == "0.1.0"
    assert SCHEMA_VERSION > 1


def test_old_runs_load_as_typed_objects(old):
    ae = AutoencoderRun(old / "autoencoder").load()
    assert ae.image_shape == [32, 32, 32] and ae.latent_shape == [3, 16, 16, 16]
    ldm = DiffusionRun(old / "diffusion").load()
    assert ldm.latent_shape == [3, 16, 16, 16] and ldm.conditions.keys == ["age", "sex", "diagnosis"]
    # written before scheduler.kind and selection.by existed: a DDPM run whose best.pt was chosen by the loss,
    # whatever today's defaults are
    assert ldm.config.scheduler.kind == "ddpm" and ldm.config.selection.by == "val_loss"
    # the diffusion run names its autoencoder by a path that is gone; the copy is found by its SHA-256
    assert not Path(ldm.autoencoder.checkpoint).exists()
    assert ldm.autoencoder.find(old / "autoencoder") == old / "autoencoder/checkpoints/best.pt"
    cache = LatentCache.checked(old / "autoencoder", old / "dataset")  # schema 1 caches carry no kind
    assert cache.mu.shape == (7, 3, 16, 16, 16) and len(cache.rows) == 7


def test_old_diffusion_run_samples(old, tmp_path):
    from medldm.inference.sample import sample_run

    paths = sample_run(old / "diffusion", tmp_path / "s", num=2, steps=2, autoencoder_run=old / "autoencoder",
                       conditions={"sex": "F"})
    volume = nib.load(str(paths[0]))
    assert volume.shape == (32, 32, 32) and np.isfinite(np.asanyarray(volume.dataobj)).all()


def test_old_latent_decompresses_and_old_autoencoder_reconstructs(old, tmp_path):
    from medldm.inference.scan import decompress_latent, reconstruct_scan

    out = decompress_latent(old / "scan.latent", tmp_path / "d.nii.gz", autoencoder_run=old / "autoencoder")
    assert nib.load(str(out)).shape == (32, 32, 32)
    image = sorted((old / "dataset/images").glob("*.nii.gz"))[0]
    quality = reconstruct_scan(image, tmp_path / "r.nii.gz", old / "autoencoder")
    assert np.isfinite(quality["ssim"])


def test_old_diffusion_run_resumes(old, tmp_path):
    from medldm.config import load_config
    from medldm.training.diffusion import train_diffusion

    ldm = tmp_path / "ldm"
    shutil.copytree(old / "diffusion", ldm)
    cfg = load_config("diffusion", ldm / "config.yaml", ["train.steps=3", "train.val_every=3",
                                                         "train.checkpoint_every=3"])
    train_diffusion(old / "dataset", old / "autoencoder", ldm, cfg, resume=True)
    state = load_checkpoint(ldm / "checkpoints" / "latest.pt", kind="diffusion", resume=True)
    assert state["step"] == 3 and state["schema"] == SCHEMA_VERSION
    before = load_checkpoint(old / "diffusion/checkpoints/latest.pt")
    assert state["ema_n_averaged"] == before["ema_n_averaged"] + 1  # one more step, from the old state
    assert any(not torch.equal(state["model"][k], before["model"][k]) for k in before["model"])
