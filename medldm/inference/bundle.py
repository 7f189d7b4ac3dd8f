"""Import a MONAI model-zoo latent diffusion bundle (first of all the brain-LDM of Pinaya et al. 2022) as medldm
runs, so that ``medldm sample`` and ``medldm evaluate`` use it like a model trained here.

The bundle's ``configs/inference.json`` defines the networks, the noise schedule, the latent noise shape and the
conditioning vector; its weights may be in the old GenerativeModels naming (``"load_old": 1``), which
:func:`medldm.models.old_keys.convert_old_state_dict` maps. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch

from medldm.artifacts import file_sha256, save_checkpoint
from medldm.config import (
    AutoencoderConfig,
    AutoencoderModelConfig,
    ConditioningConfig,
    ConfigError,
    DiffusionConfig,
    SchedulerConfig,
    UNetConfig,
    save_config,
    to_dict,
)
from medldm.data.io import write_json
from medldm.errors import InputError
from medldm.models.conditioning import UnitRangeConditions
from medldm.models.networks import build_autoencoder, build_unet
from medldm.models.old_keys import convert_old_state_dict
from medldm.versions import versions

log = logging.getLogger(__name__)

WHERE_TO_GET = ("download the bundle where there is internet access, e.g. `python -m monai.bundle download "
                "brain_image_synthesis_latent_diffusion_model --bundle_dir DIR` (the weights models/autoencoder.pt "
                "and models/model.pt are fetched from the URLs in its large_files.yml), and copy the folder here")

# What the brain-LDM bundle's conditions are, in medldm's names. The bundle documents only "values between 0 and
# 1" (docs/README.md); the units below are medldm's reading and are recorded as such in the imported run:
# - gender: UK Biobank's coding (data field 31: 0 female, 1 male);
# - age: the UK Biobank imaging visit's ages, mapped linearly onto [0, 1] (change with --age-range);
# - the two volumes stay in the bundle's normalised units.
KNOWN_CONDITIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "gender": ("sex", {"codes": {"F": 0.0, "M": 1.0},
                       "doc": "UK Biobank coding 0 = female, 1 = male (not documented by the bundle)"}),
    "age": ("age", {"unit": "years", "doc": "mapped linearly onto the bundle's [0, 1] (range not documented by the "
                                            "bundle; UK Biobank imaging ages assumed)"}),
    "ventricular_vol": ("ventricular_volume", {"unit": "", "doc": "ventricular CSF volume, the bundle's "
                                                                  "normalised units [0, 1]"}),
    "brain_vol": ("brain_volume", {"unit": "", "doc": "brain volume normalised for head size, the bundle's "
                                                      "normalised units [0, 1]"}),
}
DEFAULT_AGE_RANGE = (44.0, 82.0)
# The affine that the bundle's authors saved their samples with (GenerativeModels' scripts/saver.py), moved from
# their 5-voxel crop back to the full 160x224x160 grid: 1 mm, x mirrored (LAS), MNI-registered (UniRes).
BRAIN_LDM_AFFINE = [[-1.0, 0.0, 0.0, 101.48149872], [0.0, 1.0, 0.0, -146.47715759], [0.0, 0.0, 1.0, -156.55375671],
                    [0.0, 0.0, 0.0, 1.0]]


class BundleError(InputError):
    """A bundle folder that cannot be imported; the message names the file and the fix."""


@dataclass
class Bundle:
    """What medldm reads from a bundle folder."""

    root: Path
    name: str
    version: str
    autoencoder: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    load_old: bool
    autoencoder_weights: Path
    unet_weights: Path
    conditions: list[str]
    condition_defaults: dict[str, float]
    latent_shape: list[int]
    image_shape: list[int]
    steps: int


def _expression_path(expr: Any, default: str, model_dir: str) -> str:
    # "$@model_dir + '/model.pt'" -> models/model.pt
    found = re.search(r"['\"]/?([^'\"]+\.pth?)['\"]", str(expr or ""))
    return f"{model_dir}/{found.group(1)}" if found else default


def read_bundle(bundle_dir: str | Path) -> Bundle:
    """Read a bundle folder's inference config and metadata; a clear error for anything missing."""
    root = Path(bundle_dir)
    config_file = root / "configs" / "inference.json"
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder: {WHERE_TO_GET}")
    if not config_file.is_file():
        raise BundleError(f"{config_file} is missing (is {root} a MONAI bundle folder?): {WHERE_TO_GET}")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BundleError(f"{config_file} is not valid JSON ({e})") from None
    for key in ("autoencoder_def", "diffusion_def", "scheduler", "conditioning", "noise"):
        if key not in cfg:
            raise BundleError(f"{config_file} has no {key!r}: medldm imports latent diffusion bundles whose "
                              "inference.json defines autoencoder_def, diffusion_def, scheduler, conditioning and "
                              "noise (like brain_image_synthesis_latent_diffusion_model)")
    weights = {}
    for name, key, default in (("autoencoder", "load_autoencoder_path", "models/autoencoder.pt"),
                               ("unet", "load_diffusion_path", "models/model.pt")):
        path = root / _expression_path(cfg.get(key), default, "models")
        if not path.is_file():
            raise BundleError(f"{path} (the {name} weights) is missing: {WHERE_TO_GET}")
        weights[name] = path
    names = re.findall(r"@(\w+)", str(cfg["conditioning"]))
    names = [n for n in names if n != "device"]
    missing = [n for n in names if n not in cfg]
    if missing:
        raise BundleError(f"{config_file}: the conditioning refers to {missing}, which the file does not define")
    noise = re.search(r"randn\(\s*\(([\d,\s]+)\)", str(cfg["noise"]))
    if not noise:
        raise BundleError(f"{config_file}: cannot read the latent shape from noise={cfg['noise']!r}")
    latent = [int(v) for v in noise.group(1).split(",") if v.strip()][1:]
    steps = re.search(r"num_inference_steps\s*=\s*(\d+)", str(cfg.get("set_timesteps", "")))
    meta_file = root / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    try:
        image = list(meta["network_data_format"]["outputs"]["pred"]["spatial_shape"])
    except (KeyError, TypeError):
        channels = cfg["autoencoder_def"].get("channels") or cfg["autoencoder_def"].get("num_channels") or []
        image = [s * 2 ** (len(channels) - 1) for s in latent[1:]]
    return Bundle(root=root, name=meta.get("name") or root.name, version=str(meta.get("version", "unknown")),
                  autoencoder=cfg["autoencoder_def"], unet=cfg["diffusion_def"], scheduler=cfg["scheduler"],
                  load_old=bool(cfg.get("load_old", 0)), autoencoder_weights=weights["autoencoder"],
                  unet_weights=weights["unet"], conditions=names,
                  condition_defaults={n: float(cfg[n]) for n in names}, latent_shape=latent, image_shape=image,
                  steps=int(steps.group(1)) if steps else 50)


