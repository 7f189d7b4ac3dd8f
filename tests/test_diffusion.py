import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medldm.artifacts import AutoencoderRun, DatasetDir, DiffusionRun, load_checkpoint, save_checkpoint
from medldm.data.dataset import read_manifest
from medldm.models.conditioning import ConditionEncoder

from .conftest import Crash, crash_after_checkpoint


def test_latents_are_posterior_means_with_train_scale_factor(dataset, ae_run):
    cache = load_checkpoint(AutoencoderRun(ae_run).latents)
    rows = read_manifest(dataset)
    assert cache["images"] == [r["image"] for r in rows]
    assert tuple(cache["mu"].shape) == (len(rows), 3, 8, 8, 8)
    train = torch.tensor([r["split"] == "train" for r in rows])
    assert cache["scale_factor"] == pytest.approx(1.0 / cache["mu"][train].std().item(), rel=1e-5)
    assert cache["scale_factor"] != 1.0
    # the mean, not a sample: encoding again gives exactly the cached latent
    from medldm.data.io import load_volume

    model = AutoencoderRun(ae_run).load().model()
    x = torch.from_numpy(load_volume(dataset / rows[0]["image"])[0])[None, None]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0][0], cache["mu"][0])


def test_diffusion_checkpoint_carries_scale_factor_autoencoder_and_reference(ae_run, ldm_run):
    state = load_checkpoint(ldm_run / "checkpoints" / "latest.pt")
    cache = load_checkpoint(AutoencoderRun(ae_run).latents)
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
    fix = f"run `medldm encode --data {dataset} --autoencoder {ae_copy}` again"
    with pytest.raises(ValueError, match=re.escape(fix)):
        train_diffusion(dataset, ae_copy, tmp_path / "ldm", load_config("diffusion"))


REPO = Path(__file__).resolve().parents[1]
# a run that is refused before any step; should the check ever let it through, it fails in seconds, not minutes
ONE_STEP = ["train.steps=1", "preview.every=0"]


