"""Find the scans in a download (ADNI IDA tree or a flat folder + CSV) and attach their labels."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

from medldm.errors import InputError, not_utf8

_T = TypeVar("_T")

_PTID = re.compile(r"^\d{3}_S_\d{4}$")
_IMAGE_ID = re.compile(r"^I\d+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_VISCODE = re.compile(r"^(bl|sc|m\d+)$")
_IDA_REQUIRED = ("Image Data ID", "Group", "Sex", "Age")
_FLAT_REQUIRED = ("subject_id", "file")
_ADNIMERGE_REQUIRED = ("PTID", "VISCODE", "EXAMDATE", "AGE", "PTGENDER", "DX", "DX_bl")
_ADNIMERGE_MAX_DAYS = 180  # a scan further than this from every exam of its subject belongs to no visit
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_LAYOUTS = ("an ADNI download tree (input_dir/ADNI/<PTID>/<Description>/<date>/<ImageID>/ or "
            "input_dir/<PTID>/..., PTID like 002_S_0295), or a flat folder with a CSV that has columns "
            "subject_id and file (participants.csv or --metadata)")


@dataclass
class ScanRecord:
    """One scan and its labels; labels the download does not give are None."""

    subject_id: str
    session: str  # ADNI: VISCODE (bl, m12) if known, else the acquisition date YYYY-MM-DD; flat: 'session' or "bl"
    path: Path  # a NIfTI file, or a folder holding a DICOM series
    image_id: str  # ADNI image id (I13722); flat layout: the file name without its NIfTI suffix
    age: float | None  # at the scan, in years
    sex: str | None  # "M" / "F"
    diagnosis: str | None  # the raw group/diagnosis text; mapping to CN/MCI/AD happens in preprocess
    description: str = ""
    acquisition_date: str | None = None  # YYYY-MM-DD; ADNI only


@dataclass
class Discovery:
    """What discover_scans found: usable scans, (where, why) for scans left out and for labels left None."""

    scans: list[ScanRecord]
    skipped: list[tuple[str, str]]
    warnings: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Visit:
    """One ADNIMERGE row, parsed; unreadable fields are None."""

    where: str  # file and row number, for warnings
    viscode: str
    exam_date: dt.date | None
    baseline_age: float | None
    sex: str | None
    diagnosis: str | None


@dataclass(frozen=True)
class _Candidate:
    """An ADNI scan before one-scan-per-visit: the record plus what ranks it against its visit's other scans."""

    scan: ScanRecord
    folder: Path  # the image-id folder, named in skip reasons
    ida_type: str
    pattern_rank: int


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # utf-8-sig: spreadsheets often save a byte-order mark that would otherwise stick to the first column name
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    return header, rows


