"""Encode every preprocessed volume to its posterior mean and compute the latent scale factor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medldm.config import config_from_dict
from medldm.data.dataset import read_manifest, volume_dataset
from medldm.data.io import write_json
from medldm.models.networks import build_autoencoder
from medldm.training.checkpoint import autoencoder_checkpoint, file_sha256, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def load_autoencoder(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The autoencoder of a run (best.pt, else latest.pt) in eval mode, and its checkpoint metadata."""
    return load_autoencoder_file(autoencoder_checkpoint(run_dir), device)


def load_autoencoder_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """An autoencoder checkpoint file in eval mode, and its metadata (with the file's SHA-256)."""
    path = Path(path)
    state = load_checkpoint(path)
    if state.get("kind") != "autoencoder":
        raise ValueError(f"{path} is not an autoencoder checkpoint (kind={state.get('kind')!r})")
    cfg = config_from_dict("autoencoder", state["config"])
    model = build_autoencoder(cfg.model)
    model.load_state_dict(state["model"])
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
    meta.update(checkpoint=str(path.resolve()), sha256=file_sha256(path))
    return model.to(device).eval(), meta


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean (the deterministic reconstruction used for validation and evaluation)."""
    mu, _ = model.encode(x)
    return model.decode(mu)


def latents_path(ae_run: str | Path) -> Path:
    return Path(ae_run) / "latents" / "latents.pt"


@torch.no_grad()
def encode_dataset(data_dir: str | Path, ae_run: str | Path, device: str | None = None) -> Path:
    """Write ``AE_RUN/latents/latents.pt`` (μ of every volume + scale factor) and ``latents.json``."""
    data_dir, ae_run = Path(data_dir), Path(ae_run)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_autoencoder(ae_run, dev)
    rows = read_manifest(data_dir)
    mus = []
    for item in tqdm(volume_dataset(data_dir, rows), total=len(rows), desc="encode", unit="volume"):
        mu, _ = model.encode(item["image"][None].to(dev))
        mus.append(mu[0].float().cpu())
    mu = torch.stack(mus)
    train = torch.tensor([r["split"] == "train" for r in rows])
    if not train.any():
        raise ValueError(f"{data_dir}/manifest.csv has no train-split volumes to compute the scale factor from")
    # unit-variance latents for the diffusion model (Rombach et al.); computed once, on the train split only
    std = mu[train].std().item()
    scale_factor = 1.0 / max(std, 1e-8)
    out = latents_path(ae_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mu": mu,
        "images": [r["image"] for r in rows],
        "scale_factor": scale_factor,
        "autoencoder_sha256": meta["sha256"],
        "autoencoder_checkpoint": meta["checkpoint"],
        "data_dir": str(data_dir.resolve()),
    }
    save_checkpoint(out, payload)
    write_json(out.with_suffix(".json"), {k: v for k, v in payload.items() if k not in ("mu", "images")}
               | {"count": len(rows), "latent_shape": list(mu.shape[1:]), "train_std": std})
    log.info("encoded %d volumes to %s (latent %s, scale factor %.4f)", len(rows), out, list(mu.shape[1:]), scale_factor)
    return out
