"""Synthetic cohorts: per-sample conditions (a CSV, or drawn from a dataset), resume, and samples as a dataset."""

import collections
import csv
import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from medldm.artifacts import DiffusionRun
from medldm.data.dataset import read_dataset_info, read_manifest, volume_dataset
from medldm.inference.cohort import Cohort, plan_samples
from medldm.inference.sample import sample_run

from .conftest import edit_manifest, train_age_range


def volume(path):
    return np.asanyarray(nib.load(path).dataobj)


def sidecar(path):
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))


def write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def no_sampling(monkeypatch):
    import medldm.inference.sample as sampling

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(sampling, "sample_latents", refuse)


def test_conditions_file_sets_each_samples_conditions_and_seed(dataset, ldm_run, tmp_path):
    lo, hi = train_age_range(dataset)
    table = write_csv(tmp_path / "cohort.csv", ["age", "sex", "diagnosis", "seed"],
                      [[lo, "F", "AD", 40], [hi, "M", "", 41], ["", "", "CN", 7]])
    paths = sample_run(ldm_run, tmp_path / "s", steps=2, cohort=Cohort(file=table))  # --num: every row
    assert [p.name for p in paths] == ["sample_0040.nii.gz", "sample_0041.nii.gz", "sample_0007.nii.gz"]
    got = [(sidecar(p)["seed"], sidecar(p)["conditions"]) for p in paths]
    assert got == [(40, {"age": lo, "sex": "F", "diagnosis": "AD"}), (41, {"age": hi, "sex": "M"}),
                   (7, {"diagnosis": "CN"})]  # an empty cell is an unknown condition
    # a sample of the cohort is the sample that --condition with its seed gives (up to one stored level: a batch of
    # one rounds differently)
    alone = sample_run(ldm_run, tmp_path / "one", num=1, steps=2, seed=41, conditions={"age": str(hi), "sex": "M"})
    np.testing.assert_allclose(volume(paths[1]), volume(alone[0]), atol=1.01 / 4095)
    assert not np.allclose(volume(paths[0]), volume(paths[1]), atol=0.05)
    plan = list(csv.DictReader((tmp_path / "s" / "plan.csv").open(encoding="utf-8")))
    assert [(r["index"], r["seed"], r["sex"]) for r in plan] == [("0", "40", "F"), ("1", "41", "M"), ("2", "7", "")]


def test_bad_rows_are_refused_with_their_lines_before_sampling(dataset, ldm_run, tmp_path, monkeypatch):
    no_sampling(monkeypatch)
    lo, hi = train_age_range(dataset)
    bad = write_csv(tmp_path / "bad.csv", ["age", "sex"], [[lo, "F"], [hi + 10, "M"], [lo, "X"], [hi, "F"]])
    with pytest.raises(ValueError) as e:
        sample_run(ldm_run, tmp_path / "a", steps=2, cohort=Cohort(file=bad))
    message = str(e.value)
    assert "2 of 4 rows" in message and "line 3: age=" in message and "outside the training range" in message
    assert "line 4: sex=X: use M or F" in message
    with pytest.raises(ValueError, match="column.*'height'.*are not conditions"):
        sample_run(ldm_run, tmp_path / "b", cohort=Cohort(file=write_csv(tmp_path / "h.csv", ["height"], [[180]])))
    dup = write_csv(tmp_path / "dup.csv", ["age", "seed"], [[lo, 3], [hi, 3]])
    with pytest.raises(ValueError, match="line 3: seed 3 is already on line 2"):
        sample_run(ldm_run, tmp_path / "c", cohort=Cohort(file=dup))
    with pytest.raises(ValueError, match="has only 4 rows"):
        sample_run(ldm_run, tmp_path / "d", num=5, cohort=Cohort(file=bad))
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")


def test_like_draws_a_datasets_joint_labels_evenly(dataset, ldm_run):
    conditions = DiffusionRun(ldm_run).load().conditions
    train = [r for r in read_manifest(dataset) if r["split"] == "train"]

    def labels(r):
        return tuple(sorted((k, r[k]) for k in ("age", "sex", "diagnosis") if r.get(k) is not None))

    plan = plan_samples(Cohort(like=dataset), conditions, 3 * len(train), seed=5)
    # every training scan's (age, sex, diagnosis) exactly three times: the cohort has the dataset's joint distribution
    assert collections.Counter(tuple(sorted(p.labels.items())) for p in plan) == \
        collections.Counter({labels(r): 3 for r in train})
    # sample i's draw does not depend on --num (a run extended later keeps its samples), but on the seed
    assert plan_samples(Cohort(like=dataset), conditions, 2, seed=5) == plan[:2]
    assert [p.labels for p in plan_samples(Cohort(like=dataset), conditions, len(plan), seed=6)] != \
        [p.labels for p in plan]
    dx = train[0]["diagnosis"]
    only = plan_samples(Cohort(like=dataset, where={"diagnosis": dx}), conditions, 6, seed=0)
    assert {p.labels["diagnosis"] for p in only} == {dx}
    with pytest.raises(ValueError, match="no scan matches"):
        plan_samples(Cohort(like=dataset, where={"diagnosis": "XYZ"}), conditions, 2, seed=0)
    with pytest.raises(ValueError, match="no column 'site'"):
        plan_samples(Cohort(like=dataset, where={"site": "A"}), conditions, 2, seed=0)


def test_like_refuses_labels_outside_the_training_range_naming_the_scans(dataset, ldm_run, tmp_path, monkeypatch):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    edit_manifest(other, lambda r: r.update(age="120") if r["split"] == "test" else None)
    no_sampling(monkeypatch)
    with pytest.raises(ValueError, match=r"rows ask for what the model was not trained on.*--like other, "
                                         r"images/.*age=120: outside the training range"):
        sample_run(ldm_run, tmp_path / "s", num=4, cohort=Cohort(like=other, split="test"))


