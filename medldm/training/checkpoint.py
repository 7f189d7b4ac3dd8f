"""Checkpoints: written atomically, loaded with ``weights_only=True``, carrying config and versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medldm.data.io import atomic_write, content_sha256
from medldm.errors import InputError

# what a checkpoint of each kind must hold to be used by the later stages, and in addition to be resumed; a file
# without them is another kind, or was written by another medldm layout, and is refused by name instead of a KeyError
USE_KEYS = {
    "autoencoder": ("config", "model", "image_shape"),
    "diffusion": ("config", "ema", "latent_shape", "conditioning", "scale_factor", "autoencoder", "reference"),
}
RESUME_KEYS = {
    "autoencoder": ("optimizer", "ema", "ema_n_averaged", "step", "best_val_ssim", "rng"),
    "diffusion": ("model", "optimizer", "ema_n_averaged", "step", "best_val_loss", "rng"),
}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old or the new file, never half of one."""
    # through a Python file: a full disk is then an OSError (ENOSPC); torch's own file writer says "unexpected pos"
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    kind: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Load a medldm checkpoint safely (tensors and plain containers only); ``mmap`` maps the tensors instead of
    reading them (for a look at the metadata of a large file). With ``kind`` ("autoencoder" or "diffusion") the file
    must be a checkpoint of that kind holding what the later stages use (and, with ``resume``, what training needs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many types for a truncated, foreign or unsafe file
        raise InputError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                         "is it a medldm checkpoint that was completely written?") from None
    if kind is None:
        return state
    found = state.get("kind") if isinstance(state, dict) else type(state).__name__
    if found != kind:
        raise InputError(f"{path} is not a {kind} checkpoint (kind={found!r}): give the {kind} run")
    missing = [k for k in USE_KEYS[kind] + (RESUME_KEYS[kind] if resume else ()) if k not in state]
    if missing:
        recorded = state.get("versions") if isinstance(state.get("versions"), dict) else {}
        made_by = recorded.get("medldm", "an unknown version")
        raise InputError(f"{path}: this {kind} checkpoint has no {missing} (written by medldm {made_by}, another "
                         f"layout, or damaged); use it with that medldm version, or train the run again"
                         + (" without --resume" if resume else ""))
    return state


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a checkpoint (or any) file, as runs record the autoencoder they belong to."""
    return content_sha256(path)


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
