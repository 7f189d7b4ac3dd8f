"""Affine registration to a T1 template (SimpleITK) and the template's reference grid and brain mask."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from medldm.config import PreprocessConfig, RegistrationConfig
from medldm.data.intensity import head_mask
from medldm.data.io import from_sitk, itk_threads, load_volume, to_sitk

# files of the ICBM152 2009c nonlinear symmetric template inside the nilearn package
_MNI_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
              "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
              "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


@dataclass
class Template:
    """A template on the output grid: its image, brain mask (or None) and the grid's affine."""

    image: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray
    # the template image holds a brain only (as ICBM152 in nilearn): scans are then matched skull-stripped too
    skull_stripped: bool = False


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("registration.template=mni152 uses the ICBM152 2009 template that nilearn ships: "
                         "pip install nilearn (the [mni] extra of medldm: pip install -e '.[mni]'), or set registration.template to a template NIfTI "
                         "(and registration.template_mask to its brain mask)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _template_files(cfg: RegistrationConfig) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    if cfg.template == "mni152":
        root = _nilearn_data_dir()
        t1 = load_volume(root / _MNI_FILES["t1"])
        tissue = load_volume(root / _MNI_FILES["gm"])[0] + load_volume(root / _MNI_FILES["wm"])[0]
        # GM + WM probability, ventricles and sulcal CSF filled in: the brain as a skull strip wants it
        mask = ndimage.binary_closing(tissue > 0.25, iterations=3)
        mask = ndimage.binary_fill_holes(mask)
        return t1, mask.astype(np.float32)
    t1 = load_volume(cfg.template)
    mask = load_volume(cfg.template_mask)[0] if cfg.template_mask else None
    if mask is not None and mask.shape != t1[0].shape:
        raise ValueError(f"registration.template_mask {cfg.template_mask} does not match the template's grid")
    return t1, mask


_CACHE: dict[str, Template] = {}


def load_template(cfg: PreprocessConfig) -> Template:
    """The configured template (and mask) resampled onto the output grid: cfg.spacing, cfg.shape, RAS,
    centred on the template's brain (or head) centre. Loaded once per process."""
    key = repr((cfg.registration, cfg.spacing, cfg.shape))
    if key not in _CACHE:
        (image, affine), mask = _template_files(cfg.registration)
        _CACHE[key] = _on_output_grid(image, affine, mask, cfg)
    return _CACHE[key]


def _on_output_grid(image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None, cfg: PreprocessConfig) -> Template:
    import SimpleITK as sitk

    region = mask > 0.5 if mask is not None else image > image.mean()
    centre_vox = np.argwhere(region).mean(0)
    centre = (affine @ np.append(centre_vox, 1.0))[:3]
    spacing, shape = np.array(cfg.spacing, dtype=float), np.array(cfg.shape)
    grid = np.diag([*spacing, 1.0])
    grid[:3, 3] = centre - spacing * (shape - 1) / 2.0
    reference = to_sitk(np.zeros(cfg.shape, np.float32), grid)
    resampled = sitk.Resample(to_sitk(image, affine), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    out_mask = None
    if mask is not None:
        m = sitk.Resample(to_sitk(mask, affine), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        out_mask = from_sitk(m)[0] > 0.5
    image = from_sitk(resampled)[0]
    stripped = False
    if out_mask is not None:
        outside = image[~ndimage.binary_dilation(out_mask, iterations=2)].sum()
        stripped = bool(outside < 0.02 * image.sum())
    return Template(image, out_mask, grid, stripped)


def _brain_centre_guess(volume: np.ndarray, affine: np.ndarray, depth_mm: float = 100.0) -> np.ndarray:
    """World (RAS) centre of the top ``depth_mm`` of the head: the brain sits there, the neck and face do not."""
    mask = head_mask(volume)
    ijk = np.argwhere(mask)
    world = nib.affines.apply_affine(affine, ijk)
    top = world[:, 2].max()
    return world[world[:, 2] > top - depth_mm].mean(0)


def rough_brain_mask(volume: np.ndarray, affine: np.ndarray, erode_mm: float = 8.0) -> np.ndarray:
    """A rough skull strip for registration only: erode the head until the brain comes apart from the scalp
    (the dark skull between them), keep the largest piece, grow it back."""
    spacing = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
    steps = max(1, int(round(erode_mm / spacing)))
    mask = volume > threshold_otsu(volume)
    core = ndimage.binary_erosion(mask, iterations=steps)
    labels, n = ndimage.label(core)
    if n == 0:
        return mask
    core = labels == (1 + int(np.argmax(ndimage.sum(core, labels, range(1, n + 1)))))
    return ndimage.binary_fill_holes(ndimage.binary_dilation(core, iterations=steps) & mask)


def _run(fixed, moving, transform, cfg: RegistrationConfig, coarse_only: bool = False, seed: int | None = None
         ) -> float:
    import SimpleITK as sitk

    levels = list(zip(cfg.shrink_factors, cfg.smoothing_sigmas))
    if coarse_only and len(levels) > 1:
        levels = levels[:-1]  # the rigid start needs no full-resolution pass

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # ITK reads seed 0 as "seed from the wall clock": shift by one so that every seed, 0 included, is reproducible
    reg.SetMetricSamplingPercentage(cfg.sampling_fraction, (cfg.seed if seed is None else seed) + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=cfg.iterations, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([f for f, _ in levels])
    reg.SetSmoothingSigmasPerLevel([sigma for _, sigma in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as e:
        raise ValueError(f"registration to the template failed ({str(e).strip().splitlines()[-1]})") from None
    return float(reg.GetMetricValue())


def register_to_template(volume: np.ndarray, affine: np.ndarray, template: Template,
                         cfg: RegistrationConfig) -> tuple[np.ndarray, float]:
    """Register a scan to the template (rigid, then affine; Mattes MI, multi-resolution) and resample it onto
    the template's grid. Returns (volume on the template grid, final metric value; lower is better)."""
    import SimpleITK as sitk

    fixed = sitk.Cast(to_sitk(template.image, template.affine), sitk.sitkFloat32)
    moving = sitk.Cast(to_sitk(volume, affine), sitk.sitkFloat32)
    # a skull-stripped template is matched with a roughly skull-stripped scan: with the scalp left in, the
    # fit may shrink the whole head into the template's brain
    target = moving
    if template.skull_stripped:
        target = to_sitk(volume * rough_brain_mask(volume, affine), affine)
    # start from the brains' centres: the head's centre of mass would pull the template towards the neck
    region = template.mask if template.mask is not None else template.image > template.image.mean()
    fixed_centre = nib.affines.apply_affine(template.affine, np.argwhere(region).mean(0))
    moving_centre = _brain_centre_guess(volume, affine)
    ras_to_lps = np.array([-1.0, -1.0, 1.0])
    # with sampled voxels a fit sometimes runs off (a skull-stripped template is the hard case): run `starts`
    # rigid-then-affine fits with different sampling seeds and keep the best match (lowest metric)

    def fit(k: int) -> tuple[float, Any]:
        # images of its own: ITK does not promise that two pipelines may read one image at the same time
        fixed_k, target_k = sitk.Image(fixed), sitk.Image(target)
        fixed_k.MakeUnique(), target_k.MakeUnique()
        rigid = sitk.Euler3DTransform()
        rigid.SetCenter((fixed_centre * ras_to_lps).tolist())
        rigid.SetTranslation(((moving_centre - fixed_centre) * ras_to_lps).tolist())
        _run(fixed_k, target_k, rigid, cfg, coarse_only=True, seed=cfg.seed + k)
        candidate = sitk.AffineTransform(3)
        candidate.SetCenter(rigid.GetCenter())
        candidate.SetMatrix(rigid.GetMatrix())
        candidate.SetTranslation(rigid.GetTranslation())
        return _run(fixed_k, target_k, candidate, cfg, seed=cfg.seed + k), candidate

    # one thread per fit (see itk_threads: the same scan registered twice in one process with 2 threads came out
    # different, IXI012 metric -0.4300 vs -0.4299, voxels up to 0.11 apart); the starts run side by side instead,
    # on as many cores as this process may use (a preprocessing worker has one)
    with itk_threads(1) as cores, ThreadPoolExecutor(max(1, min(cfg.starts, cores))) as pool:
        fits = list(pool.map(fit, range(cfg.starts)))
    metric, transform = min(fits, key=lambda f: f[0])  # the first of equal fits: the order never depends on timing
    out = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    return from_sitk(out)[0], metric
