"""Image-similarity metrics on 3D volumes (MONAI SSIM, MS-SSIM, PSNR) and pairwise diversity."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from tqdm.auto import tqdm

from medldm.errors import InputError

# the standard five-scale MS-SSIM weights (Wang et al. 2003)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_scales(shape: Sequence[int], kernel_size: int) -> int:
    """The most scales (<= 5) that MS-SSIM can use on volumes of ``shape`` with this kernel."""
    n = 0
    for k in range(1, len(MS_SSIM_WEIGHTS) + 1):
        # the coarsest scale is 2^(k-1) smaller; MONAI checks against (k-1)^2, stricter for k=4: meet both
        div = max(2 ** (k - 1), (k - 1) ** 2)
        if all(s // div > kernel_size - 1 for s in shape):
            n = k
    if n == 0:
        raise InputError(f"volumes of shape {list(shape)} are too small for MS-SSIM with kernel_size={kernel_size}: "
                         f"every side needs at least {kernel_size} voxels; lower evaluate.kernel_size (odd, >= 3)")
    return n


class VolumeMetrics:
    """SSIM, MS-SSIM and PSNR between (1, X, Y, Z) volumes in [0, data_range]."""

    def __init__(self, shape: Sequence[int], kernel_size: int = 11, kernel_sigma: float = 1.5,
                 data_range: float = 1.0) -> None:
        self.scales = ms_ssim_scales(shape, kernel_size)
        w = np.array(MS_SSIM_WEIGHTS[: self.scales])
        self.ssim = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=kernel_size, kernel_sigma=kernel_sigma)
        self.ms_ssim = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel_size,
                                            kernel_sigma=kernel_sigma, weights=tuple((w / w.sum()).tolist()))
        self.psnr = PSNRMetric(max_val=data_range)

    @torch.no_grad()
    def ssim_only(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """SSIM of two (1, X, Y, Z) volumes, on ``a``'s device."""
        return float(score(self.ssim, a[None].float(), b[None].float().to(a.device)).mean())

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        a, b = a[None].float(), b[None].float()
        return {
            "ssim": float(score(self.ssim, a, b).mean()),
            "ms_ssim": float(score(self.ms_ssim, a, b).mean()),
            "psnr": float(score(self.psnr, a, b).mean()),
            "mae": float((a - b).abs().mean()),
        }


def score(metric: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A MONAI metric's values for the batches ``a`` and ``b``, one per item, with nothing left in its buffer."""
    # a MONAI metric is cumulative: each call also appends its result to a buffer for aggregate(), which medldm never
    # calls. Kept, 20,000 SSIMs of 32^3 volumes (the memorisation check of 4,000 samples) held 2.6 GB: each small
    # kept result pins freed SSIM temporaries in glibc's heap. MONAI types the result as a tensor or a list of them:
    # these metrics return a tensor
    try:
        return cast(torch.Tensor, metric(a, b))
    finally:
        metric.reset()


def random_pairs(n: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    """All pairs when there are at most ``max_pairs``, else that many distinct random pairs."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return list(itertools.combinations(range(n), 2))
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < max_pairs:
        i, j = sorted(rng.choice(n, size=2, replace=False).tolist())
        chosen.add((i, j))
    return sorted(chosen)


@torch.no_grad()
def pairwise_similarity(volumes: Sequence[torch.Tensor], metrics: VolumeMetrics, max_pairs: int, seed: int,
                        device: torch.device | str = "cpu", batch_size: int = 8, desc: str = "pairs") -> dict[str, Any]:
    """Mean pairwise MS-SSIM and SSIM of a set of volumes (lower = more diverse), with every pair's scores.

    Pairs go through the metrics ``batch_size`` at a time on ``device`` (the GPU when there is one).
    """
    pairs = random_pairs(len(volumes), max_pairs, seed)
    if not pairs:
        raise InputError("diversity needs at least two volumes")
    ms: list[float] = []
    ss: list[float] = []
    for first in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch"):
        chunk = pairs[first:first + batch_size]
        a = torch.stack([volumes[i] for i, _ in chunk]).float().to(device)
        b = torch.stack([volumes[j] for _, j in chunk]).float().to(device)
        ms += score(metrics.ms_ssim, a, b).flatten().tolist()
        ss += score(metrics.ssim, a, b).flatten().tolist()
    return {"pairs": len(pairs), "ms_ssim_mean": float(np.mean(ms)), "ms_ssim_std": float(np.std(ms)),
            "ssim_mean": float(np.mean(ss)), "ssim_std": float(np.std(ss)), "ms_ssim_scores": ms, "ssim_scores": ss}
