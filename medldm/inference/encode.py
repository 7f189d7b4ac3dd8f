"""Encode every preprocessed volume to its posterior mean and compute the latent scale factor."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medldm.config import AutoencoderConfig, config_from_dict
from medldm.data.dataset import read_manifest, volume_dataset
from medldm.data.io import read_json, write_json
from medldm.errors import InputError
from medldm.models.networks import build_autoencoder
from medldm.training.checkpoint import autoencoder_checkpoint, file_sha256, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def load_autoencoder(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The autoencoder of a run (best.pt, else latest.pt) in eval mode, and its checkpoint metadata."""
    return load_autoencoder_file(autoencoder_checkpoint(run_dir), device)


def load_autoencoder_file(path: str | Path, device: torch.device | str = "cpu",
                          sha256: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An autoencoder checkpoint file in eval mode, and its metadata (with the file's SHA-256)."""
    path = Path(path)
    state = load_checkpoint(path, kind="autoencoder")
    cfg = config_from_dict("autoencoder", state["config"])
    model = build_autoencoder(cfg.model, sdpa=cfg.speed.sdpa)
    # the EMA weights are the autoencoder's output when the run kept an EMA
    weights = state.get("ema") or state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputError(f"{path}: its weights do not fit the architecture in its own config "
                         f"({str(e).splitlines()[0]}); the file is damaged or was edited") from None
    meta = {k: v for k, v in state.items() if k not in ("model", "ema", "discriminator", "optimizer",
                                                         "optimizer_d", "rng")}
    # a caller that has just verified the file's hash passes it: large checkpoints are not hashed twice
    meta.update(checkpoint=str(path.resolve()), sha256=sha256 or file_sha256(path),
                weights="ema" if state.get("ema") else "model")
    return model.to(device).eval(), meta


def window_size(cfg: AutoencoderConfig) -> list[int]:
    """The sliding-window ROI of an autoencoder config: sliding_window.roi_size, else patch_size, else [] (whole)."""
    return list(cfg.sliding_window.roi_size or cfg.patch_size)


def _windowed(fn, x: torch.Tensor, cfg: AutoencoderConfig | None) -> torch.Tensor:
    # whole volume unless the config's window is smaller; MONAI blends windows (and rescales a smaller output)
    roi = window_size(cfg) if cfg is not None else []
    if not roi or all(r >= s for r, s in zip(roi, x.shape[2:])):
        return fn(x)
    sw = cfg.sliding_window
    return sliding_window_inference(x, roi, sw.batch_size, fn, overlap=sw.overlap, mode="gaussian")


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor, cfg: AutoencoderConfig | None = None) -> torch.Tensor:
    """Decode the posterior mean (the deterministic reconstruction); window by window when ``cfg`` asks for it."""
    return _windowed(lambda p: model.decode(model.encode(p)[0]).float(), x, cfg)


@torch.no_grad()
def posterior_mean(model: torch.nn.Module, x: torch.Tensor, cfg: AutoencoderConfig | None = None) -> torch.Tensor:
    """μ of a batch; window by window (blended at latent resolution) when ``cfg`` asks for it."""
    return _windowed(lambda p: model.encode(p)[0].float(), x, cfg)


@torch.no_grad()
def decode_latents(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Volumes (float32, clamped to [0, 1]) from unscaled latents, one volume at a time: the peak memory is one
    decode whatever the batch. (Tiles would need less, but GroupNorm would then normalise each tile with its own
    statistics, which leaves a visible grid: benchmarks/RESULTS.md.)"""
    return torch.cat([model.decode(one).float().clamp(0, 1) for one in z.split(1)])


def latents_path(ae_run: str | Path) -> Path:
    return Path(ae_run) / "latents" / "latents.pt"


# the files of a dataset dir that latents belong to besides the images: the labels and splits, and the reference
# grid (affine) that samples are written in. Two preprocessings of the same scans share image names, so only the
# content of these files tells their latents apart
DATASET_FILES = ("manifest.csv", "preprocess.json")
# what of preprocess.json the latents depend on: its settings and grid, not the run's counts, paths or timings (a
# rerun of `medldm preprocess` that changed nothing rewrites those, and must not ask for a new encode)
PREPROCESS_KEYS = ("config", "template_sha256", "reference")


def dataset_sha256(data_dir: str | Path) -> dict[str, str]:
    """SHA-256 of each of a dataset dir's ``DATASET_FILES`` (of preprocess.json: of its ``PREPROCESS_KEYS``), as a
    latent cache records them."""
    hashes = {}
    for name in DATASET_FILES:
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {data_dir} the output of `medldm preprocess`?")
        if name == "preprocess.json":
            info = read_json(path)
            made_of = json.dumps({k: info.get(k) for k in PREPROCESS_KEYS}, sort_keys=True).encode()
            hashes[name] = hashlib.sha256(made_of).hexdigest()
        else:
            hashes[name] = file_sha256(path)
    return hashes


@torch.no_grad()
def encode_dataset(data_dir: str | Path, ae_run: str | Path, device: str | None = None, batch_size: int = 4,
                   num_workers: int = 0) -> Path:
    """Write ``AE_RUN/latents/latents.pt`` (μ of every volume + scale factor + manifest rows + SHA-256 of the
    dataset's manifest.csv and preprocess.json) and ``latents.json``."""
    data_dir, ae_run = Path(data_dir), Path(ae_run)
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"encode: batch size must be >= 1 and workers >= 0 (got {batch_size}, {num_workers})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_autoencoder(ae_run, dev)
    cfg = config_from_dict("autoencoder", meta["config"])
    dataset = dataset_sha256(data_dir)  # before reading: a manifest rewritten meanwhile then fails the check
    rows = read_manifest(data_dir)
    train = torch.tensor([r["split"] == "train" for r in rows])
    if not train.any():  # before encoding a whole cohort for nothing
        raise InputError(f"{data_dir}/manifest.csv has no train-split volumes to compute the scale factor from")
    loader = DataLoader(volume_dataset(data_dir, rows, cache_rate=0.0), batch_size=batch_size, num_workers=num_workers)
    mus = []
    with tqdm(total=len(rows), desc="encode", unit="volume") as progress:
        for batch in loader:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                mus.append(posterior_mean(model, batch["image"].to(dev), cfg).float().cpu())
            progress.update(len(mus[-1]))
    mu = torch.cat(mus)
    # unit-variance latents for the diffusion model (Rombach et al.); computed once, on the train split only
    std = mu[train].std().item()
    scale_factor = 1.0 / max(std, 1e-8)
    out = latents_path(ae_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "mu": mu,
        "images": [r["image"] for r in rows],
        # the manifest rows the latents belong to, in order (labels and splits for the diffusion stage)
        "rows": rows,
        "scale_factor": scale_factor,
        "autoencoder_sha256": meta["sha256"],
        "autoencoder_checkpoint": meta["checkpoint"],
        "data_dir": str(data_dir.resolve()),
        # diffusion training checks these against its --data (content, not path: data dirs move and get rebuilt)
        "dataset_sha256": dataset,
    }
    save_checkpoint(out, payload)
    write_json(out.with_suffix(".json"), {k: v for k, v in payload.items() if k not in ("mu", "images", "rows")}
               | {"count": len(rows), "latent_shape": list(mu.shape[1:]), "train_std": std})
    log.info("encoded %d volumes to %s (latent %s, scale factor %.4f)", len(rows), out, list(mu.shape[1:]),
             scale_factor)
    return out
