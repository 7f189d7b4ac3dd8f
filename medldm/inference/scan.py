"""One scan through the models: reconstruct, compress / decompress, denoise (SDEdit), and the forward-process picture.

A scan on the model's grid (a preprocessed volume) is used as it is; any other scan goes through the preprocessing of
the dataset the autoencoder was trained on (its ``preprocess.json``), and results can be resampled back onto the
scan's own grid (``native``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler

from medldm.artifacts import AutoencoderCheckpoint, AutoencoderRun, DiffusionCheckpoint, DiffusionRun, LatentFile
from medldm.config import PreprocessConfig, from_dict
from medldm.data.dataset import read_dataset_info
from medldm.data.io import check_writable, content_sha256, is_nifti, load_volume, nifti_stem, save_volume, write_json
from medldm.devices import autocast, resolve_device
from medldm.errors import InputError
from medldm.evaluation.metrics import VolumeMetrics
from medldm.models.conditioning import condition_context
from medldm.models.networks import build_scheduler, default_sampler, set_sampling_steps
from medldm.models.ops import decode_latents, posterior_mean, sample_latents
from medldm.versions import versions
from medldm.viz import grid, save_figure, save_png, three_plane

log = logging.getLogger(__name__)

NOISING_STEPS = (0, 100, 250, 500, 750, 999)


@dataclass
class Scan:
    """A scan on the model's grid, and where it came from."""

    volume: np.ndarray  # float32 in [0, 1], the model's shape
    affine: np.ndarray
    path: Path
    source_shape: list[int]
    source_affine: np.ndarray
    preprocessed_here: bool  # False: the file was already on the model's grid
    registered: bool  # preprocessed here with registration to a template (no way back to the scan's grid)


def _dataset_preprocessing(ae: AutoencoderCheckpoint) -> tuple[Path, PreprocessConfig | None]:
    """The dataset dir the autoencoder was trained on and its preprocessing settings (None: the dataset is gone)."""
    data_dir = Path(ae.data_dir or "")
    info = read_dataset_info(data_dir) if (data_dir / "preprocess.json").is_file() else None
    # the dataset's settings as they were used (not re-validated: rules may have tightened since)
    return data_dir, (from_dict(PreprocessConfig, info["config"], "preprocess") if info else None)


def refuse_native_early(path: str | Path, ae: AutoencoderCheckpoint) -> None:
    """``--native`` refused before any work (models, N4, registration) when ``path`` is a raw scan that preprocessing
    would register to a template; a NIfTI already on the model's grid is read as it is and may go back."""
    path = Path(path)
    _, cfg = _dataset_preprocessing(ae)
    if cfg is None or not cfg.registration.enabled:
        return
    if is_nifti(path) and path.is_file():
        try:
            image = cast(nib.Nifti1Image, nib.load(str(path)))
            if list(image.shape) == ae.image_shape:  # small: the model's grid
                data = np.asanyarray(image.dataobj, dtype=np.float32)
                if data.min() >= 0.0 and data.max() <= 1.0 + 1e-3:  # as load_scan decides: used as it is
                    return
        except Exception:  # an unreadable file: loading it names the problem
            return
    raise InputError(f"--native: {path.name} is not on the model's grid, so it would be registered to a template "
                     "while preprocessing, and the transform is not kept: there is no way back to its grid; leave "
                     "out --native")


