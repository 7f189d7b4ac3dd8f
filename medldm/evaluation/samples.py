"""The synthetic volumes `medldm evaluate` scores: checked from their NIfTI headers, read one at a time when used.

A cohort of ten thousand samples does not fit in memory (5 MB each at 128x160x128 in float16), so nothing here
holds more than a few volumes: every file is refused or accepted on its header before any long work, and the
evaluation reads each volume when it scores it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, cast, overload

import nibabel as nib
import numpy as np
import torch

from medldm.data.io import load_volume, visible
from medldm.errors import InputError

# volumes a SampleVolumes keeps: the two sides of a batch of diversity pairs (pairwise_similarity's batch_size 8)
CACHE = 16


def sample_files(dirs: Sequence[Path], reference: dict[str, Any]) -> list[Path]:
    """The synthetic NIfTI files of sample dirs; refused unless every one has the dataset's shape, spacing and
    orientation (read from the headers: the voxels are read when a volume is used)."""
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"--samples {', '.join(missing)}: no such folder")
    files = [f for d in dirs for f in visible(d, "*.nii.gz")]
    spacing = np.linalg.norm(np.asarray(reference["affine"])[:3, :3], axis=0)
    axes = nib.aff2axcodes(np.asarray(reference["affine"]))
    bad = []
    for f in files:
        shape, affine = _header(f)
        # same shape, spacing and voxel-axis directions, or arrays would be compared mirrored or transposed
        if shape != list(reference["shape"]) or nib.aff2axcodes(affine) != axes or not np.allclose(
                np.linalg.norm(affine[:3, :3], axis=0), spacing, atol=1e-3):
            bad.append(f"{f} ({shape}, {''.join(nib.aff2axcodes(affine))} at "
                       f"{np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()} mm)")
    if bad:
        raise InputError(f"--samples: {', '.join(bad[:5])}{f' and {len(bad) - 5} more' if len(bad) > 5 else ''} do "
                         f"not match the dataset's {reference['shape']}, {''.join(axes)} at "
                         f"{np.round(spacing, 3).tolist()} mm; evaluation never resamples: sample from a model of this "
                         "dataset (or preprocess the data to the model's grid)")
    return files


def _header(path: Path) -> tuple[list[int], np.ndarray]:
    """Shape (trailing length-1 axes dropped, as load_volume drops them) and affine, from the header alone."""
    try:
        img = cast("nib.spatialimages.SpatialImage", nib.load(str(path)))
        shape, affine = list(img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types for truncated or corrupt files
        raise InputError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return shape, affine


def read_sample(path: Path) -> torch.Tensor:
    """One synthetic volume as a (1, X, Y, Z) float16 tensor; a blank one is counted (implausible), not refused."""
    # float16, as the real volumes are held: the scores have the same rounding whichever set a volume is in
    return torch.from_numpy(load_volume(path, allow_empty=True)[0])[None].half()


class SampleVolumes(Sequence[torch.Tensor]):
    """Sample files as a sequence of volumes, each read when indexed; the last ``CACHE`` read are kept."""

    def __init__(self, files: Sequence[Path], cache: int | None = None) -> None:
        self.files = paths = list(files)
        self.cache = CACHE if cache is None else cache
        # over ``paths``, not ``self``: no reference cycle, so the cached volumes go when the sequence goes; and
        # read_sample looked up at call time, so a test can count the reads
        self._read = lru_cache(maxsize=self.cache)(lambda i: read_sample(paths[i]))

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return self._read(index % len(self))

    def __iter__(self) -> Iterator[torch.Tensor]:
        # one pass reads each volume once and keeps none: the cache is for the pairs, which revisit volumes
        return (read_sample(f) for f in self.files)

    def subset(self, indices: Sequence[int]) -> SampleVolumes:
        """The volumes at ``indices``, read on demand as well."""
        return SampleVolumes([self.files[i] for i in indices], self.cache)
