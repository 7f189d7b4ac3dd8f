import json

import nibabel as nib
import numpy as np
import pytest

from medldm.data.dataset import read_dataset_info
from medldm.inference.sample import sample_run

from .conftest import train_age_range


def test_same_seed_same_volume_and_batch_size_does_not_matter(ldm_run, tmp_path):
    a = sample_run(ldm_run, tmp_path / "a", num=3, steps=5, seed=11, batch_size=3)
    b = sample_run(ldm_run, tmp_path / "b", num=3, steps=5, seed=11, batch_size=1)
    c = sample_run(ldm_run, tmp_path / "c", num=1, steps=5, seed=12)
    va = [np.asanyarray(nib.load(p).dataobj) for p in a]
    vb = [np.asanyarray(nib.load(p).dataobj) for p in b]
    for x, y in zip(va, vb):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert not np.allclose(va[0], va[1])
    np.testing.assert_allclose(va[1], np.asanyarray(nib.load(c[0]).dataobj), atol=1e-5)  # seed 12 = sample 1 of seed 11


def test_stochastic_ddim_is_reproducible(ldm_run, tmp_path):
    a = sample_run(ldm_run, tmp_path / "a", num=2, steps=4, eta=1.0, seed=5, batch_size=2)
    again = sample_run(ldm_run, tmp_path / "again", num=2, steps=4, eta=1.0, seed=5, batch_size=2)
    b = sample_run(ldm_run, tmp_path / "b", num=2, steps=4, eta=1.0, seed=5, batch_size=1)
    deterministic = sample_run(ldm_run, tmp_path / "d", num=2, steps=4, eta=0.0, seed=5, batch_size=2)
    for x, y, z, d in zip(a, again, b, deterministic):
        vx = np.asanyarray(nib.load(x).dataobj)
        np.testing.assert_array_equal(vx, np.asanyarray(nib.load(y).dataobj))  # bit-identical on the CPU
        # per-sample step noise: the batch size changes only float rounding
        np.testing.assert_allclose(vx, np.asanyarray(nib.load(z).dataobj), atol=1e-5)
        assert not np.allclose(vx, np.asanyarray(nib.load(d).dataobj), atol=1e-3)  # eta really adds noise


def test_export_is_synthetic_in_the_reference_space_with_provenance(dataset, ldm_run, tmp_path):
    out = tmp_path / "s"
    age = max(train_age_range(dataset))
    paths = sample_run(ldm_run, out, num=2, steps=3, seed=0, conditions={"age": str(age), "sex": "F"}, guidance=2.0)
    reference = read_dataset_info(dataset)["reference"]
    real = nib.load(dataset / reference["image"])
    for p in paths:
        img = nib.load(p)
        np.testing.assert_allclose(img.affine, real.affine, atol=1e-5)
        assert not np.allclose(img.affine, np.eye(4))
        assert img.header["descrip"].tobytes().decode().startswith("SYNTHETIC medldm")
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert img.shape == real.shape
        side = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
        assert side["synthetic"] is True and side["steps"] == 3 and side["guidance"] == 2.0
        assert side["conditions"] == {"age": age, "sex": "F"}
        assert len(side["diffusion_sha256"]) == 64 and len(side["autoencoder_sha256"]) == 64
        assert p.with_name(p.name.replace(".nii.gz", ".png")).is_file()
    assert (out / "samples.csv").read_text().count("\n") == 3
    assert (out / "contact_sheet.png").is_file()


def test_unknown_or_out_of_range_conditions_are_refused_before_sampling(dataset, ldm_run, tmp_path):
    with pytest.raises(ValueError, match="use M or F"):
        sample_run(ldm_run, tmp_path / "a", num=1, steps=2, conditions={"sex": "X"})
    with pytest.raises(ValueError, match="outside the training range"):
        sample_run(ldm_run, tmp_path / "b", num=1, steps=2, conditions={"age": str(max(train_age_range(dataset)) + 1)})
    with pytest.raises(ValueError, match="conditioned on"):
        sample_run(ldm_run, tmp_path / "c", num=1, steps=2, conditions={"height": "180"})
    assert not any(tmp_path.iterdir())  # nothing written


def test_guidance_moves_samples_and_no_condition_is_unconditional(dataset, ldm_run, tmp_path):
    import torch

    from medldm.inference.sample import ddim_sample, load_diffusion
    from medldm.models.networks import build_scheduler

    unet, meta = load_diffusion(ldm_run)
    scheduler = build_scheduler(meta["cfg"].scheduler, "ddim")
    scheduler.set_timesteps(4)
    noise = torch.randn([2, *meta["latent_shape"]], generator=torch.Generator().manual_seed(0))
    enc = meta["encoder"]
    context = enc.encode([{"age": max(train_age_range(dataset)), "diagnosis": "AD"}] * 2)
    plain = ddim_sample(unet, scheduler, noise, context, guidance=1.0)
    guided = ddim_sample(unet, scheduler, noise, context, guidance=3.0)
    null = ddim_sample(unet, scheduler, noise, enc.encode([{}] * 2), guidance=1.0)
    assert not torch.allclose(plain, guided, atol=1e-4)  # guidance extrapolates away from the null prediction
    # guided = null + 3 (cond - null) at every step; at guidance 0 it is the unconditional model
    torch.testing.assert_close(ddim_sample(unet, scheduler, noise, context, guidance=0.0), null)
    side = sample_run(ldm_run, tmp_path / "u", num=1, steps=4, seed=0)[0].with_name("sample_0000.json")
    assert json.loads(side.read_text())["conditions"] == {}
