"""The seed and conditions of every sample of a `medldm sample` run: its plan.

A plan comes from one set of ``--condition`` pairs for all samples, from a CSV with a row per sample
(``--conditions``), or from a real dataset's labels (``--like``): ages, sexes and diagnoses drawn together, row by
row, so that a synthetic cohort has the real one's joint label distribution. Sample i's row depends only on i and the
seed (never on ``--num``), so a run extended or resumed to more samples keeps the samples it already has. Every row
is checked against what the model was trained on before any sampling, and an error lists the offending rows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medldm.data.dataset import read_manifest
from medldm.errors import InputError, not_utf8
from medldm.models.conditioning import ConditionEncoder, UnitRangeConditions, parse_labels

# --like draws from one split ("all": train, val and test; QC-excluded scans never)
LIKE_SPLITS = ("train", "val", "test", "all")
# mixed into the seed of each draw, so the draws are not the sample noise's own random stream
_DRAW_STREAM = 0x10C0
_SPLIT_STREAM = 0x5917
MAX_LISTED = 10  # offending rows named in one error


@dataclass(frozen=True)
class Cohort:
    """Where each sample's conditions come from: ``condition`` pairs for all, a ``file``, or a dataset to be ``like``
    (its ``split``, filtered by ``where`` pairs: ``diagnosis=AD``, ``diagnosis=AD,MCI``, ``age=70:80``)."""

    condition: Mapping[str, str] = field(default_factory=dict)
    file: Path | None = None
    like: Path | None = None
    split: str = "train"
    where: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.file is not None and self.like is not None:
            raise InputError("--conditions and --like both set each sample's conditions: give one of them")
        if self.condition and (self.file is not None or self.like is not None):
            raise InputError("--condition sets the same conditions for every sample; with --conditions FILE or "
                             "--like DATASET give them there (--like ... --where KEY=VALUE to select rows)")
        if self.like is None and (self.where or self.split != "train"):
            raise InputError("--where and --split select rows of --like DATASET: add --like")
        if self.split not in LIKE_SPLITS:
            raise InputError(f"--split {self.split!r}: use one of {', '.join(LIKE_SPLITS)}")

    def describe(self) -> dict[str, Any]:
        """What the plan was made from, as recorded in sampling.json."""
        if self.file is not None:
            return {"source": "conditions_file", "file": str(self.file.resolve())}
        if self.like is not None:
            return {"source": "like", "dataset": str(self.like.resolve()), "split": self.split,
                    "where": dict(self.where), "draw": "each label row used equally often: cycle k of the matching "
                                                      "rows in the order of a permutation seeded by (seed, k)"}
        return {"source": "condition", "condition": dict(self.condition)}


@dataclass(frozen=True)
class PlannedSample:
    index: int
    seed: int
    labels: dict[str, Any]  # validated conditions (an absent key is unknown)


def plan_samples(cohort: Cohort, conditions: ConditionEncoder | UnitRangeConditions, num: int | None, seed: int
                 ) -> list[PlannedSample]:
    """The ``num`` samples of a run (``num`` None: 4, or every row of a conditions file); sample i's seed is
    ``seed + i`` unless the file gives one."""
    if seed < 0:
        raise InputError(f"--seed {seed}: use a number >= 0")
    seeds: list[int | None]
    if cohort.file is not None:
        rows, seeds, where = _read_conditions(cohort.file, conditions.keys, num)
    elif cohort.like is not None:
        if not conditions.keys:
            raise InputError(f"--like {cohort.like}: this model is unconditional, so there are no labels to draw; "
                             "use --num alone")
        rows, where = _draw_like(cohort, conditions.keys, 4 if num is None else num, seed)
        seeds = [None] * len(rows)
    else:
        rows = [dict(cohort.condition)] * (4 if num is None else num)
        seeds, where = [None] * len(rows), ["--condition"] * len(rows)
    if not rows:
        raise InputError("--num must be >= 1")
    planned, errors = [], []
    for i, (row, row_seed, source) in enumerate(zip(rows, seeds, where)):
        try:
            labels = parse_labels(conditions, row, source)
        except InputError as e:
            errors.append(str(e))
            continue
        planned.append(PlannedSample(i, seed + i if row_seed is None else row_seed, labels))
    if errors:
        if cohort.file is None and cohort.like is None:
            raise InputError(errors[0])
        hint = ("fix or remove those rows" if cohort.file is not None else
                "select rows the model was trained on with --where (e.g. age=LOW:HIGH) or another --split")
        raise InputError(f"{len(errors)} of {len(rows)} rows ask for what the model was not trained on ({hint}): "
                         + "; ".join(errors[:MAX_LISTED]) + (" …" if len(errors) > MAX_LISTED else ""))
    return planned


def _read_conditions(path: Path, keys: Sequence[str], num: int | None
                     ) -> tuple[list[dict[str, str]], list[int | None], list[str]]:
    """The rows of a ``--conditions`` CSV (columns: any of the model's conditions, and ``seed``)."""
    if not path.is_file():
        raise FileNotFoundError(f"--conditions {path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            table = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    unknown = [c for c in columns if c not in keys and c != "seed"]
    if unknown or not columns:
        raise InputError(f"--conditions {path}: column(s) {unknown or '(none)'} are not conditions of this model; "
                         f"its columns can be {[*keys, 'seed'] if keys else ['seed']} (one row per sample, an empty "
                         "cell is an unknown condition)")
    if num is not None:
        if num > len(table):
            raise InputError(f"--num {num}: --conditions {path} has only {len(table)} rows (one per sample); "
                             "leave --num out to sample every row")
        table = table[:num]
    rows: list[dict[str, str]] = []
    seeds: list[int | None] = []
    where: list[str] = []
    errors: list[str] = []
    first_line: dict[int, int] = {}
    for line, r in enumerate(table, start=2):  # line 1 is the header
        where.append(f"--conditions {path.name} line {line}:")
        rows.append({k: v for k, v in r.items() if k != "seed" and v != ""})
        raw = r.get("seed", "")
        if raw == "":
            seeds.append(None)
            continue
        try:
            value = int(raw)
            if value < 0:
                raise ValueError
        except ValueError:
            errors.append(f"line {line}: seed {raw!r} is not a whole number >= 0")
            seeds.append(None)
            continue
        if value in first_line:
            errors.append(f"line {line}: seed {value} is already on line {first_line[value]} (files are named by seed)")
        first_line.setdefault(value, line)
        seeds.append(value)
    given = [s for s in seeds if s is not None]
    if given and len(given) < len(seeds):
        errors.append("the seed column is empty on some rows: give every row a seed or none (then row i gets "
                      "--seed + i)")
    if errors:
        raise InputError(f"--conditions {path}: " + "; ".join(errors[:MAX_LISTED]))
    return rows, seeds, where


def _draw_like(cohort: Cohort, keys: Sequence[str], num: int, seed: int) -> tuple[list[dict[str, str]], list[str]]:
    """``num`` label rows of ``cohort.like``'s manifest; cycle k through the matching rows uses a permutation
    seeded by (seed, k), so every row is used equally often and sample i's row does not depend on ``num``."""
    assert cohort.like is not None
    manifest = read_manifest(cohort.like)
    pool = [r for r in manifest
            if (r["split"] == cohort.split or (cohort.split == "all" and r["split"] in ("train", "val", "test")))]
    in_split = len(pool)
    for key, wanted in cohort.where.items():
        if manifest and key not in manifest[0]:
            raise InputError(f"--where {key}={wanted}: {cohort.like / 'manifest.csv'} has no column {key!r} "
                             f"(its columns: {', '.join(manifest[0])})")
        test = _matcher(key, wanted)
        pool = [r for r in pool if test(r.get(key))]
    if not pool:
        selected = f"split {cohort.split!r}" + "".join(f", {k}={v}" for k, v in cohort.where.items())
        raise InputError(f"--like {cohort.like}: no scan matches {selected} ({in_split} in the split before --where); "
                         "check the values in its manifest.csv")
    perms: dict[int, np.ndarray] = {}
    rows, where = [], []
    for i in range(num):
        cycle, k = divmod(i, len(pool))
        if cycle not in perms:
            perms[cycle] = np.random.default_rng([seed, cycle, _DRAW_STREAM]).permutation(len(pool))
        r = pool[int(perms[cycle][k])]
        rows.append({key: _text(r[key]) for key in keys if r.get(key) is not None})
        where.append(f"--like {cohort.like.name}, {r['image']}:")
    return rows, where


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _matcher(key: str, wanted: str) -> Any:
    """A test of a manifest value: ``LOW:HIGH`` (inclusive, either side open) or ``A,B`` (any of)."""
    if ":" in wanted:
        lo_text, hi_text = wanted.split(":", 1)
        try:
            lo = float(lo_text) if lo_text.strip() else -math.inf
            hi = float(hi_text) if hi_text.strip() else math.inf
        except ValueError:
            raise InputError(f"--where {key}={wanted}: a range is LOW:HIGH in numbers (e.g. age=70:80)") from None

        def in_range(value: Any) -> bool:
            try:
                return value is not None and lo <= float(value) <= hi
            except ValueError:
                return False
        return in_range
    allowed = {v.strip().upper() for v in wanted.split(",")}
    return lambda value: value is not None and _text(value).upper() in allowed


def assign_split(index: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of synthetic sample ``index`` in a dataset of samples: a seeded draw per sample, so it does not
    depend on how many samples there are."""
    u = np.random.default_rng([seed, index, _SPLIT_STREAM]).random()
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def plan_rows(plan: Sequence[PlannedSample], keys: Sequence[str]) -> list[dict[str, Any]]:
    """plan.csv's rows: index, seed and one column per condition (empty: unknown)."""
    return [{"index": p.index, "seed": p.seed, **{k: _text(p.labels[k]) if k in p.labels else "" for k in keys}}
            for p in plan]
