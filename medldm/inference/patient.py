"""A diffusion model asked about one patient's scan: invert it to noise, regenerate it under other labels
(counterfactual), or reconstruct a pseudo-healthy version and map where the scan differs (anomaly).

All three work on the model's grid, through the same scan loading as ``medldm denoise`` (a preprocessed volume as it
is, a raw scan through the training dataset's preprocessing). A counterfactual is the model's guess of how this brain
would look under other labels; it is not a prognosis, and every output says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medldm.artifacts import AutoencoderCheckpoint, DiffusionCheckpoint, save_checkpoint
from medldm.data.dataset import read_manifest
from medldm.data.io import check_writable, content_sha256, nifti_stem, write_json
from medldm.devices import resolve_device
from medldm.errors import InputError
from medldm.inference.scan import (
    Scan,
    _decode,
    _diffusion_and_autoencoder,
    _encode,
    _quality,
    _write,
    check_native,
    load_scan,
)
from medldm.models.conditioning import ConditionEncoder, UnitRangeConditions, parse_labels
from medldm.models.networks import build_scheduler, set_sampling_steps
from medldm.models.ops import invert_latents, sample_latents
from medldm.versions import versions
from medldm.viz import save_figure

log = logging.getLogger(__name__)

NOT_A_PROGNOSIS = ("a counterfactual is this model's guess of how the scan would look under other labels, learnt from "
                   "its training cohort; it is not a prognosis and must not be used for a diagnosis")


@dataclass
class Patient:
    """One scan on the model's grid with the models, the scan's own labels and its scaled latent."""

    ldm: DiffusionCheckpoint
    ae: AutoencoderCheckpoint
    unet: torch.nn.Module
    model: torch.nn.Module
    scan: Scan
    labels: dict[str, Any]
    labels_from: str  # where the labels came from: "--labels" or the manifest row
    z0: torch.Tensor
    device: torch.device


def scan_labels(scan: Scan, ldm: DiffusionCheckpoint, given: dict[str, str] | None) -> tuple[dict[str, Any], str]:
    """The scan's own labels: ``given`` (``--labels``), else the row of the training dataset's manifest whose image
    or source is this file, else none (unknown; a model without "unknown" labels fills its defaults)."""
    if given:
        return own_labels(ldm, given, "--labels"), "--labels"
    data_dir = Path(ldm.data_dir) if ldm.data_dir else None  # an imported bundle has no dataset
    if ldm.conditions.keys and data_dir is not None and (data_dir / "manifest.csv").is_file():
        path = scan.path.resolve()
        for row in read_manifest(data_dir):
            source = [Path(row["source"])] if row.get("source") and Path(row["source"]).is_absolute() else []
            candidates = [data_dir / row["image"], *source]
            if any(c.resolve() == path for c in candidates):
                pairs = {k: str(row[k]) for k in ldm.conditions.keys if row.get(k) is not None}
                where = f"{data_dir / 'manifest.csv'} ({row['image']})"
                return own_labels(ldm, pairs, where), where
    if ldm.conditions.keys:
        log.warning("%s: no labels given (--labels) and not in %s/manifest.csv: its labels are taken as unknown",
                    scan.path.name, data_dir)
    return parse_labels(ldm.conditions, {}, source="--labels"), "unknown"


def own_labels(ldm: DiffusionCheckpoint, pairs: dict[str, str], source: str) -> dict[str, Any]:
    """A scan's own labels: categories checked as ``--condition`` checks them, but a number outside the training
    range (a test subject older than every training one) is a fact about the scan, not a request: it is clipped to
    the range, with a warning, since the model can only be asked what it has seen."""
    conditions = ldm.conditions
    ranges = conditions.numeric if isinstance(conditions, ConditionEncoder) else conditions.ranges
    clipped = dict(pairs)
    for key, raw in pairs.items():
        if key in ranges and key in conditions.keys:
            try:
                value = float(raw)
            except ValueError:
                continue  # parse_labels names it
            lo, hi = sorted((ranges[key]["min"], ranges[key]["max"]))
            if not lo <= value <= hi:
                clipped[key] = str(min(max(value, lo), hi))
                log.warning("%s %s=%s is outside the model's training range %g–%g: inverted as %s=%s", source, key,
                            raw, lo, hi, key, clipped[key])
    return parse_labels(conditions, clipped, source=source)


def open_patient(in_path: str | Path, run_dir: str | Path, labels: dict[str, str] | None,
                 autoencoder_run: str | Path | None, device: str | None, native: bool) -> Patient:
    dev = resolve_device(device)
    ldm, ae = _diffusion_and_autoencoder(run_dir, autoencoder_run, in_path if native else None)
    unet, model = ldm.unet(dev), ae.model(dev)
    scan = load_scan(in_path, ae)
    if native:
        check_native(scan)
    own, source = scan_labels(scan, ldm, labels)
    z0 = _encode(model, ae, scan.volume, dev) * ldm.scale_factor
    return Patient(ldm, ae, unet, model, scan, own, source, z0, dev)


def _context(p: Patient, labels: dict[str, Any]) -> torch.Tensor | None:
    return p.ldm.conditions.encode([labels]).to(p.device) if p.ldm.conditions.keys else None


def _scheduler(p: Patient, steps: int) -> Any:
    """The model's deterministic sampler: DDIM for a DDPM-trained model (never DDPM, which cannot be inverted)."""
    if steps < 1:
        raise InputError("--steps must be >= 1")
    kind = p.ldm.config.scheduler.kind
    scheduler = build_scheduler(p.ldm.config.scheduler, "rflow" if kind == "rflow" else "ddim")
    set_sampling_steps(scheduler, min(steps, p.ldm.config.scheduler.num_train_timesteps), p.ldm.latent_shape)
    return scheduler


