"""Browser copies of NIfTI volumes for a page opened from ``file://``: each a ``view/vol/<key>.js`` script.

Browsers refuse ``fetch`` of local files, but a page may load a classic ``<script>`` beside it: the copy is a
script that hands the page a base64 NIfTI (``medldmVolume(key, data)``). The copy keeps the volume's voxel grid and
affine (qform and sform) exactly, so NiiVue places it in the same world space as the original, and stores the
intensities as uint8 with scl_slope/scl_inter, which give back the original range to 1/255 of it. Copies are made
once: ``volumes.json`` records each source's size and modification time, and an unchanged source is not redone.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medldm.data.io import load_volume, nifti_stem, read_json, write_json, write_text

log = logging.getLogger(__name__)

INDEX = "volumes.json"


def volume_key(source: Path) -> str:
    """A file name for the copy of ``source``: its name (readable in a listing) and a hash of its real path (two
    ``sample_0000`` from different folders do not collide)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", nifti_stem(source))[:48]
    return f"{readable}-{hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]}"


def browser_nifti(source: Path) -> tuple[bytes, dict[str, Any]]:
    """``source`` as a gzipped uint8 NIfTI with the same grid and affine, and what the page shows about it."""
    data, affine = load_volume(source, allow_empty=True)
    lo, hi = float(data.min()), float(data.max())
    scale = (hi - lo) / 255 if hi > lo else 1.0
    img = nib.Nifti1Image(np.round((data - lo) / scale).clip(0, 255).astype(np.uint8), affine)
    img.header.set_slope_inter(scale, lo)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    info = {"shape": list(data.shape), "spacing_mm": [round(float(s), 4) for s in spacing],
            "axcodes": "".join(nib.aff2axcodes(affine)), "affine": np.round(affine, 6).tolist(),
            "range": [lo, hi]}
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0), info


class VolumeStore:
    """The browser copies of one page folder (``view/``): ``add(path)`` returns the key the page loads it by."""

    def __init__(self, view_dir: Path, limit: int | None = None) -> None:
        self.dir = view_dir / "vol"
        self.index_path = view_dir / INDEX
        self.limit = limit
        previous = read_json(self.index_path) if self.index_path.is_file() else {}
        self.previous: dict[str, Any] = previous if isinstance(previous, dict) else {}
        self.entries: dict[str, Any] = {}
        self.skipped_keys: set[str] = set()

    def add(self, source: Path) -> str | None:
        """The key of ``source``'s copy, made now unless an unchanged one exists; None past the limit (counted in
        ``skipped``) or when ``source`` is not a readable NIfTI file (a warning: a page is never refused for it)."""
        source = Path(source)
        key = volume_key(source)
        if key in self.entries:
            return key
        if self.limit is not None and len(self.entries) >= self.limit:
            self.skipped_keys.add(key)  # a volume listed twice (a sample and its nearest) is one left out
            return None
        try:
            stat = source.stat()
        except OSError as e:
            log.warning("view: %s not shown (%s)", source, e.strerror)
            return None
        stamp = {"source": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = self.previous.get(key)
        if old and all(old.get(k) == v for k, v in stamp.items()) and (self.dir / f"{key}.js").is_file():
            self.entries[key] = old
            return key
        try:
            blob, info = browser_nifti(source)
        except Exception as e:  # a damaged or non-NIfTI file: the page shows the rest
            log.warning("view: %s not shown in the viewer (%s: %s)", source, type(e).__name__, e)
            return None
        encoded = base64.b64encode(blob).decode("ascii")
        write_text(self.dir / f"{key}.js", f"medldmVolume({json.dumps(key)},\n{json.dumps(encoded)});\n")
        self.entries[key] = {**stamp, **info, "copy_bytes": len(blob)}
        return key

    @property
    def skipped(self) -> int:
        """How many distinct volumes the cap left out."""
        return len(self.skipped_keys)

    def info(self, key: str | None) -> dict[str, Any] | None:
        return self.entries.get(key) if key else None

    def finish(self) -> None:
        """Write the index and remove the copies no longer used (a scan removed from the folder)."""
        write_json(self.index_path, self.entries)
        if self.dir.is_dir():
            for old in self.dir.glob("*.js"):
                if old.stem not in self.entries:
                    os.unlink(old)
