import pytest
import torch

from medldm.data.dataset import read_manifest
from medldm.inference.encode import latents_path, load_autoencoder
from medldm.models.conditioning import ConditionEncoder
from medldm.training.checkpoint import load_checkpoint


def test_latents_are_posterior_means_with_train_scale_factor(dataset, ae_run):
    cache = load_checkpoint(latents_path(ae_run))
    rows = read_manifest(dataset)
    assert cache["images"] == [r["image"] for r in rows]
    assert tuple(cache["mu"].shape) == (len(rows), 3, 8, 8, 8)
    train = torch.tensor([r["split"] == "train" for r in rows])
    assert cache["scale_factor"] == pytest.approx(1.0 / cache["mu"][train].std().item(), rel=1e-5)
    assert cache["scale_factor"] != 1.0
    # the mean, not a sample: encoding again gives exactly the cached latent
    from medldm.data.io import load_volume

    model, _ = load_autoencoder(ae_run)
    x = torch.from_numpy(load_volume(dataset / rows[0]["image"])[0])[None, None]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0][0], cache["mu"][0])


def test_diffusion_checkpoint_carries_scale_factor_autoencoder_and_reference(ae_run, ldm_run):
    state = load_checkpoint(ldm_run / "checkpoints" / "latest.pt")
    cache = load_checkpoint(latents_path(ae_run))
    assert state["scale_factor"] == cache["scale_factor"]
    assert state["autoencoder"]["sha256"] == cache["autoencoder_sha256"]
    assert state["reference"]["shape"] == [32, 32, 32] and len(state["reference"]["affine"]) == 4
    assert {"model", "ema", "optimizer", "step", "config", "versions", "conditioning"} <= set(state)


def test_stale_latents_are_refused(dataset, ae_run, tmp_path):
    import shutil

    from medldm.config import load_config
    from medldm.training.diffusion import train_diffusion

    ae_copy = tmp_path / "ae"
    shutil.copytree(ae_run, ae_copy)
    best = ae_copy / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    state["step"] += 1  # a retrained autoencoder: different bytes
    torch.save(state, best)
    with pytest.raises(ValueError, match="run `medldm encode` again"):
        train_diffusion(dataset, ae_copy, tmp_path / "ldm", load_config("diffusion"))


def test_unknown_labels_are_the_null_condition_not_zero_valued_facts():
    enc = ConditionEncoder(["age", "sex", "diagnosis"], age_mean=70, age_std=10)
    unknown = enc.encode_one({"age": None, "sex": None, "diagnosis": None})
    assert torch.count_nonzero(unknown) == 0
    age70 = enc.encode_one({"age": 70.0})
    assert age70[0] == 0.0 and age70[1] == 1.0  # mean age is known-and-average, unlike unknown
    assert not torch.equal(age70, unknown)
    dropped = enc.drop(enc.encode([{"age": 80, "sex": "F", "diagnosis": "AD"}] * 64), 0.5,
                       torch.Generator().manual_seed(0))
    fractions = (dropped[:, 0] == 0).float().mean(0)
    assert 0.2 < fractions[1].item() < 0.8  # each condition dropped on its own


def test_condition_parsing_errors_name_the_problem():
    enc = ConditionEncoder(["age", "sex"])
    assert enc.parse({"age": "71", "sex": "female"}) == {"age": 71.0, "sex": "F"}
    with pytest.raises(ValueError, match="conditioned on"):
        enc.parse({"diagnosis": "AD"})
    with pytest.raises(ValueError, match="age must be a number"):
        enc.parse({"age": "old"})


def test_time_limit_and_gradient_accumulation(dataset, ae_run, tmp_path):
    from medldm.config import load_config
    from medldm.training.diffusion import train_diffusion

    from .conftest import LDM_FAST

    run = tmp_path / "ldm"
    train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + [
        "train.grad_accum=2", "train.time_limit_minutes=1e-6"]))
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["step"] == 1  # stopped cleanly at the limit, with a checkpoint to --resume from
    assert (run / "checkpoints" / "best.pt").is_file()


def test_a_latent_shape_the_unet_cannot_halve_is_refused_before_training(dataset, ae_run, tmp_path):
    from medldm.config import ConfigError, load_config
    from medldm.training.diffusion import train_diffusion

    # tiny latents are 8^3; four UNet levels would halve them to 1 and beyond
    cfg = load_config("diffusion", None, ["model.channels=[8,8,8,8,8]", "model.attention_levels=[false,false,false,false,false]",
                                          "model.num_head_channels=[0,0,0,0,0]"])
    with pytest.raises(ConfigError, match="use fewer UNet levels"):
        train_diffusion(dataset, ae_run, tmp_path / "ldm", cfg)
    assert not (tmp_path / "ldm").exists()
