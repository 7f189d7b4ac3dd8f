import pytest
import torch

from medldm.config import ConfigError, load_config
from medldm.training.autoencoder import check_shapes, kl_loss, train_autoencoder
from medldm.training.checkpoint import load_checkpoint
from medldm.training.loop import NonFiniteGuard, NonFiniteLossError

from .conftest import AE_FAST


def test_checkpoint_holds_what_is_needed_to_rebuild_and_resume(ae_run):
    state = load_checkpoint(ae_run / "checkpoints" / "latest.pt")
    assert state["kind"] == "autoencoder" and state["step"] == 6
    assert {"model", "optimizer", "config", "versions", "rng", "image_shape"} <= set(state)
    assert (ae_run / "checkpoints" / "best.pt").is_file()
    assert (ae_run / "config.yaml").is_file()
    assert list((ae_run / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_continues_the_run_and_refuses_to_overwrite(dataset, tmp_path):
    run = tmp_path / "ae"
    cfg = load_config("autoencoder", None, AE_FAST)
    train_autoencoder(dataset, run, cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train_autoencoder(dataset, run, cfg)
    longer = load_config("autoencoder", None, AE_FAST + ["train.steps=9"])
    before = load_checkpoint(run / "checkpoints" / "latest.pt")["model"]
    train_autoencoder(dataset, run, longer, resume=True)
    after = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert after["step"] == 9
    assert any(not torch.equal(before[k], after["model"][k]) for k in before)


def test_resume_without_checkpoint_is_an_error(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        train_autoencoder(dataset, tmp_path / "new", load_config("autoencoder"), resume=True)


def test_image_shape_must_divide_by_the_downsampling():
    cfg = load_config("autoencoder", None, ["model.channels=[8,8,8,8]", "model.attention_levels=[false,false,false,false]"])
    with pytest.raises(ConfigError, match="multiples of 8"):
        check_shapes(cfg, [32, 36, 32])


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 3, 4, 4, 4), torch.ones(2, 3, 4, 4, 4)
    assert kl_loss(mu, sigma).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(mu + 1, sigma).item() == pytest.approx(0.5 * 3 * 64)


def test_non_finite_losses_are_skipped_then_stop_the_run():
    guard = NonFiniteGuard(limit=3)
    assert guard.ok(torch.tensor(1.0), 1)
    assert not guard.ok(torch.tensor(float("nan")), 2)
    assert not guard.ok(torch.tensor(float("inf")), 3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        guard.ok(torch.tensor(float("nan")), 4)
    assert guard.skipped == 3
