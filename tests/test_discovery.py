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
    rows[2]["sex"] = "X"
    write_rows(flat / "participants.csv", rows + [dict(rows[1])])
    found = discover_scans(flat)
    # a label that cannot be read costs the label, not the scan
    assert [(s.subject_id, s.age, s.sex) for s in found.scans] == [(rows[1]["subject_id"], None, "F"),
                                                                   (rows[2]["subject_id"], None, None)]
    reasons = [reason for _, reason in found.skipped]
    assert len(reasons) == 2
    assert "file not found" in reasons[0] and found.skipped[0][0].endswith(rows[0]["file"])
    assert "row 5" in found.skipped[1][0] and "duplicate" in reasons[1]
    assert [where for where, _ in found.warnings] == [f"participants.csv row 4 (subject {rows[2]['subject_id']})"] * 2
    assert "'sixty' is not a number" in found.warnings[0][1] and "sex 'X'" in found.warnings[1][1]


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


MERGE_HEADER = ["RID", "PTID", "VISCODE", "EXAMDATE", "AGE", "PTGENDER", "DX", "DX_bl"]


def make_tree(root: Path, scans: list[tuple[str, str, str, str, dict[str, str]]]) -> None:
    """An ADNI download of empty NIfTI files: (PTID, description, acquisition day, image id, IDA row fields)."""
    rows = []
    for ptid, description, day, image_id, fields in scans:
        folder = root / "ADNI" / ptid / description / f"{day}_10_00_00.0" / image_id
        folder.mkdir(parents=True)
        (folder / f"ADNI_{ptid}_MR_{description}_{image_id}.nii").write_bytes(b"")
        rows.append({"Image Data ID": image_id, "Subject": ptid, "Group": "", "Sex": "", "Age": "", "Visit": "",
                     "Type": "Original", **fields})
    write_rows(root / "collection.csv", rows)


def write_merge(path: Path, rows: list[list[str]], header: list[str] = MERGE_HEADER) -> Path:
    write_rows(path, [dict(zip(header, row)) for row in rows])
    return path


@pytest.fixture(scope="module")
def merged_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seed 9: one subject scanned at bl and twice at m12 (Original and Processed), two scans as DICOM series
    return write_phantoms(tmp_path_factory.mktemp("merged"), num=1, layout="adni", seed=9, adnimerge=True,
                          dicom_fraction=0.5).parent


def test_adnimerge_of_a_phantom_download(merged_source: Path) -> None:
    ida = {r["Image Data ID"]: r for r in read_rows(merged_source / "ADNI_phantoms_collection.csv")}
    merge = {(r["PTID"], r["VISCODE"]): r for r in read_rows(merged_source / "ADNIMERGE.csv")}
    found = discover_scans(merged_source)  # ADNIMERGE.csv at the top of the download is used unasked
    assert found.warnings == []
    assert len(found.scans) == len({(r["Subject"], r["Visit"]) for r in ida.values()}) < len(ida)
    for scan in found.scans:
        row, visit = ida[scan.image_id], merge[(scan.subject_id, scan.session)]
        assert scan.session == row["Visit"] and scan.sex == visit["PTGENDER"][0]
        assert scan.diagnosis == (visit["DX"] or visit["DX_bl"])
        # ADNIMERGE's exam can be up to two weeks before the scan the collection CSV dates the age by
        assert abs(scan.age - float(row["Age"])) < 0.1
        month, day, year = row["Acq Date"].split("/")
        assert scan.acquisition_date == f"{year}-{int(month):02d}-{day}"
        if row["Format"] == "DCM":  # a DICOM series is its image folder
            assert scan.path.is_dir() and scan.path.name == scan.image_id and any(scan.path.glob("*.dcm"))
        else:
            assert scan.path.is_file() and scan.path.parent.name == scan.image_id
    assert {r["Format"] for r in ida.values()} == {"DCM", "NiFTI"}
    assert any(s.session == "m12" and s.age > float(merge[(s.subject_id, "bl")]["AGE"]) + 0.9 for s in found.scans)
    (where, reason), = found.skipped
    assert ida[Path(where).name]["Type"] == "Processed" and reason.startswith("another scan of")
    processed = discover_scans(merged_source, preferred_types=["PROCESSED"])
    assert Path(where).name in {s.image_id for s in processed.scans}
    assert len(discover_scans(merged_source, one_scan_per_visit=False).scans) == len(ida)


def test_adnimerge_labels_visits_and_ages(tmp_path: Path) -> None:
    make_tree(tmp_path, [
        ("002_S_0295", "MPRAGE", "2006-04-18", "I100", {"Visit": "bl", "Group": "MCI", "Sex": "M", "Age": "70.1"}),
        ("002_S_0295", "MPRAGE", "2007-05-02", "I200", {"Group": "MCI", "Sex": "M", "Age": "71.1"}),
        ("002_S_0295", "MPRAGE", "2009-01-01", "I300", {"Group": "AD", "Sex": "M", "Age": "72.8"}),
        ("011_S_0002", "MPRAGE", "2006-01-02", "I400", {"Visit": "bl", "Group": "CN", "Sex": "F", "Age": "74.3"}),
    ])
    merge = write_merge(tmp_path / "merge.csv", [
        ["295", "002_S_0295", "bl", "2006-04-18", "84.8", "Female", "", "LMCI"],
        ["295", "002_S_0295", "m12", "4/20/2007", "84.8", "Female", "Dementia", "LMCI"],
        ["2", "011_S_0002", "bl", "2006-01-02", "", "Female", "", ""],
    ])
    found = discover_scans(tmp_path, adnimerge=merge)
    labels = {s.image_id: (s.session, s.age, s.sex, s.diagnosis, s.acquisition_date) for s in found.scans}
    assert labels == {
        # ADNIMERGE wins where it has a label, and DX_bl stands in for an empty DX
        "I100": ("bl", 84.8, "F", "LMCI", "2006-04-18"),
        # no Visit in the collection CSV: the exam nearest the scan date; AGE is at baseline, so add 367 days
        "I200": ("m12", 85.8, "F", "Dementia", "2007-05-02"),
        # 622 days from the m12 exam: no visit of ADNIMERGE, so the collection CSV's labels and the date
        "I300": ("2009-01-01", 72.8, "M", "AD", "2009-01-01"),
        # ADNIMERGE without age or diagnosis: the collection CSV fills them in
        "I400": ("bl", 74.3, "F", "CN", "2006-01-02"),
    }
    (where, problem), = found.warnings
    assert where.endswith("I300") and "no ADNIMERGE visit of 002_S_0295" in problem
    assert found.skipped == []