def test_latents_of_another_dataset_are_refused_by_the_cli(dataset, ae_run, tmp_path):
    import shutil

    from .conftest import edit_manifest

    # another preprocessing of the same scans: same image names, other labels
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    edit_manifest(other, lambda r: r.update(age=f"{float(r['age']) + 1:.2f}" if r["age"] else ""))
    run = tmp_path / "ldm"
    # the medldm of this checkout first, whichever one is pip-installed
    done = subprocess.run([str(Path(sys.executable).with_name("medldm")), "train", "diffusion", "--data", str(other),
                           "--autoencoder", str(ae_run), "--run-dir", str(run), "--set", "train.steps=1",
                           "--set", "preview.every=0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("medldm ")]
    assert len(errors) == 1 and errors[0].startswith("medldm train: error: ") and "Traceback" not in done.stderr
    for named in (AutoencoderRun(ae_run).latents, f"encoded from {dataset.resolve()}", other / "manifest.csv",
                  f"run `medldm encode --data {other} --autoencoder {ae_run}` again"):
        assert str(named) in errors[0]
    assert "preprocess.json" not in errors[0]  # only the file that differs is named
    assert not run.exists()


@pytest.mark.parametrize("change", ["grid of a copy", "manifest edited after encoding"])
def test_latents_are_checked_against_the_datasets_content(dataset, ae_run, tmp_path, change):
    import json
    import shutil

    from medldm.config import load_config
    from medldm.errors import InputError
    from medldm.training.diffusion import train_diffusion

    from .conftest import edit_manifest, encoded_copy

    if change == "grid of a copy":  # same images and manifest, another reference affine (e.g. another crop)
        data, ae = tmp_path / "data", ae_run
        shutil.copytree(dataset, data)
        info = json.loads((data / "preprocess.json").read_text(encoding="utf-8"))
        info["reference"]["affine"][0][3] += 6.0
        (data / "preprocess.json").write_text(json.dumps(info), encoding="utf-8")
        expected = [f"encoded from {dataset.resolve()}, not from {data}", f"{data / 'preprocess.json'} differs"]
    else:
        data, ae = encoded_copy(dataset, ae_run, tmp_path)
        edit_manifest(data, lambda r: r.update(split="test" if r["split"] == "val" else r["split"]))
        expected = [f"encoded from {data.resolve()}, and {data / 'manifest.csv'} changed since"]
    with pytest.raises(InputError) as e:
        train_diffusion(data, ae, tmp_path / "ldm", load_config("diffusion", None, ONE_STEP))
    for text in expected + [f"run `medldm encode --data {data} --autoencoder {ae}` again"]:
        assert text in str(e.value)
    assert not (tmp_path / "ldm").exists()


def test_a_preprocessing_rerun_that_changed_nothing_keeps_the_latents(dataset, tmp_path):
    import json
    import shutil


    def rerun(data):  # what a rerun rewrites: counts, paths, timings; the settings and grid stay
        info = json.loads((data / "preprocess.json").read_text(encoding="utf-8"))
        info.update(resumed=info["num_scans"], input_dir="/elsewhere", versions={"medldm": "another"})
        (data / "preprocess.json").write_text(json.dumps(info, indent=1), encoding="utf-8")

    copy = Path(shutil.copytree(dataset, tmp_path / "data"))
    rerun(copy)
    assert DatasetDir(copy).sha256() == DatasetDir(dataset).sha256()
    info = json.loads((copy / "preprocess.json").read_text(encoding="utf-8"))
    info["config"]["spacing"] = [5.0, 6.0, 6.0]
    (copy / "preprocess.json").write_text(json.dumps(info), encoding="utf-8")
    assert DatasetDir(copy).sha256()["preprocess.json"] != DatasetDir(dataset).sha256()["preprocess.json"]


def test_latents_that_do_not_record_their_dataset_are_refused(dataset, ae_run, tmp_path):
    import shutil

    from medldm.config import load_config
    from medldm.errors import InputError
    from medldm.training.diffusion import train_diffusion

    ae = tmp_path / "ae"
    shutil.copytree(ae_run, ae)
    old = load_checkpoint(AutoencoderRun(ae).latents)
    old.pop("dataset_sha256", None)  # as encoded before the dataset was recorded (schema 1: no kind either)
    old.pop("kind", None)
    save_checkpoint(AutoencoderRun(ae).latents, old)
    with pytest.raises(InputError, match=re.escape(f"does not record which dataset it was encoded from (an older "
                                                   f"medldm wrote it): run `medldm encode --data {dataset} "
                                                   f"--autoencoder {ae}` again")):
        train_diffusion(dataset, ae, tmp_path / "ldm", load_config("diffusion", None, ONE_STEP))
    assert not (tmp_path / "ldm").exists()


def test_no_val_split_is_refused_like_the_autoencoder_does(dataset, ae_run, tmp_path):
    from medldm.config import load_config
    from medldm.errors import InputError
    from medldm.training.diffusion import train_diffusion

    from .conftest import encoded_copy

    data, ae = encoded_copy(dataset, ae_run, tmp_path, lambda r: r.update(split="train" if r["split"] == "val"
                                                                          else r["split"]))
    # the autoencoder's wording: the same fix for the same missing split
    with pytest.raises(InputError, match=re.escape(f"{data}/manifest.csv has no val-split volumes: preprocess again "
                                                   "with split.val_fraction > 0")):
        train_diffusion(data, ae, tmp_path / "ldm", load_config("diffusion", None, ONE_STEP))
    assert not (tmp_path / "ldm").exists()


def test_a_bad_label_in_a_val_row_names_the_manifest_image_and_value(dataset, ae_run, tmp_path):
    from medldm.config import load_config
    from medldm.errors import InputError
    from medldm.training.diffusion import train_diffusion

    from .conftest import encoded_copy

    val = next(r["image"] for r in read_manifest(dataset) if r["split"] == "val")
    data, ae = encoded_copy(dataset, ae_run, tmp_path, lambda r: r.update(sex="X" if r["image"] == val else r["sex"]))
    with pytest.raises(InputError, match=re.escape(f"{data / 'manifest.csv'}, {val}: sex='X' is not one of "
                                                   "['M', 'F']; correct it or leave it empty (unknown)")):
        train_diffusion(data, ae, tmp_path / "ldm", load_config("diffusion", None, ONE_STEP))
    assert not (tmp_path / "ldm").exists()


ROWS = [{"image": "a", "age": 60.0, "sex": "F", "diagnosis": "CN", "icv": "1500"},
        {"image": "b", "age": 80.0, "sex": "M", "diagnosis": None, "icv": "1300.5"},
        {"image": "c", "age": None, "sex": None, "diagnosis": "AD", "icv": None}]


def test_unknown_labels_are_the_null_condition_not_zero_valued_facts():
    enc = ConditionEncoder.fit(["age", "sex", "diagnosis"], ROWS)
    unknown = enc.encode_one({"age": None, "sex": None, "diagnosis": None})
    assert torch.count_nonzero(unknown) == 0
    age70 = enc.encode_one({"age": 70.0})
    assert age70[0] == 0.0 and age70[1] == 1.0  # the training mean is known-and-average, unlike unknown
    assert not torch.equal(age70, unknown)


def test_conditions_are_dropped_one_by_one_and_all_together():
    enc = ConditionEncoder.fit(["age", "sex", "diagnosis"], ROWS)
    full = enc.encode([{"age": 80, "sex": "F", "diagnosis": "AD"}] * 4000)
    dropped = enc.drop(full, 0.3, 0.2, torch.Generator().manual_seed(0))[:, 0]
    kept = torch.stack([dropped[:, 1] != 0, dropped[:, 3] != 0, dropped[:, 6] != 0], 1)  # age flag, F, AD slots
    for frac in (~kept).float().mean(0):  # each condition: dropped alone, or with all the others
        assert abs(frac.item() - (1 - 0.8 * 0.7)) < 0.03
    all_null = (dropped == 0).all(1).float().mean().item()
    assert abs(all_null - (0.2 + 0.8 * 0.3 ** 3)) < 0.03  # the unconditional model gets trained too
    assert torch.equal(dropped[kept.all(1)], full[kept.all(1), 0])  # what is kept is unchanged


def test_extra_numeric_column_is_standardised_with_training_statistics():
    enc = ConditionEncoder.fit(["icv"], ROWS)
    assert enc.dim == 2 and enc.numeric["icv"]["min"] == 1300.5 and enc.numeric["icv"]["max"] == 1500.0
    torch.testing.assert_close(enc.encode_one({"icv": "1400.25"}), torch.tensor([0.0, 1.0]))
    assert enc.parse({"icv": "1450"}) == {"icv": 1450.0}
    with pytest.raises(ValueError, match="no training scan .* has a value for it"):
        ConditionEncoder.fit(["ventricles"], ROWS)
    with pytest.raises(ValueError, match="'big' is not a number"):
        ConditionEncoder.fit(["icv"], ROWS + [{"image": "d", "icv": "big"}])
    with pytest.raises(ValueError, match=r"manifest.csv, d: sex='X' is not one of \['M', 'F'\]"):
        ConditionEncoder.fit(["sex"], ROWS + [{"image": "d", "sex": "X"}])


def test_condition_parsing_errors_name_the_problem():
    enc = ConditionEncoder.fit(["age", "sex"], ROWS)
    assert enc.parse({"age": "71", "sex": "female"}) == {"age": 71.0, "sex": "F"}
    with pytest.raises(ValueError, match="conditioned on"):
        enc.parse({"diagnosis": "AD"})
    with pytest.raises(ValueError, match="age must be a number"):
        enc.parse({"age": "old"})
    with pytest.raises(ValueError, match="outside the training range 60–80"):
        enc.parse({"age": "95"})
    with pytest.raises(ValueError, match="conditioned on nothing"):
        ConditionEncoder.fit([], ROWS).parse({"age": "70"})


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
    cfg = load_config("diffusion", None, ["model.channels=[8,8,8,8,8]",
                                          "model.attention_levels=[false,false,false,false,false]",
                                          "model.num_head_channels=[0,0,0,0,0]"])
    with pytest.raises(ConfigError, match="use fewer UNet levels"):
        train_diffusion(dataset, ae_run, tmp_path / "ldm", cfg)
    assert not (tmp_path / "ldm").exists()


@pytest.mark.parametrize("recipe", [["scheduler.kind=rflow", "train.lr_schedule=cosine"],
                                    ["scheduler.kind=ddpm", "min_snr_gamma=5"]], ids=["rflow", "ddpm"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(dataset, ae_run, tmp_path, monkeypatch, recipe):
    from medldm.config import load_config
    from medldm.training.diffusion import train_diffusion

    # killed at step 2, after a validation (with the sample score) and a checkpoint and inside the 3-step warm-up;
    # resumed to step 4
    cfg = load_config("diffusion", None, ["train.steps=4", "train.val_every=2", "train.checkpoint_every=2",
                                          "train.batch_size=4", "train.warmup_steps=3", "selection.num=4",
                                          "selection.steps=2", "preview.every=0", *recipe])
    train_diffusion(dataset, ae_run, tmp_path / "straight", cfg)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")

    crash_after_checkpoint(monkeypatch, step=2)
    with pytest.raises(Crash):
        train_diffusion(dataset, ae_run, tmp_path / "crashed", cfg)
    monkeypatch.undo()
    train_diffusion(dataset, ae_run, tmp_path / "crashed", cfg, resume=True)
    resumed = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "latest.pt")

    assert resumed["step"] == straight["step"] == 4
    assert "best_sample_score" in straight  # selection.by=samples, the default for both kinds
    assert resumed["best_sample_score"] == pytest.approx(straight["best_sample_score"], abs=1e-6)
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.allclose(v, resumed[part][k], atol=1e-6), f"{part}.{k} differs after resume"
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], atol=1e-9)


def test_resuming_on_other_latents_or_another_architecture_is_refused(dataset, ae_run, ldm_run, tmp_path):
    import shutil

    from medldm.config import ConfigError, load_config
    from medldm.training.diffusion import train_diffusion

    from .conftest import LDM_FAST

    run = tmp_path / "ldm"
    shutil.copytree(ldm_run, run)
    with pytest.raises(ConfigError, match=r"diffusion\.model\.channels is \[16, 32\] in this config but \[32, 64\]"):
        train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + ["model.channels=[16,32]"]),
                        resume=True)
    with pytest.raises(ConfigError, match="conditioning.keys"):
        train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + ["conditioning.keys=[age]"]),
                        resume=True)

    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    state["dataset_sha256"] = {"manifest.csv": "0" * 64, "preprocess.json": "0" * 64}  # trained on other latents
    save_checkpoint(run / "checkpoints" / "latest.pt", state)
    with pytest.raises(ValueError, match=r"--resume: .* another dataset .* start a new diffusion run"):
        train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST), resume=True)


