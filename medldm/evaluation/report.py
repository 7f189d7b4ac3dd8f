"""`medldm evaluate`: reconstruction quality and sample diversity, written as report.json, report.md and PNGs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medldm.artifacts import AutoencoderRun, file_sha256
from medldm.config import EvaluateConfig, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, split_rows
from medldm.data.io import load_volume, nifti_stem, visible, write_json, write_text
from medldm.devices import resolve_device
from medldm.errors import InputError
from medldm.evaluation.metrics import VolumeMetrics, pairwise_similarity
from medldm.evaluation.morphometry import MEASURES, Morphometry
from medldm.evaluation.plots import morphometry_plot, score_plots, verdict_sheet
from medldm.evaluation.samples import SampleVolumes, sample_files
from medldm.models.ops import reconstruct
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane

if TYPE_CHECKING:
    from medldm.evaluation.memorisation import NearestTraining

log = logging.getLogger(__name__)


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def evaluate(data_dir: str | Path, out_dir: str | Path, cfg: EvaluateConfig, autoencoder: str | Path | None = None,
             samples: str | Path | Sequence[str | Path] | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate an autoencoder run and/or samples (one or more sample dirs, e.g. one per requested age) against
    the dataset's test split (and, for memorisation, its train split)."""
    if autoencoder is None and samples is None:
        raise InputError("nothing to evaluate: give --autoencoder AE_RUN and/or --samples SAMPLES_DIR")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dev = resolve_device(device)
    rows = read_manifest(data_dir)
    info = read_dataset_info(data_dir)
    reference = info["reference"]
    test = split_rows(rows, "test")
    if not test:
        raise InputError(f"{data_dir}/manifest.csv has no test-split volumes; preprocess with split.test_fraction > 0")
    dirs = files = None
    if samples is not None:
        dirs = [Path(samples)] if isinstance(samples, (str, Path)) else [Path(d) for d in samples]
        files = sample_files(dirs, reference)  # every header checked before any volume is read
        if len(files) < 2:
            raise InputError(f"--samples {' '.join(map(str, dirs))}: diversity needs at least 2 synthetic .nii.gz "
                             f"volumes, found {len(files)}")
    metrics = VolumeMetrics(reference["shape"], cfg.kernel_size, cfg.kernel_sigma)
    out_dir.mkdir(parents=True, exist_ok=True)
    real = [_load(data_dir / r["image"]) for r in test]
    report: dict[str, Any] = {"data_dir": str(data_dir.resolve()), "test_volumes": len(test), "config": to_dict(cfg),
                              "ms_ssim_scales": metrics.scales, "device": str(dev), "versions": versions()}
    # one morphometry for every volume of the dataset's grid: the central region from the real test volumes
    morph = Morphometry.for_dataset(np.asarray(reference["affine"]), (v[0].float().numpy() for v in real),
                                    cfg.morphometry_method)
    pre = info.get("config") or {}
    skull_stripped = bool(pre.get("brain_mask")) and bool((pre.get("registration") or {}).get("enabled"))

    found = None
    if autoencoder is None and dirs is not None:
        # the samples' own autoencoder: the real test volumes decoded by it are the samples' fair reference
        autoencoder = found = sidecar_autoencoder(dirs)
    decoded = None
    if autoencoder is not None:
        report["reconstruction"], *decoded = _reconstruction(Path(autoencoder), test, real, metrics, out_dir, dev,
                                                             morph)
        if found is not None:
            report["reconstruction"]["found_in"] = "the samples' sidecars (autoencoder_checkpoint, SHA-256 checked)"
    if dirs is not None and files is not None:
        recon_m = (report.get("reconstruction") or {}).get("morphometry")
        report["generation"] = _generation(dirs, files, data_dir, rows, real, metrics, cfg, out_dir, dev, morph,
                                           skull_stripped, recon_m, decoded)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", render_markdown(report))
    return report


def sidecar_autoencoder(dirs: Sequence[Path]) -> Path | None:
    """The autoencoder checkpoint every sample's sidecar names, when it is still there with the recorded SHA-256."""
    named = set()
    for d in dirs:
        for side in visible(d, "*.json"):
            try:
                data = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("autoencoder_checkpoint"):
                named.add((data["autoencoder_checkpoint"], data.get("autoencoder_sha256")))
    if len(named) != 1:
        return None
    path, sha = next(iter(named))
    if not Path(path).is_file() or (sha and file_sha256(Path(path)) != sha):
        log.warning("the samples' autoencoder %s is gone or changed: plausibility is judged against the real "
                    "volumes (give --autoencoder AE_RUN for the decoded reference)", path)
        return None
    return Path(path)


