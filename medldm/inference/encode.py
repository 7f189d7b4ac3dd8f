"""Encode every preprocessed volume to its posterior mean and compute the latent scale factor (`medldm encode`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medldm.artifacts import AutoencoderRun, DatasetDir, LatentCache
from medldm.data.dataset import volume_dataset
from medldm.devices import autocast, resolve_device
from medldm.errors import InputError
from medldm.models.ops import posterior_mean

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_dataset(data_dir: str | Path, ae_run: str | Path, device: str | None = None, batch_size: int = 4,
                   num_workers: int = 0) -> Path:
    """Write ``AE_RUN/latents/latents.pt`` (μ of every volume + scale factor + manifest rows + SHA-256 of the
    dataset's manifest.csv and preprocess.json) and ``latents.json``."""
    data_dir, run = Path(data_dir), AutoencoderRun(ae_run)
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"encode: batch size must be >= 1 and workers >= 0 (got {batch_size}, {num_workers})")
    dev = resolve_device(device)
    ae = run.load()
    model = ae.model(dev)
    dataset = DatasetDir(data_dir)
    hashes = dataset.sha256()  # before reading: a manifest rewritten meanwhile then fails the check
    rows = dataset.rows()
    train = torch.tensor([r["split"] == "train" for r in rows])
    if not train.any():  # before encoding a whole cohort for nothing
        raise InputError(f"{data_dir}/manifest.csv has no train-split volumes to compute the scale factor from")
    loader = DataLoader(volume_dataset(data_dir, rows, cache_rate=0.0), batch_size=batch_size, num_workers=num_workers)
    mus = []
    with tqdm(total=len(rows), desc="encode", unit="volume") as progress:
        for batch in loader:
            with autocast(dev):
                mus.append(posterior_mean(model, batch["image"].to(dev), ae.config).float().cpu())
            progress.update(len(mus[-1]))
    mu = torch.cat(mus)
    # unit-variance latents for the diffusion model (Rombach et al.); computed once, on the train split only
    std = mu[train].std().item()
    cache = LatentCache(mu=mu, rows=rows, scale_factor=1.0 / max(std, 1e-8), autoencoder=ae.ref,
                        data_dir=str(data_dir.resolve()), dataset_sha256=hashes)
    cache.write(run.latents)
    log.info("encoded %d volumes to %s (latent %s, scale factor %.4f)", len(rows), run.latents, list(mu.shape[1:]),
             cache.scale_factor)
    return run.latents
