"""The preprocessed dataset on disk: manifest.csv, preprocess.json and images/ (documented in the README)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset
from monai.transforms import Compose, EnsureTyped, LoadImaged
from torch.utils.data import Dataset

from medldm.data.io import load_volume, read_json
from medldm.errors import InputError, not_utf8

# split is train, val, test, or excluded (a scan that failed QC: listed, never trained or evaluated on)
MANIFEST_COLUMNS = ("subject_id", "session", "image", "age", "sex", "diagnosis", "split", "qc_status", "tiv_ml",
                    "source", "source_sha256")
# what every stage reads from each row (the rest may be empty or, in older manifests, absent)
REQUIRED_COLUMNS = ("subject_id", "session", "image", "split")


def read_manifest(data_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``manifest.csv``; age becomes float or None, empty labels become None."""
    path = Path(data_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} the output of `medldm preprocess`?")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing}; a manifest written by `medldm preprocess` has "
                                 f"{list(MANIFEST_COLUMNS)} (rerun it with --assemble to rewrite the manifest)")
            rows = []
            row: dict[str, Any]  # the CSV's strings, then age as a float and empty labels as None
            for line, row in enumerate(reader, start=2):
                row = {k: (v if v != "" else None) for k, v in row.items()}
                for column in REQUIRED_COLUMNS[:3]:
                    if row[column] is None:
                        raise InputError(f"{path} line {line}: empty {column}")
                if (age := row.get("age")) is not None:
                    try:
                        row["age"] = float(age)
                    except ValueError:
                        row["age"] = math.nan
                    if not math.isfinite(row["age"]):
                        raise InputError(f"{path} line {line} ({row['image']}): age {age!r} is not a number of years; "
                                         "correct it or leave it empty (unknown)")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    return rows


def read_dataset_info(data_dir: str | Path) -> dict[str, Any]:
    """``preprocess.json``: the preprocessing config, versions and the reference space."""
    path = Path(data_dir) / "preprocess.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} the output of `medldm preprocess`?")
    return read_json(path)


def split_rows(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["split"] == split]


def volume_dataset(data_dir: str | Path, rows: list[dict[str, Any]], cache_rate: float = 1.0) -> Dataset:
    """Dataset of ``{"image": (1, X, Y, Z) float32}`` for the given manifest rows; ``cache_rate`` of them in memory.

    A listed image that is missing is refused before anything is read (all of them named), and one that cannot be
    read is an :class:`InputError` that names it, where MONAI's loader would raise "applying transform …"."""
    data_dir = Path(data_dir)
    items: list[dict[str, Any]] = [{"image": str(data_dir / r["image"]), "index": i} for i, r in enumerate(rows)]
    missing = [it["image"] for it in items if not Path(it["image"]).is_file()]
    if missing:
        raise InputError(f"{data_dir / 'manifest.csv'} lists {len(missing)} image(s) that are not there: "
                         f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; rerun `medldm preprocess` "
                         "into this dataset dir (it redoes what is missing)")
    transform = Compose([
        LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ])
    try:
        cached = CacheDataset(items, transform=transform, cache_rate=cache_rate, progress=False)
    except Exception as e:  # MONAI wraps the reader's error in RuntimeError("applying transform"); find the file
        for it in items:
            _readable(it["image"], e)
        raise
    return _FileNamedErrors(cached, items)


def _readable(path: str, error: BaseException) -> None:
    try:
        load_volume(path)
    except InputError as bad:
        raise InputError(f"{bad}; rerun `medldm preprocess` into this dataset dir to write it again") from error


class _FileNamedErrors(Dataset):
    """A dataset whose loading errors name the volume (it is read lazily when not cached)."""

    def __init__(self, dataset: CacheDataset, items: list[dict[str, Any]]) -> None:
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as e:  # the same search as at construction, for a volume read only now
            _readable(self.items[index]["image"], e)
            raise
