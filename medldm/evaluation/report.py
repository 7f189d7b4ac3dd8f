"""`medldm evaluate`: reconstruction quality and sample diversity, written as report.json, report.md and PNGs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medldm.config import EvaluateConfig, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, split_rows
from medldm.data.io import load_volume, write_json
from medldm.evaluation.metrics import VolumeMetrics, pairwise_similarity
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

log = logging.getLogger(__name__)


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def evaluate(data_dir: str | Path, out_dir: str | Path, cfg: EvaluateConfig, autoencoder: str | Path | None = None,
             samples: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate an autoencoder run and/or a samples dir against the dataset's test split."""
    if autoencoder is None and samples is None:
        raise ValueError("nothing to evaluate: give --autoencoder AE_RUN and/or --samples SAMPLES_DIR")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(data_dir)
    shape = read_dataset_info(data_dir)["reference"]["shape"]
    test = split_rows(rows, "test")
    if not test:
        raise ValueError(f"{data_dir}/manifest.csv has no test-split volumes; preprocess with split.test_fraction > 0")
    metrics = VolumeMetrics(shape, cfg.kernel_size, cfg.kernel_sigma)
    real = [torch.from_numpy(load_volume(data_dir / r["image"])[0])[None] for r in test]
    report: dict[str, Any] = {"data_dir": str(data_dir.resolve()), "test_volumes": len(test), "config": to_dict(cfg),
                              "ms_ssim_scales": metrics.scales, "versions": versions()}

    if autoencoder is not None:
        report["reconstruction"] = _reconstruction(Path(autoencoder), test, real, metrics, out_dir, device)
    if samples is not None:
        report["generation"] = _generation(Path(samples), real, metrics, cfg, out_dir)
    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _reconstruction(ae_run: Path, test: list[dict[str, Any]], real: list[torch.Tensor], metrics: VolumeMetrics,
                    out_dir: Path, device: str | None) -> dict[str, Any]:
    from medldm.config import config_from_dict
    from medldm.inference.encode import load_autoencoder, reconstruct

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_autoencoder(ae_run, dev)
    ae_cfg = config_from_dict("autoencoder", meta["config"])
    per_subject, tiles = [], []
    for row, x in tqdm(list(zip(test, real)), desc="reconstruct", unit="volume"):
        recon = reconstruct(model, x[None].to(dev), ae_cfg).float().clamp(0, 1)[0].cpu()
        per_subject.append({"image": row["image"], **metrics(recon, x)})
        if len(tiles) < 4:
            a, b = x[0].numpy(), recon[0].numpy()
            tiles += [three_plane(a), three_plane(b), three_plane(np.abs(a - b), vmax=0.25)]
    save_png(out_dir / "reconstructions.png", grid(tiles, columns=3))
    keys = ("ssim", "ms_ssim", "psnr", "mae")
    return {"checkpoint": meta["checkpoint"], "per_subject": per_subject,
            **{k: _summary([s[k] for s in per_subject]) for k in keys}}


def _generation(samples_dir: Path, real: list[torch.Tensor], metrics: VolumeMetrics, cfg: EvaluateConfig,
                out_dir: Path) -> dict[str, Any]:
    files = sorted(samples_dir.glob("*.nii.gz"))
    if len(files) < 2:
        raise ValueError(f"{samples_dir}: diversity needs at least 2 synthetic .nii.gz volumes, found {len(files)}")
    synthetic = [torch.from_numpy(load_volume(f)[0])[None] for f in files]
    bad = [f.name for f, v in zip(files, synthetic) if v.shape != real[0].shape]
    if bad:
        raise ValueError(f"{samples_dir}: {bad} do not have the dataset's shape {list(real[0].shape[1:])}")
    out: dict[str, Any] = {"samples_dir": str(samples_dir.resolve()), "num_samples": len(files),
                           "synthetic": pairwise_similarity(synthetic, metrics, cfg.diversity_pairs, cfg.seed)}
    if len(real) >= 2:
        out["real_test"] = pairwise_similarity(real, metrics, cfg.diversity_pairs, cfg.seed)
        out["ms_ssim_difference"] = out["synthetic"]["ms_ssim_mean"] - out["real_test"]["ms_ssim_mean"]
    else:
        out["real_test"] = None
        log.warning("only one test volume: real-real diversity is not available")
    tiles = [three_plane(v[0].numpy()) for v in synthetic[:4]] + [three_plane(v[0].numpy()) for v in real[:4]]
    save_png(out_dir / "synthetic_vs_real.png", grid(tiles, columns=4))
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """A short human-readable report."""
    lines = ["# medldm evaluation", "", f"Dataset: `{report['data_dir']}` ({report['test_volumes']} test volumes). "
             f"MS-SSIM with {report['ms_ssim_scales']} scales.", ""]
    rec = report.get("reconstruction")
    if rec:
        lines += ["## Autoencoder reconstruction (test split)", "", f"Checkpoint: `{rec['checkpoint']}`", "",
                  "| metric | mean | std |", "|---|---|---|"]
        for k in ("ssim", "ms_ssim", "psnr", "mae"):
            lines.append(f"| {k.upper().replace('_', '-')} | {rec[k]['mean']:.4f} | {rec[k]['std']:.4f} |")
        lines += ["", "![reconstructions](reconstructions.png) (rows: input, reconstruction, |difference|)", ""]
    gen = report.get("generation")
    if gen:
        syn, real = gen["synthetic"], gen["real_test"]
        lines += ["## Generation diversity (mean pairwise similarity; lower is more diverse)", "",
                  "| set | pairs | MS-SSIM | SSIM |", "|---|---|---|---|",
                  f"| synthetic ({gen['num_samples']}) | {syn['pairs']} | {syn['ms_ssim_mean']:.4f} | {syn['ssim_mean']:.4f} |"]
        if real:
            lines.append(f"| real test | {real['pairs']} | {real['ms_ssim_mean']:.4f} | {real['ssim_mean']:.4f} |")
            lines += ["", f"Synthetic minus real MS-SSIM: {gen['ms_ssim_difference']:+.4f} "
                      "(near 0: as varied as real brains; well above 0: too similar to each other)."]
        lines += ["", "![synthetic vs real](synthetic_vs_real.png) (top: synthetic, bottom: real test)", ""]
    return "\n".join(lines) + "\n"