def test_training_logs_losses_by_timestep_and_decoded_samples(dataset, ae_run, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medldm.config import load_config
    from medldm.training.diffusion import train_diffusion

    run = tmp_path / "ldm"
    with caplog.at_level("INFO"):
        train_diffusion(dataset, ae_run, run, load_config("diffusion", None, [
            "train.steps=4", "train.val_every=2", "train.log_every=2", "train.batch_size=8", "preview.every=2",
            "preview.num=3", "preview.ddim_steps=2", "scheduler.kind=ddpm", "scheduler.prediction_type=v_prediction",
            "min_snr_gamma=5",
            "train.warmup_steps=4"]))
    assert "held in CPU memory" in caplog.text  # says where the latent cache lives
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/seconds_per_step", "val/loss_ema"} <= scalars
    assert any(tag.startswith("loss_by_timestep/t0") for tag in scalars)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.5e-3, 1e-3])  # linear warm-up
    images = events.Images("samples/ddim_ema")
    assert [e.step for e in images] == [2, 4]
    assert images[0].height >= 3 * 32 > images[0].width / 3  # three 32^3 samples stacked, three planes each
    assert "sample 2:" in events.Tensors("samples/conditions/text_summary")[0].tensor_proto.string_val[0].decode()


def test_min_snr_weights_cap_the_easy_low_noise_timesteps():
    from medldm.config import SchedulerConfig
    from medldm.models.networks import build_scheduler
    from medldm.training.diffusion import loss_weights

    eps = build_scheduler(SchedulerConfig(kind="ddpm"))
    w = loss_weights(eps, 5.0)
    alpha_bar = eps.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    assert w[0] < 0.1 and torch.all(w[snr <= 5] == 1.0)  # t=0 is almost noise-free: weight 5/SNR
    v = loss_weights(build_scheduler(SchedulerConfig(kind="ddpm", prediction_type="v_prediction")), 5.0)
    assert torch.all(v < 1.0)  # v targets carry an extra (SNR + 1)
    torch.testing.assert_close(v * (snr + 1), w * snr)
    assert torch.all(loss_weights(eps, 0.0) == 1.0)


