"""Fine-tuning (``--init-from``): a new run starts from every weight of its parent, new conditions start at zero so
the model samples as its parent did, frozen weights stay bit-identical, a resumed fine-tune is exact, and data the
parent cannot take (another autoencoder, another grid) is refused with the fix."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.artifacts import AutoencoderCheckpoint, AutoencoderRun, DiffusionRun, file_sha256, load_checkpoint
from medldm.config import ConfigError, load_config
from medldm.errors import InputError
from medldm.inference.sample import sample_run
from medldm.training.autoencoder import train_autoencoder
from medldm.training.diffusion import train_diffusion

from .conftest import AE_FAST, LDM_FAST, Crash, crash_after_checkpoint, encoded_copy, train_age_range
from .test_bundle import write_bundle

REPO = Path(__file__).resolve().parents[1]
# validation by the denoising loss: the sample score draws 16 chains per validation, which these tests do not need
FT_FAST = [*LDM_FAST, "selection.by=val_loss"]


def ft_config(*overrides):
    return load_config("diffusion", None, [*FT_FAST, *overrides])


def parent_best(run: Path) -> Path:
    return DiffusionRun(run).checkpoint


def test_init_from_starts_from_every_weight_of_the_parent(dataset, ae_run, ldm_run, tmp_path):
    run = tmp_path / "ft"
    latest = train_diffusion(dataset, ae_run, run, ft_config("train.steps=0"), init_from=ldm_run)
    state, parent = load_checkpoint(latest), load_checkpoint(parent_best(ldm_run))
    assert state["step"] == 0
    # model and EMA both start from the parent's EMA weights (what it samples with), every one of them
    for part in ("model", "ema"):
        assert state[part].keys() == parent["ema"].keys()
        for k, v in parent["ema"].items():
            assert torch.equal(state[part][k], v), f"{part}.{k}"
    assert state["init_from"]["checkpoint"] == str(parent_best(ldm_run).resolve())
    assert state["init_from"]["sha256"] == file_sha256(parent_best(ldm_run))
    assert DiffusionRun(run).load().init_from == state["init_from"]
    # the parent's latent scale and condition statistics: its weights were trained on them
    assert state["scale_factor"] == parent["scale_factor"]
    assert state["conditioning"] == parent["conditioning"]
    # what belongs to fine-tunes only is refused without a parent
    with pytest.raises(ConfigError, match="train.steps=0 trains nothing"):
        train_diffusion(dataset, ae_run, tmp_path / "scratch", ft_config("train.steps=0"))
    with pytest.raises(ConfigError, match=r"train.trainable=\['attention'\] .* give --init-from"):
        train_diffusion(dataset, ae_run, tmp_path / "scratch", ft_config("train.trainable=[attention]"))
    assert not (tmp_path / "scratch").exists()


def _hybrid_parent(dataset, ae_run, tmp_path):
    run = tmp_path / "hybrid"
    train_diffusion(dataset, ae_run, run, ft_config("conditioning.mode=hybrid", "conditioning.keys=[age,sex]",
                                                    "train.steps=3"))
    return run


@pytest.mark.parametrize("case", ["added", "removed", "hybrid"])
def test_new_conditions_start_at_zero_and_the_model_samples_as_its_parent(case, dataset, ae_run, ldm_run, tmp_path):
    age = sum(train_age_range(dataset)) / 2
    parent, data, ae = ldm_run, dataset, ae_run
    if case == "added":  # a new numeric condition between kept ones, on data whose ages are 5 years older
        counter = iter(range(1000))
        data, ae = encoded_copy(dataset, ae_run, tmp_path, lambda r: r.update(
            tiv_ml=str(1400 + 10 * next(counter)), age=f"{float(r['age']) + 5:.2f}" if r["age"] else ""))
        keys, mine = ["age", "tiv_ml", "sex", "diagnosis"], {"tiv_ml": "TRAINED", "diagnosis": "AD"}
        theirs = {"diagnosis": "AD"}
    elif case == "removed":  # diagnosis dropped, the others swapped: the parent sees diagnosis as unknown
        keys, mine, theirs = ["sex", "age"], {}, {}
    else:  # the conditions also concatenated as input channels: the first convolution is mapped too
        parent = _hybrid_parent(dataset, ae_run, tmp_path)
        keys, mine, theirs = ["age", "diagnosis", "sex"], {"diagnosis": "MCI"}, {}
    mode = ["conditioning.mode=hybrid"] if case == "hybrid" else []
    child = tmp_path / "child"
    train_diffusion(data, ae, child, ft_config("train.steps=0", f"conditioning.keys=[{','.join(keys)}]", *mode),
                    init_from=parent)

    state, before = load_checkpoint(child / "checkpoints" / "latest.pt"), load_checkpoint(parent_best(parent))
    # a kept numeric condition keeps the parent's standardisation: age 70 means what it meant to the parent
    assert state["conditioning"]["numeric"]["age"]["mean"] == before["conditioning"]["numeric"]["age"]["mean"]
    key_weight = next(k for k in state["ema"] if k.endswith("attn2.to_k.weight"))
    widths = {"age": 2, "tiv_ml": 2, "sex": 2, "diagnosis": 3}
    start, columns = 0, {}
    for k in keys:
        columns[k] = slice(start, start + widths[k])
        start += widths[k]
    old_start, old_columns = 0, {}
    for k in before["conditioning"]["keys"]:
        old_columns[k] = slice(old_start, old_start + widths[k])
        old_start += widths[k]
    for k in keys:
        new_w = state["ema"][key_weight][:, columns[k]]
        if k in old_columns:
            assert torch.equal(new_w, before["ema"][key_weight][:, old_columns[k]]), k
        else:
            assert not new_w.any(), f"the columns of the new condition {k} start at zero"

    if "tiv_ml" in mine:  # a value inside the new condition's training range
        mine["tiv_ml"] = f"{state['conditioning']['numeric']['tiv_ml']['max']:g}"
    common = dict(num=2, steps=3, seed=1, device="cpu", dtype="float32")
    labels = {"age": f"{age:g}", "sex": "F"}
    theirs_paths = sample_run(parent, tmp_path / "parent", conditions=labels | theirs, **common)
    mine_paths = sample_run(child, tmp_path / "child_samples", conditions=labels | mine, **common)
    for a, b in zip(theirs_paths, mine_paths):
        np.testing.assert_allclose(nib.load(b).get_fdata(), nib.load(a).get_fdata(), atol=1e-5)
    # and the comparison means something: the parent's samples do depend on a condition it keeps
    other = sample_run(parent, tmp_path / "parent_m", conditions=labels | theirs | {"sex": "M"}, **common)
    assert not np.array_equal(nib.load(other[0]).get_fdata(), nib.load(theirs_paths[0]).get_fdata())


def test_frozen_weights_stay_bit_identical_and_only_the_trainable_ones_learn(dataset, ae_run, ldm_run, tmp_path):
    cfg = ft_config("train.steps=3", "train.trainable=[conditions,time_embed]")
    latest = train_diffusion(dataset, ae_run, tmp_path / "ft", cfg, init_from=ldm_run)
    state, parent = load_checkpoint(latest), load_checkpoint(parent_best(ldm_run))
    keys = [k for k in parent["ema"] if k.endswith("attn2.to_k.weight")]
    trainable = [k for k in parent["ema"] if "time_embed" in k or k.endswith("attn2.to_v.weight")]
    assert len(trainable) > 4  # time_embed's two linear layers and the values of every cross-attention block
    for part in ("model", "ema"):
        for k, v in parent["ema"].items():
            if k in trainable:
                assert not torch.equal(state[part][k], v), f"{part}.{k} was trained"
            elif k not in keys:  # attention over one context token weighs it 1 whatever the keys: no gradient to them
                assert torch.equal(state[part][k], v), f"{part}.{k} is frozen"
    # the optimiser holds the trainable parameters only (the cross-attention keys among them)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trainable) + len(keys)

    with pytest.raises(ConfigError, match=r"train.trainable: 'nosuchlayer' names no parameter of the UNet; .*"
                                          r"'attention', 'conditions'"):
        train_diffusion(dataset, ae_run, tmp_path / "bad", ft_config("train.trainable=[attn2,nosuchlayer]"),
                        init_from=ldm_run)
    assert not (tmp_path / "bad").exists()


def test_a_resumed_fine_tune_is_exact_and_keeps_its_parent(dataset, ae_run, ldm_run, tmp_path, monkeypatch):
    # a removed condition and frozen layers: what a resume has to rebuild without the parent
    cfg = ft_config("conditioning.keys=[age,sex]", "train.trainable=[attention]", "train.finetune_warmup_steps=4")
    train_diffusion(dataset, ae_run, tmp_path / "straight", cfg, init_from=ldm_run)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")

    crash_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(Crash):
        train_diffusion(dataset, ae_run, tmp_path / "crashed", cfg, init_from=ldm_run)
    monkeypatch.undo()
    # --resume wins: the run continues from its checkpoint; an --init-from that names another parent is refused
    with pytest.raises(InputError, match=r"was started from .*best.pt .* resume without --init-from"):
        train_diffusion(dataset, ae_run, tmp_path / "crashed", cfg, resume=True, init_from=ae_run)
    with pytest.raises(ConfigError, match=r"--resume: diffusion.train.trainable is \[\] in this config"):
        train_diffusion(dataset, ae_run, tmp_path / "crashed", ft_config("conditioning.keys=[age,sex]"), resume=True)
    train_diffusion(dataset, ae_run, tmp_path / "crashed", cfg, resume=True)
    resumed = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "latest.pt")

    assert resumed["step"] == straight["step"] == 6
    assert resumed["init_from"] == straight["init_from"]
    assert resumed["init_from"]["sha256"] == file_sha256(parent_best(ldm_run))
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k} differs after resume"
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_latents_of_another_autoencoder_are_refused_naming_the_parents(dataset, ae_run, ldm_run, tmp_path):
    other = tmp_path / "ae_other"
    shutil.copytree(ae_run, other)
    best = other / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    state["step"] += 1  # another autoencoder: other bytes
    torch.save(state, best)
    recorded = load_checkpoint(parent_best(ldm_run))["autoencoder"]
    with pytest.raises(InputError) as e:
        train_diffusion(dataset, other, tmp_path / "ft", ft_config(), init_from=ldm_run)
    for named in (best, recorded["checkpoint"], f"`medldm encode --data {dataset} --autoencoder {recorded['run']}`",
                  f"pass --autoencoder {recorded['run']}"):
        assert str(named) in str(e.value)
    assert not (tmp_path / "ft").exists()


def _brain_ldm_sized_bundle(tmp_path):
    """The test bundle with the brain-LDM's grid, 160x224x160 (its networks never run here)."""
    root = write_bundle(tmp_path)[0]
    config = json.loads((root / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["noise"] = "$torch.randn((1, 3, 40, 56, 40)).to(@device)"
    (root / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    meta = {"version": "1.0.0", "network_data_format": {"outputs": {"pred": {"spatial_shape": [160, 224, 160]}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def test_data_on_another_grid_is_refused_naming_the_preprocessing(dataset, ae_run, ldm_run, tmp_path):
    from medldm.inference.bundle import import_bundle

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    info = json.loads((data / "preprocess.json").read_text(encoding="utf-8"))
    info["reference"]["affine"] = (np.asarray(info["reference"]["affine"]) @ np.diag([5 / 6, 5 / 6, 5 / 6, 1])).tolist()
    (data / "preprocess.json").write_text(json.dumps(info), encoding="utf-8")
    for train in (lambda: train_diffusion(data, ae_run, tmp_path / "ft", ft_config(), init_from=ldm_run),
                  lambda: train_autoencoder(data, tmp_path / "ft", load_config("autoencoder", None, AE_FAST),
                                            init_from=ae_run)):
        with pytest.raises(InputError) as e:
            train()
        for named in (f"{data}: its volumes are 32×32×32 at 5×5×5 mm (RAS)", "trained on 32×32×32 at 6×6×6 mm",
                      f"the preprocessing config of the parent's data (\"config\" in {dataset / 'preprocess.json'})",
                      "--set shape=[32,32,32] --set spacing=[6,6,6]"):
            assert named in str(e.value)
        assert not (tmp_path / "ft").exists()

    # an imported brain-LDM: the shipped config that produces its grid
    runs = import_bundle(_brain_ldm_sized_bundle(tmp_path), tmp_path / "imported")
    cfg = load_config("diffusion", runs["diffusion"] / "config.yaml", ["preview.every=0"])
    ae_cfg = load_config("autoencoder", runs["autoencoder"] / "config.yaml", AE_FAST)
    for train in (lambda: train_diffusion(dataset, ae_run, tmp_path / "ft", cfg, init_from=tmp_path / "imported"),
                  lambda: train_autoencoder(dataset, tmp_path / "ft", ae_cfg, init_from=tmp_path / "imported")):
        with pytest.raises(InputError, match=r"trained on 160×224×160 at 1×1×1 mm \(LAS\); .* preprocess the scans "
                                             r"with `medldm preprocess RAW_DIR OUT_DIR --config "
                                             r"configs/preprocess/brain_ldm.yaml`"):
            train()
    assert load_config("preprocess", REPO / "configs" / "preprocess" / "brain_ldm.yaml").shape == (160, 224, 160)


def test_autoencoder_init_from_loads_every_weight_and_freezes(dataset, ae_run, tmp_path):
    parent = AutoencoderRun(ae_run).load()
    zero = train_autoencoder(dataset, tmp_path / "zero", load_config("autoencoder", None, [*AE_FAST, "train.steps=0"]),
                             init_from=ae_run)
    state = load_checkpoint(zero)
    assert state["model"].keys() == parent.weights.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in parent.weights.items())
    assert state["init_from"]["sha256"] == parent.sha256

    cfg = load_config("autoencoder", None, [*AE_FAST, "train.trainable=[decoder]", "train.steps=2"])
    state = load_checkpoint(train_autoencoder(dataset, tmp_path / "decoder", cfg, init_from=ae_run))
    for k, v in parent.weights.items():
        assert torch.equal(state["model"][k], v) != k.startswith("decoder."), k
    latest = AutoencoderCheckpoint.load(tmp_path / "decoder" / "checkpoints" / "latest.pt")
    assert latest.init_from == state["init_from"]


def test_a_bundle_fine_tunes_through_the_documented_command(dataset, tmp_path):
    from medldm.inference.bundle import imported_diffusion_run
    from medldm.inference.encode import encode_dataset

    root = write_bundle(tmp_path)[0]
    imported = imported_diffusion_run(root).parent  # what `medldm sample --run BUNDLE` or the training CLI write
    # the phantoms on the bundle's grid (its affine: 1 mm, LAS), encoded with the bundle's autoencoder
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    info = json.loads((data / "preprocess.json").read_text(encoding="utf-8"))
    info["reference"] = json.loads((imported / "bundle.json").read_text(encoding="utf-8"))["reference"]
    (data / "preprocess.json").write_text(json.dumps(info), encoding="utf-8")
    encode_dataset(data, imported / "autoencoder")

    run = tmp_path / "ft"
    command = [sys.executable, "-m", "medldm", "train", "diffusion", "--data", str(data), "--autoencoder",
               str(imported / "autoencoder"), "--run-dir", str(run), "--config", str(imported / "diffusion" /
                                                                                        "config.yaml"),
               "--init-from", str(root), "--set", "train.steps=2", "--set", "train.batch_size=2", "--set",
               "train.trainable=[conditions]", "--set", "preview.every=0", "--set", "selection.by=val_loss"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert f"checkpoint: {run / 'checkpoints' / 'latest.pt'}" in done.stdout
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    bundle_best = imported / "diffusion" / "checkpoints" / "best.pt"
    assert state["init_from"]["checkpoint"] == str(bundle_best.resolve())
    assert state["init_from"]["imported_from"]["bundle"] == str(root.resolve())
    assert state["conditioning"]["scheme"] == "unit_range" and state["scale_factor"] == 1.0
    # the first convolution (hybrid: it reads the conditions) learnt, the rest is the bundle's
    bundle_weights = load_checkpoint(bundle_best)["ema"]
    changed = {k for k, v in bundle_weights.items() if not torch.equal(state["model"][k], v)}
    assert "conv_in.conv.weight" in changed and changed <= {k for k in bundle_weights if "conv_in.conv" in k
                                                            or "attn2.to_" in k}
    assert sample_run(run, tmp_path / "samples", num=1, steps=2, conditions={"age": "70"}, device="cpu")[0].is_file()
