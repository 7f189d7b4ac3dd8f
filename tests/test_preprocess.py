import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medldm.config import load_config
from medldm.data.dataset import read_manifest
from medldm.data.preprocess import preprocess_dataset, preprocess_volume


def _world_centre_of_mass(data, affine):
    idx = np.argwhere(data > 0.5 * data.max()).mean(0)
    return (affine @ np.append(idx, 1.0))[:3]


def test_volume_is_ras_resampled_cropped_normalised_and_stays_in_place():
    # a bright off-centre block in an LPS, 1.5 mm, oblique-free scan
    data = np.zeros((100, 90, 80), np.float32)
    data[30:60, 20:50, 40:70] = 1000.0
    data += np.random.default_rng(0).normal(0, 5, data.shape).astype(np.float32)
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [70.0, 60.0, -50.0]
    cfg = load_config("preprocess", None, ["spacing=[3.0,3.0,3.0]", "shape=[48,48,48]", "n4.enabled=false"])
    out, out_affine, stats = preprocess_volume(data, affine, cfg)

    assert out.shape == (48, 48, 48) and out.dtype == np.float32
    assert stats["input_axcodes"] == "LPS" and stats["input_spacing"] == [1.5, 1.5, 1.5]
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(out_affine)[:3]), 3.0)
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.9
    # the block is where it was in world (scanner) coordinates: the affine was carried, not replaced
    np.testing.assert_allclose(_world_centre_of_mass(out, out_affine), _world_centre_of_mass(data, affine), atol=3.0)


def test_dataset_dir_layout_labels_and_split(dataset, raw_adni):
    rows = read_manifest(dataset)
    info = json.loads((dataset / "preprocess.json").read_text(encoding="utf-8"))
    assert len(rows) == info["num_scans"] >= 8
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
        img = nib.load(dataset / r["image"])
        assert img.shape == tuple(info["reference"]["shape"])
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert r["diagnosis"] in ("CN", "MCI", "AD")
        assert r["sex"] in ("M", "F") and 50 < r["age"] < 100
    assert all(len(s) == 1 for s in by_subject.values()), "a subject appears in two splits"
    assert info["versions"]["monai"] and info["config"]["shape"] == [32, 32, 32]
    assert (dataset / "qc" / "overview.png").stat().st_size > 1000


def test_corrupt_scan_is_reported_and_the_batch_goes_on(raw_adni, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(raw_adni, raw)
    victim = sorted(raw.rglob("*.nii"))[0]
    victim.write_bytes(b"not a nifti file at all")
    out = tmp_path / "out"
    info = preprocess_dataset(raw, out, load_config("preprocess"))
    assert len(info["failures"]) == 1 and str(victim) in info["failures"][0]["path"]
    assert "cannot be read as NIfTI" in info["failures"][0]["error"]
    with (out / "failures.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1
    assert len(read_manifest(out)) == info["num_scans"] == len(list(raw.rglob("*.nii"))) - 1
    assert not list(out.rglob("*.tmp*")), "half-written files left behind"


def test_no_scans_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "participants.csv").write_text("subject_id,file\n")
    with pytest.raises(ValueError, match="no usable scans"):
        preprocess_dataset(tmp_path / "in", tmp_path / "out", load_config("preprocess"))
