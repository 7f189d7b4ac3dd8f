"""Subject-level train/val/test splits: every scan of a subject lands in the same split."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val", "test")


def assign_splits(subjects: Iterable[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Map each unique subject id to train/val/test, deterministically for a given seed."""
    unique = sorted(set(subjects))
    n = len(unique)
    order = np.random.default_rng(seed).permutation(n)

    def count(fraction: float) -> int:
        # a requested split gets at least one subject once there are enough to keep training alive
        k = int(round(fraction * n))
        return max(k, 1) if fraction > 0 and n >= 3 else k

    n_test = count(test_fraction)
    n_val = count(val_fraction)
    if n_test + n_val >= n:
        n_test, n_val = (1 if test_fraction > 0 else 0), 0
    split = {}
    for rank, idx in enumerate(order):
        split[unique[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split