@pytest.mark.parametrize("edit, match", [
    ("split", "no train-split volumes"),
    ("keys", "no training scan .* has a value for it"),
])
def test_bad_training_input_is_refused_before_the_run_starts(dataset, ae_run, tmp_path, edit, match):
    import shutil

    from medldm.config import load_config
    from medldm.inference.encode import encode_dataset
    from medldm.training.diffusion import train_diffusion

    from .conftest import edit_manifest

    data = tmp_path / "data"
    shutil.copytree(dataset, data)  # an identical copy: the latents of ``dataset`` are its latents too
    if edit == "split":
        # latents come from their own manifest (training checks its content), so a manifest without training scans
        # stops at encode, before any volume is encoded
        edit_manifest(data, lambda r: r.update(split="test" if r["split"] == "train" else r["split"]))
        ae = tmp_path / "ae"
        shutil.copytree(ae_run, ae, ignore=shutil.ignore_patterns("latents"))
        with pytest.raises(ValueError, match=match):
            encode_dataset(data, ae)
        assert not AutoencoderRun(ae).latents.exists()
    else:
        with pytest.raises(ValueError, match=match):
            train_diffusion(data, ae_run, tmp_path / "ldm",
                            load_config("diffusion", None, ["conditioning.keys=[age,ventricles]"]))
    assert not (tmp_path / "ldm").exists()


