"""Running preprocessing on a cohort: bad inputs, resuming, QC outputs, exit codes."""

import csv
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from medldm.cli import main
from medldm.config import load_config
from medldm.data.dataset import read_manifest
from medldm.data.io import load_volume
from medldm.data.preprocess import preprocess_dataset

FAST = ["split.val_fraction=0", "split.test_fraction=0.2"]


@pytest.fixture
def good_scans(raw_adni):
    """Three good (volume, affine) pairs from the phantom download."""
    return [load_volume(p) for p in sorted(raw_adni.rglob("*.nii"))[:3]]


def _flat(root, scans, rows_extra=""):
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["subject_id,file,age,sex,diagnosis"]
    for name, img in scans.items():
        if img is not None:
            nib.save(img, root / "images" / f"{name}.nii.gz")
        lines.append(f"{name},images/{name}.nii.gz,70,F,CN")
    (root / "participants.csv").write_text("\n".join(lines) + "\n" + rows_extra)
    return root


def test_every_kind_of_bad_scan_fails_alone_with_its_reason(tmp_path, good_scans):
    (v1, a1), (v2, a2), (v3, a3) = good_scans
    coarse = a1.copy()
    coarse[:3, 2] *= 5.5 / np.linalg.norm(coarse[:3, 2])
    nan = v2.copy()
    nan[10, 10, 10] = np.nan
    scans = {
        "good1": nib.Nifti1Image(v1, a1), "good2": nib.Nifti1Image(v2, a2), "good3": nib.Nifti1Image(v3, a3),
        "flat2d": nib.Nifti1Image(v1[:, :, 40], a1),
        "fourd": nib.Nifti1Image(np.stack([v1, v1], -1), a1),
        "zeros": nib.Nifti1Image(np.zeros_like(v1), a1),
        "nans": nib.Nifti1Image(nan, a2),
        "thick": nib.Nifti1Image(v1, coarse),
        "truncated": None,
    }
    root = _flat(tmp_path / "in", scans, rows_extra="ghost,images/ghost.nii.gz,70,F,CN\n")
    blob = gzip.compress(nib.Nifti1Image(v1, a1).to_bytes())
    (root / "images" / "truncated.nii.gz").write_bytes(blob[: len(blob) // 3])
    out = tmp_path / "out"
    info = preprocess_dataset(root, out, load_config("preprocess", None, FAST))

    errors = {e["path"].split("/")[-1]: e["error"] for e in info["failures"]}
    assert set(errors) == {"flat2d.nii.gz", "fourd.nii.gz", "zeros.nii.gz", "nans.nii.gz", "thick.nii.gz",
                           "truncated.nii.gz"}
    assert "2D image" in errors["flat2d.nii.gz"]
    assert "use_first_volume_of_4d" in errors["fourd.nii.gz"]
    assert "every voxel is zero" in errors["zeros.nii.gz"]
    assert "NaN" in errors["nans.nii.gz"]
    assert "max_input_spacing" in errors["thick.nii.gz"]
    assert "cannot be read" in errors["truncated.nii.gz"]
    assert any("ghost.nii.gz" in s["path"] for s in info["skipped"])
    assert {r["subject_id"] for r in read_manifest(out)} == {"good1", "good2", "good3"}
    with (out / "failures.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert not list(out.rglob("*.tmp*"))

    # the 4D scan is fine once the config says to take its first volume
    info = preprocess_dataset(root, out, load_config("preprocess", None, FAST + ["use_first_volume_of_4d=true"]))
    assert "fourd" in {r["subject_id"] for r in read_manifest(out)}


def test_rerun_resumes_keeps_splits_and_redoes_changed_or_unfinished_scans(tmp_path, raw_adni):
    out = tmp_path / "out"
    cfg = load_config("preprocess", None, ["split.test_fraction=0.3"])
    first = preprocess_dataset(raw_adni, out, cfg)
    splits = {r["subject_id"]: r["split"] for r in read_manifest(out)}
    assert first["resumed"] == 0

    import shutil

    shutil.rmtree(out / "qc")  # a user tidying up: the pictures come back without redoing the scans
    again = preprocess_dataset(raw_adni, out, cfg)
    assert again["resumed"] == again["num_scans"]
    assert len(list((out / "qc" / "scans").glob("*.png"))) == again["num_scans"]
    assert {r["subject_id"]: r["split"] for r in read_manifest(out)} == splits

    # a run killed after writing an image but before its sidecar: that scan is redone
    victim = sorted((out / "images").glob("*.json"))[0]
    victim.unlink()
    assert preprocess_dataset(raw_adni, out, cfg)["resumed"] == again["num_scans"] - 1

    # a per-scan setting changed: everything is redone; a split setting alone changes nothing per scan
    assert preprocess_dataset(raw_adni, out,
                              load_config("preprocess", None, ["percentiles=[1.0,99.0]"]))["resumed"] == 0
    changed_split = load_config("preprocess", None, ["percentiles=[1.0,99.0]", "split.seed=7"])
    assert preprocess_dataset(raw_adni, out, changed_split)["resumed"] == again["num_scans"]
    assert {r["subject_id"]: r["split"] for r in read_manifest(out)} == splits


def test_manifest_records_source_hashes_and_qc_is_complete(dataset):
    rows = read_manifest(dataset)
    assert all(len(r["source_sha256"]) == 64 for r in rows)
    qc = dataset / "qc"
    with (qc / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [s["image"] for s in summary] == [r["image"] for r in rows]
    assert all(float(s["foreground_ml"]) > 0 for s in summary)
    for r in rows:
        assert (qc / "scans" / r["image"].split("/")[-1].replace(".nii.gz", ".png")).is_file()
        sidecar = json.loads((dataset / r["image"].replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
        assert sidecar["source_sha256"] == r["source_sha256"]
    page = (qc / "index.html").read_text(encoding="utf-8")
    assert page.count("<figure") == len(rows) and (qc / "overview.png").is_file()


def test_outliers_are_flagged():
    import tempfile
    from pathlib import Path

    from medldm.data.qc import write_qc
    from medldm.viz import save_png

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        rows, stats = [], []
        for i in range(12):
            rows.append({"image": f"images/s{i}_bl.nii.gz", "subject_id": f"s{i}", "session": "bl", "split": "train"})
            stats.append({"input_shape": [10, 10, 10], "input_spacing": [1, 1, 1], "input_axcodes": "RAS",
                          "intensity_window": [0, 1], "foreground_ml": 1500.0 + i if i != 7 else 300.0,
                          "foreground_mean": 0.5})
            save_png(out / "qc" / "scans" / f"s{i}_bl.png", np.zeros((8, 8), np.uint8))
        flagged = write_qc(out, rows, stats)
        assert [f["image"] for f in flagged] == ["images/s7_bl.nii.gz"]
        assert "foreground_ml low" in flagged[0]["flags"]
        assert 'border:3px solid' in (out / "qc" / "index.html").read_text(encoding="utf-8")


def test_cli_exit_code_says_whether_anything_failed(tmp_path, good_scans, capsys):
    (v1, a1), _, _ = good_scans
    root = _flat(tmp_path / "in", {"good": nib.Nifti1Image(v1, a1), "bad": nib.Nifti1Image(np.zeros_like(v1), a1)})
    assert main(["preprocess", str(root), str(tmp_path / "out"), "--set", "split.test_fraction=0"]) == 1
    assert "1 scan(s) failed" in capsys.readouterr().err
    assert main(["preprocess", str(root), str(root / "out")]) == 2
    assert "inside the input dir" in capsys.readouterr().err


def test_missing_required_csv_column_names_the_file(tmp_path):
    (tmp_path / "participants.csv").write_text("subject,path\ns1,a.nii.gz\n")
    with pytest.raises(ValueError, match=r"participants.csv.*subject_id"):
        preprocess_dataset(tmp_path, tmp_path.parent / "o", load_config("preprocess"))


def test_adni_download_with_dicom_adnimerge_and_repeat_scans(tmp_path):
    from medldm.data.phantoms import write_phantoms

    raw = tmp_path / "ADNI_download"
    write_phantoms(raw, 6, layout="adni", seed=1, adnimerge=True, dicom_fraction=0.4)  # seed 1 has a repeat scan
    out = tmp_path / "dataset"
    info = preprocess_dataset(raw, out, load_config("preprocess", None, ["split.test_fraction=0.2"]), workers=2)
    rows = read_manifest(out)
    assert not info["failures"]
    assert any((r["source"] and not r["source"].endswith(".nii")) for r in rows), "no DICOM series was preprocessed"
    visits = [(r["subject_id"], r["session"]) for r in rows]
    assert len(visits) == len(set(visits)), "two scans kept for one visit"
    assert any("kept" in s["reason"] for s in info["skipped"])
    assert {r["diagnosis"] for r in rows} <= {"CN", "MCI", "AD"} and all(r["age"] for r in rows)


def test_a_nearly_constant_statistic_flags_nothing():
    from medldm.data.qc import robust_z

    brain_ml = np.array([2040.0, 2039.5, 2040.2, 2038.9, 2040.1, 2041.0, 2039.7, 2010.0])  # 1.5 % apart
    assert not (np.abs(robust_z(brain_ml)) > 3.5).any()
    assert np.abs(robust_z(np.append(brain_ml, 1500.0)))[-1] > 3.5


def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_source_replaced_at_the_same_path_is_redone_and_the_run_says_why(tmp_path, good_scans, caplog,
                                                                            monkeypatch):
    (v1, a1), (v2, a2), (v3, a3) = good_scans
    root = _flat(tmp_path / "in", {"s1": nib.Nifti1Image(v1, a1), "s2": nib.Nifti1Image(v2, a2),
                                   "s3": nib.Nifti1Image(v3, a3)})
    out = tmp_path / "out"
    cfg = load_config("preprocess", None, FAST)
    preprocess_dataset(root, out, cfg)
    kept = {name: (out / "images" / f"{name}_bl.nii.gz").stat().st_mtime_ns for name in ("s1", "s3")}
    old_image = (out / "images" / "s2_bl.nii.gz").read_bytes()

    # the same subject re-exported: another file at the same path
    nib.save(nib.Nifti1Image(v3[::-1].copy(), a2), root / "images" / "s2.nii.gz")
    caplog.set_level("INFO", logger="medldm.data.preprocess")
    info = preprocess_dataset(root, out, cfg)
    assert info["resumed"] == 2 and info["redone_changed"] == 1
    assert json.loads((out / "preprocess.json").read_text(encoding="utf-8"))["redone_changed"] == 1
    assert {n: (out / "images" / f"{n}_bl.nii.gz").stat().st_mtime_ns for n in kept} == kept
    assert (out / "images" / "s2_bl.nii.gz").read_bytes() != old_image
    row = next(r for r in read_manifest(out) if r["subject_id"] == "s2")
    assert row["source_sha256"] == _sha256(root / "images" / "s2.nii.gz")
    sidecar = json.loads((out / "images" / "s2_bl.json").read_text(encoding="utf-8"))
    assert sidecar["source_sha256"] == row["source_sha256"]
    said = [r.getMessage() for r in caplog.records if "s2_bl.nii.gz" in r.getMessage()]
    assert len(said) == 1 and "changed: source content" in said[0] and str(root / "images" / "s2.nii.gz") in said[0]

    # nothing changed (the input dir spelled relative this time): everything is kept
    monkeypatch.chdir(tmp_path)
    info = preprocess_dataset("in", out, cfg)
    assert info["resumed"] == 3 and info["redone_changed"] == 0

    # a damaged sidecar: that scan is redone and the run says which file was damaged; the batch goes on
    (out / "images" / "s1_bl.json").write_text('{"config_hash": "trunc', encoding="utf-8")
    caplog.clear()
    info = preprocess_dataset(root, out, cfg)
    assert info["resumed"] == 2 and info["redone_changed"] == 1 and not info["failures"]
    assert any("s1_bl.json is damaged" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert json.loads((out / "images" / "s1_bl.json").read_text(encoding="utf-8"))["source_sha256"] == \
        _sha256(root / "images" / "s1.nii.gz")


def test_another_input_folder_with_the_same_names_redoes_every_scan(tmp_path, good_scans, caplog):
    (v1, a1), (v2, a2), (v3, a3) = good_scans
    first = _flat(tmp_path / "site_a", {"s1": nib.Nifti1Image(v1, a1), "s2": nib.Nifti1Image(v2, a2)})
    second = _flat(tmp_path / "site_b", {"s1": nib.Nifti1Image(v3, a3), "s2": nib.Nifti1Image(v1[::-1].copy(), a1)})
    out = tmp_path / "out"
    cfg = load_config("preprocess", None, ["split.val_fraction=0", "split.test_fraction=0"])
    preprocess_dataset(first, out, cfg)
    caplog.set_level("INFO", logger="medldm.data.preprocess")
    info = preprocess_dataset(second, out, cfg)
    assert info["resumed"] == 0 and info["redone_changed"] == 2
    for row in read_manifest(out):
        source = second / "images" / f"{row['subject_id']}.nii.gz"
        assert row["source"] == str(source) and row["source_sha256"] == _sha256(source)
        sidecar = json.loads((out / row["image"].replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
        assert sidecar["source"] == str(source) and sidecar["source_sha256"] == row["source_sha256"]
    said = [r.getMessage() for r in caplog.records if "preprocessed again from" in r.getMessage()]
    assert len(said) == 2 and all("source path, source content" in m for m in said)
