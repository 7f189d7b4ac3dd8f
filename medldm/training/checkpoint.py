"""Checkpoints: written atomically, loaded with ``weights_only=True``, carrying config and versions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from medldm.data.io import atomic_path
from medldm.errors import InputError


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old or the new file, never half of one."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a medldm checkpoint safely (tensors and plain containers only); ``mmap`` maps the tensors instead of
    reading them (for a look at the metadata of a large file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise InputError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                         "is it a medldm checkpoint that was completely written?") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """The global torch RNG states of this process (CPU, and its current CUDA device)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def best_checkpoint(run_dir: str | Path, stage: str) -> Path:
    """The checkpoint of a run that later stages use: best.pt (by validation), else latest.pt."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    for name in ("best.pt", "latest.pt"):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train it first with `medldm train {stage}`")


def autoencoder_checkpoint(run_dir: str | Path) -> Path:
    return best_checkpoint(run_dir, "autoencoder")
