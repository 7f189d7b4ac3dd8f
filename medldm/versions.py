"""Versions of the packages that shape results; stored in every output dir and checkpoint."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("medldm", "torch", "monai", "numpy", "nibabel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
