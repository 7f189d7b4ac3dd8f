"""Subject-level train/val/test splits: every scan of a subject lands in the same split, on every rerun."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np

SPLITS = ("train", "val", "test")


def assign_splits(
    subjects: Mapping[str, str | None],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: bool = True,
    previous: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Map each subject id (-> its diagnosis, or None) to train/val/test, deterministically for a seed.

    With ``stratify`` each diagnosis is split on its own, so every split keeps the cohort's diagnosis mix.
    Subjects in ``previous`` (an earlier run's manifest) keep their split; only new subjects are drawn.
    """
    previous = {s: v for s, v in (previous or {}).items() if s in subjects and v in SPLITS}
    new = sorted(s for s in subjects if s not in previous)
    groups: dict[str | None, list[str]] = defaultdict(list)
    for s in new:
        groups[subjects[s] if stratify else None].append(s)
    out = dict(previous)
    rng = np.random.default_rng(seed)
    for key in sorted(groups, key=str):
        members = groups[key]
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_test, n_val = _counts(n, val_fraction, test_fraction)
        for rank, s in enumerate(order):
            out[s] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    def count(fraction: float) -> int:
        # a requested split gets at least one subject once there are enough to keep training alive
        k = int(round(fraction * n))
        return max(k, 1) if fraction > 0 and n >= 3 else k

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n_test + n_val >= n:
        n_test, n_val = (1 if test_fraction > 0 and n >= 2 else 0), 0
    return n_test, n_val
