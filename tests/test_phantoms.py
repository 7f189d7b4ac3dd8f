import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medldm.data.io import load_volume
from medldm.data.phantoms import (
    ADNI_GROUPS,
    ADNIMERGE_HEADER,
    TISSUE_LABELS,
    make_phantom,
    make_phantom_with_labels,
    write_phantoms,
)

LABEL = {name: index for index, name in TISSUE_LABELS.items()}
ADNI_FILE = re.compile(
    r"ADNI/(?P<ptid>\d{3}_S_\d{4})/(?P<desc>[^/]+)/(?P<date>\d{4}-\d{2}-\d{2})_\d{2}_\d{2}_\d{2}\.0/(?P<iid>I\d+)/"
    r"ADNI_(?P=ptid)_MR_(?P=desc)_br_raw_\d{17}_1_S\d+_(?P=iid)\.nii$")
IDA_HEADER = ["Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
              "Acq Date", "Format", "Downloaded"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def adni(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("adni"), num=5, layout="adni", seed=3)


def test_make_phantom_is_deterministic_and_float32() -> None:
    volume, affine = make_phantom(np.random.default_rng(0), 70.0, "CN", "F")
    again, _, labels = make_phantom_with_labels(np.random.default_rng(0), 70.0, "CN", "F")
    assert volume.dtype == np.float32 and affine.shape == (4, 4)
    np.testing.assert_array_equal(volume, again)
    assert labels.shape == volume.shape and 85 <= min(volume.shape) and max(volume.shape) <= 150


def test_anatomy_sits_right_in_world_space(adni: Path) -> None:
    orientations = set()
    for path in sorted(adni.parent.rglob("*.nii")):
        image = nib.load(path)
        assert not np.allclose(image.affine, np.eye(4))
        assert 1.8 <= min(image.header.get_zooms()) and max(image.header.get_zooms()) <= 2.6 + 1e-6
        orientations.add(nib.aff2axcodes(image.affine))
        canonical = nib.as_closest_canonical(image)
        data = canonical.get_fdata()
        head = data > 0.3 * np.percentile(data, 99.5)  # skin and brain, not air or bone
        ijk = np.argwhere(head)
        world_centre = nib.affines.apply_affine(canonical.affine, ijk.mean(axis=0))
        # the head is drawn within 17 mm of the origin; the neck pulls the centre of mass down by up to ~25 mm
        assert np.linalg.norm(world_centre) < 45, f"{path.name}: head centre at {world_centre} mm"
        # canonical axes grow towards R, A, S: the capsule is on the right, the nose in front, the neck below
        zooms = np.array(canonical.header.get_zooms())
        midline = np.median(ijk, axis=0)
        parts, count = ndimage.label(head)
        sizes = np.bincount(parts.ravel())[1:]
        small = [ndimage.center_of_mass(parts == i + 1)[0] for i in range(count) if 5 <= sizes[i] < 500]
        # the capsule is the stray bright spot farthest from the midline; bits of cortex or neck lie closer
        capsule = max(small, key=lambda x: abs(x - midline[0]))
        assert (capsule - midline[0]) * zooms[0] > 60, (path.name, small, midline)
        anterior = (ijk[:, 1].max() - midline[1]) - (midline[1] - ijk[:, 1].min())
        assert anterior * zooms[1] > 5, (path.name, anterior)
        assert head[:, :, 0].sum() > 100 and not head[:, :, -1].any(), path.name
    assert len(orientations) >= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_contrast_is_t1_like(seed: int) -> None:
    volume, _, labels = make_phantom_with_labels(np.random.default_rng(seed), 75.0, "MCI", None)
    mean = {name: volume[labels == index].mean() for name, index in LABEL.items()}
    assert mean["white matter"] > mean["grey matter"] > mean["CSF"] > mean["skull"]
    assert mean["background"] < 0.1 * mean["white matter"]
    assert 150 < mean["white matter"] < 2000  # arbitrary scanner units: intensity normalisation is needed


def test_ventricles_grow_with_age_and_disease() -> None:
    def ventricle_voxels(age: float, diagnosis: str) -> int:
        _, _, labels = make_phantom_with_labels(np.random.default_rng(4), age, diagnosis, "M")
        return int((labels == LABEL["ventricles"]).sum())

    young, old = ventricle_voxels(55, "CN"), ventricle_voxels(90, "CN")
    assert old > 1.4 * young
    assert ventricle_voxels(70, "CN") < ventricle_voxels(70, "MCI") < ventricle_voxels(70, "AD")


def test_adni_tree_and_collection_csv(adni: Path) -> None:
    root = adni.parent
    assert adni.name.endswith("_collection.csv")
    with open(adni, newline="") as f:
        assert next(csv.reader(f)) == IDA_HEADER
    rows = read_rows(adni)
    files = {m["iid"]: m for m in (ADNI_FILE.search(p.relative_to(root).as_posix()) for p in root.rglob("*.nii"))}
    assert None not in files.values() and len(files) == len(rows)
    assert len({r["Image Data ID"] for r in rows}) == len(rows)
    for row in rows:
        match = files[row["Image Data ID"]]
        assert match["ptid"] == row["Subject"] and match["desc"] == row["Description"].replace(" ", "_")
        month, day, year = row["Acq Date"].split("/")
        assert match["date"] == f"{year}-{int(month):02d}-{day}" and len(day) == 2
        assert row["Group"] in ADNI_GROUPS and row["Sex"] in ("M", "F") and 55 <= float(row["Age"]) <= 93
        assert (row["Modality"], row["Type"], row["Format"]) == ("MRI", "Original", "NiFTI")
        assert re.fullmatch(r"\d{1,2}/\d{2}/\d{4}", row["Downloaded"])
    visits: dict[str, list[str]] = {}
    for row in rows:
        visits.setdefault(row["Subject"], []).append(row["Visit"])
    assert len(visits) == 5 and any(v == ["bl", "m12"] or v == ["bl", "m24"] for v in visits.values())


def test_flat_layout(tmp_path: Path) -> None:
    csv_path = write_phantoms(tmp_path, num=3, layout="flat", seed=5)
    assert csv_path == tmp_path / "participants.csv"
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "subject_id,file,age,sex,diagnosis"
    rows = read_rows(csv_path)
    assert [r["subject_id"] for r in rows] == ["sub-0001", "sub-0002", "sub-0003"]
    for row in rows:
        assert row["file"] == f"images/{row['subject_id']}.nii.gz" and (tmp_path / row["file"]).is_file()
        assert row["diagnosis"] in ("CN", "MCI", "AD")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num": 0}, "num"),
    ({"num": 2, "layout": "bids"}, "layout must be one of \\('adni', 'flat'\\)"),
    ({"num": 2, "dicom_fraction": 1.5}, "dicom_fraction must be between 0 and 1"),
    ({"num": 2, "layout": "flat", "adnimerge": True}, "ADNI layout only"),
    ({"num": 2, "layout": "flat", "dicom_fraction": 0.5}, "ADNI layout only"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_phantoms(tmp_path, **kwargs)


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="diagnosis must be one of"):
        make_phantom(np.random.default_rng(0), 70.0, "Dementia", "M")
    with pytest.raises(ValueError, match="sex must be one of"):
        make_phantom(np.random.default_rng(0), 70.0, "CN", "X")


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One download written twice with ADNIMERGE: all NIfTI, and every axis-aligned scan as DICOM."""
    # seed 9: one subject with bl and m12 scans, m12 scanned twice, two of the three scans axis-aligned
    kwargs = {"num": 1, "layout": "adni", "seed": 9, "adnimerge": True}
    return (write_phantoms(tmp_path_factory.mktemp("nifti"), **kwargs).parent,
            write_phantoms(tmp_path_factory.mktemp("dicom"), dicom_fraction=1.0, **kwargs).parent)


def test_adnimerge_csv(merged: tuple[Path, Path]) -> None:
    root = merged[0]
    with open(root / "ADNIMERGE.csv", newline="") as f:
        assert next(csv.reader(f)) == list(ADNIMERGE_HEADER) == ["RID", "PTID", "VISCODE", "EXAMDATE", "AGE",
                                                                 "PTGENDER", "DX", "DX_bl"]
    merge, ida = read_rows(root / "ADNIMERGE.csv"), read_rows(root / "ADNI_phantoms_collection.csv")
    scanned = {(r["Subject"], r["Visit"]) for r in ida}
    visits = [(r["PTID"], r["VISCODE"]) for r in merge]
    # one row per visit, and one clinical visit that has no scan
    assert len(set(visits)) == len(visits) and set(visits) - scanned == {(ida[0]["Subject"], "m06")}
    assert scanned <= set(visits)
    baseline = {r["Subject"]: r for r in ida if r["Visit"] == "bl"}
    for row in merge:
        scan = baseline[row["PTID"]]
        assert row["PTID"].endswith(f"_S_{int(row['RID']):04d}") and row["AGE"] == scan["Age"]
        assert row["PTGENDER"] == {"M": "Male", "F": "Female"}[scan["Sex"]]
        assert row["DX_bl"] == {"MCI": "LMCI"}.get(scan["Group"], scan["Group"])
        assert row["DX"] in ("", {"CN": "CN", "SMC": "CN", "AD": "Dementia"}.get(scan["Group"], "MCI"))
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["EXAMDATE"])
    # a visit scanned twice: the second scan is another image, listed as processed
    twice = [r for r in ida if (r["Subject"], r["Visit"]) == (ida[-1]["Subject"], ida[-1]["Visit"])]
    assert ([r["Type"] for r in twice] == ["Original", "Processed"]
            and twice[0]["Image Data ID"] != twice[1]["Image Data ID"])


def test_dicom_series_hold_the_same_head(merged: tuple[Path, Path]) -> None:
    import SimpleITK as sitk

    nifti_root, dicom_root = merged
    rows = read_rows(dicom_root / "ADNI_phantoms_collection.csv")
    assert [r["Format"] for r in rows].count("DCM") == 2
    for row in (r for r in rows if r["Format"] == "DCM"):
        folder = next(dicom_root.rglob(row["Image Data ID"]))
        files = sorted(folder.iterdir())
        nifti = nib.load(next(nifti_root.rglob(f"{row['Image Data ID']}/*.nii")))
        assert len(files) == nifti.shape[2] and all(p.suffix == ".dcm" for p in files)
        # the same voxels in the same place: compared in RAS order, so slice order and axis flips do not matter
        data, affine = load_volume(folder)
        expected, found = nib.as_closest_canonical(nifti), nib.as_closest_canonical(nib.Nifti1Image(data, affine))
        np.testing.assert_array_equal(found.get_fdata(), expected.get_fdata())
        np.testing.assert_allclose(found.affine, expected.affine, atol=1e-3)
        reader = sitk.ImageFileReader()
        tags = []
        for path in files:
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            tags.append({key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()})
        assert len({t["0020|000e"] for t in tags}) == 1 and len({t["0020|0032"] for t in tags}) == len(files)
        assert sorted(int(t["0020|0013"]) for t in tags) == list(range(1, len(files) + 1))
        zooms = nifti.header.get_zooms()
        assert float(tags[0]["0018|0050"]) == pytest.approx(zooms[2], abs=1e-4)
        np.testing.assert_allclose([float(v) for v in tags[0]["0028|0030"].split("\\")], zooms[1::-1], atol=1e-4)
        assert len(tags[0]["0020|0037"].split("\\")) == 6 and tags[0]["0008|0060"] == "MR"


def test_same_seed_same_files(merged: tuple[Path, Path], tmp_path: Path) -> None:
    first = merged[1]
    again = write_phantoms(tmp_path / "again", num=1, layout="adni", seed=9, adnimerge=True, dicom_fraction=1.0)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.parent) for p in again.parent.rglob("*") if p.is_file())
    # every byte, DICOM UIDs and dates included: nothing comes from the clock or a random UID generator
    for rel in files:
        assert (first / rel).read_bytes() == (again.parent / rel).read_bytes(), rel
    other = write_phantoms(tmp_path / "other", num=1, layout="adni", seed=10)
    assert other.read_bytes() != (first / again.name).read_bytes()
