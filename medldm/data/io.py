"""Reading and writing volumes with their real affine (NIfTI via nibabel, DICOM series via SimpleITK)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import locale
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np

from medldm.errors import InputError, not_utf8

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The name of a NIfTI file without .nii or .nii.gz (``sub-01.nii.gz`` -> ``sub-01``)."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def load_volume(path: str | Path, first_volume_of_4d: bool = False, allow_empty: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D scan as (float32 array, 4x4 RAS+ world affine); a folder is read as one DICOM series.

    Refuses, naming the file: unreadable files, 2D images, 4D images (unless ``first_volume_of_4d``),
    NaN/infinite voxels and all-zero images (unless ``allow_empty``: a blank synthetic volume is a result to count).
    """
    path = Path(path)
    if path.is_dir():
        data, affine = _load_dicom_series(path)
    elif not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
    else:
        try:
            # nib.load is typed as returning the base image class, which has no affine; a NIfTI is a SpatialImage
            img = cast("nib.spatialimages.SpatialImage", nib.load(str(path)))
            data = np.asanyarray(img.dataobj, dtype=np.float32)
        except Exception as e:  # nibabel raises many types for truncated or corrupt files
            raise InputError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None
        affine = img.affine.astype(np.float64)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if not first_volume_of_4d:
            raise InputError(f"{path}: a 4D image with {data.shape[-1]} volumes; set "
                             "preprocess.use_first_volume_of_4d=true to use its first volume")
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{path}: expected a 3D volume, got shape {list(data.shape)} (a 2D image?)")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: contains NaN or infinite voxels")
    if not allow_empty and not data.any():
        raise InputError(f"{path}: every voxel is zero")
    return data, affine


def _load_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk  # heavy; only preprocessing of DICOM downloads needs it

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series found (expected .dcm files of one image)")
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} DICOM series (mixed series); expected exactly one")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])  # sorted by slice position
    if len(files) < 2:
        raise InputError(f"{folder}: DICOM series has {len(files)} slice(s); a 3D scan needs more")
    _check_slice_positions(folder, files)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{folder}: DICOM series cannot be read ({e})") from None
    return from_sitk(image)


