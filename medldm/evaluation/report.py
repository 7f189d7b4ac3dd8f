"""`medldm evaluate`: reconstruction quality and sample diversity, written as report.json, report.md and PNGs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from medldm.config import EvaluateConfig, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, split_rows
from medldm.data.io import load_volume, write_json
from medldm.evaluation.metrics import VolumeMetrics, pairwise_similarity
from medldm.evaluation.plots import score_plots
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

log = logging.getLogger(__name__)


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def evaluate(data_dir: str | Path, out_dir: str | Path, cfg: EvaluateConfig, autoencoder: str | Path | None = None,
             samples: str | Path | Sequence[str | Path] | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate an autoencoder run and/or samples (one or more sample dirs, e.g. one per requested age) against
    the dataset's test split (and, for memorisation, its train split)."""
    if autoencoder is None and samples is None:
        raise ValueError("nothing to evaluate: give --autoencoder AE_RUN and/or --samples SAMPLES_DIR")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = read_manifest(data_dir)
    reference = read_dataset_info(data_dir)["reference"]
    test = split_rows(rows, "test")
    if not test:
        raise ValueError(f"{data_dir}/manifest.csv has no test-split volumes; preprocess with split.test_fraction > 0")
    metrics = VolumeMetrics(reference["shape"], cfg.kernel_size, cfg.kernel_sigma)
    out_dir.mkdir(parents=True, exist_ok=True)
    real = [_load(data_dir / r["image"]) for r in test]
    report: dict[str, Any] = {"data_dir": str(data_dir.resolve()), "test_volumes": len(test), "config": to_dict(cfg),
                              "ms_ssim_scales": metrics.scales, "device": str(dev), "versions": versions()}

    if autoencoder is not None:
        report["reconstruction"] = _reconstruction(Path(autoencoder), test, real, metrics, out_dir, dev)
    if samples is not None:
        dirs = [Path(samples)] if isinstance(samples, (str, Path)) else [Path(d) for d in samples]
        report["generation"] = _generation(dirs, data_dir, rows, reference, real, metrics, cfg, out_dir, dev)
    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _load(path: Path) -> torch.Tensor:
    # float16 in memory halves what a thousand samples take (5 MB per 128x160x128 volume); scores run in float32
    return torch.from_numpy(load_volume(path)[0])[None].half()


def _reconstruction(ae_run: Path, test: list[dict[str, Any]], real: list[torch.Tensor], metrics: VolumeMetrics,
                    out_dir: Path, dev: torch.device) -> dict[str, Any]:
    from medldm.config import config_from_dict
    from medldm.inference.encode import load_autoencoder, reconstruct

    model, meta = load_autoencoder(ae_run, dev)
    ae_cfg = config_from_dict("autoencoder", meta["config"])
    per_subject, recons = [], []
    for row, x in tqdm(list(zip(test, real)), desc="reconstruct", unit="volume"):
        recon = reconstruct(model, x[None].float().to(dev), ae_cfg).float().clamp(0, 1)[0].cpu()
        per_subject.append({"image": row["image"], **metrics(recon, x)})
        recons.append(recon)
    # the five worst by SSIM: where a reader should look first
    worst = sorted(range(len(per_subject)), key=lambda i: per_subject[i]["ssim"])[:5]
    tiles = []
    for i in worst:
        a, b = real[i][0].float().numpy(), recons[i][0].numpy()
        tiles += [three_plane(a), three_plane(b), three_plane(np.abs(a - b), vmax=0.25)]
    save_png(out_dir / "reconstructions_worst.png", grid(tiles, columns=3))
    keys = ("ssim", "ms_ssim", "psnr", "mae")
    return {"checkpoint": meta["checkpoint"], "per_subject": per_subject,
            "worst": [per_subject[i]["image"] for i in worst], **{k: _summary([s[k] for s in per_subject]) for k in keys}}