def _round_trip(p: Patient, z: torch.Tensor, z_back: torch.Tensor, back: np.ndarray | None = None
                ) -> dict[str, float]:
    """How far regenerating the inverted noise lands from the scan: latent error (relative to the latent's size) and
    the decoded volume (``back``, when the caller has decoded it already) against the autoencoder's own
    reconstruction and against the scan."""
    scale = p.ldm.scale_factor
    recon = _decode(p.model, z / scale)
    back = _decode(p.model, z_back / scale) if back is None else back
    rel = float((z_back - z).norm() / z.norm().clamp_min(1e-12))
    vs_recon, vs_scan = _quality(recon, back), _quality(p.scan.volume, back)
    return {"latent_relative_error": rel, "ssim_vs_reconstruction": vs_recon["ssim"],
            "psnr_vs_reconstruction": vs_recon["psnr"], "ssim_vs_scan": vs_scan["ssim"],
            "psnr_vs_scan": vs_scan["psnr"]}


def _provenance(p: Patient) -> dict[str, Any]:
    return {"diffusion_checkpoint": p.ldm.resolved, "diffusion_sha256": p.ldm.sha256,
            "autoencoder_checkpoint": p.ae.resolved, "autoencoder_sha256": p.ae.sha256,
            "labels": p.labels, "labels_from": p.labels_from}


def invert_scan(in_path: str | Path, out_path: str | Path, run_dir: str | Path, steps: int = 50, refine: int = 2,
                labels: dict[str, str] | None = None, autoencoder_run: str | Path | None = None,
                device: str | None = None) -> dict[str, Any]:
    """Invert a scan's latent to the noise the model's sampler turns back into it, under the scan's labels; writes
    OUT (a medldm ``inversion`` file: the noise, the scan's latent, labels, sampler, steps) and OUT.json with the
    round trip's error (the noise sampled again with the same labels). Returns that record."""
    check_writable(out_path)
    p = open_patient(in_path, run_dir, labels, autoencoder_run, device, native=False)
    scheduler = _scheduler(p, steps)
    context = _context(p, p.labels)
    hybrid = p.ldm.hybrid
    noise = invert_latents(p.unet, scheduler, p.z0, context, refine=refine, progress=True, concat=hybrid)
    back = sample_latents(p.unet, scheduler, noise, context, concat=hybrid)
    record = {"kind": "inversion", "input": str(p.scan.path.resolve()),
              "input_sha256": content_sha256(p.scan.path) if p.scan.path.is_file() else None,
              "sampler": type(scheduler).__name__, "steps": len(scheduler.timesteps), "refine": refine,
              "noise_std": float(noise.std()), "round_trip": _round_trip(p, p.z0, back), **_provenance(p),
              "versions": versions()}
    out = Path(out_path)
    save_checkpoint(out, {**record, "noise": noise[0].cpu(), "latent": p.z0[0].cpu(),
                          "affine": np.asarray(p.scan.affine).tolist(), "shape": list(p.scan.volume.shape)})
    write_json(out.with_name(out.name + ".json"), record)
    return record