def load_scan(path: str | Path, ae: AutoencoderCheckpoint) -> Scan:
    """``path`` on the autoencoder's grid: as it is when it already has the training volumes' shape and [0, 1]
    intensities, else preprocessed with the settings of the dataset the autoencoder was trained on."""
    path = Path(path)
    data_dir, cfg = _dataset_preprocessing(ae)
    data, affine = load_volume(path, first_volume_of_4d=bool(cfg and cfg.use_first_volume_of_4d))
    shape = ae.image_shape
    if list(data.shape) == shape and data.min() >= 0.0 and data.max() <= 1.0 + 1e-3:
        return Scan(data, affine, path, shape, affine, False, False)
    if cfg is None:
        raise FileNotFoundError(f"{path} is not a preprocessed volume ({list(data.shape)}, the model needs {shape} in "
                                f"[0, 1]) and the dataset whose preprocessing it would need ({data_dir}) is not there; "
                                "preprocess it with `medldm preprocess` first")
    from medldm.data.preprocess import preprocess_volume  # SimpleITK and MONAI transforms: only for raw scans
    from medldm.data.registration import load_template

    template = load_template(cfg) if cfg.registration.enabled else None
    try:
        volume, out_affine, _ = preprocess_volume(data, affine, cfg, template)
    except RuntimeError as e:  # SimpleITK's N4 or registration gave up on this scan
        raise InputError(f"{path}: preprocessing it as {data_dir} was preprocessed failed "
                         f"({str(e).strip().splitlines()[-1][:200]}); is it a T1 head scan? `medldm preprocess` on a "
                         "folder holding it writes its QC picture and reason") from None
    log.info("%s preprocessed as %s was (%s -> %s)", path.name, data_dir, list(data.shape), list(volume.shape))
    return Scan(volume, out_affine, path, list(data.shape), affine, True, template is not None)


def check_native(scan: Scan) -> None:
    """``--native`` needs a way back to the scan's grid: none after registration to a template."""
    if scan.registered:
        raise InputError(f"--native: {scan.path.name} was registered to a template during preprocessing and the "
                         "transform is not kept, so there is no way back to its grid; leave out --native")


