"""Every sample gets a verdict: brains pass, noise, blanks, shifted intensities and scrambled volumes do not."""

import numpy as np
import pytest

from medldm.config import load_config
from medldm.data.dataset import read_manifest
from medldm.data.io import load_volume, save_volume
from medldm.evaluation.plausibility import prediction_limit, robust_reference, ssim_floor, verdict
from medldm.evaluation.report import evaluate


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """40 phantom heads, 16 of them in the test split: enough real references for both rules."""
    from medldm.data.phantoms import write_phantoms
    from medldm.data.preprocess import preprocess_dataset

    raw, out = tmp_path_factory.mktemp("raw40"), tmp_path_factory.mktemp("cohort40")
    write_phantoms(raw, 40, layout="flat", seed=11)
    preprocess_dataset(raw, out, load_config("preprocess", None, ["split.val_fraction=0.1", "split.test_fraction=0.4",
                                                                  "n4.enabled=false"]), workers=2)
    return out


def test_constructed_samples_get_the_right_verdict_and_reason(cohort, tmp_path):
    dataset = cohort
    rows = read_manifest(dataset)
    val = [r for r in rows if r["split"] == "val"]
    train = [r for r in rows if r["split"] == "train"]
    assert val and train
    samples = tmp_path / "samples"
    samples.mkdir()
    brain, affine = load_volume(dataset / val[0]["image"])
    rng = np.random.default_rng(0)
    cases = {
        "real_val": brain,  # a real head the model never saw: must pass
        "copy": load_volume(dataset / train[0]["image"])[0],  # a brain, and memorised
        "noise": rng.uniform(0, 1, brain.shape),
        "constant": np.full(brain.shape, 0.5),
        "empty": np.zeros(brain.shape),
        "shifted": np.clip(brain + 0.3, 0, 1),  # an intensity offset (a decoder bias): the background is grey
        "scrambled": rng.permutation(brain.ravel()).reshape(brain.shape),  # same intensities, no anatomy
    }
    for name, data in cases.items():
        save_volume(samples / f"{name}.nii.gz", data.astype(np.float32), affine, dtype="float32")
    report = evaluate(dataset, tmp_path / "report", load_config("evaluate"), samples=samples)
    gen = report["generation"]
    verdicts = {e["file"].removesuffix(".nii.gz"): e for e in gen["plausibility"]["synthetic"]}
    assert verdicts["real_val"]["plausible"] and verdicts["copy"]["plausible"], verdicts["real_val"]["reasons"]
    for name in ("noise", "constant", "empty", "shifted", "scrambled"):
        assert not verdicts[name]["plausible"], name
    assert any("no brain" in r for r in verdicts["empty"]["reasons"])
    assert any("off the data manifold" in r for r in verdicts["noise"]["reasons"])
    assert any("off the data manifold" in r for r in verdicts["scrambled"]["reasons"])
    assert any("robust SD from the reference volumes' median" in r for r in verdicts["shifted"]["reasons"])
    assert any("intracranial volume" in r for r in verdicts["constant"]["reasons"])
    # the copy is plausible and memorised, and nothing else is memorised
    flagged = [gen["files"][i] for i in gen["memorisation"]["flagged"]]
    assert flagged == ["copy.nii.gz"]
    assert gen["plausibility"]["plausible"] == 2
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "**plausible: 2 of 7**" in md and "**5 of 7 are not brains**" in md and "`scrambled.nii.gz`" in md
    assert (tmp_path / "report" / "plausibility.png").stat().st_size > 1000


def test_rule_follows_the_real_references_not_fixed_numbers():
    # the same statistic is plausible or not depending on what the real volumes show
    tight = robust_reference([{"contrast": 0.70 + 0.001 * i} for i in range(20)])
    wide = robust_reference([{"contrast": 0.40 + 0.03 * i} for i in range(20)])
    real = np.linspace(0.80, 0.86, 20)
    floor = ssim_floor(real, percentile=1.0, z=3.5)
    assert floor["floor"] == min(floor["percentile"], floor["median_minus_z"]) < 0.80
    sample = {"contrast": 0.55}
    assert not verdict(0.9, sample, floor, tight, 3.5, 1.0)["plausible"]
    assert verdict(0.9, sample, floor, wide, 3.5, 1.0)["plausible"]
    # inside the real range is never implausible, however small the robust SD
    assert verdict(0.9, {"contrast": 0.719}, floor, tight, 3.5, 1.0)["plausible"]
    low = verdict(0.5, {"contrast": 0.71}, floor, tight, 3.5, 1.0)
    assert not low["plausible"] and "off the data manifold" in low["reasons"][0]
    mad = np.median(np.abs(real - 0.83))
    assert np.isclose(floor["median_minus_z"], 0.83 - floor["z_used"] * 1.4826 * mad)
    # few references widen the limit (a Student-t prediction interval), many leave it near z
    assert prediction_limit(3.5, 8) > 6 and 3.5 < prediction_limit(3.5, 1000) < 3.52


def test_degenerate_references_and_volumes_do_not_break_the_verdict():
    from medldm.evaluation.morphometry import Morphometry

    # one reference volume says nothing about the spread (no floor); a NaN among them is dropped, not propagated
    assert ssim_floor([0.7], 1.0, 3.5)["floor"] == float("-inf")
    assert np.isfinite(ssim_floor([0.80, float("nan"), 0.82, 0.84, 0.86, 0.81], 1.0, 3.5)["floor"])
    # a two-valued or constant volume gets statistics (and a reason), not an exception
    morph = Morphometry(0.001, np.ones((16, 16, 16), bool))
    two = np.zeros((16, 16, 16), np.float32)
    two[4:12, 4:12, 4:12] = 0.5
    two[6:10, 6:10, 6:10] = 1.0
    stats = morph(two)
    assert np.isfinite(stats["intracranial_ml"]) and not np.isfinite(stats["contrast"])
    v = verdict(0.9, stats, {"floor": 0.1, "percentile": 0.1, "median_minus_z": 0.1}, {}, 3.5, 1.0)
    assert not v["plausible"] and v["reasons"] == ["no tissue contrast: one intensity class inside the brain mask"]
