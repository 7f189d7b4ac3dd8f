"""Is a synthetic volume a copy of a training patient? Nearest training volume by SSIM, judged against real ones.

For every query volume (synthetic, and each real test volume as the yardstick) a cheap pre-filter (L2 distance of
volumes average-pooled by ``factor``) picks ``candidates`` training volumes; exact 3D SSIM on those picks the
nearest. A synthetic volume is flagged when it is closer to its nearest training volume than the given
percentile of the real test volumes' nearest-training SSIMs: a real unseen subject is the closest a
non-copy is expected to come.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medldm.errors import InputError
from medldm.evaluation.metrics import VolumeMetrics


def pooled(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """A (1, X, Y, Z) volume average-pooled by ``factor`` and flattened: the pre-filter's feature."""
    return F.avg_pool3d(volume[None].float(), factor, ceil_mode=True).flatten()


class NearestTraining:
    """Nearest training volume by SSIM for any query, without holding the training set in memory.

    ``load(i)`` returns training volume i as a (1, X, Y, Z) tensor; the pooled features of all of them are
    computed once (one pass, with a progress bar), full volumes are reloaded only as candidates (a few cached).
    ``measure`` (optional) is applied to every training volume in the same pass; its results are ``measured``.
    """

    def __init__(self, load: Callable[[int], torch.Tensor], count: int, metrics: VolumeMetrics, factor: int = 4,
                 candidates: int = 5, device: torch.device | str = "cpu",
                 measure: Callable[[torch.Tensor], Any] | None = None) -> None:
        if count < 1:
            raise InputError("memorisation check: the dataset has no training volumes to compare with")
        self.metrics, self.factor, self.k, self.device = metrics, factor, min(candidates, count), torch.device(device)
        self.load = lru_cache(maxsize=32)(load)
        self.measured: list[Any] = []
        features = []
        for i in tqdm(range(count), desc="training features", unit="volume"):
            volume = load(i)
            features.append(pooled(volume, factor))
            if measure is not None:
                self.measured.append(measure(volume))
        self.features = torch.stack(features).to(self.device)

    def __call__(self, volume: torch.Tensor, exclude: int | None = None) -> tuple[int, float]:
        """(index of the nearest training volume, its SSIM to ``volume``), never training volume ``exclude``."""
        volume = volume.to(self.device)
        distance = torch.nan_to_num(torch.cdist(pooled(volume, self.factor)[None], self.features)[0],
                                    nan=float("inf"))
        order = torch.argsort(distance).tolist()
        shortlist = [i for i in order if i != exclude][: self.k]
        if not shortlist:
            raise InputError("nearest training volume: no training volume left to compare with")
        ssims = [self.metrics.ssim_only(volume, self.load(i)) for i in shortlist]
        best = int(np.nanargmax(ssims)) if np.isfinite(ssims).any() else 0
        return shortlist[best], float(ssims[best])


def memorisation(synthetic: Sequence[torch.Tensor], real_test: Sequence[torch.Tensor], nearest: NearestTraining,
                 percentile: float = 99.0, reference_ssim: Sequence[float] | None = None,
                 reference: str = "the real test volumes") -> dict[str, Any]:
    """Nearest-training SSIM of every synthetic and real test volume, the threshold and the flagged samples.

    The threshold is the ``percentile`` of the real test volumes' nearest-training SSIM, or of ``reference_ssim``
    when given (``medldm evaluate`` passes real volumes through the samples' autoencoder: a decoded copy is as
    smooth as any sample). Non-finite values are left out."""
    if not real_test:
        raise InputError("memorisation check: needs real test volumes for the threshold")
    real = [nearest(v) for v in tqdm(real_test, desc="nearest training (real test)", unit="volume")]
    synth = [nearest(v) for v in tqdm(synthetic, desc="nearest training (synthetic)", unit="volume")]
    return flag_copies(synth, real, percentile, reference_ssim, reference)


def flag_copies(synthetic: Sequence[tuple[int, float]], real_test: Sequence[tuple[int, float]],
                percentile: float = 99.0, reference_ssim: Sequence[float] | None = None,
                reference: str = "the real test volumes") -> dict[str, Any]:
    """``memorisation`` from nearest-training results already found: (index, SSIM) of every synthetic and real test
    volume (``medldm evaluate`` finds the synthetic ones in its one pass over the samples)."""
    if not real_test:
        raise InputError("memorisation check: needs real test volumes for the threshold")
    raw = float(np.percentile([s for _, s in real_test], percentile))
    out: dict[str, Any] = {"percentile": percentile, "threshold_reference": reference}
    finite = [float(x) for x in (reference_ssim or []) if np.isfinite(x)]
    if reference_ssim is not None:
        out["threshold_ssim_raw_test"] = raw
    threshold = float(np.percentile(finite, percentile)) if finite else raw
    return {
        **out, "threshold_ssim": threshold,
        "real_test": [{"nearest_train": j, "ssim": s} for j, s in real_test],
        "synthetic": [{"nearest_train": j, "ssim": s, "flagged": s > threshold} for j, s in synthetic],
        "flagged": [i for i, (_, s) in enumerate(synthetic) if s > threshold],
    }