def test_adnimerge_errors(tmp_path: Path) -> None:
    make_tree(tmp_path, [("002_S_0295", "MPRAGE", "2006-04-18", "I100", {})])
    short = write_merge(tmp_path / "ADNIMERGE.csv", [["295", "002_S_0295", "bl", "2006-04-18", "84.8", "Male"]],
                        header=MERGE_HEADER[:6])
    with pytest.raises(ValueError, match=r"ADNIMERGE.csv: missing column\(s\) \['DX', 'DX_bl'\]"):
        discover_scans(tmp_path)
    with pytest.raises(ValueError, match="adnimerge file .*nope.csv does not exist"):
        discover_scans(tmp_path, adnimerge=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="preferred_types must be a sequence of strings"):
        discover_scans(tmp_path, adnimerge=short, preferred_types="Original")


def test_adnimerge_is_for_adni_trees_only(flat: Path) -> None:
    merge = write_merge(flat / "ADNIMERGE.csv", [["295", "002_S_0295", "bl", "2006-04-18", "84.8", "Male", "", "CN"]])
    with pytest.raises(ValueError, match="adnimerge applies to ADNI download trees only"):
        discover_scans(flat, adnimerge=merge)


@pytest.mark.parametrize(("patterns", "types", "kept"), [
    ((), (), "I100"),  # no preference: the lowest image id
    (("MPRAGE", "IR-SPGR"), (), "I150"),  # the earliest pattern, then the lowest id
    (("IR-SPGR", "MPRAGE"), (), "I100"),
    (("MPRAGE", "IR-SPGR"), ("processed", "original"), "I200"),  # the Type comes before the pattern
    (("IR-SPGR", "MPRAGE"), ("Derived", "Processed"), "I200"),  # a Type nobody has is no preference
])
def test_one_scan_per_visit(tmp_path: Path, patterns: tuple[str, ...], types: tuple[str, ...], kept: str) -> None:
    make_tree(tmp_path, [
        ("002_S_0295", "MPRAGE", "2006-04-18", "I300", {"Visit": "bl"}),
        ("002_S_0295", "MPRAGE_Repeat", "2006-04-18", "I200", {"Visit": "bl", "Type": "Processed"}),
        ("002_S_0295", "IR-SPGR", "2006-04-18", "I100", {"Visit": "bl"}),
        ("002_S_0295", "MPRAGE", "2006-04-18", "I150", {"Visit": "bl"}),
        ("002_S_0295", "MPRAGE", "2007-04-18", "I500", {"Visit": "m12"}),
    ])
    found = discover_scans(tmp_path, description_patterns=patterns, preferred_types=types)
    assert [s.image_id for s in found.scans] == [kept, "I500"]
    assert sorted(Path(where).name for where, _ in found.skipped) == sorted({"I100", "I150", "I200", "I300"} - {kept})
    assert {reason for _, reason in found.skipped} == {f"another scan of 002_S_0295 bl kept: {kept}"}
    every = discover_scans(tmp_path, description_patterns=patterns, preferred_types=types, one_scan_per_visit=False)
    assert len(every.scans) == 5 and every.skipped == []


def test_unreadable_labels_are_warnings(tmp_path: Path) -> None:
    make_tree(tmp_path, [
        ("002_S_0295", "MPRAGE", "2006-04-18", "I100", {"Visit": "bl", "Group": "CN", "Sex": "X", "Age": "abc"}),
        ("002_S_0295", "MPRAGE", "2007-04-20", "I200", {"Visit": "m12", "Group": "CN", "Sex": "M", "Age": "71"}),
    ])
    write_merge(tmp_path / "ADNIMERGE.csv", [
        ["295", "002_S_0295", "bl", "18.04.2006", "old", "Male", "", "CN"],
        ["295", "002_S_0295", "m12", "2007-04-20", "84.8", "Unknown", "", "CN"],
    ])
    found = discover_scans(tmp_path)
    labels = {s.image_id: (s.session, s.age, s.sex) for s in found.scans}
    # the bl exam date is unreadable, so the m12 age cannot be counted from it and the CSV's age stands
    assert labels == {"I100": ("bl", None, "M"), "I200": ("m12", 71.0, "M")} and found.skipped == []
    problems = {(where.split(" (")[0].rsplit("/", 1)[-1], problem.split(";")[0]) for where, problem in found.warnings}
    assert problems == {
        ("ADNIMERGE.csv row 2", "date '18.04.2006' is neither YYYY-MM-DD nor M/D/YYYY"),
        ("ADNIMERGE.csv row 2", "age 'old' is not a number"),
        ("ADNIMERGE.csv row 3", "sex 'Unknown' is not one of M, F, male, female"),
        ("ADNIMERGE.csv row 3", "no readable EXAMDATE for this visit or its subject's bl visit"),
        ("I100", "age 'abc' is not a number"),
        ("I100", "sex 'X' is not one of M, F, male, female"),
    }