def load_samples(dirs: Sequence[Path], reference: dict[str, Any]) -> tuple[list[Path], list[torch.Tensor]]:
    """The synthetic NIfTI volumes of sample dirs; refused unless every one has the dataset's shape and spacing."""
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"--samples {', '.join(missing)}: no such folder")
    files = [f for d in dirs for f in sorted(d.glob("*.nii.gz"))]
    spacing = np.linalg.norm(np.asarray(reference["affine"])[:3, :3], axis=0)
    axes = nib.aff2axcodes(np.asarray(reference["affine"]))
    volumes, bad = [], []
    for f in files:
        data, affine = load_volume(f)
        # same shape, spacing and voxel-axis directions, or arrays would be compared mirrored or transposed
        if list(data.shape) != list(reference["shape"]) or nib.aff2axcodes(affine) != axes or not np.allclose(
                np.linalg.norm(affine[:3, :3], axis=0), spacing, atol=1e-3):
            bad.append(f"{f} ({list(data.shape)}, {''.join(nib.aff2axcodes(affine))} at "
                       f"{np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()} mm)")
        volumes.append(torch.from_numpy(data)[None].half())
    if bad:
        raise ValueError(f"--samples: {', '.join(bad[:5])} do not match the dataset's {reference['shape']}, "
                         f"{''.join(axes)} at {np.round(spacing, 3).tolist()} mm; evaluation never resamples: sample "
                         "from a model of this dataset (or preprocess the data to the model's grid)")
    return files, volumes


def _generation(dirs: list[Path], data_dir: Path, rows: list[dict[str, Any]], reference: dict[str, Any],
                real: list[torch.Tensor], metrics: VolumeMetrics, cfg: EvaluateConfig, out_dir: Path,
                dev: torch.device) -> dict[str, Any]:
    from medldm.evaluation.memorisation import NearestTraining, memorisation, pooled

    feature_net = None
    if cfg.fid_weights:  # checked (file, architecture) before any long work
        from medldm.evaluation.fid import medicalnet

        feature_net = medicalnet(cfg.fid_depth, cfg.fid_weights)
    files, synthetic = load_samples(dirs, reference)
    if len(files) < 2:
        raise ValueError(f"--samples {' '.join(map(str, dirs))}: diversity needs at least 2 synthetic .nii.gz "
                         f"volumes, found {len(files)}")
    names = [f.name if len(dirs) == 1 else f"{f.parent.name}/{f.name}" for f in files]
    out: dict[str, Any] = {"samples_dirs": [str(d.resolve()) for d in dirs], "num_samples": len(files),
                           "files": names,
                           "synthetic": pairwise_similarity(synthetic, metrics, cfg.diversity_pairs, cfg.seed, dev,
                                                            desc="pairs (synthetic)")}
    if len(real) >= 2:
        out["real_test"] = pairwise_similarity(real, metrics, cfg.diversity_pairs, cfg.seed, dev, desc="pairs (real)")
        out["ms_ssim_difference"] = out["synthetic"]["ms_ssim_mean"] - out["real_test"]["ms_ssim_mean"]
    else:
        out["real_test"] = None
        log.warning("only one test volume: real-real diversity is not available")

    train = split_rows(rows, "train")
    nearest = NearestTraining(lambda i: _load(data_dir / train[i]["image"]), len(train), metrics,
                              cfg.prefilter_factor, cfg.nearest_candidates, dev)
    mem = memorisation(synthetic, real, nearest, cfg.memorisation_percentile)
    for entry in mem["synthetic"] + mem["real_test"]:
        entry["nearest_train_image"] = train[entry["nearest_train"]]["image"]
    for entry, name in zip(mem["synthetic"], names):
        entry["file"] = name
    out["memorisation"] = mem
    # the flagged pairs, else the five closest: synthetic volume above, its nearest training volume below
    shown = mem["flagged"] or sorted(range(len(synthetic)), key=lambda i: -mem["synthetic"][i]["ssim"])[:5]
    tiles = [three_plane(synthetic[i][0].numpy()) for i in shown[:8]]
    tiles += [three_plane(nearest.load(mem["synthetic"][i]["nearest_train"])[0].numpy()) for i in shown[:8]]
    save_png(out_dir / "nearest_training.png", grid(tiles, columns=len(shown[:8])))

    # distribution distance on the pre-filter's pooled volumes; train-vs-test is the yardstick for "as close as real"
    syn_f = torch.stack([pooled(v, cfg.prefilter_factor) for v in synthetic])
    real_f = torch.stack([pooled(v, cfg.prefilter_factor) for v in real])
    if len(real) >= 2:
        out["mmd"] = {"synthetic_vs_test": _mmd(real_f, syn_f, cfg.seed),
                      "train_vs_test": _mmd(real_f, nearest.features.cpu(), cfg.seed) if len(train) >= 2 else None,
                      "features": f"volumes average-pooled by {cfg.prefilter_factor}, linear kernel (MONAI MMDMetric)"}
    n = min(8, len(synthetic), len(real))
    tiles = [three_plane(v[0].numpy()) for v in synthetic[:n]] + [three_plane(v[0].numpy()) for v in real[:n]]
    save_png(out_dir / "synthetic_vs_real.png", grid(tiles, columns=n))
    out["conditioning"] = _age_check(files, synthetic, split_rows(rows, "test"), real)
    score_plots(out_dir / "scores.png", out)
    if feature_net is None:
        out["fid"] = {"skipped": "evaluate.fid_weights is empty: FID needs a local MedicalNet ResNet checkpoint (e.g. "
                                 "resnet_10_23dataset.pth of the MedicalNet release with evaluate.fid_depth=10); "
                                 "nothing is downloaded"}
    else:
        from medldm.evaluation.fid import features, fid

        test_feat = features(feature_net, real, dev)
        train_feat = features(feature_net, [nearest.load(i) for i in range(min(len(train), len(synthetic)))], dev)
        out["fid"] = {"synthetic_vs_test": fid(features(feature_net, synthetic, dev), test_feat),
                      "train_vs_test": fid(train_feat, test_feat), "weights": cfg.fid_weights, "depth": cfg.fid_depth}
        if min(len(synthetic), len(real)) < test_feat.shape[1]:
            out["fid"]["note"] = (f"fewer volumes than the {test_feat.shape[1]} features: the covariances are "
                                  "singular and FID is biased; compare values only at equal set sizes")
    return out