def to_native(volume: np.ndarray, scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """A result on the model's grid resampled (linear, world coordinates) onto the scan's own grid."""
    check_native(scan)
    if not scan.preprocessed_here:
        return volume, scan.affine
    import SimpleITK as sitk

    from medldm.data.io import from_sitk, to_sitk

    moving = to_sitk(volume, scan.affine)
    grid_ = to_sitk(np.zeros(scan.source_shape, np.float32), scan.source_affine)
    out = sitk.Resample(moving, grid_, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return from_sitk(out)


def _quality(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    m = VolumeMetrics(list(a.shape))(torch.from_numpy(b)[None], torch.from_numpy(a)[None])
    return {"ssim": m["ssim"], "psnr": m["psnr"]}


@torch.no_grad()
def _encode(model: torch.nn.Module, ae: AutoencoderCheckpoint, volume: np.ndarray,
            device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(volume)[None, None].to(device)
    with autocast(device):
        return posterior_mean(model, x, ae.config).float()


@torch.no_grad()
def _decode(model: torch.nn.Module, z: torch.Tensor) -> np.ndarray:
    with autocast(z.device):
        return decode_latents(model, z.float())[0, 0].cpu().numpy()


def _write(out: Path, volume: np.ndarray, scan: Scan, native: bool, descrip: str, sidecar: dict[str, Any]) -> Path:
    affine = scan.affine
    if native:
        volume, affine = to_native(volume, scan)
    save_volume(out, volume, affine, descrip=descrip[:79])
    write_json(out.with_name(nifti_stem(out) + ".json"), {
        "synthetic": False, "input": str(scan.path.resolve()),
        "input_sha256": content_sha256(scan.path) if scan.path.is_file() else None,
        "preprocessed_here": scan.preprocessed_here, "native_grid": native, **sidecar, "versions": versions()})
    return out


def _pictures(path: Path, rows: list[np.ndarray]) -> None:
    """Rows of three-plane views: input, output, |difference| (scaled to a quarter of the range)."""
    tiles = [three_plane(rows[0]), three_plane(rows[1]), three_plane(np.abs(rows[0] - rows[1]), vmax=0.25)]
    save_png(path, grid(tiles, columns=3))


def reconstruct_scan(in_path: str | Path, out_path: str | Path, autoencoder_run: str | Path, native: bool = False,
                     device: str | None = None) -> dict[str, Any]:
    """Encode to the posterior mean and decode (the path compress + decompress takes); writes the volume, a sidecar
    and ``OUT.png`` (input, reconstruction, difference). Returns SSIM and PSNR against the input."""
    dev = resolve_device(device)
    check_writable(out_path)
    ae_path = AutoencoderRun(autoencoder_run).checkpoint
    if native:  # before the work: the metadata alone (mapped, no weights read) says whether there is a way back
        refuse_native_early(in_path, AutoencoderCheckpoint.load(ae_path, mmap=True))
    ae = AutoencoderCheckpoint.load(ae_path)
    model = ae.model(dev)
    scan = load_scan(in_path, ae)
    if native:
        check_native(scan)
    recon = _decode(model, _encode(model, ae, scan.volume, dev))
    quality = _quality(scan.volume, recon)
    out = Path(out_path)
    _write(out, recon, scan, native, "PROCESSED medldm reconstruct", {
        "processed": "autoencoder reconstruction (posterior mean)", "autoencoder_checkpoint": ae.resolved,
        "autoencoder_sha256": ae.sha256, **quality})
    _pictures(_png(out), [scan.volume, recon])
    return quality


def _png(out: Path) -> Path:
    return out.with_name(nifti_stem(out) + ".png")


def compress_scan(in_path: str | Path, out_path: str | Path, autoencoder_run: str | Path, float16: bool = False,
                  device: str | None = None) -> dict[str, Any]:
    """Write the posterior mean of a scan (float32, or float16) with the autoencoder's hash and the scan's geometry;
    returns sizes, the compression ratio and the round trip's SSIM and PSNR."""
    dev = resolve_device(device)
    check_writable(out_path)
    ae = AutoencoderRun(autoencoder_run).load()
    model = ae.model(dev)
    scan = load_scan(in_path, ae)
    mu = _encode(model, ae, scan.volume, dev).cpu()
    stored = mu.half() if float16 else mu
    out = Path(out_path)
    LatentFile(mu=stored[0], autoencoder=ae.ref, affine=scan.affine.tolist(), shape=list(scan.volume.shape),
               source={"path": str(scan.path.resolve()), "shape": scan.source_shape,
                       "affine": np.asarray(scan.source_affine).tolist(), "preprocessed_here": scan.preprocessed_here,
                       "registered": scan.registered},
               preprocess=ae.data_dir, versions=versions()).write(out)
    recon = _decode(model, stored.float().to(dev))  # what decompress will give
    voxels = int(np.prod(scan.volume.shape))
    result = {"latent_bytes": out.stat().st_size, "input_bytes": scan.path.stat().st_size if scan.path.is_file()
              else None, "values_ratio": voxels / mu.numel(),
              "float32_ratio": voxels * 4 / out.stat().st_size, **_quality(scan.volume, recon)}
    return result


def decompress_latent(latent_path: str | Path, out_path: str | Path, autoencoder_run: str | Path | None = None,
                      native: bool = False, device: str | None = None) -> Path:
    """Decode a latent written by :func:`compress_scan` onto the scan's grid (or its own grid with ``native``) with the
    autoencoder it was encoded with; any other autoencoder is refused."""
    latent_path = Path(latent_path)
    check_writable(out_path)
    latent = LatentFile.load(latent_path)
    source = latent.source
    if native and source["registered"]:  # before the work
        raise InputError(f"--native: {Path(source['path']).name} was registered to a template when it was "
                         "compressed and the transform is not kept, so there is no way back to its grid; leave out "
                         "--native")
    trained = latent.autoencoder
    try:
        ae_path = trained.find(autoencoder_run)
    except InputError:
        if autoencoder_run is None:  # the recorded checkpoint itself changed: its own message says so
            raise
        raise InputError(f"{latent_path} was encoded by another autoencoder (SHA-256 {trained.sha256[:12]}…, "
                         f"{trained.checkpoint}) than {autoencoder_run}; decompress with that one") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"the autoencoder {trained.checkpoint} that {latent_path} was encoded with is "
                                "missing (moved?); pass --autoencoder AE_RUN") from None
    dev = resolve_device(device)
    model = AutoencoderCheckpoint.load(ae_path, sha256=trained.sha256).model(dev)
    volume = _decode(model, latent.mu[None].float().to(dev))
    scan = Scan(volume, np.asarray(latent.affine), Path(source["path"]), source["shape"],
                np.asarray(source["affine"]), source["preprocessed_here"], source["registered"])
    affine = scan.affine
    if native:
        volume, affine = to_native(volume, scan)
    out = Path(out_path)
    save_volume(out, volume, affine, descrip="PROCESSED medldm decompress")
    return out


def _diffusion_and_autoencoder(run_dir: str | Path, autoencoder_run: str | Path | None,
                               in_path: str | Path | None = None) -> tuple[DiffusionCheckpoint, AutoencoderCheckpoint]:
    """The diffusion run's checkpoint and its autoencoder's; with ``in_path`` (``--native``), refused first when that
    scan has no way back to its grid."""
    run = DiffusionRun(run_dir)
    if in_path is not None:  # the checkpoints' metadata only (mapped, no weights read) before any model is loaded
        ae_path = run.load(mmap=True).autoencoder.find(autoencoder_run)
        refuse_native_early(in_path, AutoencoderCheckpoint.load(ae_path, mmap=True))
    ldm = run.load()
    return ldm, ldm.load_autoencoder(autoencoder_run)


def denoise_scan(in_path: str | Path, out_path: str | Path, run_dir: str | Path, strength: float = 0.3,
                 steps: int = 50, seed: int = 0, conditions: dict[str, str] | None = None, native: bool = False,
                 autoencoder_run: str | Path | None = None, device: str | None = None) -> Path:
    """SDEdit: encode, noise the latent to the timestep ``strength`` names, run the model's sampler back to 0, decode.

    Strength 0 returns the reconstruction; strength 1 ignores the input and is the fresh sample ``medldm sample
    --seed SEED`` gives. The output keeps the scan's geometry and is marked as processed (synthetic at strength 1,
    where nothing of the scan is left); ``OUT.png`` shows input, output and difference."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"--strength {strength:g}: use a value from 0 (reconstruction only) to 1 (a new sample)")
    if steps < 1:
        raise InputError("--steps must be >= 1")
    dev = resolve_device(device)
    check_writable(out_path)
    ldm, ae = _diffusion_and_autoencoder(run_dir, autoencoder_run, in_path if native else None)
    unet, model = ldm.unet(dev), ae.model(dev)
    scan = load_scan(in_path, ae)
    if native:
        check_native(scan)
    context, labels = condition_context(ldm.conditions, conditions, dev)
    scale = ldm.scale_factor
    z0 = _encode(model, ae, scan.volume, dev) * scale
    sampler = default_sampler(ldm.config.scheduler)
    scheduler = build_scheduler(ldm.config.scheduler, sampler)
    set_sampling_steps(scheduler, min(steps, ldm.config.scheduler.num_train_timesteps), ldm.latent_shape)
    # sample seed's start noise, drawn as `medldm sample --seed` draws it
    gen = torch.Generator(dev).manual_seed(seed)
    noise = torch.randn(ldm.latent_shape, generator=gen, device=dev)[None]
    hybrid = ldm.hybrid
    ran = {"t_start": None, "denoising_steps": 0}
    if strength == 0.0:
        z = z0
    elif strength == 1.0:
        z = sample_latents(unet, scheduler, noise, context, concat=hybrid)
        ran = {"t_start": int(scheduler.timesteps[0]), "denoising_steps": len(scheduler.timesteps)}
    else:
        # noised to the first sampling timestep at or below strength x (T - 1), denoised from there
        # no rounding: 0.5 x 999 = 499.5 starts at 0 of the steps 999, 500, 0 (rounding started one step too high)
        kept = scheduler.timesteps[scheduler.timesteps <= strength * (scheduler.num_train_timesteps - 1)]
        if len(kept) == 0:
            z = z0  # below the last sampling step: nothing to denoise
        else:
            noisy = scheduler.add_noise(z0, noise, kept[:1].to(dev))
            scheduler.timesteps = kept
            z = sample_latents(unet, scheduler, noisy, context, concat=hybrid)
            ran = {"t_start": int(kept[0]), "denoising_steps": len(kept)}
    out_volume = _decode(model, z / scale)
    out = Path(out_path)
    # at strength 1 nothing of the scan is left: the volume is a synthetic brain and says so
    mark = "SYNTHETIC" if strength == 1.0 else "PROCESSED"
    _write(out, out_volume, scan, native, f"{mark} medldm denoise strength={strength:g}", {
        "synthetic": strength == 1.0,
        "processed": f"SDEdit denoising (encode, noise to the strength's timestep, {sampler.upper()} back, decode)",
        "strength": strength, "steps": steps, **ran, "seed": seed, "conditions": labels,
        "diffusion_checkpoint": ldm.resolved, "diffusion_sha256": ldm.sha256,
        "autoencoder_checkpoint": ae.resolved, "autoencoder_sha256": ae.sha256})
    _pictures(_png(out), [scan.volume, out_volume])
    return out


def _signal(scheduler: Any, t: int) -> str:
    # DDPM scales the latent by sqrt(alpha_bar); rectified flow mixes it linearly with the noise
    if isinstance(scheduler, RFlowScheduler):
        return f"latent share {1 - t / scheduler.num_train_timesteps:.3f}"
    return f"ᾱ = {float(scheduler.alphas_cumprod[t]):.3f}"


def show_noising(in_path: str | Path, out_png: str | Path, run_dir: str | Path, seed: int = 0,
                 timesteps: tuple[int, ...] = NOISING_STEPS, autoencoder_run: str | Path | None = None,
                 device: str | None = None) -> int:
    """The forward process on one scan under the model's own schedule: for each timestep, the noised latent decoded
    (image space) and each latent channel, mid axial slices, one column per timestep. Returns the panel count."""
    from matplotlib.figure import Figure

    dev = resolve_device(device)
    check_writable(out_png)
    ldm, ae = _diffusion_and_autoencoder(run_dir, autoencoder_run)
    model = ae.model(dev)
    scan = load_scan(in_path, ae)
    scale = ldm.scale_factor
    z0 = _encode(model, ae, scan.volume, dev) * scale
    scheduler = build_scheduler(ldm.config.scheduler)
    last = scheduler.num_train_timesteps - 1
    timesteps = tuple(min(t, last) for t in timesteps)
    noise = torch.randn(z0.shape, generator=torch.Generator(dev).manual_seed(seed), device=dev)
    rows = 1 + z0.shape[1]
    fig = Figure(figsize=(2.2 * len(timesteps), 2.3 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, len(timesteps), squeeze=False)
    for j, t in enumerate(timesteps):
        zt = scheduler.add_noise(z0, noise, torch.tensor([t], device=dev))
        image = _decode(model, zt / scale)
        axes[0, j].imshow(np.rot90(image[:, :, image.shape[2] // 2]), cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"t = {t}\n{_signal(scheduler, t)}", fontsize=9)
        for c in range(z0.shape[1]):
            lat = zt[0, c].cpu().numpy()
            axes[1 + c, j].imshow(np.rot90(lat[:, :, lat.shape[2] // 2]), cmap="coolwarm", vmin=-3, vmax=3)
    axes[0, 0].set_ylabel("decoded image")
    for c in range(z0.shape[1]):
        axes[1 + c, 0].set_ylabel(f"latent channel {c}")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    kind = ldm.config.scheduler.schedule if ldm.config.scheduler.kind == "ddpm" else "rectified flow"
    fig.suptitle(f"{scan.path.name}: forward process of {Path(run_dir).name} "
                 f"({kind}, {scheduler.num_train_timesteps} steps)", fontsize=10)
    save_figure(fig, out_png)
    return rows * len(timesteps)
