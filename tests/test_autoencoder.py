from pathlib import Path

import pytest
import torch

from medldm.artifacts import AutoencoderRun, load_checkpoint
from medldm.config import ConfigError, load_config
from medldm.data.dataset import read_manifest
from medldm.training.autoencoder import check_shapes, train_autoencoder
from medldm.training.loop import (
    NonFiniteGuard,
    NonFiniteLossError,
    adamw,
    load_optimizer,
    make_ema,
    update_ema,
)
from medldm.training.losses import kl_loss

from .conftest import AE_FAST, Crash, crash_after_checkpoint


def test_checkpoint_holds_what_is_needed_to_rebuild_and_resume(ae_run):
    state = load_checkpoint(ae_run / "checkpoints" / "latest.pt")
    assert state["kind"] == "autoencoder" and state["step"] == 6
    assert {"model", "optimizer", "config", "versions", "rng", "image_shape"} <= set(state)
    assert (ae_run / "checkpoints" / "best.pt").is_file()
    assert (ae_run / "config.yaml").is_file()
    assert list((ae_run / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_continues_the_run_and_refuses_to_overwrite(dataset, ae_run, tmp_path):
    import shutil

    run = tmp_path / "ae"
    shutil.copytree(ae_run, run)  # the session's run, trained with AE_FAST
    cfg = load_config("autoencoder", None, AE_FAST)
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
    cfg = load_config("autoencoder", None, ["model.channels=[8,8,8,8]",
                                            "model.attention_levels=[false,false,false,false]"])
    with pytest.raises(ConfigError, match="multiples of 8"):
        check_shapes(cfg, [32, 36, 32])


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 3, 4, 4, 4), torch.ones(2, 3, 4, 4, 4)
    assert kl_loss(mu, sigma).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(mu + 1, sigma).item() == pytest.approx(0.5 * 3 * 64)


def test_steps_with_non_finite_gradients_leave_the_weights_alone_then_stop_the_run():
    model = torch.nn.Linear(3, 1)
    opt = adamw(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(torch.device("cpu"), limit=3)

    def step(scale: float) -> dict[str, torch.Tensor]:
        opt.zero_grad()
        (model(torch.ones(1, 3)).sum() * scale).backward()
        guard.step([(opt, model.parameters())], grad_clip=1.0)
        return {k: v.clone() for k, v in model.state_dict().items()}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    after_good = step(1.0)
    assert not torch.equal(after_good["weight"], before["weight"])
    moments = {k: v.clone() for k, v in opt.state[model.weight].items()}
    for i, bad in enumerate((float("nan"), float("inf"))):
        after_bad = step(bad)
        assert all(torch.equal(after_bad[k], after_good[k]) for k in after_good)  # weights untouched
        assert all(torch.equal(opt.state[model.weight][k], moments[k]) for k in moments)  # moments and step too
        guard.check(2 + i)  # two in a row: not yet the limit
    step(1.0)  # a good step resets the run of bad ones
    step(float("nan")), step(float("nan"))
    guard.check(6)
    step(float("nan"))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row with non-finite gradients by step 7"):
        guard.check(7)
    assert guard.skipped == 5


def test_a_bad_discriminator_step_skips_the_generator_step_too():
    gen, disc = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt_g, opt_d = adamw(gen.parameters(), lr=0.1), adamw(disc.parameters(), lr=0.1)
    guard = NonFiniteGuard(torch.device("cpu"))
    before = [p.clone() for p in (*gen.parameters(), *disc.parameters())]
    gen(torch.ones(1, 3)).sum().backward()
    (disc(torch.ones(1, 3)).sum() * float("nan")).backward()
    guard.step([(opt_g, gen.parameters()), (opt_d, disc.parameters())], grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, (*gen.parameters(), *disc.parameters())))
    assert guard.skipped == 1


def test_optimiser_states_from_before_the_fused_adamw_resume_with_the_guard():
    model = torch.nn.Conv3d(2, 4, 3)
    old = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)  # how earlier checkpoints were written
    model(torch.rand(1, 2, 4, 4, 4)).sum().backward()
    old.step()
    model.to(memory_format=torch.channels_last_3d)  # and channels-last switched on since
    opt = adamw(model.parameters(), lr=0.1)
    load_optimizer(opt, old.state_dict())
    moments = opt.state[model.weight]
    assert moments["exp_avg"].is_contiguous(memory_format=torch.channels_last_3d)
    guard = NonFiniteGuard(torch.device("cpu"))
    model(torch.rand(1, 2, 4, 4, 4)).sum().backward()
    guard.step([(opt, model.parameters())], grad_clip=1.0)  # the fused step with found_inf
    assert float(opt.state[model.weight]["step"]) == 2