def _load(path: Path) -> torch.Tensor:
    # float16 in memory halves what the test split takes (5 MB per 128x160x128 volume); scores run in float32
    return torch.from_numpy(load_volume(path)[0])[None].half()


def _reconstruction(ae_run: Path, test: list[dict[str, Any]], real: list[torch.Tensor], metrics: VolumeMetrics,
                    out_dir: Path, dev: torch.device, morph: Morphometry
                    ) -> tuple[dict[str, Any], list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The test volumes through the autoencoder: scores, pictures, the decoded volumes and the decoding itself."""
    ae = AutoencoderRun.at(ae_run)
    model, ae_cfg = ae.model(dev), ae.config
    per_subject, recons, measured = [], [], []
    for row, x in tqdm(list(zip(test, real)), desc="reconstruct", unit="volume"):
        recon = reconstruct(model, x[None].float().to(dev), ae_cfg).float().clamp(0, 1)[0].cpu()
        per_subject.append({"image": row["image"], **metrics(recon, x)})
        recons.append(recon)
        # the real test volumes as the decoder leaves them: the morphometry yardstick for decoded samples
        measured.append(morph(recon[0].numpy()))
    # the five worst by SSIM: where a reader should look first
    worst = sorted(range(len(per_subject)), key=lambda i: per_subject[i]["ssim"])[:5]
    tiles = []
    for i in worst:
        a, b = real[i][0].float().numpy(), recons[i][0].numpy()
        tiles += [three_plane(a), three_plane(b), three_plane(np.abs(a - b), vmax=0.25)]
    save_png(out_dir / "reconstructions_worst.png", grid(tiles, columns=3))
    keys = ("ssim", "ms_ssim", "psnr", "mae")
    return ({"checkpoint": ae.resolved, "per_subject": per_subject, "morphometry": measured,
             "worst": [per_subject[i]["image"] for i in worst],
             **{k: _summary([s[k] for s in per_subject]) for k in keys}}, [r.half() for r in recons],
            lambda x: reconstruct(model, x[None].float().to(dev), ae_cfg).float().clamp(0, 1)[0].cpu().half())


def _generation(dirs: list[Path], files: list[Path], data_dir: Path, rows: list[dict[str, Any]],
                real: list[torch.Tensor], metrics: VolumeMetrics, cfg: EvaluateConfig, out_dir: Path,
                dev: torch.device, morph: Morphometry, skull_stripped: bool,
                recon_m: list[dict[str, float]] | None, decoded: list[Any] | None) -> dict[str, Any]:
    """Plausibility, memorisation, diversity, morphometry and distribution distances of the samples (``files``, checked
    by ``sample_files``); their volumes are read one at a time (memory does not grow with their number)."""
    from medldm.evaluation.memorisation import NearestTraining, flag_copies, pooled

    feature_net = None
    if cfg.fid_weights:  # checked (file, architecture) before any long work
        from medldm.evaluation.fid import medicalnet

        feature_net = medicalnet(cfg.fid_depth, cfg.fid_weights)
    synthetic = SampleVolumes(files)
    names = [f.name if len(dirs) == 1 else f"{f.parent.name}/{f.name}" for f in files]
    train = split_rows(rows, "train")

    def measure(v: torch.Tensor) -> dict[str, float]:
        return morph(v[0].float().numpy())

    nearest = NearestTraining(lambda i: _load(data_dir / train[i]["image"]), len(train), metrics,
                              cfg.prefilter_factor, cfg.nearest_candidates, dev, measure=measure)
    # MMD compares sets of one size: only the samples it draws keep their pooled volume
    mmd_real, mmd_syn = _mmd_draw(len(real), len(files), cfg.seed)
    scores = _score_samples(synthetic, nearest, measure, cfg.prefilter_factor, mmd_syn.tolist(), feature_net, dev)
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

    ref_ssim = ref_m = None
    threshold_reference = "the real test volumes"
    if decoded is not None:
        # the reference of decoded samples: real volumes through the same autoencoder, the test volumes and up to
        # REFERENCE_TRAIN training volumes (each compared with the training set without itself)
        test_decoded, decode = decoded
        ref_ssim = [nearest(v)[1] for v in tqdm(test_decoded, desc="nearest training (test via AE)", unit="volume")]
        assert recon_m is not None  # the reconstruction that decoded them measured them too
        ref_m = list(recon_m)
        picked = np.random.default_rng(cfg.seed).permutation(len(train))[:REFERENCE_TRAIN].tolist()
        if len(train) > 1:
            for i in tqdm(picked, desc="nearest training (train via AE)", unit="volume"):
                v = decode(nearest.load(i))
                ref_ssim.append(nearest(v, exclude=i)[1])
                ref_m.append(measure(v))
        threshold_reference = (f"{len(test_decoded)} test and {len(ref_ssim) - len(test_decoded)} training volumes "
                               "through the autoencoder")
    # the raw test volumes' threshold flagged smooth average brains on IXI: the decoded reference sets it if known
    real_nearest = [nearest(v) for v in tqdm(real, desc="nearest training (real test)", unit="volume")]
    mem = flag_copies(scores.nearest, real_nearest, cfg.memorisation_percentile, ref_ssim, threshold_reference)
    for entry in mem["synthetic"] + mem["real_test"]:
        entry["nearest_train_image"] = train[entry["nearest_train"]]["image"]
    for entry, name in zip(mem["synthetic"], names):
        entry["file"] = name
    out["memorisation"] = mem
    syn_m, real_m = scores.measured, [measure(v) for v in real]
    test_rows = split_rows(rows, "test")
    syn_ssim = [e["ssim"] for e in mem["synthetic"]]
    test_names = [r["image"] for r in test_rows]
    if ref_ssim is not None:  # a perfect model's samples are real brains as the decoder renders them
        assert ref_m is not None  # made with ref_ssim
        # the statistics' ranges also take in the training volumes as scanned: a brain is a brain, sharp or decoded
        plaus = _plausibility(syn_ssim, syn_m, ref_ssim, ref_m, nearest.measured, test_names, names, cfg,
                              f"{len(test_names)} test and {len(ref_ssim) - len(test_names)} training volumes through "
                              f"the autoencoder (decoded, as samples are; for the statistics also the {len(train)} "
                              "training volumes as scanned)")
    else:
        plaus = _plausibility(syn_ssim, syn_m, [e["ssim"] for e in mem["real_test"]], real_m, nearest.measured,
                              test_names, names, cfg, "the real volumes (no autoencoder known: they are sharper than "
                              "decoded samples, so expect false alarms; give --autoencoder)")
    out["plausibility"] = plaus
    keep = [i for i, e in enumerate(plaus["synthetic"]) if e["plausible"]]
    if 2 <= len(keep) < len(files):  # diversity without the failures, beside the whole set's
        out["synthetic_plausible"] = pairwise_similarity(synthetic.subset(keep), metrics, cfg.diversity_pairs,
                                                         cfg.seed, dev, desc="pairs (plausible)")
    shown = verdict_sheet(out_dir / "plausibility.png", lambda i: three_plane(synthetic[i][0].numpy()), names,
                          plaus["synthetic"])
    plaus["sheet"] = {"shown": len(shown), "implausible_shown": sum(not plaus["synthetic"][i]["plausible"]
                                                                    for i in shown),
                      "of": len(files), "files": [names[i] for i in shown]}
    out["morphometry"] = _morphometry([syn_m[i] for i in keep], real_m, nearest.measured, recon_m, syn_m,
                                      skull_stripped, morph, cfg.seed)
    out["morphometry"]["plausible"] = [e["plausible"] for e in plaus["synthetic"]]
    morphometry_plot(out_dir / "morphometry.png", out["morphometry"])
    # the flagged pairs, else the five closest: synthetic volume above, its nearest training volume below
    shown = (mem["flagged"] or sorted(range(len(files)), key=lambda i: -mem["synthetic"][i]["ssim"])[:5])[:8]
    tiles = [three_plane(synthetic[i][0].numpy()) for i in shown]
    tiles += [three_plane(nearest.load(mem["synthetic"][i]["nearest_train"])[0].numpy()) for i in shown]
    save_png(out_dir / "nearest_training.png", grid(tiles, columns=len(shown)))

    # distribution distance on the pre-filter's pooled volumes; train-vs-test is the yardstick for "as close as real"
    real_f = torch.stack([pooled(v, cfg.prefilter_factor) for v in real])
    if len(real) >= 2:
        train_vs_test = None
        if len(train) >= 2:
            a, b = _mmd_draw(len(real_f), len(nearest.features), cfg.seed)
            train_vs_test = _mmd(real_f[a], nearest.features.cpu()[b])
        out["mmd"] = {"synthetic_vs_test": _mmd(real_f[mmd_real], scores.mmd_features),
                      "train_vs_test": train_vs_test,
                      "features": f"volumes average-pooled by {cfg.prefilter_factor}, linear kernel (MONAI MMDMetric)"}
    n = min(8, len(files), len(real))
    tiles = [three_plane(synthetic[i][0].numpy()) for i in range(n)] + [three_plane(v[0].numpy()) for v in real[:n]]
    save_png(out_dir / "synthetic_vs_real.png", grid(tiles, columns=n))
    out["conditioning"] = _age_check(files, syn_m, test_rows, real_m, [e["plausible"] for e in plaus["synthetic"]])
    score_plots(out_dir / "scores.png", out)
    if feature_net is None:
        out["fid"] = {"skipped": "evaluate.fid_weights is empty: FID needs a local MedicalNet ResNet checkpoint (e.g. "
                                 "resnet_10_23dataset.pth of the MedicalNet release with evaluate.fid_depth=10); "
                                 "nothing is downloaded"}
    else:
        from medldm.evaluation.fid import features, fid

        assert scores.fid_features is not None  # computed in the pass when there is a feature network
        test_feat = features(feature_net, real, dev)
        train_feat = features(feature_net, (nearest.load(i) for i in range(min(len(train), len(files)))), dev)
        out["fid"] = {"synthetic_vs_test": fid(scores.fid_features, test_feat),
                      "train_vs_test": fid(train_feat, test_feat), "weights": cfg.fid_weights, "depth": cfg.fid_depth}
        if min(len(files), len(real)) < test_feat.shape[1]:
            out["fid"]["note"] = (f"fewer volumes than the {test_feat.shape[1]} features: the covariances are "
                                  "singular and FID is biased; compare values only at equal set sizes")
    return out


@dataclass
class _SampleScores:
    """What the report needs of each sample, from one pass over them."""

    nearest: list[tuple[int, float]]  # (nearest training volume, its SSIM)
    measured: list[dict[str, float]]  # morphometry and the plausibility statistics
    mmd_features: torch.Tensor  # pooled volumes of the samples MMD draws, in the order drawn
    fid_features: torch.Tensor | None  # MedicalNet features of every sample, when FID is on


def _score_samples(synthetic: SampleVolumes, nearest: NearestTraining,
                   measure: Callable[[torch.Tensor], dict[str, float]], factor: int, mmd_pick: list[int],
                   feature_net: torch.nn.Module | None, dev: torch.device) -> _SampleScores:
    """Nearest training volume, morphometry and the small features of every sample, one volume in memory at a time."""
    from medldm.evaluation.fid import features
    from medldm.evaluation.memorisation import pooled

    slot = {i: k for k, i in enumerate(mmd_pick)}
    found, measured, fid_f = [], [], []
    mmd_f: list[torch.Tensor | None] = [None] * len(mmd_pick)
    for i, v in enumerate(tqdm(synthetic, desc="samples (nearest training, morphometry)", unit="volume")):
        found.append(nearest(v))
        measured.append(measure(v))
        if i in slot:
            mmd_f[slot[i]] = pooled(v, factor)
        if feature_net is not None:
            fid_f.append(features(feature_net, [v], dev))
    return _SampleScores(found, measured, torch.stack([f for f in mmd_f if f is not None]),
                         torch.cat(fid_f) if fid_f else None)


REFERENCE_TRAIN = 64  # training volumes decoded for the plausibility reference (beside every test volume)
AGE_MEASURES = ("csf_fraction", "ventricle_ml", "brain_ml")


def _age_check(files: list[Path], syn_m: list[dict[str, float]], test: list[dict[str, Any]],
               real_m: list[dict[str, float]], plausible: list[bool]) -> dict[str, Any]:
    """Morphometry against the requested age (from each sample's sidecar; plausible samples only), beside real
    scans against their true age. The first of ``AGE_MEASURES`` is the headline quantity."""
    from medldm.evaluation.anatomy import age_trend

    ages: list[float] = []
    seeds: list[int] = []
    for f, ok in zip(files, plausible):
        side_path = f.with_name(nifti_stem(f) + ".json")
        side = json.loads(side_path.read_text(encoding="utf-8")) if side_path.is_file() else {}
        conditions = side.get("conditions") or {}
        age = float(conditions["age"]) if conditions.get("age") is not None else float("nan")
        ages.append(age if ok else float("nan"))  # a sample that is not a brain has no anatomy to measure
        seeds.append(side.get("seed", -1 - len(seeds)))  # no sidecar: a seed of its own
    real_ages = [float(r["age"]) if r.get("age") not in (None, "") else float("nan") for r in test]
    measures = {m: {"synthetic": age_trend(ages, [x[m] for x in syn_m], seeds),
                    "real_test": age_trend(real_ages, [x[m] for x in real_m])} for m in AGE_MEASURES}
    head = AGE_MEASURES[0]
    return {"quantity": MEASURES[head], "measure": head, "synthetic": measures[head]["synthetic"],
            "real_test": measures[head]["real_test"], "measures": measures, "requested_ages": ages,
            "synthetic_values": [x[head] for x in syn_m], "real_ages": real_ages,
            "real_values": [x[head] for x in real_m]}


def _plausibility(syn_ssim: list[float], syn_m: list[dict[str, float]], ref_ssim: list[float],
                  ref_m: list[dict[str, float]], extra_m: list[dict[str, float]], ref_names: list[str],
                  names: list[str], cfg: EvaluateConfig, reference: str) -> dict[str, Any]:
    """A verdict per synthetic volume against the reference volumes (``ref_*``: their nearest-training SSIM and
    statistics; ``extra_m`` adds statistics only, e.g. the training volumes), and the same verdict for every
    reference volume with itself left out: the yardstick, see medldm.evaluation.plausibility."""
    from medldm.evaluation.plausibility import STATISTICS, robust_reference, ssim_floor, verdict

    z, pct = cfg.plausibility_z, cfg.plausibility_percentile
    floor = ssim_floor(ref_ssim, pct, z)
    limits = robust_reference(extra_m + ref_m)
    syn = [{"file": name, **verdict(s, m, floor, limits, z, pct)} for name, s, m in zip(names, syn_ssim, syn_m)]
    real = []
    for i, (name, m) in enumerate(zip(ref_names if len(ref_ssim) > 1 else [], ref_m)):
        floor_i = ssim_floor(ref_ssim[:i] + ref_ssim[i + 1:], pct, z) if len(ref_ssim) > 1 else floor
        real.append({"image": name, **verdict(ref_ssim[i], m, floor_i,
                                              robust_reference(extra_m + ref_m[:i] + ref_m[i + 1:]), z, pct)})
    return {"plausible": sum(e["plausible"] for e in syn), "n": len(syn),
            "real_test_plausible": sum(e["plausible"] for e in real), "real_test_n": len(real),
            "ssim_floor": floor, "z_limit": z, "percentile": pct, "statistics": STATISTICS,
            "reference": reference, "limits": limits, "synthetic": syn, "real_test": real}


def _morphometry(syn: list[dict[str, float]], real: list[dict[str, float]], train: list[dict[str, float]],
                 recon: list[dict[str, float]] | None, all_syn: list[dict[str, float]], skull_stripped: bool,
                 morph: Morphometry, seed: int) -> dict[str, Any]:
    """Per measure: the sets' summaries, synthetic (plausible) vs real test, and the yardsticks (train vs test at the
    synthetic set's size; the test volumes after the autoencoder, which smooths them as it smooths samples)."""
    from medldm.evaluation.morphometry import distances, summary, yardstick

    out: dict[str, Any] = {
        "method": morph.method, "skull_stripped": skull_stripped, "measures": MEASURES,
        "region_voxels": int(morph.region.sum()), "voxel_ml": morph.voxel_ml,
        "note": None if skull_stripped else "the dataset is not skull-stripped: the 'brain' mask is the head, so the "
                                            "tissue classes and volumes are the head's, comparable only with each "
                                            "other",
        "synthetic": all_syn, "real_test": real, "train": train, "reconstructed_test": recon, "distances": {}}
    n = len(syn) or len(real)
    for m in MEASURES:
        col = {name: [x[m] for x in values] for name, values in
               (("synthetic", syn), ("real_test", real), ("train", train), ("reconstructed_test", recon or []))}
        d = {"synthetic_vs_test": distances(col["synthetic"], col["real_test"]),
             "train_vs_test": yardstick(col["train"], col["real_test"], n, seed=seed),
             "summary": {k: summary(v) for k, v in col.items() if v}, "unit": "ml" if m.endswith("_ml") else "share"}
        if recon:
            d["reconstructed_vs_test"] = distances(col["reconstructed_test"], col["real_test"])
            d["synthetic_vs_reconstructed"] = distances(col["synthetic"], col["reconstructed_test"])
        out["distances"][m] = d
    return out


def _mmd_draw(n_a: int, n_b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The subsets of two sets that MMD compares: MONAI's unbiased MMD needs sets of one size, so the larger set is
    subsampled (seeded; the indices into each set, in the order drawn)."""
    n = min(n_a, n_b)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_a, generator=g)[:n], torch.randperm(n_b, generator=g)[:n]


def _mmd(a: torch.Tensor, b: torch.Tensor) -> float:
    """MONAI's unbiased MMD of two feature sets of one size (drawn by ``_mmd_draw``)."""
    from monai.metrics import MMDMetric

    return float(MMDMetric()(a, b))


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def verdict_table(report: dict[str, Any]) -> list[str]:
    """One screen that says whether the model is usable: each answer beside the yardstick real data give."""
    lines = ["## Verdict", "", "| question | result | yardstick | reading |", "|---|---|---|---|"]
    rec, gen = report.get("reconstruction"), report.get("generation")
    if gen:
        p, mem, n = gen["plausibility"], gen["memorisation"], gen["num_samples"]
        bad = n - p["plausible"]
        lines.append(f"| Are the samples brains? | **plausible: {p['plausible']} of {n}** | real test volumes"
                     + (" through the autoencoder" if "autoencoder (decoded" in p["reference"] else "")
                     + f": {p['real_test_plausible']} of {p['real_test_n']} plausible by the same rule "
                       "(each left out) | "
                     + ("every sample is a brain" if not bad else f"**{bad} of {n} are not brains** (listed below)")
                     + " |")
        k = len(mem["flagged"])
        lines.append(f"| Are they copies? | **possibly memorised: {k} of {n}** | nearest-training SSIM above "
                     f"{mem['threshold_ssim']:.3f} (percentile {mem['percentile']:g} of "
                     f"{mem.get('threshold_reference', 'the real test volumes')}) | "
                     + ("none is closer to a training brain than unseen real subjects are" if not k else
                        f"look at {k} (nearest_training.png)") + " |")
        real = gen.get("real_test")
        if real:
            gap, spread = gen["ms_ssim_difference"], real["ms_ssim_std"]
            plausible = gen.get("synthetic_plausible")
            extra = f" (plausible only: {plausible['ms_ssim_mean']:.3f})" if plausible else ""
            reading = ("as varied as real brains" if abs(gap) <= spread else "less varied than real brains (too alike)"
                       if gap > 0 else "more varied than real brains (failed samples or unreal variation)")
            lines.append(f"| As varied as real brains? | pairwise MS-SSIM "
                         f"{gen['synthetic']['ms_ssim_mean']:.3f}{extra}; "
                         f"diversity gap {gap:+.3f} | real test {real['ms_ssim_mean']:.3f} ± {spread:.3f} | "
                         f"{reading} |")
        morph = gen["morphometry"]
        against = "synthetic_vs_reconstructed" if morph.get("reconstructed_test") else "synthetic_vs_test"
        rows = [(m, d[against]["wasserstein"], d["train_vs_test"]["wasserstein"])
                for m, d in morph["distances"].items()]
        rows = [(m, a, b) for m, a, b in rows if a is not None and b is not None]
        if rows:
            worst = max(rows, key=lambda r: r[1] / max(r[2], 1e-12))
            further = sum(a > b for _, a, b in rows)
            versus = "the test set through the autoencoder" if against.endswith("reconstructed") else "the test set"
            lines.append(f"| Anatomy like real brains? | morphometry gap: {further} of {len(rows)} measures further "
                         f"from {versus} than training volumes are from the test set; worst `{worst[0]}` W1 "
                         f"{worst[1]:.4g} | "
                         f"train vs test W1 {worst[2]:.4g} (same set size) | "
                         + ("anatomy within the real spread" if not further else "see Morphometry below") + " |")
        else:
            lines.append("| Anatomy like real brains? | n/a: fewer than 2 plausible samples | | |")
    if rec:
        lines.append(f"| Does the autoencoder keep the anatomy? | test SSIM {rec['ssim']['mean']:.3f}, PSNR "
                     f"{rec['psnr']['mean']:.1f} dB | 1 = perfect | decoded samples are at most this sharp |")
    return lines + [""]


def _plausibility_md(gen: dict[str, Any]) -> list[str]:
    p = gen["plausibility"]
    f = p["ssim_floor"]
    lines = ["## Plausibility: is every sample a brain?", "",
             f"**plausible: {p['plausible']} of {p['n']}**; the reference's test volumes by the same rule, "
             "each left out: "
             f"{p['real_test_plausible']} of {p['real_test_n']}. The reference: {p['reference']}. A volume is "
             f"implausible when its nearest-training SSIM is below {f['floor']:.3f} (the lower of the reference's "
             f"percentile {p['percentile']:g}, {f['percentile']:.3f}, and its median minus "
             f"{f.get('z_used', p['z_limit']):.1f} robust SD, {f['median_minus_z']:.3f}; {p['z_limit']:g} widened for "
             f"{f.get('n', '?')} volumes), or when one of its statistics ({', '.join(p['statistics'])}) lies outside "
             f"the reference's range and beyond the same robust-SD limit from its median. Each reference volume is "
             "judged with itself left out: its verdicts count the rule's false alarms on real brains.", ""]
    bad = [e for e in p["synthetic"] if not e["plausible"]]
    if bad:
        lines += ["| sample | nearest-training SSIM | why |", "|---|---|---|"]
        lines += [f"| `{e['file']}` | {e['nearest_train_ssim']:.3f} | {'; '.join(e['reasons'])} |" for e in bad[:50]]
    real_bad = [e for e in p["real_test"] if not e["plausible"]]
    if real_bad:
        lines += ["", "Reference volumes the rule rejects (each a false alarm of the rule, or a scan to look at): "
                  + "; ".join(f"`{e['image']}`: {e['reasons'][0]}" for e in real_bad[:10])]
    sheet = p.get("sheet") or {"shown": p["n"], "of": p["n"]}
    shown = f"all {sheet['of']} samples"
    if sheet["shown"] < sheet["of"]:  # a cohort: the implausible first, then plausible ones, spread over the set
        bad_n, bad_shown = p["n"] - p["plausible"], sheet["implausible_shown"]
        shown = (f"{sheet['shown']} of {sheet['of']} samples shown: "
                 + (f"all {bad_n} implausible" if bad_shown == bad_n else f"{bad_shown} of the {bad_n} implausible")
                 + (f", then {sheet['shown'] - bad_shown} plausible" if sheet["shown"] > bad_shown else "")
                 + ", spread over the set")
    return lines + ["", f"![plausibility](plausibility.png) (green: plausible, red: not, with the first reason; "
                        f"{shown})", ""]


def _morphometry_md(morph: dict[str, Any]) -> list[str]:
    lines = ["## Morphometry", "", f"Tissue classes inside the brain mask by {morph['method']} "
             "(CSF < grey < white matter), on the dataset's grid; plausible samples only. W1: Wasserstein distance "
             "in the measure's unit; KS: Kolmogorov-Smirnov statistic. The yardstick is training vs test volumes at "
             "the synthetic set's size (the mean over random subsets); *test via AE*: the test volumes through the "
             "autoencoder, which smooths them as the decoder smooths samples: synthetic vs test via AE is the "
             "diffusion model's own gap, test via AE vs test the decoder's.", ""]
    if morph.get("note"):
        lines += [f"Note: {morph['note']}.", ""]
    lines += ["| measure | synthetic median | test median | train median | test via AE median | W1 synthetic-test | "
              "W1 synthetic-test via AE | W1 train-test | KS synthetic-test | KS train-test |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m, d in morph["distances"].items():
        med = {k: v.get("median") for k, v in d["summary"].items()}
        spec = ".4g"
        lines.append(f"| {m} | {_fmt(med.get('synthetic'), spec)} | {_fmt(med.get('real_test'), spec)} | "
                     f"{_fmt(med.get('train'), spec)} | {_fmt(med.get('reconstructed_test'), spec)} | "
                     f"{_fmt(d['synthetic_vs_test']['wasserstein'], spec)} | "
                     f"{_fmt((d.get('synthetic_vs_reconstructed') or {}).get('wasserstein'), spec)} | "
                     f"{_fmt(d['train_vs_test']['wasserstein'], spec)} | "
                     f"{_fmt(d['synthetic_vs_test']['ks'], '.2f')} | {_fmt(d['train_vs_test']['ks'], '.2f')} |")
    return lines + ["", "![morphometry](morphometry.png) (each dot a volume; bar: median)", ""]


def render_markdown(report: dict[str, Any]) -> str:
    """Tables a reader can paste into a paper, and the pictures."""
    lines = ["# medldm evaluation", "", f"Dataset: `{report['data_dir']}` ({report['test_volumes']} test volumes). "
             f"MS-SSIM with {report['ms_ssim_scales']} scales.", ""]
    lines += verdict_table(report)
    rec = report.get("reconstruction")
    if rec:
        lines += ["## Autoencoder reconstruction (test split)", "",
                  f"Checkpoint: `{rec['checkpoint']}`"
                  + (f", found in {rec['found_in']}" if rec.get("found_in") else ""), "",
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
                  f"Threshold: percentile {mem['percentile']:g} of the nearest-training SSIM of "
                  f"{mem.get('threshold_reference', 'the real test volumes')}, {mem['threshold_ssim']:.4f}"
                  + (f" (of the raw test volumes: {mem['threshold_ssim_raw_test']:.4f}; a copy comes out of the "
                     "decoder as smooth as any sample)" if "threshold_ssim_raw_test" in mem else "")
                  + f". **{len(mem['flagged'])} of {len(syn_s)} synthetic volumes are "
                  "closer to a training volume than that** and may be copies"
                  + (": " + ", ".join(f"`{mem['synthetic'][i]['file']}` ~ "
                                     f"`{mem['synthetic'][i]['nearest_train_image']}`"
                                     f" ({mem['synthetic'][i]['ssim']:.4f})" for i in mem["flagged"][:20])
                     if mem["flagged"] else "."),
                  "", "![nearest training volumes](nearest_training.png) (top: synthetic, bottom: its nearest training "
                  "volume; the flagged ones, else the five closest)", ""]
        lines += ["![synthetic vs real](synthetic_vs_real.png) (top: synthetic, bottom: real test)", "",
                  "![scores](scores.png) (pairwise MS-SSIM, nearest-training SSIM with the flagging threshold, "
                  "and the age check; synthetic red, real blue)", ""]
        lines += _plausibility_md(gen) + _morphometry_md(gen["morphometry"])
        cond = gen["conditioning"]
        lines += ["## Conditioning check: age", "", "Morphometry of the plausible samples against their requested age "
                  "(from each sample's sidecar), and of the real test volumes against their true age.", "",
                  "| measure | set | n | Pearson r | slope per decade |", "|---|---|---|---|---|"]
        for m, trends in cond["measures"].items():
            for name, key in (("synthetic (requested age)", "synthetic"), ("real test (true age)", "real_test")):
                t = trends[key]
                lines.append(f"| {m} | {name} | {t['n']} | " + (
                    f"{t['pearson_r']:+.3f} | {t['slope_per_decade']:+.4g} |" if t["pearson_r"] is not None
                    else f"skipped: {t['skipped']} | |"))
            t = trends["synthetic"]
            if "within_seed_r" in t:
                lines.append(f"| {m} | synthetic, within seed ({t['seeds_at_several_ages']} seeds at several ages) | "
                             f"{t['n']} | {t['within_seed_r']:+.3f} | {t['within_seed_slope_per_decade']:+.4g} |")
        lines += ["", "A model that follows its age condition shows slopes like the real scans' (CSF and ventricles "
                  "grow with age, brain volume shrinks). Sample the same seeds at several ages for the within-seed "
                  "lines.", ""]
    return "\n".join(lines) + "\n"