def _arg(definition: dict[str, Any], key: str, where: str, default: Any = None, old: str | None = None) -> Any:
    value = definition.get(key, definition.get(old) if old else None)
    if value is None:
        if default is None:
            raise BundleError(f"{where}: {key} is not given")
        return default
    return value


def _require(definition: dict[str, Any], where: str, **expected: Any) -> None:
    # arguments medldm's builders fix; a bundle that sets them otherwise is refused rather than imported wrongly
    for key, value in expected.items():
        if key in definition and definition[key] != value:
            raise BundleError(f"{where}: {key}={definition[key]!r} is not supported (medldm builds {value!r})")


def _res_blocks(d: dict[str, Any], where: str) -> int:
    # MONAI takes one number or one per level; medldm's configs take one
    value = _arg(d, "num_res_blocks", where, 2)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise BundleError(f"{where}: num_res_blocks={value} differs per level; medldm uses one number")
        value = value[0]
    return int(value)


def autoencoder_config(d: dict[str, Any], where: str) -> AutoencoderConfig:
    """medldm's autoencoder config for a bundle's AutoencoderKL definition."""
    if not str(d.get("_target_", "")).endswith("AutoencoderKL"):
        raise BundleError(f"{where}: _target_ {d.get('_target_')!r} is not an AutoencoderKL")
    _require(d, where, spatial_dims=3, in_channels=1, out_channels=1, norm_eps=1e-6, use_convtranspose=False,
             include_fc=True, use_combined_linear=False)
    channels = _arg(d, "channels", where, old="num_channels")
    res_blocks = _res_blocks(d, where)
    enc, dec = d.get("with_encoder_nonlocal_attn", True), d.get("with_decoder_nonlocal_attn", True)
    if enc != dec:
        raise BundleError(f"{where}: with_encoder_nonlocal_attn and with_decoder_nonlocal_attn differ")
    cfg = AutoencoderConfig(model=AutoencoderModelConfig(
        channels=tuple(channels), num_res_blocks=res_blocks, latent_channels=int(_arg(d, "latent_channels", where, 3)),
        attention_levels=tuple(_arg(d, "attention_levels", where, [False] * len(channels))),
        norm_num_groups=int(_arg(d, "norm_num_groups", where, 32)), with_nonlocal_attn=bool(enc)))
    cfg.validate()
    return cfg


