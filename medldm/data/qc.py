"""Quality control of a preprocessed cohort: summary.csv with outlier flags, contact sheets, a static HTML page."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from medldm.viz import grid, save_png

# statistics screened for outliers (robust z-score over the cohort)
SCREENED = ("foreground_ml", "foreground_mean", "registration_metric")
Z_LIMIT = 3.5
SHEET_SIZE = 100  # scans per contact sheet page
TILE_HEIGHT = 64


def robust_z(values: np.ndarray, min_relative_spread: float = 0.02) -> np.ndarray:
    """(x - median) / spread, spread = 1.4826 MAD but at least 2 % of |median|: a statistic that is nearly
    constant over the cohort (the brain volume inside a fixed template mask) must not flag 1 % differences."""
    median = np.median(values)
    spread = max(1.4826 * np.median(np.abs(values - median)), min_relative_spread * abs(median))
    return np.zeros_like(values) if spread == 0 else (values - median) / spread


def write_qc(output_dir: Path, rows: list[dict[str, Any]], stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write qc/summary.csv, qc/overview*.png and qc/index.html; return the flagged scans."""
    qc = output_dir / "qc"
    flags: list[list[str]] = [[] for _ in rows]
    for key in SCREENED:
        present = [i for i, s in enumerate(stats) if s.get(key) is not None]
        if len(present) < 5:
            continue  # too few scans to call anything an outlier
        z = robust_z(np.array([stats[i][key] for i in present], dtype=float))
        for i, zi in zip(present, z):
            if abs(zi) > Z_LIMIT:
                flags[i].append(f"{key} {'high' if zi > 0 else 'low'} (z={zi:+.1f})")
    summary = []
    for row, s, f in zip(rows, stats, flags):
        summary.append({
            "image": row["image"], "subject_id": row["subject_id"], "session": row["session"], "split": row["split"],
            "input_shape": "x".join(map(str, s["input_shape"])), "input_spacing": "x".join(map(str, s["input_spacing"])),
            "input_axcodes": s["input_axcodes"], "intensity_low": s["intensity_window"][0],
            "intensity_high": s["intensity_window"][1], "foreground_ml": s["foreground_ml"],
            "foreground_mean": s["foreground_mean"], "registration_metric": s.get("registration_metric", ""),
            "flags": "; ".join(f),
        })
    with (qc / "summary.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    pngs = [qc / "scans" / Path(r["image"]).name.replace(".nii.gz", ".png") for r in rows]
    _contact_sheets(qc, pngs)
    _html(qc, summary, pngs)
    return [s for s in summary if s["flags"]]


def _contact_sheets(qc: Path, pngs: list[Path]) -> None:
    for old in qc.glob("overview*.png"):
        old.unlink()
    tiles = []
    for p in pngs:
        image = iio.imread(p)
        step = max(1, image.shape[0] // TILE_HEIGHT)
        tiles.append(image[::step, ::step])
    pages = [tiles[i : i + SHEET_SIZE] for i in range(0, len(tiles), SHEET_SIZE)]
    for n, page in enumerate(pages):
        name = "overview.png" if len(pages) == 1 else f"overview_{n + 1:03d}.png"
        save_png(qc / name, grid(page, columns=5), min_size=0)


def _html(qc: Path, summary: list[dict[str, Any]], pngs: list[Path]) -> None:
    flagged = sum(1 for s in summary if s["flags"])
    cards = []
    for s, p in zip(summary, pngs):
        style = ' style="border:3px solid #d33"' if s["flags"] else ""
        note = f"<br><b>{html.escape(s['flags'])}</b>" if s["flags"] else ""
        cards.append(f'<figure{style}><img src="scans/{p.name}" loading="lazy"><figcaption>'
                     f"{html.escape(s['image'])} ({s['split']}, {s['input_axcodes']} {s['input_spacing']} mm){note}"
                     "</figcaption></figure>")
    (qc / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>medldm QC</title><style>body{font:13px sans-serif;background:#111;"
        "color:#ddd}figure{display:inline-block;margin:4px;width:300px}img{width:300px}</style>"
        f"<h1>medldm preprocessing QC</h1><p>{len(summary)} scans, {flagged} flagged (robust z &gt; {Z_LIMIT} on "
        f"{', '.join(SCREENED)}); axial, coronal and sagittal mid-slices.</p>" + "".join(cards) + "\n", encoding="utf-8")