def test_ema_copies_first_then_averages_with_a_warm_up():
    model = torch.nn.Linear(2, 1)
    ema = make_ema(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    update_ema(ema, model)  # the first update copies
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    update_ema(ema, model)  # n = 1: decay min(0.9, 2/11)
    assert torch.allclose(ema.module.weight, torch.full_like(model.weight, 1.0 + 2.0 * (1 - 2 / 11)))
    assert int(ema.n_averaged) == 2 and ema.n_averaged.device.type == "cpu"


# every production feature at once, so the exact-resume test covers their state: adversarial term (from step 2),
# EMA, random patches, gradient accumulation; logged every step for the logging test
AE_FULL = AE_FAST + ["train.steps=8", "train.val_every=4", "train.checkpoint_every=4", "adversarial_start=2",
                     "ema_decay=0.9", "patch_size=[24,24,24]", "train.grad_accum=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    """One uninterrupted AE_FULL run, shared by the resume, logging and encoding tests of this module."""
    run = tmp_path_factory.mktemp("full") / "ae"
    train_autoencoder(dataset, run, load_config("autoencoder", None, AE_FULL))
    return run


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(dataset, full_run, tmp_path, monkeypatch):
    cfg = load_config("autoencoder", None, AE_FULL)
    straight = load_checkpoint(full_run / "checkpoints" / "latest.pt")

    crash_after_checkpoint(monkeypatch, step=4)
    with pytest.raises(Crash):
        train_autoencoder(dataset, tmp_path / "crashed", cfg)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "crashed" / "checkpoints" / "latest.pt")["step"] == 4
    train_autoencoder(dataset, tmp_path / "crashed", cfg, resume=True)
    resumed = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "latest.pt")

    assert resumed["step"] == straight["step"] == 8
    assert resumed["best_val_ssim"] == pytest.approx(straight["best_val_ssim"], abs=1e-6)
    for part in ("model", "ema", "discriminator"):
        for k, v in straight[part].items():
            assert torch.allclose(v, resumed[part][k], atol=1e-6), f"{part}.{k} differs after resume"
    exp_avg = [s["exp_avg"] for s in straight["optimizer_d"]["state"].values()]
    assert all(torch.allclose(a, s["exp_avg"], atol=1e-6)
               for a, s in zip(exp_avg, resumed["optimizer_d"]["state"].values()))


def test_training_logs_every_term_and_validation_pictures(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/l1", "train/kl", "train/adv_g", "train/adv_d", "train/loss", "train/lr",
            "train/seconds_per_step", "val/ssim", "val/ms_ssim", "val/psnr", "val/l1"} <= scalars
    assert [e.step for e in events.Scalars("val/ssim")] == [4, 8]
    assert "val/input_reconstruction_error" in events.Tags()["images"]
    # the adversarial terms start at adversarial_start=2, not before
    assert min(e.step for e in events.Scalars("train/adv_g")) == 3


def test_encoding_uses_the_ema_weights_and_records_the_manifest_rows(dataset, full_run, tmp_path):
    import shutil

    from medldm.inference.encode import encode_dataset

    run = Path(shutil.copytree(full_run, tmp_path / "ae"))  # encoding writes into the run: a copy
    ae = AutoencoderRun(run).load()
    model = ae.model()
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ae.weights_name == "ema"
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    cache = load_checkpoint(encode_dataset(dataset, run, batch_size=3))
    rows = read_manifest(dataset)
    assert [r["image"] for r in cache["rows"]] == [r["image"] for r in rows]
    assert [r["split"] for r in cache["rows"]] == [r["split"] for r in rows]
    # the sliding-window encoder (24^3 windows from the patch size) gives the whole-volume latent grid
    assert cache["mu"].shape == (len(rows), 3, 8, 8, 8)


def test_sliding_window_reconstruction_covers_the_whole_volume():
    from medldm.models.networks import build_autoencoder
    from medldm.models.ops import posterior_mean, reconstruct

    class BlockAverage(torch.nn.Module):
        """An autoencoder whose output at a voxel depends only on its 4^3 block: 16^3 windows at 0.25 overlap start
        on that block grid (0, 12, then the last one flush with the edge), so each window computes exactly what the
        whole volume does there, and any blend of them must give the whole-volume result."""

        def encode(self, x):
            mu = torch.nn.functional.avg_pool3d(x, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1)
            return mu, torch.ones_like(mu)

        def decode(self, z):
            return torch.nn.functional.interpolate(z.mean(1, keepdim=True) / 2, scale_factor=4, mode="nearest")

    cfg = load_config("autoencoder", None, ["patch_size=[16,16,16]", "adversarial_weight=0"])
    x = torch.rand(2, 1, 32, 40, 32)
    local = BlockAverage()
    windowed, whole = reconstruct(local, x, cfg), reconstruct(local, x)
    assert windowed.shape == whole.shape == x.shape
    # a window left out, an overlap zeroed or counted twice, or a window put in the wrong place all show here
    torch.testing.assert_close(windowed, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior_mean(local, x, cfg), posterior_mean(local, x), rtol=0, atol=1e-5)
    # the real autoencoder's windows give the whole volume's latent grid
    assert posterior_mean(build_autoencoder(cfg.model).eval(), x[:1], cfg).shape == (1, 3, 8, 10, 8)


def test_time_limit_stops_with_a_resumable_checkpoint(dataset, tmp_path):
    run = tmp_path / "ae"
    cfg = load_config("autoencoder", None, AE_FAST + ["train.time_limit_minutes=1e-6"])
    train_autoencoder(dataset, run, cfg)
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["step"] == 1 and (run / "checkpoints" / "best.pt").is_file()
    train_autoencoder(dataset, run, load_config("autoencoder", None, AE_FAST), resume=True)
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 6


@pytest.mark.parametrize("overrides, match", [
    (["patch_size=[48,16,16]"], "larger than the dataset's volumes"),
    (["sliding_window.roi_size=[16,16,64]"], "larger than the dataset's volumes"),
    (["patch_size=[16,16,16]"], "discriminator.num_layers=3 downsamples"),
])
def test_sizes_that_cannot_work_are_refused_before_training(dataset, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_autoencoder(dataset, tmp_path / "ae", load_config("autoencoder", None, AE_FAST + overrides))
    assert not (tmp_path / "ae").exists()


def test_config_refuses_patches_the_autoencoder_cannot_halve():
    with pytest.raises(ConfigError, match="patch_size"):
        load_config("autoencoder", None, ["patch_size=[18,16,16]"])
    with pytest.raises(ConfigError, match="perceptual_weights"):
        load_config("autoencoder", None, ["perceptual_weights=/nowhere/resnet50.pth"])


def test_perceptual_loss_is_off_without_local_weights_and_says_so(caplog):
    from medldm.training.losses import build_perceptual_loss

    with caplog.at_level("WARNING"):
        assert build_perceptual_loss(load_config("autoencoder")) is None
    assert "perceptual loss off" in caplog.text and "Nothing is downloaded" in caplog.text


def test_a_dataset_without_a_validation_split_is_refused(dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    manifest = data / "manifest.csv"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace(",val,", ",train,"))
    with pytest.raises(ValueError, match="no val-split volumes"):
        train_autoencoder(data, tmp_path / "ae", load_config("autoencoder", None, AE_FAST))


def test_resuming_with_another_architecture_or_a_corrupt_checkpoint_is_refused(ae_run, tmp_path):
    import shutil

    run = tmp_path / "ae"
    shutil.copytree(ae_run, run)
    data = load_checkpoint(run / "checkpoints" / "latest.pt")["data_dir"]
    wider = load_config("autoencoder", None, AE_FAST + ["model.channels=[16,16,16]"])
    with pytest.raises(ConfigError, match="model.channels is"):
        train_autoencoder(data, run, wider, resume=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded"):
        train_autoencoder(data, run, load_config("autoencoder", None, AE_FAST), resume=True)
