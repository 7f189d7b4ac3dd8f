"""`medldm view` without a browser: the pinned viewer asset, the browser copies of volumes (geometry kept), what each
kind of page embeds, and the errors. tests/test_view_browser.py opens the pages in Chromium."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medldm.data.io import save_volume
from medldm.errors import InputError
from medldm.view import folder_kind, write_page, write_page_quietly
from medldm.view.page import ASSETS
from medldm.view.volumes import VolumeStore

ROOT = Path(__file__).parents[1]


def page_data(page: Path) -> dict:
    """The JSON a page embeds for its script."""
    text = page.read_text(encoding="utf-8")
    embedded = re.search(r'<script id="medldm-data" type="application/json">(.*?)</script>', text, re.S)
    assert embedded, f"{page} embeds no data"
    return json.loads(embedded.group(1))


def copy_volume(view: Path, key: str) -> nib.Nifti1Image:
    """The NIfTI a page hands NiiVue for ``key`` (view/vol/KEY.js: medldmVolume(key, base64))."""
    script = (view / "vol" / f"{key}.js").read_text()
    called_key, encoded = json.loads("[" + script.strip().removeprefix("medldmVolume(").removesuffix(");") + "]")
    assert called_key == key
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded)))


def test_the_committed_viewer_is_the_version_the_lockfile_pins():
    record = json.loads((ASSETS / "NIIVUE.json").read_text())
    lock = json.loads((ROOT / "viewer" / "package-lock.json").read_text())["packages"]["node_modules/@niivue/niivue"]
    assert record["version"] == lock["version"] == json.loads(
        (ROOT / "viewer" / "package.json").read_text())["dependencies"]["@niivue/niivue"]
    assert record["lockfile_integrity"] == lock["integrity"]
    bundle = (ASSETS / "niivue.umd.js").read_bytes()
    assert len(bundle) == record["bytes"] and hashlib.sha256(bundle).hexdigest() == record["sha256"], \
        "medldm/view/assets/niivue.umd.js is not the file NIIVUE.json records: run `make viewer`"
    licence = (ASSETS / "LICENSE-niivue.txt").read_text()
    assert "BSD 2-Clause License" in licence and "Copyright (c) 2021, Niivue" in licence and "gl-matrix" in licence


def test_a_browser_copy_keeps_the_grid_affine_and_intensities(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((20, 24, 18)).astype(np.float32) * 3.0 + 0.5
    affine = np.array([[0, 0, -1.5, 90.0], [-2.0, 0, 0, 110.0], [0, 2.5, 0, -60.0], [0, 0, 0, 1]])  # oblique axes
    save_volume(tmp_path / "scan.nii.gz", data, affine)
    store = VolumeStore(tmp_path / "view")
    key = store.add(tmp_path / "scan.nii.gz")
    store.finish()
    copy = copy_volume(tmp_path / "view", key)
    assert copy.shape == data.shape and copy.get_data_dtype() == np.uint8
    np.testing.assert_allclose(copy.affine, affine, atol=1e-5)
    np.testing.assert_allclose(copy.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(copy.get_fdata(), data, atol=(data.max() - data.min()) / 255 / 2 + 1e-4)
    assert store.info(key)["axcodes"] == "".join(nib.aff2axcodes(affine))


def test_copies_are_reused_redone_when_changed_and_removed_when_gone(tmp_path):
    for name in ("a", "b"):
        save_volume(tmp_path / f"{name}.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    store = VolumeStore(tmp_path / "view")
    ka, kb = store.add(tmp_path / "a.nii.gz"), store.add(tmp_path / "b.nii.gz")
    store.finish()
    made = (tmp_path / "view" / "vol" / f"{ka}.js").stat().st_mtime_ns
    save_volume(tmp_path / "b.nii.gz", np.full((5, 4, 4), 2, np.float32), np.eye(4))
    again = VolumeStore(tmp_path / "view")
    assert again.add(tmp_path / "a.nii.gz") == ka and again.add(tmp_path / "b.nii.gz") == kb
    again.finish()
    assert (tmp_path / "view" / "vol" / f"{ka}.js").stat().st_mtime_ns == made  # unchanged: not rewritten
    assert copy_volume(tmp_path / "view", kb).shape == (5, 4, 4)  # changed: redone
    last = VolumeStore(tmp_path / "view")
    last.add(tmp_path / "a.nii.gz")
    last.finish()
    assert not (tmp_path / "view" / "vol" / f"{kb}.js").exists()
    capped = VolumeStore(tmp_path / "capped", limit=1)
    capped.add(tmp_path / "a.nii.gz")
    assert capped.add(tmp_path / "b.nii.gz") is None and capped.add(tmp_path / "b.nii.gz") is None
    assert capped.skipped == 1  # a volume listed twice (a sample's nearest for two samples) is one left out


def test_the_dataset_page_lists_every_scan_flags_first_and_caps_the_volumes(dataset, tmp_path):
    data = tmp_path / "dataset"
    shutil.copytree(dataset, data)
    summary = (data / "qc" / "summary.csv").read_text().splitlines()
    header = summary[0].split(",")
    last = summary[-1].split(",")
    last[header.index("qc_status")] = "fail"
    last[header.index("subject_id")] = "007"  # an ID that looks like a number stays the ID it is
    (data / "qc" / "summary.csv").write_text("\n".join([*summary[:-1], ",".join(last)]) + "\n")
    assert folder_kind(data) == "dataset"
    (page,) = write_page(data, max_volumes=3)
    d = page_data(page)
    rows = d["dataset"]["rows"]
    assert len(rows) == len(summary) - 1 and rows[0]["qc_status"] == "fail" and rows[0]["image"] == last[0]
    assert {r["age"] for r in rows} != {""}, "the manifest's labels are joined"
    assert sum(r["volume"]["key"] is not None for r in rows) == 3 and "--max-volumes 3" in d["notes"][0]
    assert rows[0]["volume"]["key"] is not None, "flagged scans are embedded first"
    assert rows[0]["subject_id"] == "007"
    assert all(r["volume"]["url"] == r["image"] for r in rows)  # served pages read the file itself
    numeric = {c["key"] for c in d["dataset"]["columns"] if c["numeric"]}
    assert {"foreground_ml", "age"} <= numeric and "image" not in numeric
    # the page names no file outside its folder: it can be moved or sent as it is
    assert str(dataset) not in page.read_text(encoding="utf-8")


def test_a_folder_of_outputs_gets_an_index_and_anything_else_a_clear_error(dataset, ae_run, tmp_path):
    root = tmp_path / "outputs"
    shutil.copytree(dataset, root / "dataset")
    shutil.copytree(ae_run, root / "ae", ignore=shutil.ignore_patterns("latents"))
    (root / "notes").mkdir()
    (root / "broken" / "checkpoints").mkdir(parents=True)  # a run whose config.yaml is damaged
    (root / "broken" / "config.yaml").write_text("train: [unclosed\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(root / "ae" / "tensorboard")) as tb:  # a diverged score: NaN at every step
        for step in (1, 2):
            tb.add_scalar("val/diverged", float("nan"), step)
    pages = write_page(root, max_volumes=1)
    assert pages == [root / "ae" / "index.html", root / "dataset" / "index.html", root / "index.html"]
    index = page_data(root / "index.html")["index"]["pages"]
    assert [(p["href"], p["kind"]) for p in index] == [("ae/index.html", "run"), ("", "run"),
                                                       ("dataset/index.html", "dataset")]
    assert "medldm view" in index[1]["summary"]  # the one that failed says so; the others are written
    run = page_data(root / "ae" / "index.html")["run"]
    assert "train/loss" in run["scalars"] and any(t.startswith("val/") for t in run["scalars"])
    assert "val/diverged" not in run["scalars"], "a tag with no finite value has no curve"
    steps = [s for s, _ in run["scalars"]["train/loss"]]
    assert steps == sorted(steps) and steps[-1] == 6
    frames = next(iter(run["previews"].values()))
    assert all((root / "ae" / f["src"]).is_file() for f in frames)  # the preview images, out of TensorBoard
    with pytest.raises(InputError, match="not a medldm dataset, run, samples or evaluation folder"):
        write_page(root / "notes")
    with pytest.raises(InputError, match="--max-volumes -1"):
        write_page(root, max_volumes=-1)


def test_a_page_that_cannot_be_written_warns_and_never_fails_the_stage(tmp_path, caplog):
    (tmp_path / "notes").mkdir()
    with caplog.at_level(logging.WARNING):
        assert write_page_quietly(tmp_path / "notes") == []
    assert "medldm view" in caplog.text


def test_samples_page_lists_conditions_and_real_comparisons(dataset, ldm_run, tmp_path):
    from medldm.inference.sample import sample_run

    from .conftest import train_age_range

    age = min(train_age_range(dataset)) + 1
    out = tmp_path / "samples"
    sample_run(ldm_run, out, num=2, steps=2, conditions={"age": f"{age}", "sex": "F"})
    sample_run(ldm_run, out / "older", num=1, steps=2, conditions={"age": f"{age + 1}"})
    sample_run(ldm_run, out / "dicom", num=1, steps=2, fmt="dicom")  # no NIfTI: the page reads the series
    assert folder_kind(out) == "samples"
    (page,) = write_page(out)
    groups = page_data(page)["samples"]["groups"]
    assert [g["folder"] for g in groups] == ["samples", "samples/dicom", "samples/older"]
    (dicom,) = groups[1]["samples"]
    assert dicom["volume"]["key"] and dicom["volume"]["name"].endswith("_dicom")
    assert copy_volume(page.parent / "view", dicom["volume"]["key"]).shape == nib.load(
        out / "sample_0000.nii.gz").shape
    first, later = groups[0]["samples"][0], groups[2]["samples"][0]
    assert first["conditions"] == {"age": age, "sex": "F"} and later["name"] == "older/sample_0000"
    from medldm.data.dataset import read_manifest

    train = {r["image"] for r in read_manifest(dataset) if r["split"] == "train"}
    test = {r["image"]: r for r in read_manifest(dataset) if r["split"] == "test"}
    assert first["nearest"]["name"] in train and 0 < first["nearest"]["ssim"] <= 1
    assert first["same_age"]["name"] in test
    closest = min([r for r in test.values() if r["sex"] == "F"] or test.values(), key=lambda r: abs(r["age"] - age))
    assert abs(test[first["same_age"]["name"]]["age"] - age) == abs(closest["age"] - age)
    assert first["volume"]["key"] and first["nearest"]["volume"]["key"] and first["nearest"]["volume"]["url"] is None


def test_view_command_prints_its_pages(dataset, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    done = subprocess.run([sys.executable, "-m", "medldm", "view", str(data), "--max-volumes", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"page: {data / 'index.html'}"
    missing = subprocess.run([sys.executable, "-m", "medldm", "view", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nothing: no such folder" in missing.stderr


def test_a_score_that_could_not_be_computed_is_a_blank_not_a_broken_page(tmp_path):
    report = {"data_dir": str(tmp_path), "test_volumes": 1, "reconstruction": {
        "ssim": {"mean": float("nan")}, "psnr": {"mean": 9.5},
        "per_subject": [{"image": "images/a.nii.gz", "ssim": float("nan"), "ms_ssim": 0.5, "psnr": 9.5, "mae": 0.1}]}}
    (tmp_path / "report.json").write_text(json.dumps(report))  # Python's json writes NaN, as report.json may hold
    (page,) = write_page(tmp_path)
    d = page_data(page)["evaluation"]
    assert d["tables"][0]["rows"][0]["ssim"] is None and "test SSIM nan" in d["verdicts"][0]["result"]
