"""Quality control of a preprocessed cohort: summary.csv with outlier flags, contact sheets, a static HTML page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from medldm.config import QCConfig
from medldm.data.io import visible, write_csv, write_text
from medldm.viz import grid, save_png

# statistics screened for outliers (robust z over the cohort): (key, side that is bad, minimum relative spread).
# A registration much worse than the cohort's fails; any other statistic far out is a warning to look at.
REGISTRATION_SCREENED = (("registration_correlation", "low", 0.05), ("registration_dice", "low", 0.02))
WARNING_SCREENED = (("foreground_ml", "both", 0.02), ("foreground_mean", "both", 0.02), ("tiv_ml", "both", 0.02))
SHEET_SIZE = 100  # scans per contact sheet page
TILE_HEIGHT = 64
STATUSES = ("pass", "warn", "fail")


def robust_z(values: np.ndarray, min_relative_spread: float = 0.02) -> np.ndarray:
    """(x - median) / spread, spread = 1.4826 MAD but at least 2 % of |median|: a statistic that is nearly
    constant over the cohort (the brain volume inside a fixed template mask) must not flag 1 % differences."""
    median = np.median(values)
    spread = max(1.4826 * np.median(np.abs(values - median)), min_relative_spread * abs(median))
    return np.zeros_like(values) if spread == 0 else (values - median) / spread


def _z_flags(stats: list[dict[str, Any]], screened: tuple, z_limit: float) -> list[list[str]]:
    flags: list[list[str]] = [[] for _ in stats]
    for key, side, spread in screened:
        present = [i for i, s in enumerate(stats) if s.get(key) is not None]
        if len(present) < 5:
            continue  # too few scans to call anything an outlier
        z = robust_z(np.array([stats[i][key] for i in present], dtype=float), spread)
        for i, zi in zip(present, z):
            if (zi < -z_limit and side in ("low", "both")) or (zi > z_limit and side in ("high", "both")):
                flags[i].append(f"{key} {'high' if zi > 0 else 'low'} (z={zi:+.1f})")
    return flags


def assess(stats: list[dict[str, Any]], cfg: QCConfig) -> list[tuple[str, list[str]]]:
    """(qc_status, reasons) of every scan: fail (a registration that is bad on the absolute scale, implausible,
    or far worse than the cohort's), warn (another statistic far from the cohort's, a refused affine), or pass."""
    failing = _z_flags(stats, REGISTRATION_SCREENED, cfg.z_limit)
    warning = _z_flags(stats, WARNING_SCREENED, cfg.z_limit)
    out = []
    for s, fail, warn in zip(stats, failing, warning):
        corr, dice, problem = (s.get("registration_correlation"), s.get("registration_dice"),
                               s.get("registration_problem"))
        if corr is not None and corr < cfg.min_correlation:
            fail.insert(0, f"registration_correlation {corr:.3f} < {cfg.min_correlation}")
        if dice is not None and dice < cfg.min_dice:
            fail.insert(0, f"registration_dice {dice:.3f} < {cfg.min_dice}")
        if problem:
            (fail if problem.startswith("implausible") else warn).append(problem)
        out.append(("fail", fail + warn) if fail else ("warn", warn) if warn else ("pass", []))
    return out


def write_qc(output_dir: Path, rows: list[dict[str, Any]], stats: list[dict[str, Any]],
             verdicts: list[tuple[str, list[str]]] | None = None) -> list[dict[str, Any]]:
    """Write qc/summary.csv, qc/overview*.png and qc/index.html; return the scans that did not pass."""
    qc = output_dir / "qc"
    verdicts = verdicts if verdicts is not None else assess(stats, QCConfig())
    summary = []
    for row, s, (status, reasons) in zip(rows, stats, verdicts):
        summary.append({
            "image": row["image"], "subject_id": row["subject_id"], "session": row["session"], "split": row["split"],
            "qc_status": status, "input_shape": "x".join(map(str, s["input_shape"])),
            "input_spacing": "x".join(map(str, s["input_spacing"])), "input_axcodes": s["input_axcodes"],
            "intensity_low": s["intensity_window"][0], "intensity_high": s["intensity_window"][1],
            "foreground_ml": s["foreground_ml"], "foreground_mean": s["foreground_mean"],
            "tiv_ml": _blank(s.get("tiv_ml")), "registration_correlation": _blank(s.get("registration_correlation")),
            "registration_dice": _blank(s.get("registration_dice")),
            "registration_metric": _blank(s.get("registration_metric")),
            "registration_scales": "x".join(map(str, s.get("registration_scales") or [])),
            "flags": "; ".join(reasons),
        })
    write_csv(qc / "summary.csv", list(summary[0]), summary)
    pngs = [qc / "scans" / Path(r["image"]).name.replace(".nii.gz", ".png") for r in rows]
    _contact_sheets(qc, pngs)
    _html(qc, summary, pngs)
    return [s for s in summary if s["qc_status"] != "pass"]


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _contact_sheets(qc: Path, pngs: list[Path]) -> None:
    for old in visible(qc, "overview*.png"):
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


_FRAME = {"fail": "#d33", "warn": "#e90"}


def _html(qc: Path, summary: list[dict[str, Any]], pngs: list[Path]) -> None:
    counts = {k: sum(1 for s in summary if s["qc_status"] == k) for k in STATUSES}
    cards, listed = [], []
    # failures first, then warnings, then the rest: what needs a look is at the top of the page
    order = sorted(range(len(summary)), key=lambda i: -STATUSES.index(summary[i]["qc_status"]))
    for i in order:
        s, p = summary[i], pngs[i]
        status = s["qc_status"]
        style = f' style="border:3px solid {_FRAME[status]}"' if status in _FRAME else ""
        note = f"<br><b>{status.upper()}: {html.escape(s['flags'])}</b>" if status != "pass" else ""
        quality = ""
        if s["registration_correlation"] != "":
            quality = f"<br>r={s['registration_correlation']}, Dice={s['registration_dice']}, TIV {s['tiv_ml']} ml"
        anchor = html.escape(Path(s["image"]).name.removesuffix(".nii.gz"))
        cards.append(f'<figure id="{anchor}"{style}><img src="scans/{p.name}" loading="lazy"><figcaption>'
                     f"{html.escape(s['image'])} ({s['split']}, {s['input_axcodes']} {s['input_spacing']} mm)"
                     f"{quality}{note}</figcaption></figure>")
        if status != "pass":
            listed.append(f'<li><a href="#{anchor}">{html.escape(s["image"])}</a> ({status}, {s["split"]}): '
                          f"{html.escape(s['flags'])}</li>")
    write_text(qc / "index.html",
        "<!doctype html><meta charset=utf-8><title>medldm QC</title><style>body{font:13px sans-serif;background:#111;"
        "color:#ddd}a{color:#8cf}figure{display:inline-block;margin:4px;width:300px;vertical-align:top}"
        "img{width:300px}</style>"
        f"<h1>medldm preprocessing QC</h1><p>{len(summary)} scans: {counts['pass']} pass, {counts['warn']} warn, "
        f"{counts['fail']} fail (failed registrations are framed red and, by default, excluded from the splits; "
        "warnings orange). r: correlation of the registered scan with the template inside its brain mask; Dice: "
        "the scan's registered brain mask against the template's. Axial, coronal and sagittal mid-slices.</p>"
        + (f"<ul>{''.join(listed)}</ul>" if listed else "") + "".join(cards) + "\n")
