import csv
import re
import shutil
from pathlib import Path

import pytest

from medldm.data.discovery import discover_scans
from medldm.data.phantoms import write_phantoms


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def adni_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("adni"), num=5, layout="adni", seed=3).parent


@pytest.fixture(scope="module")
def flat_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("flat"), num=3, layout="flat", seed=5).parent


@pytest.fixture
def adni(adni_source: Path, tmp_path: Path) -> Path:
    """A private copy of the ADNI download that a test may damage."""
    return Path(shutil.copytree(adni_source, tmp_path / "download"))


@pytest.fixture
def flat(flat_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(flat_source, tmp_path / "download"))


def test_adni_scans_get_their_labels(adni_source: Path) -> None:
    rows = {r["Image Data ID"]: r for r in read_rows(next(adni_source.glob("*_collection.csv")))}
    found = discover_scans(adni_source)
    assert found.skipped == [] and len(found.scans) == len(rows)
    for scan in found.scans:
        row = rows[scan.image_id]
        assert scan.path.is_file() and scan.path.name.endswith(f"_{scan.image_id}.nii")
        assert (scan.subject_id, scan.session, scan.diagnosis, scan.sex) == (row["Subject"], row["Visit"], row["Group"],
                                                                           row["Sex"])
        assert scan.age == float(row["Age"]) and scan.description == row["Description"].replace(" ", "_")
    keys = [(s.subject_id, s.session, s.image_id) for s in found.scans]
    assert keys == sorted(keys)


def test_second_visit_is_a_second_session(adni_source: Path) -> None:
    sessions: dict[str, list[str]] = {}
    for scan in discover_scans(adni_source).scans:
        sessions.setdefault(scan.subject_id, []).append(scan.session)
    assert len(sessions) == 5
    assert any(len(s) == 2 and s[0] == "bl" and re.fullmatch(r"m(12|24)", s[1]) for s in sessions.values())


def test_subject_folders_without_the_adni_folder(adni: Path) -> None:
    for subject in (adni / "ADNI").iterdir():
        subject.rename(adni / subject.name)
    (adni / "ADNI").rmdir()
    assert len(discover_scans(adni).scans) == len(read_rows(next(adni.glob("*_collection.csv"))))


def test_description_filter(adni: Path) -> None:
    subject_dir = sorted((adni / "ADNI").iterdir())[0]
    next(subject_dir.iterdir()).rename(subject_dir / "Accelerated_Sagittal_MPRAGE")
    expected = set((adni / "ADNI").glob("*/Accelerated_Sagittal_MPRAGE/*/I*"))
    found = discover_scans(adni, description_patterns=["accelerated SAGITTAL"])
    assert {s.path.parent for s in found.scans} == expected
    assert found.skipped and all("does not match" in reason for _, reason in found.skipped)


def test_scan_without_csv_row_keeps_none_labels(adni: Path) -> None:
    csv_path = next(adni.glob("*_collection.csv"))
    rows = read_rows(csv_path)
    write_rows(csv_path, rows[1:])
    scan = next(s for s in discover_scans(adni).scans if s.image_id == rows[0]["Image Data ID"])
    assert (scan.age, scan.sex, scan.diagnosis) == (None, None, None)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", scan.session) and scan.subject_id == rows[0]["Subject"]


def test_dicom_folder_empty_folder_and_two_niftis(adni: Path) -> None:
    subject_dir = sorted((adni / "ADNI").iterdir())[0]
    dicom = subject_dir / "MPRAGE" / "2010-01-05_10_00_00.0" / "I999991"
    dicom.mkdir(parents=True)
    for i in (1, 2):
        (dicom / f"ADNI_{subject_dir.name}_MR_MPRAGE_br_raw_{i}_I999991.dcm").write_bytes(b"\0" * 132 + b"DICM")
    empty = subject_dir / "MPRAGE" / "2011-01-05_10_00_00.0" / "I999992"
    empty.mkdir(parents=True)
    doubled = subject_dir / "MPRAGE" / "2012-01-05_10_00_00.0" / "I999993"
    doubled.mkdir(parents=True)
    for name in ("a.nii", "b.nii.gz"):
        (doubled / name).write_bytes(b"")

    found = discover_scans(adni)
    scan = next(s for s in found.scans if s.image_id == "I999991")
    assert scan.path == dicom and scan.session == "2010-01-05" and scan.age is None
    skipped = dict(found.skipped)
    assert "empty" in skipped[str(empty)]
    assert "2 NIfTI files" in skipped[str(doubled)]
    assert len(skipped) == 2


def test_flat_scans_get_their_labels(flat_source: Path) -> None:
    rows = read_rows(flat_source / "participants.csv")
    found = discover_scans(flat_source)
    assert found.skipped == [] and [s.subject_id for s in found.scans] == [r["subject_id"] for r in rows]
    for scan, row in zip(found.scans, rows):
        assert scan.path == flat_source / row["file"] and scan.image_id == row["subject_id"]
        assert scan.session == "bl" and scan.diagnosis == row["diagnosis"] and scan.sex == (row["sex"] or None)
        assert scan.age == (float(row["age"]) if row["age"] else None)


def test_flat_rows_that_cannot_be_used(flat: Path) -> None:
    rows = read_rows(flat / "participants.csv")
    (flat / rows[0]["file"]).unlink()
    rows[1].update(age="", sex="female")
    rows[2]["age"] = "sixty"
    write_rows(flat / "participants.csv", rows + [dict(rows[1])])
    found = discover_scans(flat)
    assert [(s.subject_id, s.age, s.sex) for s in found.scans] == [(rows[1]["subject_id"], None, "F")]
    reasons = [reason for _, reason in found.skipped]
    assert len(reasons) == 3
    assert "file not found" in reasons[0] and found.skipped[0][0].endswith(rows[0]["file"])
    assert "row 4" in reasons[1] and "'sixty' is not a number" in reasons[1]
    assert "row 5" in found.skipped[2][0] and "duplicate" in reasons[2]


def test_flat_csv_given_as_metadata(flat: Path) -> None:
    (flat / "participants.csv").rename(flat / "labels.csv")
    assert len(discover_scans(flat, metadata=flat / "labels.csv").scans) == 3


def test_bad_metadata_is_an_error(adni: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.csv does not exist"):
        discover_scans(adni, metadata=tmp_path / "nope.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("Image Data ID,Subject\nI1,002_S_0001\n")
    with pytest.raises(ValueError, match=r"wrong.csv: missing column\(s\) \['Group', 'Sex', 'Age'\]"):
        discover_scans(adni, metadata=wrong)


def test_folder_without_a_known_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path} holds neither layout.*ADNI.*subject_id and file"):
        discover_scans(tmp_path)