def diffusion_config(d: dict[str, Any], scheduler: dict[str, Any], latent_channels: int, conditions: list[str],
                     where: str) -> DiffusionConfig:
    """medldm's diffusion config for a bundle's DiffusionModelUNet and scheduler definitions."""
    if not str(d.get("_target_", "")).endswith("DiffusionModelUNet"):
        raise BundleError(f"{where}: _target_ {d.get('_target_')!r} is not a DiffusionModelUNet")
    _require(d, where, spatial_dims=3, norm_eps=1e-6, transformer_num_layers=1, num_class_embeds=None,
             include_fc=True, use_combined_linear=False, dropout_cattn=0.0)
    n = len(conditions)
    in_channels, out_channels = int(_arg(d, "in_channels", where)), int(_arg(d, "out_channels", where))
    if out_channels != latent_channels:
        raise BundleError(f"{where}: out_channels={out_channels} but the autoencoder has {latent_channels} latent "
                          "channels")
    if in_channels == latent_channels + n:
        mode = "hybrid"  # the conditions are also concatenated to the latent as constant channels
    elif in_channels == latent_channels:
        mode = "crossattn"
    else:
        raise BundleError(f"{where}: in_channels={in_channels} is neither the latent channels ({latent_channels}) "
                          f"nor latent + conditions ({latent_channels + n})")
    if n and d.get("cross_attention_dim") != n:
        raise BundleError(f"{where}: cross_attention_dim={d.get('cross_attention_dim')} but the conditioning has "
                          f"{n} values")
    channels = list(_arg(d, "channels", where, old="num_channels"))
    heads = _arg(d, "num_head_channels", where, 8)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    res_blocks = _res_blocks(d, where)
    # beta_schedule is whatever the JSON holds (absent: None): anything but these two is linear
    schedules: dict[Any, str] = {"scaled_linear": "scaled_linear_beta", "linear": "linear_beta"}
    schedule = scheduler.get("schedule", schedules.get(scheduler.get("beta_schedule"), "linear_beta"))
    if scheduler.get("clip_sample", False):
        raise BundleError(f"{where}: scheduler clip_sample=true is not supported")
    cfg = DiffusionConfig(
        model=UNetConfig(channels=tuple(channels), attention_levels=tuple(_arg(d, "attention_levels", where)),
                         num_res_blocks=res_blocks, num_head_channels=tuple(heads),
                         norm_num_groups=int(_arg(d, "norm_num_groups", where, 32)),
                         resblock_updown=bool(d.get("resblock_updown", False)),
                         upcast_attention=bool(d.get("upcast_attention", False))),
        # the bundle's UNet was trained as a DDPM model (MONAI's DDPM/DDIM schedulers), whatever today's default is
        scheduler=SchedulerConfig(kind="ddpm", num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                                  schedule=schedule, beta_start=float(scheduler.get("beta_start", 1e-4)),
                                  beta_end=float(scheduler.get("beta_end", 2e-2)),
                                  prediction_type=scheduler.get("prediction_type", "epsilon")),
        # the bundle's model never saw a dropped condition: no guidance, nothing to drop
        conditioning=ConditioningConfig(keys=[KNOWN_CONDITIONS.get(c, (c,))[0] for c in conditions], drop_prob=0.0,
                                        drop_all_prob=0.0, mode=mode),
        ema_decay=0.0)
    try:
        cfg.validate()
    except ConfigError as e:
        raise BundleError(f"{where}: {e}") from None
    return cfg