def counterfactual_scan(in_path: str | Path, out_path: str | Path, run_dir: str | Path, conditions: dict[str, str],
                        labels: dict[str, str] | None = None, guidance: float = 1.0, steps: int = 50, refine: int = 2,
                        strength: float = 1.0, native: bool = False, autoencoder_run: str | Path | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """The scan under other labels: invert under its own labels (to ``strength`` of the way to noise), regenerate
    under the labels with ``conditions`` changed, decode. Writes OUT (marked COUNTERFACTUAL), OUT.json (source, old
    and new labels, the morphometric change, the round trip) and OUT.png (scan, reconstruction under its own labels,
    counterfactual, signed difference). Returns the sidecar."""
    if not conditions:
        raise InputError("--condition: name at least one label to change, e.g. --condition age=85")
    if not 0.0 < strength <= 1.0:
        raise InputError(f"--strength {strength:g}: use a value above 0 (hardly any change) up to 1 (the whole way)")
    if not math.isfinite(guidance):
        raise InputError(f"--guidance {guidance}: use a finite number (1 = no guidance)")
    check_writable(out_path)
    p = open_patient(in_path, run_dir, labels, autoencoder_run, device, native)
    if guidance != 1.0 and (isinstance(p.ldm.conditions, UnitRangeConditions)
                            or not getattr(p.ldm.conditions, "guidance", True)):
        raise InputError(f"--guidance {guidance:g}: this model has no unconditional prediction to guide with (its "
                         "conditions were never dropped in training, or it takes them as values with no 'unknown'); "
                         "leave --guidance at 1")
    # only the named labels change (parse, not parse_labels: a bundle's defaults must not replace the scan's own)
    changed = {**p.labels, **p.ldm.conditions.parse(conditions, source="--condition")}
    changed = {k: changed[k] for k in p.ldm.conditions.keys if k in changed}
    scheduler = _scheduler(p, steps)
    kept = scheduler.timesteps[scheduler.timesteps <= math.ceil(strength * scheduler.num_train_timesteps)]
    if len(kept) == 0:
        raise InputError(f"--strength {strength:g} is below the sampler's last step at {steps} steps: raise it")
    scheduler.timesteps = kept
    old, new, hybrid = _context(p, p.labels), _context(p, changed), p.ldm.hybrid
    noise = invert_latents(p.unet, scheduler, p.z0, old, refine=refine, progress=True, concat=hybrid)
    same = sample_latents(p.unet, scheduler, noise, old, concat=hybrid)
    other = sample_latents(p.unet, scheduler, noise, new, guidance=guidance, concat=hybrid)
    # the change is measured against the scan's own labels at the same guidance, so guidance alone changes nothing
    base = same if guidance == 1.0 else sample_latents(p.unet, scheduler, noise, old, guidance=guidance, concat=hybrid)
    scale = p.ldm.scale_factor
    reconstruction, counterfactual = _decode(p.model, base / scale), _decode(p.model, other / scale)
    change = morphometric_change(p.scan, reconstruction, counterfactual)
    out = Path(out_path)
    text = " ".join(f"{k}={v}" for k, v in changed.items() if p.labels.get(k) != v)
    sidecar = {"processed": "counterfactual: inverted under the scan's labels, regenerated under the new ones",
               "synthetic": True, "counterfactual": True, "disclaimer": NOT_A_PROGNOSIS, "old_conditions": p.labels,
               "new_conditions": changed, "guidance": guidance, "steps": len(kept), "strength": strength,
               "refine": refine, "sampler": type(scheduler).__name__, "morphometry": change,
               "round_trip": _round_trip(p, p.z0, same, reconstruction if guidance == 1.0 else None),
               **_provenance(p)}
    _write(out, counterfactual, p.scan, native, f"COUNTERFACTUAL medldm {text}", sidecar)
    title = (f"{p.scan.path.name}: {_labels_text(p.labels)} -> {_labels_text(changed)} (a model's guess, not a "
             "prognosis)")
    panels = [("scan", p.scan.volume), ("reconstruction, own labels", reconstruction),
              (f"counterfactual, {text or 'same labels'}", counterfactual)]
    save_figure(planes_figure(title, panels, ("counterfactual - reconstruction", counterfactual - reconstruction)),
                out.with_name(nifti_stem(out) + ".png"))
    return sidecar


def _labels_text(labels: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in labels.items()) or "no labels"


def planes_figure(title: str, panels: list[tuple[str, np.ndarray]], extra: tuple[str, np.ndarray],
                  overlay: np.ndarray | None = None, at: tuple[int, int, int] | None = None) -> Any:
    """Volumes in columns and the three planes in rows (through ``at``, else the centre), then a last column:
    ``extra`` as a signed difference (blue lower, red higher) or, with ``overlay``, as a heat map over it."""
    from matplotlib.figure import Figure

    shape = panels[0][1].shape
    at = at or (shape[0] // 2, shape[1] // 2, shape[2] // 2)
    cut = [lambda v: v[:, :, at[2]], lambda v: v[:, at[1], :], lambda v: v[at[0], :, :]]  # axial, coronal, sagittal
    fig = Figure(figsize=(2.4 * (len(panels) + 1), 7.2), dpi=100, layout="constrained")
    axes = fig.subplots(3, len(panels) + 1, squeeze=False)
    # a signed difference saturates at its 99.9th percentile; a heat map spans up to its peak, which is the point
    vmax = max(0.05, float(np.percentile(np.abs(extra[1]), 99.9) if overlay is None else extra[1].max()))
    # where ``at`` lies in each rot90-ed plane (x, y on the screen), for a marker on the heat maps
    marks = [(at[0], shape[1] - 1 - at[1]), (at[0], shape[2] - 1 - at[2]), (at[1], shape[2] - 1 - at[2])]
    for r, plane in enumerate(cut):
        for c, (name, volume) in enumerate(panels):
            axes[r, c].imshow(np.rot90(plane(volume)), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
        ax = axes[r, -1]
        if overlay is None:
            shown = ax.imshow(np.rot90(plane(extra[1])), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        else:
            ax.imshow(np.rot90(plane(overlay)), cmap="gray", vmin=0, vmax=1)
            heat = np.rot90(plane(extra[1]))
            shown = ax.imshow(np.ma.masked_less(heat, 0.3 * vmax), cmap="autumn", vmin=0, vmax=vmax, alpha=0.8)
            ax.plot(*marks[r], marker="+", color="cyan", markersize=12, markeredgewidth=1.5)
        if r == 0:
            ax.set_title(extra[0], fontsize=8)
    fig.colorbar(shown, ax=axes[:, -1], shrink=0.6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def morphometric_change(scan: Scan, reconstruction: np.ndarray, counterfactual: np.ndarray) -> dict[str, Any]:
    """The morphometric measures of the reconstruction under the scan's own labels and of the counterfactual, and
    their difference (both decoded, so the autoencoder's smoothing cancels out); the central region is the scan's."""
    from medldm.evaluation.morphometry import Morphometry

    morph = Morphometry.for_dataset(scan.affine, [scan.volume])
    before, after = morph(reconstruction), morph(counterfactual)
    return {"reconstruction": before, "counterfactual": after,
            "change": {k: after[k] - before[k] for k in before if math.isfinite(before[k]) and math.isfinite(after[k])}}


def healthy_labels(p: Patient) -> dict[str, Any]:
    """The scan's labels with the diagnosis set to cognitively normal where the model knows diagnoses: the
    pseudo-healthy reference is the model's brain of that age and sex without disease."""
    labels = dict(p.labels)
    if "diagnosis" in p.ldm.conditions.keys:
        labels.update(p.ldm.conditions.parse({"diagnosis": "CN"}, source="pseudo-healthy"))
    return labels


def brain_mask(volume: np.ndarray, erode: int = 1) -> np.ndarray:
    """The brain on the model's grid (the intracranial mask of the preprocessed volume), eroded by ``erode`` voxels:
    the autoencoder's largest errors are on the brain's edge, and a map should not light up there."""
    from scipy import ndimage

    from medldm.evaluation.morphometry import intracranial_mask

    mask = intracranial_mask(volume)
    return ndimage.binary_erosion(mask, iterations=erode) if erode else mask


def anomaly_scan(in_path: str | Path, out_dir: str | Path, run_dir: str | Path, strength: float = 0.4,
                 steps: int = 50, seeds: int = 4, sigma: float = 1.0, labels: dict[str, str] | None = None,
                 autoencoder_run: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """A pseudo-healthy version of the scan and where the scan departs from it.

    The scan's latent is noised to ``strength`` and denoised under its labels (diagnosis cognitively normal where the
    model has one), as ``medldm denoise`` does, once per seed; the mean of the ``seeds`` decoded volumes is the
    pseudo-healthy reconstruction. The anomaly map is |scan - pseudo-healthy|, Gaussian-smoothed (``sigma`` voxels)
    and masked to the brain; the score is its maximum (the smoothing pools each voxel's neighbourhood, so a focal
    lesion counts; a percentile of the whole brain is set by the reconstruction's blur everywhere and barely moved
    by a lesion: benchmarks/RESULTS.md). Writes OUT_DIR/pseudo_healthy.nii.gz,
    anomaly_map.nii.gz, anomaly.json and anomaly.png (planes through the map's peak). Returns the record."""
    from scipy import ndimage

    if not 0.0 < strength < 1.0:
        raise InputError(f"--strength {strength:g}: use a value between 0 and 1 (0.3 to 0.5 keeps the anatomy and "
                         "removes what the model has not seen)")
    if seeds < 1:
        raise InputError("--seeds must be >= 1")
    out = Path(out_dir)
    for name in ("pseudo_healthy.nii.gz", "pseudo_healthy.json", "anomaly_map.nii.gz", "anomaly_map.json",
                 "anomaly.json", "anomaly.png"):
        check_writable(out / name)
    p = open_patient(in_path, run_dir, labels, autoencoder_run, device, native=False)
    reference = healthy_labels(p)
    context, hybrid = _context(p, reference), p.ldm.hybrid
    scheduler = _scheduler(p, steps)
    kept = scheduler.timesteps[scheduler.timesteps <= strength * (scheduler.num_train_timesteps - 1)]
    if len(kept) == 0:
        raise InputError(f"--strength {strength:g} is below the sampler's last step at {steps} steps: raise it")
    scheduler.timesteps = kept
    healthy = np.zeros_like(p.scan.volume)
    for seed in range(seeds):  # each seed's start noise as `medldm denoise --seed` draws it
        noise = torch.randn(p.ldm.latent_shape, generator=torch.Generator(p.device).manual_seed(seed),
                            device=p.device)[None]
        z = sample_latents(p.unet, scheduler, scheduler.add_noise(p.z0, noise, kept[:1].to(p.device)), context,
                           concat=hybrid)
        healthy += _decode(p.model, z / p.ldm.scale_factor) / seeds
    # eroded past the smoothing's reach: the edge's reconstruction errors would otherwise bleed into the rim
    mask = brain_mask(p.scan.volume, erode=int(math.ceil(2 * sigma)) + 1)
    diff = ndimage.gaussian_filter(np.abs(p.scan.volume - healthy), sigma) if sigma > 0 else np.abs(
        p.scan.volume - healthy)
    amap = np.where(mask, diff, 0.0).astype(np.float32)
    i, j, k = (int(v) for v in np.unravel_index(int(np.argmax(amap)), amap.shape))
    peak = (i, j, k)
    inside = amap[mask]
    record = {"processed": "anomaly map: |scan - pseudo-healthy|, smoothed, in the brain", "input":
              str(p.scan.path.resolve()), "score": float(amap[peak]), "score_is": "the map's maximum in the brain",
              "p99_in_brain": float(np.percentile(inside, 99)) if inside.size else float("nan"),
              "mean_in_brain": float(inside.mean()) if inside.size else float("nan"), "peak_voxel": list(peak),
              "peak_world_mm": [float(v) for v in (np.asarray(p.scan.affine) @ [*peak, 1])[:3]],
              "brain_voxels": int(mask.sum()), "strength": strength, "steps": len(kept), "seeds": seeds,
              "sigma_voxels": sigma, "reference_labels": reference, **_provenance(p), "versions": versions()}
    _write(out / "pseudo_healthy.nii.gz", healthy, p.scan, False, "PROCESSED medldm pseudo-healthy",
           {**record, "processed": f"pseudo-healthy: the mean of {seeds} SDEdit reconstructions at strength "
                                   f"{strength:g} under the reference labels"})
    _write(out / "anomaly_map.nii.gz", amap, p.scan, False, "PROCESSED medldm anomaly map", record)
    write_json(out / "anomaly.json", record)
    title = f"{p.scan.path.name}: anomaly score {record['score']:.3f} (the map's maximum), at voxel {peak}"
    save_figure(planes_figure(title, [("scan", p.scan.volume), ("pseudo-healthy", healthy)], ("anomaly map", amap),
                              overlay=p.scan.volume, at=peak), out / "anomaly.png")
    return record