def _check_slice_positions(folder: Path, files: tuple[str, ...]) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing or duplicated slice)."""
    import SimpleITK as sitk

    positions = []
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        if not header.HasMetaDataKey("0020|0032"):
            raise InputError(f"{folder}: {Path(name).name} has no ImagePositionPatient; cannot order the slices")
        positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
    steps = np.linalg.norm(np.diff(np.array(positions), axis=0), axis=1)
    if steps.min() < 1e-3 or steps.max() > 1.5 * np.median(steps):
        where = int(np.argmax(steps)) if steps.max() > 1.5 * np.median(steps) else int(np.argmin(steps))
        raise InputError(f"{folder}: inconsistent slice spacing (slices {where} to {where + 1} are "
                         f"{steps[where]:.2f} mm apart, median {np.median(steps):.2f} mm): a slice is missing or "
                         "duplicated")


@contextmanager
def itk_threads(n: int) -> Iterator[int]:
    """Run SimpleITK filters created inside with ``n`` threads; yields the number there was before (put back on exit).

    Preprocessing runs N4 and each registration fit single-threaded: ITK adds up per-thread partial sums, so a
    result changed with the number of threads (N4: 1e-5) or even from run to run (Mattes MI), and registration
    magnifies such differences into other fits. With one thread a scan gives the same volume on any machine,
    with any --workers and in any --shard."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield before
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def from_sitk(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (x, y, z in LPS) -> (array in i, j, k order, RAS+ affine) as nibabel uses."""
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = nib.affines.from_matvec(direction * np.array(image.GetSpacing()), image.GetOrigin())
    return data, _LPS_TO_RAS @ lps


def to_sitk(data: np.ndarray, affine: np.ndarray, dtype: Any = np.float32) -> Any:
    """(array in i, j, k order, RAS+ affine) -> SimpleITK image of ``dtype`` with the same world geometry."""
    import SimpleITK as sitk

    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=dtype).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def new_uid() -> str:
    """A globally unique DICOM UID from a random UUID (the 2.25 root needs no registered organisation)."""
    return f"2.25.{uuid.uuid4().int}"


def save_dicom_series(folder: str | Path, data: np.ndarray, affine: np.ndarray, tags: dict[str, str]) -> list[Path]:
    """Write an integer volume as one classic MR DICOM series (one file per slice along the third axis).

    ``tags`` ("gggg|eeee" -> value) go into every slice (study/series UIDs, new ones when not given; patient and
    series description); each slice gets its own SOPInstanceUID, InstanceNumber and ImagePositionPatient. The
    folder appears complete or not at all. A left-handed affine is written with its third axis reversed, because DICOM
    readers take the slice normal as row x column: the world geometry is unchanged.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.integer) or data.ndim != 3:
        raise InputError(f"{folder}: DICOM export needs a 3D integer volume, got {data.dtype} {list(data.shape)}")
    affine = np.asarray(affine, dtype=np.float64)
    if np.linalg.det((_LPS_TO_RAS @ affine)[:3, :3]) < 0:
        data = data[:, :, ::-1]
        affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, data.shape[2] - 1], [0, 0, 0, 1]])
    image = to_sitk(data, affine, dtype=np.int16)
    # one study, series and frame of reference for all slices unless the caller names them, and every attribute the
    # MR Image IOD requires (checked with dciodvfy in tests/test_dicom_validity.py); the caller's tags win
    # (the study and series date and time too: GDCM would stamp each slice with its own clock time, and dcentvfy then
    # sees one study with several times)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    tags = {"0020|000d": new_uid(), "0020|000e": new_uid(), "0020|0052": new_uid(), **MR_IOD_DEFAULTS,
            "0008|0020": date, "0008|0030": time, "0008|0021": date, "0008|0031": time, **tags}
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))  # row, then column cosines
    thickness = f"{image.GetSpacing()[2]:.6f}"
    tmp = staging_dir(folder)
    files = []
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # our UIDs, not GDCM's
        for k in range(image.GetDepth()):
            # a one-slice 3D image keeps the slice spacing, which GDCM writes as SpacingBetweenSlices
            slice_ = image[:, :, k:k + 1]
            position = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
            for key, value in {**tags, "0008|0016": MR_IMAGE_STORAGE, "0008|0018": new_uid(),
                               "0020|0013": str(k + 1), "0020|0032": position, "0020|0037": orientation,
                               "0018|0050": thickness, "0018|0088": thickness}.items():
                slice_.SetMetaData(key, value)
            files.append(folder / f"IM{k + 1:04d}.dcm")
            writer.SetFileName(str(tmp / files[-1].name))
            with keep_locale():
                writer.Execute(slice_)
        # the old series goes aside (hidden) and is deleted only once the new one is in place: a crash in between
        # leaves whole series only, never a mix of old and new slices
        old = folder.parent / f".{folder.name}.{_WRITER}-{os.getpid()}.old.tmp"
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        _remove_left_behind(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


@contextmanager
def keep_locale() -> Iterator[None]:
    """Put the process locale back after GDCM's DICOM writer, which switches it to "C" and leaves it there: Python
    (and torch) would then read every text file after it as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"  # classic MR: every viewer and PACS reads it

# The MR Image IOD's required attributes that a volume without an acquisition cannot fill from its pixels: Type 2 ones
# left empty (present, unknown), Type 1 ones with the values the standard gives a derived image. PatientPosition
# (Type 2C for MR) is head first-supine, the position in which the patient (LPS) axes of ImageOrientationPatient are the
# scanner's, as the RAS+ affine assumes; BodyPartExamined names a structure that is not paired, so no Laterality.
MR_IOD_DEFAULTS = {
    "0008|0008": "DERIVED\\SECONDARY\\OTHER",  # ImageType: value 3 is required for MR; OTHER is a defined term
    "0008|0070": "",  # Manufacturer
    "0018|0015": "BRAIN",  # BodyPartExamined
    "0018|5100": "HFS",  # PatientPosition
    "0020|1040": "",  # PositionReferenceIndicator
    "0018|0020": "RM",  # ScanningSequence: research mode, no sequence to report
    "0018|0021": "NONE",  # SequenceVariant
    "0018|0022": "",  # ScanOptions
    "0018|0023": "3D",  # MRAcquisitionType
    "0018|0080": "", "0018|0081": "", "0018|0091": "",  # RepetitionTime, EchoTime, EchoTrainLength
    "0020|0010": "1", "0020|0011": "1",  # StudyID, SeriesNumber (a DICOMDIR needs them)
}

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def atomic_path(final: Path) -> Path:
    """A temporary sibling of ``final`` to write first and ``os.replace`` afterwards (it keeps ``final``'s suffixes, so
    writers that choose the format by name still do). Hidden, and named after this host and process, so that a rerun
    can remove what a killed writer left (:func:`atomic_write`) and no listing of outputs sees it (:func:`visible`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{_WRITER}-{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{''.join(final.suffixes)}"
    # created like any new file (mode 0666 less the umask; mkstemp would make it private), and never over another
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


@contextmanager
def atomic_write(final: str | Path) -> Iterator[Path]:
    """``with atomic_write(path) as tmp:`` write ``tmp``; it replaces ``path`` only when the block ends without an
    error. On any error (or a crash) ``path`` keeps its old content, or stays absent, and ``tmp`` is removed: a
    reader never sees half a file. Every file medldm writes goes through here."""
    tmp = atomic_path(Path(final))
    try:
        try:
            yield tmp
        except OSError as e:  # e.g. the disk filled while writing: the error names the file asked for
            if e.errno is not None and (e.filename is None or Path(e.filename) == tmp):
                raise type(e)(e.errno, e.strerror or os.strerror(e.errno), str(final)) from None
            raise
        try:
            os.replace(tmp, final)
        except OSError as e:  # name the file the user asked for, not the temporary one
            raise type(e)(e.errno, e.strerror, str(final)) from None
        _remove_left_behind(Path(final))
    finally:
        tmp.unlink(missing_ok=True)


_WRITER = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def staging_dir(final: Path) -> Path:
    """A new hidden folder beside ``final`` to write a multi-file result into and move in when it is complete
    (named like :func:`atomic_path`'s files, so a rerun removes one that a killed writer left)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.parent / f".{final.name}.{_WRITER}-{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    stage.mkdir()
    return stage


# folders this process has swept: once each, not at every write (a dataset's images/ holds thousands of files)
_SWEPT: set[Path] = set()


def _remove_left_behind(final: Path) -> None:
    """Remove, once per process and folder, the temporaries (files or staging folders) that killed writers on this
    host left beside ``final``: those whose process is gone."""
    folder = final.parent.resolve()
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    for tmp in folder.glob(f".*.{_WRITER}-*.tmp*"):
        pid = tmp.name.rsplit(f".{_WRITER}-", 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def visible(folder: str | Path, pattern: str) -> list[Path]:
    """``folder.glob(pattern)`` without hidden files (pathlib's ``*`` matches them): a temporary that a killed
    writer left is never read as an output."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith("."))


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        atomic_path(path).unlink()
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path.parent)) from None


def write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# integer storage: value = round(intensity in [0, 1] x levels); NIfTI readers get [0, 1] back through scl_slope
INTEGER_LEVELS = {"uint8": (np.uint8, 255), "int16": (np.int16, 4095)}


def to_integer(data: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] intensities as the stored integers of ``dtype`` (uint8: 0..255, int16: 0..4095, a 12-bit MR range)."""
    np_type, levels = INTEGER_LEVELS[dtype]
    return np.round(np.clip(data, 0, 1) * levels).astype(np_type)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, descrip: str | None = None,
                dtype: str = "float32") -> None:
    """Write a NIfTI with ``affine`` as both qform and sform (scanner space), atomically, with a fresh header
    (nothing from the source carried over). ``dtype`` uint8 or int16 stores [0, 1] data as integers
    (``to_integer``) with scl_slope 1/levels, which readers turn back into [0, 1]."""
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: refusing to write an invalid affine {affine.tolist()}")
    if dtype in INTEGER_LEVELS:
        img = nib.Nifti1Image(to_integer(data, dtype), affine)
        img.header.set_slope_inter(1 / INTEGER_LEVELS[dtype][1], 0.0)
    elif dtype == "float32":
        img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    else:
        raise InputError(f"{path}: unsupported dtype {dtype!r} (float32, int16 or uint8)")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if descrip is not None:
        img.header["descrip"] = descrip[:79].encode()
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))


def write_csv(path: str | Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    """Write a CSV atomically (a crash never leaves half a table)."""
    with atomic_write(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def content_sha256(*paths: str | Path) -> str:
    """SHA-256 of the content of ``paths`` read one after another: a file, or a folder's files in name order (a
    DICOM series). Of one file it is the file's usual SHA-256."""
    h = hashlib.sha256()
    for path in map(Path, paths):
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            if f.is_file():
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    """Read a JSON file medldm wrote; a damaged one is an ``InputError`` that names it (not "Expecting value")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: damaged JSON ({e}); rerun the command that wrote it, or restore the file") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
