"""Where tensors run: the default device, checked ``--device`` names, and the bf16 autocast policy (CUDA only)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from medldm.errors import InputError


def default_device() -> str:
    """The first CUDA GPU when there is one, else the CPU: what every command uses without ``--device``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """``name`` (or the default) as a device this machine has; an error that names ``flag`` otherwise."""
    name = name or default_device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"{flag} {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{flag} {name}: this machine has no CUDA GPU (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {name}: use cpu, cuda or cuda:N")
    return dev


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager:
    """bf16 autocast on CUDA (no gradient scaler needed); the CPU runs float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