def _sample_cli(ldm_run, out, *extra):
    return [sys.executable, "-m", "medldm", "sample", "--run", str(ldm_run), "--out", str(out), "--steps", "10",
            "--batch-size", "2", *extra]


def _listed(out):
    path = out / "samples.csv"
    return len(path.read_text(encoding="utf-8").splitlines()) - 1 if path.is_file() else 0


def test_a_run_killed_with_sigkill_resumes_to_the_same_volumes(dataset, ldm_run, tmp_path):
    """The documented command, killed as a scheduler kills it, then run again with --resume."""
    like = ["--like", str(dataset), "--num", "9", "--seed", "3", "--as-dataset"]  # the README's cohort command
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_sample_cli(ldm_run, killed, *like), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _listed(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _listed(killed)
    assert proc.returncode == -signal.SIGKILL and 3 <= kept < 9, (proc.returncode, kept)
    # without --resume the folder is refused; with it the run goes on to --num
    refused = subprocess.run(_sample_cli(ldm_run, killed, *like), env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume to continue" in refused.stderr
    subprocess.run(_sample_cli(ldm_run, killed, *like, "--resume"), env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(_sample_cli(ldm_run, whole, *like), env=env, check=True, capture_output=True)
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in killed.iterdir()) == names  # same files: nothing duplicated, dropped or left over
    for name in names:
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(volume(killed / name), volume(whole / name))
            assert sidecar(killed / name)["conditions"] == sidecar(whole / name)["conditions"]
    for table in ("samples.csv", "plan.csv", "manifest.csv"):
        assert (killed / table).read_text(encoding="utf-8") == (whole / table).read_text(encoding="utf-8")


def test_resume_extends_a_run_and_refuses_other_settings(dataset, ldm_run, tmp_path, monkeypatch):
    import medldm.inference.sample as sampling

    out = tmp_path / "s"
    first = sample_run(ldm_run, out, num=3, steps=2, batch_size=2, seed=1, cohort=Cohort(like=dataset))
    calls = []
    real = sampling.sample_latents
    monkeypatch.setattr(sampling, "sample_latents", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    again = sample_run(ldm_run, out, num=3, steps=2, batch_size=2, seed=1, cohort=Cohort(like=dataset), resume=True)
    assert again == first and calls == []  # a finished run: nothing sampled again
    more = sample_run(ldm_run, out, num=5, steps=2, batch_size=2, seed=1, cohort=Cohort(like=dataset), resume=True)
    assert more[:3] == first and calls == [2, 1]  # batch [2, 3] (sample 2 is there, 3 is not), then [4]
    whole = sample_run(ldm_run, tmp_path / "w", num=5, steps=2, batch_size=2, seed=1, cohort=Cohort(like=dataset))
    for i, (a, b) in enumerate(zip(more, whole)):
        if i == 2:  # denoised in a batch of one by the shorter run, in [2, 3] by the longer: float rounding apart
            np.testing.assert_allclose(volume(a), volume(b), atol=1.01 / 4095)
        else:
            np.testing.assert_array_equal(volume(a), volume(b))
    assert (out / "contact_sheet.png").is_file()
    with pytest.raises(ValueError, match="sampled with steps=2, this run has 3"):
        sample_run(ldm_run, out, num=5, steps=3, batch_size=2, seed=1, cohort=Cohort(like=dataset), resume=True)
    with pytest.raises(ValueError, match="leave out seed"):
        sample_run(ldm_run, out, num=2, steps=2, batch_size=2, seed=1, cohort=Cohort(like=dataset), resume=True)
    with pytest.raises(ValueError, match="--overwrite starts again"):
        sample_run(ldm_run, out, num=5, steps=2, overwrite=True, resume=True)
    # --resume in an empty folder starts the run: a job script can always pass it
    assert len(sample_run(ldm_run, tmp_path / "new", num=1, steps=2, resume=True)) == 1


def test_samples_as_a_dataset_are_read_as_one(dataset, ldm_run, tmp_path):
    from medldm.config import load_config
    from medldm.evaluation.report import evaluate

    synth = tmp_path / "synth"
    paths = sample_run(ldm_run, synth, num=8, steps=2, cohort=Cohort(like=dataset, where={"sex": "F"}),
                       as_dataset=True)
    rows = read_manifest(synth)
    assert [synth / r["image"] for r in rows] == paths
    assert {r["synthetic"] for r in rows} == {"1"} and {r["sex"] for r in rows} == {"F"}
    assert {r["split"] for r in rows} <= {"train", "val", "test"} and len({r["split"] for r in rows}) > 1
    assert [r["age"] for r in rows] == [sidecar(p)["conditions"].get("age") for p in paths]
    info = read_dataset_info(synth)
    assert info["reference"] == read_dataset_info(dataset)["reference"] and info["synthetic"]["diffusion_sha256"]
    item = volume_dataset(synth, rows[:1], cache_rate=0)[0]
    assert list(item["image"].shape) == [1, *info["reference"]["shape"]]
    # the synthetic dataset is evaluated like a real one (its test split against other samples)
    other = tmp_path / "other"
    sample_run(ldm_run, other, num=3, steps=2, seed=50)
    assert {r["split"] for r in rows} >= {"train", "test"}  # seeded: the same splits on every run
    report = evaluate(synth, tmp_path / "report", load_config("evaluate", None, []), samples=other)
    assert report["generation"]["num_samples"] == 3
    assert report["test_volumes"] == sum(r["split"] == "test" for r in rows)
    # a folder that is a real dataset is never written into
    with pytest.raises(ValueError, match="is a dataset"):
        sample_run(ldm_run, dataset, num=1, steps=2, overwrite=True)