def _age_check(files: list[Path], synthetic: list[torch.Tensor], test: list[dict[str, Any]],
               real: list[torch.Tensor]) -> dict[str, Any]:
    """The CSF-like share of the brain against the requested age (from each sample's sidecar), beside real scans."""
    from medldm.evaluation.anatomy import age_trend, csf_fraction

    ages, seeds = [], []
    for f in files:
        side_path = f.with_name(f.name.replace(".nii.gz", ".json"))
        side = json.loads(side_path.read_text(encoding="utf-8")) if side_path.is_file() else {}
        conditions = side.get("conditions") or {}
        ages.append(float(conditions["age"]) if conditions.get("age") is not None else float("nan"))
        seeds.append(side.get("seed", -1 - len(seeds)))  # no sidecar: a seed of its own
    synth = [csf_fraction(v[0].float().numpy()) for v in synthetic]
    real_ages = [float(r["age"]) if r.get("age") is not None else float("nan") for r in test]
    real_values = [csf_fraction(v[0].float().numpy()) for v in real]
    return {"quantity": "share of head/brain voxels darker than half their median (CSF-like)",
            "synthetic": age_trend(ages, synth, seeds), "real_test": age_trend(real_ages, real_values),
            "requested_ages": ages, "synthetic_values": synth, "real_ages": real_ages,
            "real_values": real_values}


def _mmd(a: torch.Tensor, b: torch.Tensor, seed: int) -> float:
    """MONAI's unbiased MMD; it needs sets of one size, so the larger set is subsampled (seeded)."""
    from monai.metrics import MMDMetric

    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a, b = (x[torch.randperm(len(x), generator=g)[:n]] for x in (a, b))
    return float(MMDMetric()(a, b))


