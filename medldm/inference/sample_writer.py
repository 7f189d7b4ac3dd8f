"""Export synthetic volumes: NIfTI (and DICOM) in the dataset's reference space, JSON sidecars, PNG previews,
samples.csv and a contact sheet. Each volume is written as soon as it is decoded, each file atomically."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medldm import __version__
from medldm.data.io import (
    INTEGER_LEVELS,
    new_uid,
    save_dicom_series,
    save_volume,
    to_integer,
    visible,
    write_csv,
    write_json,
)
from medldm.errors import InputError
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

DESCRIP = f"SYNTHETIC medldm {__version__}"
FORMATS = ("nifti", "dicom", "both")
DTYPES = ("int16", "float32")
# what a previous `medldm sample` leaves in its output folder; nothing else there is touched
OUTPUT_PATTERNS = ("sample_*.nii.gz", "sample_*.json", "sample_*.png", "sample_*_dicom", "samples.csv",
                   "contact_sheet*.png")
SHEET_PAGE = 64  # volumes per contact sheet (16 rows of 4); more go to contact_sheet_2.png, ...
CSV_FIELDS = ["file", "dicom", "seed", "conditions"]


def prepare_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Check before any sampling that ``out_dir`` can be written and holds no earlier samples (unless ``overwrite``)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medldm-write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"--out {out_dir}: cannot write there ({e.strerror or e}); "
                         "choose a folder you can write to") from None
    earlier = previous_outputs(out_dir)
    if earlier and not overwrite:
        raise FileExistsError(f"--out {out_dir} already holds {len(earlier)} files of earlier samples "
                              f"(e.g. {earlier[0].name}); pass --overwrite to replace them or choose another folder")
    return out_dir


def previous_outputs(out_dir: Path) -> list[Path]:
    return sorted(p for pattern in OUTPUT_PATTERNS for p in visible(out_dir, pattern))


def remove_previous_outputs(out_dir: Path) -> None:
    """Delete what an earlier `medldm sample` wrote into ``out_dir`` (and nothing else)."""
    for p in previous_outputs(out_dir):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


class SampleWriter:
    """Writes each decoded volume as ``sample_SEED`` files; ``samples.csv`` always lists exactly the finished ones.

    NIfTI: the reference affine as qform and sform (code 1), ``descrip`` "SYNTHETIC medldm <version>", int16
    (value = round(intensity x 4095), scl_slope 1/4095, so readers get the [0, 1] intensities of the preprocessed
    data) or float32. DICOM: one classic MR series per volume with the same integers (no rescale), new UIDs and
    patient fields that say SYNTHETIC.
    """

    def __init__(self, out_dir: Path, reference: dict[str, Any], provenance: dict[str, Any],
                 fmt: str = "nifti", dtype: str = "int16") -> None:
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.out_dir, self.fmt, self.dtype = out_dir, fmt, dtype
        self.affine = np.asarray(reference["affine"], dtype=np.float64)
        self.shape = list(reference["shape"])
        self.reference_image = reference.get("image")
        self.provenance = provenance
        self.versions = versions()
        self.created = dt.datetime.now(dt.timezone.utc)
        self.rows: list[dict[str, Any]] = []
        self.tiles: list[np.ndarray] = []  # previews of the contact sheet page being filled
        self.pages = 0

    def write(self, volume: np.ndarray, seed: int) -> Path:
        """Write one volume with its sidecar and preview; returns the NIfTI path (the DICOM folder if DICOM only)."""
        if list(volume.shape) != self.shape:
            raise InputError(f"sample shape {list(volume.shape)} differs from the reference {self.shape}")
        stem = f"sample_{seed:04d}"
        nifti = self.out_dir / f"{stem}.nii.gz"
        dicom = self.out_dir / f"{stem}_dicom"
        side: dict[str, Any] = {"synthetic": True, "seed": seed, **self.provenance, "intensity": self.intensity(),
                                "versions": self.versions, "created": self.created.isoformat(timespec="seconds"),
                                "reference_image": self.reference_image}
        if self.fmt in ("nifti", "both"):
            save_volume(nifti, volume, self.affine, descrip=DESCRIP, dtype=self.dtype)
            side["file"] = nifti.name
        if self.fmt in ("dicom", "both"):
            tags = self.dicom_tags(seed)
            save_dicom_series(dicom, to_integer(volume, "int16"), self.affine, tags)
            side["dicom"] = {"folder": dicom.name, "slices": volume.shape[2], "study_instance_uid": tags["0020|000d"],
                             "series_instance_uid": tags["0020|000e"], "patient_id": tags["0010|0020"]}
        write_json(self.out_dir / f"{stem}.json", side)
        preview = three_plane(volume)
        save_png(self.out_dir / f"{stem}.png", preview)
        self.tiles.append(preview)
        if len(self.tiles) == SHEET_PAGE:
            self._save_sheet()
        self.rows.append({"file": side.get("file", ""), "dicom": dicom.name if "dicom" in side else "", "seed": seed,
                          "conditions": json.dumps(self.provenance.get("conditions", {}))})
        write_csv(self.out_dir / "samples.csv", CSV_FIELDS, self.rows)
        return nifti if self.fmt != "dicom" else dicom

    def close(self) -> None:
        """The last contact sheet page (four volumes per row)."""
        if self.tiles:
            self._save_sheet()

    def _save_sheet(self) -> None:
        self.pages += 1
        name = "contact_sheet.png" if self.pages == 1 else f"contact_sheet_{self.pages}.png"
        save_png(self.out_dir / name, grid(self.tiles, columns=4))
        self.tiles = []

    def intensity(self) -> str:
        levels = INTEGER_LEVELS["int16"][1]
        text = "[0, 1] as in the preprocessed training data (0 = background)"
        if self.fmt in ("nifti", "both"):
            text += (f"; NIfTI int16 stores round(value x {levels}) with scl_slope 1/{levels}"
                     if self.dtype == "int16" else "; NIfTI float32")
        if self.fmt in ("dicom", "both"):
            text += f"; DICOM pixels are round(value x {levels}) (0..{levels}, no rescale)"
        return text

    def dicom_tags(self, seed: int) -> dict[str, str]:
        """Series-level DICOM tags: new UIDs per volume; every human-readable field says synthetic."""
        conditions = self.provenance.get("conditions", {})
        date, time = self.created.strftime("%Y%m%d"), self.created.strftime("%H%M%S")
        levels = INTEGER_LEVELS["int16"][1]
        series_uid = new_uid()
        tags = {
            "0008|0008": "DERIVED\\SECONDARY\\SYNTHETIC",
            "0008|0020": date, "0008|0021": date, "0008|0023": date, "0008|0030": time, "0008|0031": time,
            "0008|0060": "MR",
            "0008|0070": "medldm (synthetic image generator)",
            "0008|1030": "SYNTHETIC brain MRI",
            "0008|103e": f"{DESCRIP} seed {seed}",
            "0010|0010": "SYNTHETIC^MEDLDM",
            "0010|0020": f"SYNTH-{series_uid[-12:]}",
            "0010|0030": "",
            "0010|0040": {"M": "M", "F": "F"}.get(str(conditions.get("sex", "")), "O"),
            "0012|0062": "YES",  # patient identity removed: there never was one
            "0012|0063": "synthetic image, generated by medldm; no patient data",
            "0018|0015": "BRAIN",
            # the MR Image module's required fields: research mode (RM), no sequence parameters to report
            "0018|0020": "RM", "0018|0021": "NONE", "0018|0022": "", "0018|0023": "3D", "0018|0080": "",
            "0018|0081": "", "0018|0091": "", "0020|1040": "", "0008|0033": time,
            "0020|000d": new_uid(), "0020|000e": series_uid, "0020|0052": new_uid(),
            "0020|0010": "1", "0020|0011": "1",
            "0020|4000": f"SYNTHETIC image generated by medldm {__version__} (seed {seed}); not a patient",
            "0028|1050": str(levels // 2), "0028|1051": str(levels),
        }
        if "age" in conditions:
            tags["0010|1010"] = f"{min(int(round(float(conditions['age']))), 999):03d}Y"
        return tags
