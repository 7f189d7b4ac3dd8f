"""Affine registration to a T1 template (SimpleITK) and the template's reference grid and brain mask.

A scan meets the template in three steps, each guarded against the wrong minima that multi-site scans produce:
1. starts from the brain masks: the scan's brain centre and size against the template's, in each of the 24
   orientations a scanner (or a wrong header) can produce and the 4 that align the masks' principal axes;
   each start is scored by its correlation with the template at the coarsest level;
2. the best ``starts`` of them get a coarse similarity fit (rotation, shift, one scale), scored again;
3. the best gets the affine fit (Mattes mutual information) on the finer levels, which is refused when its
   scales or shears are not a human head's.
The registered scan's quality is measured on an absolute scale (correlation with the template inside its brain
mask, Dice of the two brain masks), so that QC can compare it across scans and cohorts.
"""

from __future__ import annotations

import importlib.util
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from medldm.config import PreprocessConfig, RegistrationConfig
from medldm.data.io import content_sha256, from_sitk, itk_threads, load_volume, to_sitk
from medldm.errors import InputError

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
    # the template smoothed and resampled for each registration level, made once per process
    levels: dict[tuple[float, float], Any] = field(default_factory=dict, repr=False)
    # SHA-256 of the files it was made from (template_sha256): what a registered volume records it was made against
    sha256: str = ""

    def __post_init__(self) -> None:
        # what every registration reads, computed once: the brain region, its centre, covariance and volume (ml),
        # and the image as ITK sees it
        self.region = self.mask if self.mask is not None else self.image > self.image.mean()
        self.centre, self.covariance, self.volume_ml = _moments(self.region, self.affine)
        self.itk = None  # the float32 ITK image, made on first use (SimpleITK is imported lazily)


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("registration.template=mni152 uses the ICBM152 2009 template that nilearn ships: "
                         "pip install nilearn (the [mni] extra of medldm: pip install -e '.[mni]'), "
                         "or set registration.template to a template NIfTI "
                         "(and registration.template_mask to its brain mask)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def template_files(cfg: RegistrationConfig) -> list[Path]:
    """The files the template is made from: its image, then its mask (mni152: the GM and WM maps it is drawn from)."""
    if cfg.template == "mni152":
        root = _nilearn_data_dir()
        return [root / _MNI_FILES[k] for k in ("t1", "gm", "wm")]
    return [Path(cfg.template)] + ([Path(cfg.template_mask)] if cfg.template_mask else [])


def template_sha256(cfg: RegistrationConfig) -> str:
    """SHA-256 of the template's files (a DICOM folder's files in name order), wherever they lie: a file replaced
    at the same path (another nilearn release, a template re-exported) gives another hash."""
    files = template_files(cfg)
    for path in files:
        if not path.exists():
            raise InputError(f"{path}: registration template file not found (registration.template / template_mask)")
    return content_sha256(*files)


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
        raise InputError(f"registration.template_mask {cfg.template_mask} does not match the template's grid")
    return t1, mask


_CACHE: dict[str, Template] = {}


def load_template(cfg: PreprocessConfig) -> Template:
    """The configured template (and mask) resampled onto the output grid: cfg.spacing, cfg.shape, RAS,
    centred on the template's brain (or head) centre. Loaded once per process and template content."""
    # keyed on the content too: a template replaced at the same path is not served from the cache (a notebook or
    # a test that preprocesses again in the same process would register to the old one and record the new one)
    digest = template_sha256(cfg.registration)
    key = repr((cfg.registration, cfg.spacing, cfg.shape, digest))
    if key not in _CACHE:
        (image, affine), mask = _template_files(cfg.registration)
        _CACHE[key] = _on_output_grid(image, affine, mask, cfg)
        _CACHE[key].sha256 = digest
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


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Registration:
    """A scan registered to the template, with what QC needs to judge the fit."""

    image: np.ndarray  # the scan on the template grid
    mask: np.ndarray  # the scan's own brain mask on the template grid
    matrix: np.ndarray  # 4x4 RAS: template point -> scan point
    metric: float  # Mattes mutual information of the final fit (lower is better; not comparable across scans)
    correlation: float  # Pearson r with the template inside the template's brain mask (comparable across scans)
    dice: float | None  # Dice of the scan's registered brain mask with the template's (None: template has no mask)
    scales: list[float]  # singular values of the linear part (scan mm per template mm)
    start: str  # the start the fit came from: an orientation as axis codes, or "moments"
    problem: str | None = None  # an affine refused as implausible, and what was kept instead


def _moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(centre in world mm, covariance in world mm^2, volume in ml) of a mask."""
    ijk = np.argwhere(mask)
    if len(ijk) < 10:
        raise InputError("the brain mask is empty: nothing to register")
    world = nib.affines.apply_affine(affine, ijk[:: max(1, len(ijk) // 200_000)])
    volume = len(ijk) * abs(np.linalg.det(affine[:3, :3])) / 1000.0
    return world.mean(0), np.cov(world.T), volume


def _orientations() -> list[tuple[str, np.ndarray]]:
    """The 24 rotations that map the axes onto each other (a scanner's or a header's orientations), identity first."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            r = np.zeros((3, 3))
            r[list(perm), [0, 1, 2]] = signs
            if np.linalg.det(r) > 0:
                out.append(("".join(nib.aff2axcodes(nib.affines.from_matvec(r))), r))
    return sorted(out, key=lambda o: o[0] != "RAS")


def _starts(template: Template, mask: np.ndarray, affine: np.ndarray, cfg: RegistrationConfig
            ) -> list[tuple[str, np.ndarray]]:
    """Candidate template->scan transforms (4x4 RAS) that put the template's brain on the scan's brain."""
    c_t, cov_t, vol_t = template.centre, template.covariance, template.volume_ml
    c_m, cov_m, vol_m = _moments(mask, affine)
    scale = float(np.clip((vol_m / vol_t) ** (1 / 3), *cfg.scale_range))
    rotations = list(_orientations())
    # principal axes: the rotation that takes the template brain's axes onto the scan brain's (4 sign choices)
    _, e_t = np.linalg.eigh(cov_t)
    _, e_m = np.linalg.eigh(cov_m)
    for signs in itertools.product((1, -1), repeat=3):
        r = e_m @ np.diag(signs) @ e_t.T
        if np.linalg.det(r) > 0:
            rotations.append(("moments", r))
    return [(name, nib.affines.from_matvec(scale * r, c_m - scale * r @ c_t)) for name, r in rotations]


def _to_itk(matrix: np.ndarray, centre: np.ndarray) -> Any:
    """A 4x4 RAS template->scan matrix as an ITK affine transform (LPS) about ``centre`` (RAS)."""
    import SimpleITK as sitk

    lps = _RAS_TO_LPS @ matrix[:3, :3] @ _RAS_TO_LPS
    c = _RAS_TO_LPS @ centre
    t = _RAS_TO_LPS @ nib.affines.apply_affine(matrix, centre) - c
    transform = sitk.AffineTransform(3)
    transform.SetCenter(c.tolist())
    transform.SetMatrix(lps.ravel().tolist())
    transform.SetTranslation(t.tolist())
    return transform


def _from_itk(transform: Any) -> np.ndarray:
    """The 4x4 RAS template->scan matrix of an ITK affine-like transform."""
    a = np.array(transform.GetMatrix()).reshape(3, 3)
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    lin = _RAS_TO_LPS @ a @ _RAS_TO_LPS
    offset = _RAS_TO_LPS @ (c + t - a @ c)
    return nib.affines.from_matvec(lin, offset)


def _similarity(matrix: np.ndarray, centre: np.ndarray) -> Any:
    """An ITK similarity transform (rotation, one scale, shift) closest to a 4x4 RAS matrix."""
    import SimpleITK as sitk

    affine = _to_itk(matrix, centre)
    lin = np.array(affine.GetMatrix()).reshape(3, 3)
    u, sv, vt = np.linalg.svd(lin)
    rotation = u @ vt
    transform = sitk.Similarity3DTransform()
    transform.SetCenter(affine.GetCenter())
    transform.SetMatrix((rotation * float(np.cbrt(np.prod(sv)))).ravel().tolist())
    transform.SetTranslation(affine.GetTranslation())
    return transform


def _as_affine(transform: Any) -> Any:
    import SimpleITK as sitk

    out = sitk.AffineTransform(3)
    out.SetCenter(transform.GetCenter())
    out.SetMatrix(transform.GetMatrix())
    out.SetTranslation(transform.GetTranslation())
    return out


def _levels(cfg: RegistrationConfig, spacing: np.ndarray) -> list[tuple[float, float]]:
    """(grid spacing in mm, smoothing sigma in mm) of each registration level, coarsest first."""
    out = []
    for shrink, sigma in zip(cfg.shrink_factors, cfg.smoothing_sigmas):
        step = float(spacing.mean() * shrink)
        # smoothed at least as much as the coarser grid needs, so that it does not alias
        out.append((step, max(float(sigma), 0.5 * step if shrink > 1 else 0.0)))
    return out


def _level(image: Any, step: float, sigma: float) -> Any:
    """An ITK image smoothed by ``sigma`` mm and resampled onto a grid of ``step`` mm over the same extent."""
    import SimpleITK as sitk

    if sigma > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma)
    if np.allclose(image.GetSpacing(), step):
        return image
    size = [max(4, int(round(n * s / step))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing([step] * 3)
    reference.SetDirection(image.GetDirection())
    # the same field of view: the first voxel centre moves by half the change in voxel size
    shift = np.array(image.GetDirection()).reshape(3, 3) @ ((step - np.array(image.GetSpacing())) / 2)
    reference.SetOrigin((np.array(image.GetOrigin()) + shift).tolist())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)


@dataclass
class _Level:
    """The template at one registration level: image, brain region (x/y/z array), the region the metric samples."""

    image: Any
    region: np.ndarray
    # brain-only templates: the metric samples the brain and 10 mm around it (ITK mask; None: the whole grid, as for
    # a template with the head in it, whose scalp and skull carry information too)
    sampled: Any
    sampled_fraction: float

    def copy(self) -> _Level:
        """Images of its own for a fit in another thread (ITK does not promise that two pipelines may read one)."""
        import SimpleITK as sitk

        return _Level(sitk.Image(self.image), self.region, None if self.sampled is None else sitk.Image(self.sampled),
                      self.sampled_fraction)


def _template_itk(template: Template) -> Any:
    import SimpleITK as sitk

    if template.itk is None:
        template.itk = sitk.Cast(to_sitk(template.image, template.affine), sitk.sitkFloat32)
    return template.itk


def _template_level(template: Template, step: float, sigma: float) -> _Level:
    import SimpleITK as sitk

    key = (step, sigma)
    if key not in template.levels:
        image = _level(_template_itk(template), step, sigma)
        brain = _level(to_sitk(template.region.astype(np.float32), template.affine), step, 0.0) > 0.5
        sampled, fraction = None, 1.0
        if template.skull_stripped:
            sampled = sitk.BinaryDilate(brain, [max(1, int(round(10.0 / step)))] * 3)
            fraction = float(sitk.GetArrayViewFromImage(sampled).mean())
        template.levels[key] = _Level(image, ndimage.binary_dilation(from_sitk(brain)[0] > 0, iterations=1),
                                      sampled, fraction)
    return template.levels[key]


def _correlation(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Pearson r of two images inside a region (0 where either is flat there)."""
    a, b = a[region].astype(np.float64), b[region].astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _fit(level: _Level, moving: Any, transform: Any, cfg: RegistrationConfig, seed: int) -> float:
    """One single-level Mattes fit of ``transform`` (in place); returns the final metric."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # samples fall on the brain and around it only (as many as sampling_fraction of the whole grid would give):
    # with a brain-only template most of the grid is empty, and an affine fit on the few samples left on the brain
    # ran off at 3 mm (IXI scans at 1 mm, scales 1.46 x 0.87 x 0.35)
    if level.sampled is not None:
        reg.SetMetricFixedMask(level.sampled)
    # ITK reads seed 0 as "seed from the wall clock": shift by one so that every seed, 0 included, is reproducible
    reg.SetMetricSamplingPercentage(min(1.0, cfg.sampling_fraction / max(level.sampled_fraction, 1e-3)), seed + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=cfg.iterations, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    try:
        reg.Execute(level.image, moving)
    except RuntimeError as e:
        raise InputError(f"registration to the template failed ({str(e).strip().splitlines()[-1]})") from None
    return float(reg.GetMetricValue())


def _fit_levels(pyramid: list[tuple[_Level, Any]], transform: Any, cfg: RegistrationConfig, seed: int) -> float:
    metric = float("nan")
    for k, (level, moving) in enumerate(pyramid):
        metric = _fit(level, moving, transform, cfg, seed + 1000 * k)
    return metric


def implausible(matrix: np.ndarray, cfg: RegistrationConfig) -> str | None:
    """Why a template->scan affine is not a human head meeting the template (None when it is one)."""
    lin = matrix[:3, :3]
    scales = np.linalg.svd(lin, compute_uv=False)
    if np.linalg.det(lin) <= 0:
        return "the affine mirrors the brain"
    lo, hi = cfg.scale_range
    if scales.min() < lo or scales.max() > hi:
        return f"scales {np.round(scales, 2).tolist()} outside {[lo, hi]}"
    if scales.max() / scales.min() > cfg.max_anisotropy:
        return (f"one axis stretched {scales.max() / scales.min():.2f}x more than another "
                f"(scales {np.round(scales, 2).tolist()}; limit {cfg.max_anisotropy})")
    return None


def register_to_template(volume: np.ndarray, affine: np.ndarray, brain: np.ndarray, template: Template,
                         cfg: RegistrationConfig) -> Registration:
    """Register a scan (with its brain mask ``brain``) to the template and resample both onto the template grid."""
    import SimpleITK as sitk

    moving = sitk.Cast(to_sitk(volume, affine), sitk.sitkFloat32)
    # a skull-stripped template is matched with the skull-stripped scan: with the scalp left in, the
    # fit may shrink the whole head into the template's brain
    target = to_sitk((volume * brain).astype(np.float32), affine) if template.skull_stripped else moving
    levels = _levels(cfg, np.linalg.norm(template.affine[:3, :3], axis=0))
    with itk_threads(1) as cores:  # one thread per fit (see itk_threads); fits run side by side instead
        fixed_levels = [_template_level(template, step, sigma) for step, sigma in levels]
        pyramid = [(fixed, _level(target, step, sigma)) for fixed, (step, sigma) in zip(fixed_levels, levels)]
        coarse_fixed, coarse_region = fixed_levels[0].image, fixed_levels[0].region
        coarse_template = from_sitk(coarse_fixed)[0]
        centre = template.centre

        def score(transform: Any) -> float:
            warped = sitk.Resample(pyramid[0][1], coarse_fixed, transform, sitk.sitkLinear, 0.0)
            return _correlation(from_sitk(warped)[0], coarse_template, coarse_region)

        # 1. every start scored as it is
        starts = [(score(_to_itk(m, centre)), name, m) for name, m in _starts(template, brain, affine, cfg)]
        best = sorted(starts, key=lambda s: -s[0])[: cfg.starts]  # stable: ties keep the fixed order

        # 2. a coarse similarity fit of the best starts (all levels but the finest), scored again
        coarse = pyramid[:-1] or pyramid

        def similarity(k: int) -> tuple[float, str, Any]:
            _, name, m = best[k]
            transform = _similarity(m, centre)
            _fit_levels([(f.copy(), sitk.Image(mv)) for f, mv in coarse], transform, cfg, cfg.seed + k)
            return score(transform), name, transform

        with ThreadPoolExecutor(max(1, min(len(best), cores))) as pool:
            fitted = list(pool.map(similarity, range(len(best))))
        _, start, chosen = max(fitted, key=lambda f: f[0])  # the first of equal scores: never timing-dependent

        # 3. the affine fit from the chosen similarity, on every level but the coarsest: there, 12 parameters on a
        # brain blurred to a blob collapsed one axis (IXI at 1 mm with adni.yaml, 6 mm level: scales 1.41 x 0.77 x 0.27)
        transform = _as_affine(chosen)
        metric = _fit_levels(pyramid[1:] or pyramid, transform, cfg, cfg.seed)
        problem = implausible(_from_itk(transform), cfg)
        if problem is not None:  # keep the similarity fit, which a head can nearly always be, and say so
            transform = _as_affine(chosen)
            still = implausible(_from_itk(transform), cfg)
            problem = (f"implausible registration: {still}" if still else
                       f"affine refused ({problem}); the similarity fit was kept")
        matrix = _from_itk(transform)

        fixed_full = _template_itk(template)
        out = sitk.Resample(moving, fixed_full, transform, sitk.sitkLinear, 0.0)
        out_mask = sitk.Resample(to_sitk(brain.astype(np.float32), affine), fixed_full, transform, sitk.sitkLinear, 0.0)
    image, mask = from_sitk(out)[0], from_sitk(out_mask)[0] > 0.5
    matched = image * mask if template.skull_stripped else image
    correlation = _correlation(matched, template.image, template.region)
    dice = None
    if template.mask is not None:
        dice = float(2 * (mask & template.mask).sum() / max(1, mask.sum() + template.mask.sum()))
    return Registration(image=image, mask=mask, matrix=matrix, metric=metric, correlation=correlation, dice=dice,
                        scales=np.linalg.svd(matrix[:3, :3], compute_uv=False).round(3).tolist(), start=start,
                        problem=problem)


def tilt_degrees(matrix: np.ndarray) -> float:
    """How far a template->scan matrix tips the template's superior axis away from the scan's (pitch and roll;
    a turn about the vertical axis does not count). Brain-extraction networks are trained on upright heads."""
    up = matrix[:3, :3] @ np.array([0.0, 0.0, 1.0])
    return float(np.degrees(np.arccos(np.clip(up[2] / np.linalg.norm(up), -1.0, 1.0))))


def to_scan_grid(image: np.ndarray, template: Template, matrix: np.ndarray, shape: tuple[int, ...],
                 affine: np.ndarray, order: int = 1) -> np.ndarray:
    """An image on the template grid pulled back onto a scan's grid through a template->scan matrix."""
    voxel = np.linalg.inv(template.affine) @ np.linalg.inv(matrix) @ affine  # scan voxel -> template voxel
    return ndimage.affine_transform(image.astype(np.float32), voxel[:3, :3], voxel[:3, 3], output_shape=shape,
                                    order=order, mode="constant", cval=0.0)
