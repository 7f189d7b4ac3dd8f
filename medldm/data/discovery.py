"""Find the scans in a download (ADNI IDA tree or a flat folder + CSV) and attach their labels."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_PTID = re.compile(r"^\d{3}_S_\d{4}$")
_IMAGE_ID = re.compile(r"^I\d+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_IDA_REQUIRED = ("Image Data ID", "Group", "Sex", "Age")
_FLAT_REQUIRED = ("subject_id", "file")
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_LAYOUTS = ("an ADNI download tree (input_dir/ADNI/<PTID>/<Description>/<date>/<ImageID>/ or "
            "input_dir/<PTID>/..., PTID like 002_S_0295), or a flat folder with a CSV that has columns "
            "subject_id and file (participants.csv or --metadata)")


@dataclass
class ScanRecord:
    """One scan and its labels; labels the download does not give are None."""

    subject_id: str
    session: str  # ADNI: Visit (bl, m12) if known, else the acquisition date YYYY-MM-DD; flat: 'session' or "bl"
    path: Path  # a NIfTI file, or a folder holding a DICOM series
    image_id: str  # ADNI image id (I13722); flat layout: the file name without its NIfTI suffix
    age: float | None
    sex: str | None  # "M" / "F"
    diagnosis: str | None  # the raw group/diagnosis text; mapping to CN/MCI/AD happens in preprocess
    description: str = ""


@dataclass
class Discovery:
    """What discover_scans found: usable scans, and (path or id, reason) for everything it had to leave out."""

    scans: list[ScanRecord]
    skipped: list[tuple[str, str]]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # utf-8-sig: spreadsheets often save a byte-order mark that would otherwise stick to the first column name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return header, rows


def _require_columns(path: Path, header: list[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {header}")


def _parse_age(text: str) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"age {text!r} is not a number") from None


def _parse_sex(text: str) -> str | None:
    if not text:
        return None
    if text.lower() not in _SEX:
        raise ValueError(f"sex {text!r} is not one of M, F, male, female")
    return _SEX[text.lower()]


def _description_matches(description: str, patterns: Sequence[str]) -> bool:
    # IDA turns spaces in the series description into '_' in folder names; users type either form
    names = {description.lower(), description.replace("_", " ").lower(), description.replace("_", "-").lower()}
    return not patterns or any(p.lower() in name for p in patterns for name in names)


def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _adni_root(input_dir: Path) -> Path | None:
    for root in (input_dir / "ADNI", input_dir):
        if root.is_dir() and any(_PTID.match(p.name) and p.is_dir() for p in root.iterdir()):
            return root
    return None


def _ida_rows(input_dir: Path, metadata: Path | None) -> dict[str, dict[str, str]]:
    """IDA collection rows by Image Data ID: from `metadata`, else from every top-level CSV that looks like one."""
    if metadata is not None:
        header, rows = _read_csv(metadata)
        _require_columns(metadata, header, _IDA_REQUIRED)
    else:
        rows = []
        for path in sorted(input_dir.glob("*.csv")):
            header, found = _read_csv(path)
            if "Image Data ID" in header:
                rows += found
    by_id: dict[str, dict[str, str]] = {}
    for row in rows:
        by_id.setdefault(row["Image Data ID"], row)  # a collection downloaded twice lists an image twice
    return by_id


def _image_path(image_dir: Path) -> tuple[Path | None, str]:
    """The scan in an ADNI image folder: (NIfTI file or the folder itself for DICOM, '') or (None, why not)."""
    files = [p for p in image_dir.iterdir() if p.is_file()]
    niftis = [p for p in files if p.name.endswith((".nii", ".nii.gz"))]
    if len(niftis) == 1:  # a NIfTI beside DICOMs is the conversion of the same series
        return niftis[0], ""
    if niftis:
        return None, f"{len(niftis)} NIfTI files in one image folder: {sorted(p.name for p in niftis)}"
    if any(p.suffix.lower() == ".dcm" for p in files):
        return image_dir, ""
    return None, "empty image folder" if not files else "no NIfTI (.nii, .nii.gz) or DICOM (.dcm) files"


def _discover_adni(root: Path, input_dir: Path, metadata: Path | None,
                   description_patterns: Sequence[str]) -> Discovery:
    labels = _ida_rows(input_dir, metadata)
    scans, skipped = [], []
    for subject_dir in sorted(root.iterdir()):
        if not subject_dir.is_dir():
            continue
        if not _PTID.match(subject_dir.name):
            skipped.append((str(subject_dir), "not an ADNI subject folder (expected a PTID like 002_S_0295)"))
            continue
        image_dirs = sorted(p for p in subject_dir.glob("*/*/*") if p.is_dir())
        if not image_dirs:
            skipped.append((str(subject_dir), "no <Description>/<date>/<ImageID> folders inside"))
        for image_dir in image_dirs:
            description, date = image_dir.parent.parent.name, image_dir.parent.name
            if not _IMAGE_ID.match(image_dir.name):
                skipped.append((str(image_dir), "not an ADNI image folder (expected an image id like I13722)"))
                continue
            if not _description_matches(description, description_patterns):
                skipped.append((str(image_dir), f"description {description!r} does not match any of "
                                                f"{list(description_patterns)}"))
                continue
            path, reason = _image_path(image_dir)
            if path is None:
                skipped.append((str(image_dir), reason))
                continue
            row = labels.get(image_dir.name, {})
            if (row.get("Subject") or subject_dir.name) != subject_dir.name:
                skipped.append((str(image_dir), f"the collection CSV gives {image_dir.name} to subject "
                                                f"{row['Subject']}, not {subject_dir.name}"))
                continue
            try:
                age, sex = _parse_age(row.get("Age", "")), _parse_sex(row.get("Sex", ""))
            except ValueError as e:
                skipped.append((str(image_dir), f"collection CSV row for {image_dir.name}: {e}"))
                continue
            session = row.get("Visit") or (date[:10] if _DATE.match(date) else date)
            scans.append(ScanRecord(subject_dir.name, session, path, image_dir.name, age, sex,
                                    row.get("Group") or None, description))
    return Discovery(scans, skipped)


def _discover_flat(csv_path: Path) -> Discovery:
    header, rows = _read_csv(csv_path)
    _require_columns(csv_path, header, _FLAT_REQUIRED)
    scans, skipped = [], []
    seen: set[tuple[str, str]] = set()
    # row numbers as a spreadsheet shows them: the header is row 1
    for number, row in enumerate(rows, start=2):
        where = f"{csv_path.name} row {number}"
        subject, file = row["subject_id"], row["file"]
        if not subject or not file:
            skipped.append((where, f"{where}: empty subject_id or file"))
            continue
        path = csv_path.parent / file  # an absolute `file` replaces the folder
        if not path.exists():
            skipped.append((str(path), f"file not found ({where}, subject {subject})"))
            continue
        session = row.get("session") or "bl"
        if (subject, session) in seen:
            skipped.append((where, f"{where}: duplicate subject {subject} session {session}; the earlier row is kept"))
            continue
        try:
            age, sex = _parse_age(row.get("age", "")), _parse_sex(row.get("sex", ""))
        except ValueError as e:
            skipped.append((where, f"{where}, subject {subject}: {e}"))
            continue
        seen.add((subject, session))
        scans.append(ScanRecord(subject, session, path, _strip_nifti_suffix(path.name), age, sex,
                                row.get("diagnosis") or None))
    return Discovery(scans, skipped)


def discover_scans(input_dir: str | Path, metadata: str | Path | None = None,
                   description_patterns: Sequence[str] = ()) -> Discovery:
    """Find the scans under input_dir (ADNI download tree or flat folder + CSV) and attach their labels.

    metadata: the IDA collection CSV (ADNI) or the subject_id/file CSV (flat); found in input_dir if None.
    description_patterns: keep ADNI series whose description contains any of them (case-insensitive).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ValueError(f"input_dir {input_dir} is not a directory")
    metadata = None if metadata is None else Path(metadata)
    if metadata is not None and not metadata.is_file():
        raise ValueError(f"metadata file {metadata} does not exist")
    root = _adni_root(input_dir)
    if root is not None:
        found = _discover_adni(root, input_dir, metadata, description_patterns)
    else:
        csv_path = metadata or input_dir / "participants.csv"
        if not csv_path.is_file():
            raise ValueError(f"{input_dir} holds neither layout; expected {_LAYOUTS}")
        found = _discover_flat(csv_path)
    found.scans.sort(key=lambda s: (s.subject_id, s.session, s.image_id))
    return found
