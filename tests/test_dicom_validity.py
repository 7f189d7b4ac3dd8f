"""The DICOM series medldm exports pass the standard's validators (dicom3tools) and read back in a second client
(dcmtk) as one series with our pixels. Both are Debian packages: `.ci/run` installs them; elsewhere these tests skip
and say what to install."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medldm.data.io import save_dicom_series

from .conftest import train_age_range

needs_dicom3tools = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None,
    reason="dicom3tools is not installed (Debian/Ubuntu: apt-get install dicom3tools)")
needs_dcmtk = pytest.mark.skipif(
    shutil.which("dcmdump") is None or shutil.which("dcm2pnm") is None,
    reason="dcmtk is not installed (Debian/Ubuntu: apt-get install dcmtk)")


@pytest.fixture(scope="module")
def exported(dataset, ldm_run, tmp_path_factory):
    """Two samples exported as DICOM by the documented command, conditioned on age and sex."""
    out = tmp_path_factory.mktemp("dicom") / "samples"
    age = min(train_age_range(dataset))
    subprocess.run([sys.executable, "-m", "medldm", "sample", "--run", str(ldm_run), "--out", str(out), "--num", "2",
                    "--steps", "2", "--format", "dicom", "--condition", f"age={age}", "sex=F"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    series = sorted(p for p in out.iterdir() if p.is_dir() and p.name.endswith("_dicom"))
    assert [p.name for p in series] == ["sample_0000_dicom", "sample_0001_dicom"]
    return series


def _oblique_left_handed(folder):
    """A series from save_dicom_series' defaults alone: an oblique, left-handed affine, anisotropic voxels."""
    angle = np.deg2rad(17)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.1, 0.9, 1.7])  # a flipped first axis: left-handed in RAS
    affine[:3, 3] = [40.0, -80.0, -30.0]
    data = np.random.default_rng(0).integers(-200, 3000, size=(23, 19, 7), dtype=np.int16)
    save_dicom_series(folder, data, affine, {"0010|0010": "SYNTHETIC^TEST", "0010|0020": "TEST-1"})
    return folder


def _problems(tool, files):
    """dicom3tools print 'Error - ...' and 'Warning - ...' lines (to stderr); the errors are what a PACS refuses."""
    proc = subprocess.run([tool, *map(str, files)], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


@needs_dicom3tools
def test_exported_series_pass_dciodvfy_and_dcentvfy(exported, tmp_path):
    for folder in [*exported, _oblique_left_handed(tmp_path / "oblique")]:
        files = sorted(folder.glob("*.dcm"))
        assert len(files) > 1
        for f in files:  # the IOD validator checks one file against the MR Image IOD
            errors, warnings = _problems("dciodvfy", [f])
            assert errors == [], f"{f}: {errors}"
            assert warnings == [], f"{f}: {warnings}"
        # the entity validator checks that patient, study, series and frame of reference agree across the slices
        errors, _ = _problems("dcentvfy", files)
        assert errors == [], f"{folder}: {errors}"


def _dump(path):
    """(tag name -> value) from dcmdump, as dcmtk reads it."""
    text = subprocess.run(["dcmdump", "+L", str(path)], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in text.splitlines():
        m = re.match(r"\([0-9a-f]{4},[0-9a-f]{4}\) \w\w (\[(.*?)\]|=(\S+)|(\S+)).*#\s+\d+, \d+ (\w+)$", line)
        if m:
            values[m.group(5)] = m.group(2) if m.group(2) is not None else (m.group(3) or m.group(4))
    return values


@needs_dcmtk
def test_dcmtk_reads_one_series_with_the_pixels_and_geometry_written(exported, tmp_path):
    import SimpleITK as sitk

    for folder in [*exported, _oblique_left_handed(tmp_path / "oblique")]:
        files = sorted(folder.glob("*.dcm"))
        tags = [_dump(f) for f in files]
        assert len({t["SeriesInstanceUID"] for t in tags}) == 1 and len({t["StudyInstanceUID"] for t in tags}) == 1
        assert len({t["SOPInstanceUID"] for t in tags}) == len(files)  # one instance per slice, none repeated
        assert sorted(int(t["InstanceNumber"]) for t in tags) == list(range(1, len(files) + 1))
        assert {t["SOPClassUID"] for t in tags} == {"MRImageStorage"}
        assert {t["PatientPosition"] for t in tags} == {"HFS"}
        # the slices are stacked along their normal, one SpacingBetweenSlices apart
        orientation = np.array([float(v) for v in tags[0]["ImageOrientationPatient"].split("\\")])
        normal = np.cross(orientation[:3], orientation[3:])
        by_number = sorted(tags, key=lambda t: int(t["InstanceNumber"]))
        along = [normal @ [float(v) for v in t["ImagePositionPatient"].split("\\")] for t in by_number]
        np.testing.assert_allclose(np.diff(along), float(tags[0]["SpacingBetweenSlices"]), atol=1e-3)
        # dcm2pnm renders every slice; with a min-max window its 16-bit output is our integers rescaled
        volume = sitk.GetArrayFromImage(sitk.ReadImage([str(f) for f in files])).astype(np.float64)  # (k, rows, cols)
        for k, f in enumerate(files):
            pgm = tmp_path / f"{folder.name}_{k}.pgm"
            subprocess.run(["dcm2pnm", "+Wm", "+opw", str(f), str(pgm)], check=True, capture_output=True)
            *header, body = pgm.read_text().split(None, 4)  # P2, width, height, maxval, the values
            assert header[0] == "P2" and (int(header[2]), int(header[1])) == volume.shape[1:]  # rows, columns
            rendered = np.array(body.split(), dtype=np.float64).reshape(volume.shape[1:]) / int(header[3])
            stored = volume[k]  # files sort by InstanceNumber (IM0001.dcm, ...)
            if np.ptp(stored) > 0:
                np.testing.assert_allclose(rendered, (stored - stored.min()) / np.ptp(stored), atol=2e-3)