def test_hybrid_conditioning_trains_and_samples(dataset, ae_run, tmp_path):
    # the brain-LDM bundle's layout: conditions also concatenated to the latent, resblock up/down, float32 attention
    from medldm.config import load_config
    from medldm.inference.sample import sample_run
    from medldm.training.diffusion import train_diffusion

    from .conftest import LDM_FAST

    run = tmp_path / "ldm"
    train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + [
        "train.steps=2", "conditioning.mode=hybrid", "model.resblock_updown=true", "model.upcast_attention=true"]))
    ldm = DiffusionRun(run).load()
    unet = ldm.unet()
    assert unet.conv_in.conv.in_channels == ldm.latent_shape[0] + ldm.conditions.dim
    paths = sample_run(run, tmp_path / "samples", num=1, steps=2, conditions={"sex": "F"}, guidance=2.0, device="cpu")
    assert paths[0].is_file()


def test_runs_from_before_new_config_keys_resume_and_a_changed_mode_is_refused(dataset, ae_run, tmp_path):
    from medldm.config import ConfigError, load_config
    from medldm.training.diffusion import train_diffusion

    from .conftest import LDM_FAST

    run = tmp_path / "ldm"
    train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + ["train.steps=2"]))
    latest = run / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest)
    for key in ("resblock_updown", "upcast_attention"):  # as written before these keys existed
        del state["config"]["model"][key]
    del state["config"]["conditioning"]["mode"]
    save_checkpoint(latest, state)
    config = (run / "config.yaml").read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="conditioning.mode is hybrid in this config but crossattn"):
        train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + [
            "train.steps=3", "conditioning.mode=hybrid"]), resume=True)
    assert (run / "config.yaml").read_text(encoding="utf-8") == config  # refused before anything was written
    train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST + ["train.steps=3"]), resume=True)
    assert load_checkpoint(latest)["step"] == 3