def bundle_conditions(bundle: Bundle, age_range: tuple[float, float]) -> UnitRangeConditions:
    """The bundle's conditions by medldm name, with their ranges, codes and the bundle's defaults."""
    keys, ranges, codes = [], {}, {}
    for name in bundle.conditions:
        key, info = KNOWN_CONDITIONS.get(name, (name, {"unit": "", "doc": "the bundle's normalised units [0, 1]"}))
        default = bundle.condition_defaults[name]
        keys.append(key)
        if "codes" in info:
            codes[key] = info["codes"]
            letter = next((c for c, v in info["codes"].items() if v == default), None)
            ranges[key] = {"default": letter if letter is not None else default, "doc": info["doc"]}
            continue
        lo, hi = age_range if key == "age" else (0.0, 1.0)
        ranges[key] = {"min": lo, "max": hi, "default": lo + default * (hi - lo), "unit": info["unit"],
                       "doc": info["doc"]}
    return UnitRangeConditions(keys, ranges, codes)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a truncated or foreign file
        raise BundleError(f"{path} cannot be read as weights ({type(e).__name__}: {e}); is the download "
                          f"complete? {WHERE_TO_GET}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def import_bundle(bundle_dir: str | Path, out_dir: str | Path, age_range: tuple[float, float] = DEFAULT_AGE_RANGE,
                  reference_image: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write ``OUT/autoencoder`` and ``OUT/diffusion`` (medldm runs) and ``OUT/bundle.json`` from a bundle folder;
    returns the run dirs. ``reference_image`` (a NIfTI on the model's grid) gives the samples its affine instead of
    the authors' 1 mm one."""
    bundle = read_bundle(bundle_dir)
    out = Path(out_dir)
    ae_run, ldm_run = out / "autoencoder", out / "diffusion"
    if not overwrite and any((run / "checkpoints" / "best.pt").exists() for run in (ae_run, ldm_run)):
        raise FileExistsError(f"{out} already holds imported runs; pass --overwrite or choose another --out")
    if age_range[0] >= age_range[1]:
        raise InputError(f"--age-range {age_range[0]:g} {age_range[1]:g}: the first must be the smaller")
    config_file = bundle.root / "configs" / "inference.json"
    ae_cfg = autoencoder_config(bundle.autoencoder, f"{config_file} autoencoder_def")
    ldm_cfg = diffusion_config(bundle.unet, bundle.scheduler, ae_cfg.model.latent_channels, bundle.conditions,
                               f"{config_file} diffusion_def")
    encoder = bundle_conditions(bundle, age_range)
    factor = ae_cfg.model.downsample_factor
    if [s * factor for s in bundle.latent_shape[1:]] != list(bundle.image_shape):
        raise BundleError(f"{config_file}: latent {bundle.latent_shape} x {factor} is not the image shape "
                          f"{bundle.image_shape} of configs/metadata.json")

    reference = {"image": None, "shape": list(bundle.image_shape), "affine": BRAIN_LDM_AFFINE,
                 "space": "1 mm MNI-registered (UniRes), the affine the bundle's authors saved samples with"}
    if reference_image is not None:
        try:
            header = cast("nib.spatialimages.SpatialImage", nib.load(str(reference_image)))
        except (OSError, nib.filebasedimages.ImageFileError) as e:
            raise InputError(f"--reference {reference_image}: not a readable NIfTI ({e})") from None
        if list(header.shape[:3]) != list(bundle.image_shape):
            raise InputError(f"--reference {reference_image}: its grid {list(header.shape)} is not the model's "
                             f"{bundle.image_shape}")
        # the model's arrays are in the authors' layout: another axis order or direction would mirror the samples
        theirs, ours = nib.aff2axcodes(header.affine), nib.aff2axcodes(np.asarray(BRAIN_LDM_AFFINE))
        if theirs != ours:
            raise InputError(f"--reference {reference_image}: its voxel axes point {''.join(theirs)}, the model's "
                             f"{''.join(ours)} (x mirrored, as the bundle's authors saved their samples); reorient "
                             "it to that layout first, or the samples would be written mirrored")
        reference.update(image=str(Path(reference_image).resolve()), affine=header.affine.tolist(),
                         space=f"the grid of {Path(reference_image).name}")

    autoencoder = build_autoencoder(ae_cfg.model)
    autoencoder.load_state_dict(convert_old_state_dict(autoencoder, _weights(bundle.autoencoder_weights),
                                                       str(bundle.autoencoder_weights)))
    unet = build_unet(ldm_cfg.model, ae_cfg.model.latent_channels, encoder.dim,
                      hybrid=ldm_cfg.conditioning.hybrid)
    unet.load_state_dict(convert_old_state_dict(unet, _weights(bundle.unet_weights), str(bundle.unet_weights)))

    source = {"bundle": str(bundle.root.resolve()), "name": bundle.name, "version": bundle.version,
              "load_old": bundle.load_old, "age_range": list(age_range),
              "files": {p.name: {"sha256": file_sha256(p), **_stamp(p)}
                        for p in (bundle.autoencoder_weights, bundle.unet_weights)}}
    for run, cfg in ((ae_run, ae_cfg), (ldm_run, ldm_cfg)):
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    ae_file = ae_run / "checkpoints" / "best.pt"
    weights = autoencoder.state_dict()
    save_checkpoint(ae_file, {"kind": "autoencoder", "config": to_dict(ae_cfg), "versions": versions(),
                              "model": weights, "ema": None, "image_shape": list(bundle.image_shape), "step": 0,
                              "imported_from": source})
    weights = unet.state_dict()
    # no scale factor in the bundle: its UNet works on the autoencoder's latents as they are
    save_checkpoint(ldm_run / "checkpoints" / "best.pt", {
        "kind": "diffusion", "config": to_dict(ldm_cfg), "versions": versions(), "scale_factor": 1.0,
        "latent_shape": list(bundle.latent_shape), "conditioning": encoder.state_dict(), "model": weights,
        "ema": weights, "step": 0, "reference": reference, "imported_from": source,
        "autoencoder": {"run": str(ae_run.resolve()), "checkpoint": str(ae_file.resolve()),
                        "sha256": file_sha256(ae_file)}})
    write_json(out / "bundle.json", {**source, "runs": {"autoencoder": str(ae_run), "diffusion": str(ldm_run)},
                                     "conditions": encoder.describe(), "ddim_steps": bundle.steps,
                                     "reference": reference, "conditioning_mode": ldm_cfg.conditioning.mode})
    log.info("imported %s %s: autoencoder %.1fM and UNet %.1fM parameters (%s naming), conditions %s", bundle.name,
             bundle.version, sum(p.numel() for p in autoencoder.parameters()) / 1e6,
             sum(p.numel() for p in unet.parameters()) / 1e6, "old GenerativeModels" if bundle.load_old else "MONAI",
             "; ".join(encoder.describe()))
    return {"autoencoder": ae_run, "diffusion": ldm_run}


IMPORTED = "medldm_runs"  # where `medldm sample --run BUNDLE_DIR` keeps its import, inside the bundle folder


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_bundle(path: str | Path) -> bool:
    """A MONAI bundle folder (configs/inference.json) rather than a medldm run (checkpoints/)."""
    path = Path(path)
    return (path / "configs" / "inference.json").is_file() and not (path / "checkpoints").is_dir()


def imported_diffusion_run(bundle_dir: str | Path) -> Path:
    """The diffusion run of a bundle imported into ``BUNDLE/medldm_runs``: imported now, or earlier from the same
    weight files (same size and modification time), so ``medldm sample --run BUNDLE_DIR`` is one command."""
    bundle = read_bundle(bundle_dir)
    out = bundle.root / IMPORTED
    record = out / "bundle.json"
    if record.is_file():
        try:
            files = json.loads(record.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            files = {}
        current = {p.name: _stamp(p) for p in (bundle.autoencoder_weights, bundle.unet_weights)}
        if all({k: files.get(n, {}).get(k) for k in ("bytes", "mtime_ns")} == stamp for n, stamp in current.items()):
            return out / "diffusion"
    log.info("importing the bundle %s into %s (once; `medldm import-bundle` chooses another place)", bundle.root, out)
    try:
        return import_bundle(bundle.root, out, overwrite=True)["diffusion"]
    except OSError:  # no permission, or a read-only file system
        raise InputError(f"{bundle.root} is read-only: import it elsewhere with `medldm import-bundle "
                         f"{bundle.root} --out RUNS` and sample with --run RUNS/diffusion") from None