def render_markdown(report: dict[str, Any]) -> str:
    """Tables a reader can paste into a paper, and the pictures."""
    lines = ["# medldm evaluation", "", f"Dataset: `{report['data_dir']}` ({report['test_volumes']} test volumes). "
             f"MS-SSIM with {report['ms_ssim_scales']} scales.", ""]
    rec = report.get("reconstruction")
    if rec:
        lines += ["## Autoencoder reconstruction (test split)", "", f"Checkpoint: `{rec['checkpoint']}`", "",
                  "| metric | mean | std |", "|---|---|---|"]
        for k in ("ssim", "ms_ssim", "psnr", "mae"):
            lines.append(f"| {k.upper().replace('_', '-')} | {rec[k]['mean']:.4f} | {rec[k]['std']:.4f} |")
        lines += ["", f"Worst by SSIM: {', '.join(f'`{w}`' for w in rec['worst'])}.", "",
                  "![worst reconstructions](reconstructions_worst.png) (per row: input, reconstruction, "
                  "|difference| x4; the five worst subjects)", ""]
    gen = report.get("generation")
    if gen:
        syn, real = gen["synthetic"], gen["real_test"]
        lines += ["## Generation diversity (mean pairwise similarity; lower is more diverse)", "",
                  "| set | pairs | MS-SSIM | SSIM |", "|---|---|---|---|",
                  f"| synthetic ({gen['num_samples']}) | {syn['pairs']} | {syn['ms_ssim_mean']:.4f} ± "
                  f"{syn['ms_ssim_std']:.4f} | {syn['ssim_mean']:.4f} |"]
        if real:
            lines.append(f"| real test | {real['pairs']} | {real['ms_ssim_mean']:.4f} ± {real['ms_ssim_std']:.4f} | "
                         f"{real['ssim_mean']:.4f} |")
            lines += ["", f"Synthetic minus real MS-SSIM: {gen['ms_ssim_difference']:+.4f} "
                      "(near 0: as varied as real brains; well above 0: too similar to each other)."]
        if gen.get("mmd"):
            m = gen["mmd"]
            yard = f"{m['train_vs_test']:.5f}" if m["train_vs_test"] is not None else "n/a"
            lines += ["", f"MMD to the real test volumes ({m['features']}): synthetic {m['synthetic_vs_test']:.5f}, "
                      f"real training volumes {yard} (lower is closer)."]
        f = gen["fid"]
        lines += ["", f"FID skipped: {f['skipped']}." if "skipped" in f else
                  f"FID to the real test volumes (MedicalNet resnet{f['depth']} features): synthetic "
                  f"{f['synthetic_vs_test']:.4f}, real training volumes {f['train_vs_test']:.4f} (lower is closer)"
                  + (f"; {f['note']}." if "note" in f else ".")]
        mem = gen["memorisation"]
        real_s = [e["ssim"] for e in mem["real_test"]]
        syn_s = [e["ssim"] for e in mem["synthetic"]]
        lines += ["", "## Memorisation: nearest training volume (SSIM)", "",
                  "| set | n | median | max |", "|---|---|---|---|",
                  f"| synthetic | {len(syn_s)} | {np.median(syn_s):.4f} | {max(syn_s):.4f} |",
                  f"| real test (never trained on) | {len(real_s)} | {np.median(real_s):.4f} | {max(real_s):.4f} |", "",
                  f"Threshold: the {mem['percentile']:g}th percentile of the real test volumes' nearest-training SSIM, "
                  f"{mem['threshold_ssim']:.4f}. **{len(mem['flagged'])} of {len(syn_s)} synthetic volumes are "
                  "closer to a training volume than that** and may be copies"
                  + (": " + ", ".join(f"`{mem['synthetic'][i]['file']}` ~ `{mem['synthetic'][i]['nearest_train_image']}`"
                                     f" ({mem['synthetic'][i]['ssim']:.4f})" for i in mem["flagged"][:20]) if mem["flagged"]
                     else "."),
                  "", "![nearest training volumes](nearest_training.png) (top: synthetic, bottom: its nearest training "
                  "volume; the flagged ones, else the five closest)", ""]
        lines += ["![synthetic vs real](synthetic_vs_real.png) (top: synthetic, bottom: real test)", "",
                  "![scores](scores.png) (pairwise MS-SSIM, nearest-training SSIM with the flagging threshold, "
                  "and the age check; synthetic red, real blue)", ""]
        cond = gen["conditioning"]
        lines += ["## Conditioning check: age", "", f"Measured: {cond['quantity']}, against the requested age "
                  "(synthetic, from each sample's sidecar) and the true age (real test).", "",
                  "| set | n | Pearson r | slope per decade |", "|---|---|---|---|"]
        for name, key in (("synthetic (requested age)", "synthetic"), ("real test (true age)", "real_test")):
            t = cond[key]
            lines.append(f"| {name} | {t['n']} | " + (f"{t['pearson_r']:+.3f} | {t['slope_per_decade']:+.4f} |"
                                                   if t["pearson_r"] is not None else f"skipped: {t['skipped']} | |"))
        t = cond["synthetic"]
        if "within_seed_r" in t:
            lines.append(f"| synthetic, within seed ({t['seeds_at_several_ages']} seeds at several ages) | {t['n']} | "
                         f"{t['within_seed_r']:+.3f} | {t['within_seed_slope_per_decade']:+.4f} |")
        lines += ["", "A model that follows its age condition shows a positive slope like the real scans' (ventricles "
                  "and sulci widen with age). Sample the same seeds at several ages for the within-seed line.", ""]
    return "\n".join(lines) + "\n"