def _require_columns(path: Path, header: list[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; found {header}")


def _parse_age(text: str) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"age {text!r} is not a number") from None


def _parse_sex(text: str) -> str | None:
    if not text:
        return None
    if text.lower() not in _SEX:
        raise InputError(f"sex {text!r} is not one of M, F, male, female")
    return _SEX[text.lower()]


def _parse_date(text: str) -> dt.date | None:
    """A date as ADNIMERGE (YYYY-MM-DD) or IDA and spreadsheets (M/D/YYYY) write it."""
    if not text:
        return None
    for layout in ("%Y-%m-%d", "%m/%d/%Y"):
        try:
            return dt.datetime.strptime(text, layout).date()
        except ValueError:
            pass
    raise InputError(f"date {text!r} is neither YYYY-MM-DD nor M/D/YYYY")


def _parse_or_warn(parse: Callable[[str], _T | None], text: str, where: str,
                   warnings: list[tuple[str, str]]) -> _T | None:
    """parse(text), or None and a warning: one unreadable label should not cost the whole scan."""
    try:
        return parse(text)
    except ValueError as e:
        warnings.append((where, f"{e}; left empty"))
        return None


def _pattern_rank(description: str, patterns: Sequence[str]) -> int | None:
    """Index of the first pattern the description contains (0 when there are none); None if it contains none."""
    if not patterns:
        return 0
    # IDA turns spaces in the series description into '_' in folder names; users type either form
    names = {description.lower(), description.replace("_", " ").lower(), description.replace("_", "-").lower()}
    return next((i for i, p in enumerate(patterns) if any(p.lower() in name for name in names)), None)


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


def _adnimerge_rows(path: Path) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """ADNIMERGE rows by PTID, each with where it came from; parsed later, only for subjects in the download."""
    header, rows = _read_csv(path)
    _require_columns(path, header, _ADNIMERGE_REQUIRED)
    by_subject: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for number, row in enumerate(rows, start=2):  # row numbers as a spreadsheet shows them: the header is row 1
        by_subject.setdefault(row["PTID"], []).append((f"{path.name} row {number}", row))
    return by_subject


def _parse_visits(rows: list[tuple[str, dict[str, str]]], warnings: list[tuple[str, str]]) -> list[_Visit]:
    return [_Visit(where, row["VISCODE"], _parse_or_warn(_parse_date, row["EXAMDATE"], where, warnings),
                   _parse_or_warn(_parse_age, row["AGE"], where, warnings),
                   _parse_or_warn(_parse_sex, row["PTGENDER"], where, warnings),
                   row["DX"] or row["DX_bl"] or None)
            for where, row in rows]


def _match_visit(visits: list[_Visit], session: str, acquired: dt.date | None) -> _Visit | None:
    """The visit of a scan: by VISCODE when the session is one ADNIMERGE has, else the nearest exam date."""
    if _VISCODE.match(session):
        match = next((v for v in visits if v.viscode == session), None)
        if match is not None:
            return match
    # screening scans (sc) and scans without a Visit in the collection CSV get here
    dated = [v for v in visits if v.exam_date is not None]
    if acquired is None or not dated:
        return None
    # every visit in `dated` has an exam date
    nearest = min(dated, key=lambda v: abs((cast(dt.date, v.exam_date) - acquired).days))
    return nearest if abs((cast(dt.date, nearest.exam_date) - acquired).days) <= _ADNIMERGE_MAX_DAYS else None


def _age_at_visit(visit: _Visit, visits: list[_Visit], warnings: list[tuple[str, str]]) -> float | None:
    """ADNIMERGE's AGE is the age at baseline: add the time from the baseline exam to this one."""
    if visit.baseline_age is None or visit.viscode == "bl":
        return visit.baseline_age
    baseline = next((v.exam_date for v in visits if v.viscode == "bl"), None)
    if baseline is None or visit.exam_date is None:
        warnings.append((visit.where, "no readable EXAMDATE for this visit or its subject's bl visit; "
                                      "age at scan left empty"))
        return None
    return round(visit.baseline_age + (visit.exam_date - baseline).days / 365.25, 2)


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


def _adni_candidates(root: Path, labels: dict[str, dict[str, str]],
                     merge: dict[str, list[tuple[str, dict[str, str]]]] | None, description_patterns: Sequence[str],
                     skipped: list[tuple[str, str]], warnings: list[tuple[str, str]]) -> list[_Candidate]:
    """Every usable scan in the tree with its labels: ADNIMERGE's where it has them, the collection CSV's else."""
    candidates = []
    for subject_dir in sorted(root.iterdir()):
        if not subject_dir.is_dir():
            continue
        if not _PTID.match(subject_dir.name):
            skipped.append((str(subject_dir), "not an ADNI subject folder (expected a PTID like 002_S_0295)"))
            continue
        image_dirs = sorted(p for p in subject_dir.glob("*/*/*") if p.is_dir())
        if not image_dirs:
            skipped.append((str(subject_dir), "no <Description>/<date>/<ImageID> folders inside"))
        visits = None if merge is None else _parse_visits(merge.get(subject_dir.name, []), warnings)
        for image_dir in image_dirs:
            description, date = image_dir.parent.parent.name, image_dir.parent.name
            if not _IMAGE_ID.match(image_dir.name):
                skipped.append((str(image_dir), "not an ADNI image folder (expected an image id like I13722)"))
                continue
            rank = _pattern_rank(description, description_patterns)
            if rank is None:
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
            where = f"{image_dir} (collection CSV row for {image_dir.name})"
            age = _parse_or_warn(_parse_age, row.get("Age", ""), where, warnings)
            sex = _parse_or_warn(_parse_sex, row.get("Sex", ""), where, warnings)
            diagnosis = row.get("Group") or None
            # the folder date is always there; the CSV's Acq Date only where the download came with one
            acquired = (_parse_or_warn(_parse_date, date[:10], str(image_dir), warnings) if _DATE.match(date)
                        else _parse_or_warn(_parse_date, row.get("Acq Date", ""), where, warnings))
            session = row.get("Visit") or (acquired.isoformat() if acquired else date)
            if visits is not None:
                visit = _match_visit(visits, session, acquired)
                if visit is None:
                    warnings.append((str(image_dir), f"no ADNIMERGE visit of {subject_dir.name} has VISCODE "
                                                     f"{session!r} or an EXAMDATE within {_ADNIMERGE_MAX_DAYS} days "
                                                     f"of {acquired}; labels from the collection CSV only"))
                else:
                    session = visit.viscode
                    visit_age = _age_at_visit(visit, visits, warnings)
                    age = visit_age if visit_age is not None else age
                    sex, diagnosis = visit.sex or sex, visit.diagnosis or diagnosis
            scan = ScanRecord(subject_dir.name, session, path, image_dir.name, age, sex, diagnosis, description,
                              acquired.isoformat() if acquired else None)
            candidates.append(_Candidate(scan, image_dir, row.get("Type", ""), rank))
    return candidates


def _one_per_visit(candidates: list[_Candidate], preferred_types: Sequence[str],
                   skipped: list[tuple[str, str]]) -> list[ScanRecord]:
    """Keep the best scan of each subject-visit: preferred IDA Type, then description pattern, then lowest id."""
    types = [t.lower() for t in preferred_types]
    by_visit: dict[tuple[str, str], list[_Candidate]] = {}
    for candidate in candidates:
        by_visit.setdefault((candidate.scan.subject_id, candidate.scan.session), []).append(candidate)
    kept = []
    for (subject, session), group in by_visit.items():
        group.sort(key=lambda c: (types.index(c.ida_type.lower()) if c.ida_type.lower() in types else len(types),
                                  c.pattern_rank, int(c.scan.image_id[1:])))
        kept.append(group[0].scan)
        skipped.extend((str(c.folder), f"another scan of {subject} {session} kept: {group[0].scan.image_id}")
                       for c in group[1:])
    return kept


def _discover_adni(root: Path, input_dir: Path, metadata: Path | None, adnimerge: Path | None,
                   description_patterns: Sequence[str], preferred_types: Sequence[str],
                   one_scan_per_visit: bool) -> Discovery:
    labels = _ida_rows(input_dir, metadata)
    if adnimerge is None and (input_dir / "ADNIMERGE.csv").is_file():
        adnimerge = input_dir / "ADNIMERGE.csv"
    merge = None if adnimerge is None else _adnimerge_rows(adnimerge)
    skipped: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    candidates = _adni_candidates(root, labels, merge, description_patterns, skipped, warnings)
    if one_scan_per_visit:
        scans = _one_per_visit(candidates, preferred_types, skipped)
    else:
        scans = [c.scan for c in candidates]
    # two scans of one visit meet the same unreadable ADNIMERGE row: say so once
    return Discovery(scans, skipped, list(dict.fromkeys(warnings)))


def _discover_flat(csv_path: Path) -> Discovery:
    header, rows = _read_csv(csv_path)
    _require_columns(csv_path, header, _FLAT_REQUIRED)
    scans: list[ScanRecord] = []
    skipped: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
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
        seen.add((subject, session))
        where = f"{where} (subject {subject})"
        age = _parse_or_warn(_parse_age, row.get("age", ""), where, warnings)
        sex = _parse_or_warn(_parse_sex, row.get("sex", ""), where, warnings)
        scans.append(ScanRecord(subject, session, path, _strip_nifti_suffix(path.name), age, sex,
                                row.get("diagnosis") or None))
    return Discovery(scans, skipped, warnings)


def discover_scans(input_dir: str | Path, metadata: str | Path | None = None,
                   description_patterns: Sequence[str] = (), adnimerge: str | Path | None = None,
                   preferred_types: Sequence[str] = (), one_scan_per_visit: bool = True) -> Discovery:
    """Find the scans under input_dir (ADNI download tree or flat folder + CSV) and attach their labels.

    metadata: the IDA collection CSV (ADNI) or the subject_id/file CSV (flat); found in input_dir if None.
    description_patterns: keep ADNI series whose description contains any of them (case-insensitive); an
        earlier pattern is preferred when a visit has several scans.
    adnimerge: ADNIMERGE.csv, whose visit, age, sex and diagnosis take precedence over the collection CSV's
        (ADNI only); input_dir/ADNIMERGE.csv is used if None and it exists.
    preferred_types: IDA Types (Original, Processed, ...), most wanted first, to choose among a visit's scans.
    one_scan_per_visit: keep one scan per ADNI subject and session (the rest go to `skipped`); a flat CSV
        always gives one per subject and session.
    """
    for name, value in (("description_patterns", description_patterns), ("preferred_types", preferred_types)):
        if isinstance(value, str):  # a bare string would be read as a sequence of one-letter patterns
            raise InputError(f"{name} must be a sequence of strings, got the string {value!r}")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"input_dir {input_dir} is not a directory")
    metadata = None if metadata is None else Path(metadata)
    if metadata is not None and not metadata.is_file():
        raise InputError(f"metadata file {metadata} does not exist")
    adnimerge = None if adnimerge is None else Path(adnimerge)
    if adnimerge is not None and not adnimerge.is_file():
        raise InputError(f"adnimerge file {adnimerge} does not exist")
    root = _adni_root(input_dir)
    if root is not None:
        found = _discover_adni(root, input_dir, metadata, adnimerge, description_patterns, preferred_types,
                               one_scan_per_visit)
    else:
        csv_path = metadata or input_dir / "participants.csv"
        if not csv_path.is_file():
            raise InputError(f"{input_dir} holds neither layout; expected {_LAYOUTS}")
        if adnimerge is not None:
            raise InputError(f"adnimerge applies to ADNI download trees only; {input_dir} is a flat folder")
        found = _discover_flat(csv_path)
    found.scans.sort(key=lambda s: (s.subject_id, s.session, s.image_id))
    return found
