"""Reading and writing volumes with their real affine (NIfTI via nibabel, DICOM series via SimpleITK)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D scan as (float32 array, 4x4 RAS+ world affine); a folder is read as one DICOM series."""
    path = Path(path)
    if path.is_dir():
        return _load_dicom_series(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: not a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for truncated or corrupt files
        raise ValueError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: contains NaN or infinite voxels")
    return data, img.affine.astype(np.float64)


def _load_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk  # heavy; only preprocessing of DICOM downloads needs it

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ValueError(f"{folder}: no DICOM series found (expected .dcm files of one image)")
    if len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; expected exactly one")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])  # sorted by slice position
    if len(files) < 2:
        raise ValueError(f"{folder}: DICOM series has {len(files)} slice(s); a 3D scan needs more")
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"{folder}: DICOM series cannot be read ({e})") from None
    # SimpleITK is (x, y, z) in LPS; nibabel wants the array in (i, j, k) order with a RAS affine
    data = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return data, affine


def atomic_path(final: Path) -> Path:
    """A temporary sibling of ``final`` to write first and ``os.replace`` afterwards."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + "".join(final.suffixes), dir=final.parent)
    os.close(fd)
    return Path(tmp)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, descrip: str | None = None) -> None:
    """Write a float32 NIfTI with ``affine`` as both qform and sform (scanner space), atomically."""
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{path}: refusing to write an invalid affine {affine.tolist()}")
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if descrip is not None:
        img.header["descrip"] = descrip[:79].encode()
    tmp = atomic_path(path)
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
