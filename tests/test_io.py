import locale
import os

import nibabel as nib
import numpy as np
import pytest

from medldm.data.io import keep_locale, load_volume, save_dicom_series, save_volume


def _write_dicom_series(folder, volume_zyx, spacing, origin):
    """One axial DICOM file per slice, as a scanner would write them (LPS patient coordinates)."""
    import SimpleITK as sitk

    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    for k, plane in enumerate(volume_zyx):
        img = sitk.GetImageFromArray(plane[None].astype(np.int16))
        pos = [origin[0], origin[1], origin[2] + k * spacing[2]]
        img.SetSpacing(spacing)  # the writer derives PixelSpacing/ImagePositionPatient from the image
        img.SetOrigin(pos)
        for tag, value in {
            "0008|0060": "MR", "0020|000e": series_uid, "0020|000d": "1.2.3", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, pos)), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
            "0008|0018": f"{series_uid}.{k + 1}",
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        with keep_locale():  # GDCM leaves the process in the C locale
            writer.Execute(img)


def test_dicom_series_loads_with_a_ras_affine_that_matches_its_positions(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, size=(6, 10, 12))  # (slices, rows, columns)
    _write_dicom_series(tmp_path / "I123", vol, spacing=(0.9, 0.8, 2.0), origin=(-50.0, -60.0, -10.0))
    data, affine = load_volume(tmp_path / "I123")
    assert data.shape == (12, 10, 6)  # (columns=x, rows=y, slices=z)
    np.testing.assert_allclose(data[3, 4, 5], vol[5, 4, 3])
    # voxel (0,0,0) sits at the first slice's ImagePositionPatient, LPS -> RAS flips x and y
    np.testing.assert_allclose(affine[:3, 3], [50.0, 60.0, -10.0], atol=1e-4)
    np.testing.assert_allclose(affine[:3, :3], np.diag([-0.9, -0.8, 2.0]), atol=1e-4)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="broken.nii.gz: cannot be read as NIfTI"):
        load_volume(bad)
    empty = tmp_path / "I1"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM series found"):
        load_volume(empty)
    with pytest.raises(ValueError, match="not a NIfTI file"):
        load_volume(tmp_path / "scan.mha")


def test_saved_volume_keeps_its_affine_and_refuses_a_broken_one(tmp_path):
    affine = np.array([[0, 0, 2.0, -90], [-2.0, 0, 0, 110], [0, 2.0, 0, -130], [0, 0, 0, 1]])
    save_volume(tmp_path / "v.nii.gz", np.ones((4, 5, 6)), affine, descrip="x")
    img = nib.load(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["sform_code"]) == 1
    with pytest.raises(ValueError, match="invalid affine"):
        save_volume(tmp_path / "w.nii.gz", np.ones((4, 5, 6)), np.zeros((4, 4)))
    assert not (tmp_path / "w.nii.gz").exists()


def test_dicom_series_with_a_missing_slice_or_two_series_is_refused(tmp_path):
    vol = np.random.default_rng(1).integers(0, 1000, size=(8, 6, 6))
    _write_dicom_series(tmp_path / "gap", vol, spacing=(1.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0))
    (tmp_path / "gap" / "slice004.dcm").unlink()
    with pytest.raises(ValueError, match="gap: inconsistent slice spacing .* a slice is missing"):
        load_volume(tmp_path / "gap")

    import SimpleITK as sitk

    _write_dicom_series(tmp_path / "mixed", vol, spacing=(1.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0))
    stray = sitk.ReadImage(str(tmp_path / "mixed" / "slice000.dcm"))
    stray.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.99")
    stray.SetMetaData("0008|0018", "1.2.826.0.1.3680043.2.1125.99.1")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "mixed" / "other.dcm"))
    with keep_locale():
        writer.Execute(stray)
    with pytest.raises(ValueError, match="mixed series"):
        load_volume(tmp_path / "mixed")


@pytest.mark.parametrize("affine", [
    np.array([[1.5, 0, 0, -90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]]),  # RAS, as exported
    np.array([[-1.0, 0, 0, 90], [0, 1.2, 0, -100], [0, 0, 2.0, -50], [0, 0, 0, 1]]),  # LAS: left-handed in DICOM
    np.array([[0, 0, 2.0, -90], [-2.0, 0, 0, 110], [0, 2.0, 0, -130], [0, 0, 0, 1]]),  # sagittal slices
])
def test_dicom_export_reads_back_with_the_same_world_geometry(tmp_path, affine):
    data = np.random.default_rng(0).integers(0, 4096, size=(7, 6, 5)).astype(np.int16)
    caller_locale = locale.setlocale(locale.LC_ALL)
    files = save_dicom_series(tmp_path / "series", data, affine, {"0010|0010": "SYNTHETIC^TEST"})
    # GDCM switches the process to the C locale; left so, Python would read text files as ASCII afterwards
    assert locale.setlocale(locale.LC_ALL) == caller_locale
    assert len(files) == 5 and all(f.is_file() for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name != "series"]  # no temporary folder left
    back, back_affine = load_volume(tmp_path / "series")
    # the reader may order the slices the other way round: compare voxel by voxel in world space
    to_back = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(back_affine))
    np.testing.assert_array_equal(back, nib.orientations.apply_orientation(data, to_back))
    for ijk in np.ndindex(2, 2, 2):
        corner = np.array(ijk) * (np.array(data.shape) - 1)
        world = affine @ [*corner, 1]
        back_ijk = np.linalg.solve(back_affine, world)[:3]
        np.testing.assert_allclose(back_ijk, np.round(back_ijk), atol=1e-3)  # a voxel centre in both
        assert data[tuple(corner)] == back[tuple(np.round(back_ijk).astype(int))]


def test_int16_nifti_stores_12_bit_levels_that_read_back_as_intensities(tmp_path):
    x = np.linspace(-0.1, 1.1, 60).reshape(3, 4, 5)
    save_volume(tmp_path / "v.nii.gz", x, np.eye(4) * [2, 2, 2, 1], dtype="int16")
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.get_data_dtype() == np.int16
    raw = np.asanyarray(img.dataobj.get_unscaled())
    assert raw.min() == 0 and raw.max() == 4095  # clipped to [0, 1], then 0..4095
    np.testing.assert_allclose(img.get_fdata(), np.clip(x, 0, 1), atol=0.5 / 4095 + 1e-6)


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp makes private files; a run or an imported bundle shared by a group must stay readable
    from medldm.data.io import write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
