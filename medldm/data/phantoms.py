"""Procedural T1-weighted head phantoms, written as an ADNI-like download tree (NIfTI or DICOM series, with
ADNIMERGE.csv if asked) or a flat folder + CSV.

Each head is drawn in world (RAS, mm) coordinates and sampled through a random, realistic affine (RAS,
LPS, sagittal axis orders, small oblique tilts), so code that mishandles orientation puts the anatomy in
the wrong place. Markers that break every mirror symmetry: the nose points anterior, the neck leaves
inferiorly, the cerebellum sits posterior-inferior and a vitamin-E capsule is taped to the right temple.
"""

from __future__ import annotations

import csv
import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy.spatial.transform import Rotation

from medldm.data.io import atomic_write, keep_locale
from medldm.errors import InputError

ADNI_GROUPS = ("CN", "SMC", "EMCI", "LMCI", "MCI", "AD")
FLAT_DIAGNOSES = ("CN", "MCI", "AD")
LAYOUTS = ("adni", "flat")
SEXES = ("M", "F")
TISSUE_LABELS = {0: "background", 1: "soft tissue", 2: "skull", 3: "CSF", 4: "grey matter", 5: "white matter",
                 6: "ventricles"}

# How far along the way to dementia each group is; drives ventricle growth and cortical thinning.
_SEVERITY: dict[str | None, float] = {"CN": 0.0, "SMC": 0.1, "EMCI": 0.35, "MCI": 0.5, "LMCI": 0.65, "AD": 1.0}
_GROUP_P = (0.3, 0.07, 0.15, 0.15, 0.13, 0.2)
# Axis codes seen in real downloads: axial RAS/LPS/LAS and sagittal acquisitions (ADNI MPRAGE is sagittal).
_AXCODES = (("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("P", "S", "R"), ("A", "S", "L"), ("P", "I", "R"))
# T1 intensities relative to white matter ~0.9 before the per-scan +-10% and the global scale.
_INTENSITY = {"skin": 0.8, "muscle": 0.35, "skull": 0.07, "csf": 0.15, "gm": 0.55, "wm": 0.9, "capsule": 1.2}
_SITES = ("002", "005", "011", "023", "035", "067", "098", "127", "130", "941")
# IDA series descriptions; the download folder is the description with spaces replaced by '_'
_DESCRIPTIONS = ("MPRAGE", "MP-RAGE", "IR-SPGR", "Accelerated Sagittal MPRAGE")
_DESCRIPTION_P = (0.7, 0.12, 0.1, 0.08)
_COLLECTION_HEADER = ("Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
                      "Acq Date", "Format", "Downloaded")
ADNIMERGE_HEADER = ("RID", "PTID", "VISCODE", "EXAMDATE", "AGE", "PTGENDER", "DX", "DX_bl")


@dataclass(frozen=True)
class _Waves:
    """A smooth random field: a sum of a few plane sine waves, scaled to unit variance."""

    k: np.ndarray  # (n, 3) wave vectors, rad/mm
    phase: np.ndarray  # (n,)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        total = np.zeros_like(x)
        for (kx, ky, kz), phase in zip(self.k, self.phase):
            total += np.sin(kx * x + ky * y + kz * z + phase)
        return total * np.float32(np.sqrt(2 / len(self.phase)))


@dataclass(frozen=True)
class _Subject:
    """What stays the same between two visits of one person."""

    semi_axes: np.ndarray  # outer scalp, LR/AP/SI, mm
    scalp: float  # layer thicknesses in mm at age 40, cognitively normal
    skull: float
    csf: float
    gm: float
    ventricles: float  # ventricle volume factor at age 40, cognitively normal
    warp: _Waves
    folds: _Waves


def _waves(rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]) -> _Waves:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = directions * (2 * np.pi / rng.uniform(*wavelength_mm, size=(count, 1)))
    return _Waves(k.astype(np.float32), rng.uniform(0, 2 * np.pi, count).astype(np.float32))


def _draw_subject(rng: np.random.Generator, sex: str | None) -> _Subject:
    if sex not in (*SEXES, None):
        raise InputError(f"sex must be one of {SEXES} or None, got {sex!r}")
    size = {"M": 1.03, "F": 0.97, None: 1.0}[sex]
    semi_axes = rng.uniform((65.0, 85.0, 70.0), (80.0, 100.0, 85.0)) * size
    return _Subject(semi_axes=semi_axes, scalp=rng.uniform(4.0, 6.0), skull=rng.uniform(5.0, 7.0),
                    csf=rng.uniform(1.5, 2.5), gm=rng.uniform(4.0, 5.0), ventricles=rng.uniform(0.75, 1.25),
                    warp=_waves(rng, 6, (80.0, 160.0)), folds=_waves(rng, 8, (14.0, 24.0)))


def _ellipsoid_depth(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
                     semi: tuple[float, float, float]) -> np.ndarray:
    """Signed depth in mm (positive inside) below an axis-aligned ellipsoid; an infinite semi-axis makes a cylinder."""
    offsets = [(c - c0) for c, c0, s in zip((x, y, z), centre, semi) if np.isfinite(s)]
    finite = [s for s in semi if np.isfinite(s)]
    radius = np.sqrt(sum((d / s) ** 2 for d, s in zip(offsets, finite)))
    length = np.sqrt(sum(d**2 for d in offsets))
    # distance to the surface along the ray from the centre; exact on a sphere, close enough for a phantom
    to_surface = np.divide(length, radius, out=np.full_like(length, min(finite)), where=radius > 1e-6)
    return to_surface - length


class _Canvas:
    """Paints tissues in order, later ones over earlier ones, with one voxel of partial volume at each edge."""

    def __init__(self, shape: tuple[int, ...], edge_mm: float) -> None:
        self.image = np.zeros(shape, np.float32)
        self.labels = np.zeros(shape, np.uint8)
        self.edge_mm = edge_mm

    def paint(self, depth: np.ndarray, value: float, label: int) -> None:
        alpha = np.clip(0.5 + depth / self.edge_mm, 0.0, 1.0)
        self.image += alpha * (value - self.image)
        self.labels[alpha > 0.5] = label


def _geometry(rng: np.random.Generator, semi_axes: np.ndarray, neck_mm: float = 0.0
              ) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """Random scanner geometry around a head: (affine, shape, head centre in world mm); ``neck_mm`` more field of
    view below the head, along the voxel axis nearest to the body's (so the neck fills it)."""
    directions = np.zeros((3, 3))
    for axis, (world_axis, sign) in enumerate(axcodes2ornt(_AXCODES[rng.integers(len(_AXCODES))])):
        directions[int(world_axis), axis] = sign
    if rng.random() < 0.4:
        tilt = rng.normal(size=3)
        tilt *= np.deg2rad(rng.uniform(3, 15)) / np.linalg.norm(tilt)
        directions = Rotation.from_rotvec(tilt).as_matrix() @ directions
    spacing = np.full(3, rng.uniform(1.8, 2.2))
    if rng.random() < 0.4:  # thick-slice acquisitions: one axis coarser
        spacing[rng.integers(3)] = rng.uniform(2.2, 2.6)
    # room for the nose, the capsule and the warp, so none of them is cut off by the field of view
    reach = (semi_axes + (18.0, 22.0, 6.0)) * 1.08
    half_extent = np.sqrt(((reach[:, None] * directions) ** 2).sum(axis=0))
    fov = np.maximum(rng.uniform(220, 240, 3), 2 * half_extent + 4)
    shape = np.ceil(fov / spacing).astype(int)
    slack = np.minimum(fov / 2 - half_extent, 15.0)
    head_centre = rng.uniform(-10, 10, 3)
    grid_centre = head_centre + directions @ rng.uniform(-slack, slack)
    affine = nib.affines.from_matvec(directions * spacing, grid_centre - (directions * spacing) @ ((shape - 1) / 2))
    if neck_mm > 0:
        axis = int(np.argmax(np.abs(directions[2])))  # the voxel axis that runs (most) up and down
        extra = int(np.ceil(neck_mm / spacing[axis]))
        shape[axis] += extra
        if directions[2, axis] > 0:  # the axis runs upwards: the new voxels go before the first one
            affine[:3, 3] -= affine[:3, axis] * extra
    return affine, (int(shape[0]), int(shape[1]), int(shape[2])), head_centre


def _world_grid(affine: np.ndarray, shape: tuple[int, int, int], origin: np.ndarray) -> list[np.ndarray]:
    """World x, y, z (mm, relative to origin) of every voxel, built by broadcasting instead of index arrays."""
    index = [np.arange(n, dtype=np.float32) for n in shape]
    coords = []
    for row in range(3):
        coord = (np.float32(affine[row, 0]) * index[0])[:, None, None] \
            + (np.float32(affine[row, 1]) * index[1])[None, :, None] \
            + (np.float32(affine[row, 2]) * index[2])[None, None, :]
        coords.append(coord + np.float32(affine[row, 3] - origin[row]))
    return coords


def _scan(rng: np.random.Generator, subject: _Subject, age: float, diagnosis: str | None, neck_mm: float = 0.0,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One acquisition of a subject at an age: (float32 volume, affine, uint8 tissue labels)."""
    if diagnosis not in (*ADNI_GROUPS, None):
        raise InputError(f"diagnosis must be one of {ADNI_GROUPS} or None, got {diagnosis!r}")
    severity = _SEVERITY.get(diagnosis, 0.0)
    years = age - 40.0
    affine, shape, centre = _geometry(rng, subject.semi_axes, neck_mm)
    x, y, z = _world_grid(affine, shape, centre)
    # coil sensitivity: smooth, +-20%, fixed to the scanner rather than the head, so it changes between visits
    bias = _waves(rng, 3, (250.0, 500.0))(x, y, z)
    bias = 1 + 0.2 * bias / np.abs(bias).max()
    stretch = 1 + 0.025 * subject.warp(x, y, z)  # same warp at every visit: it is the person's head shape
    x, y, z = x * stretch, y * stretch, z * stretch
    ax, ay, az = (float(a) for a in subject.semi_axes)
    tone = {name: value * rng.uniform(0.9, 1.1) for name, value in _INTENSITY.items()}
    canvas = _Canvas(shape, edge_mm=float(np.mean(np.linalg.norm(affine[:3, :3], axis=0))))

    neck = np.minimum(_ellipsoid_depth(x, y, z, (0, -0.1 * ay, 0), (0.65 * ax, 0.55 * ay, np.inf)), -0.5 * az - z)
    canvas.paint(neck, tone["skin"], 1)
    canvas.paint(neck - subject.scalp, tone["muscle"], 1)
    canvas.paint(_ellipsoid_depth(x, y, z, (0, 0.97 * ay, -0.3 * az), (11, 18, 20)), tone["skin"], 1)
    canvas.paint(_ellipsoid_depth(x, y, z, (ax + 10, 0.25 * ay, 0.15 * az), (5, 5, 5)), tone["capsule"], 1)

    head = _ellipsoid_depth(x, y, z, (0, 0, 0), (ax, ay, az))
    csf = subject.csf + 0.05 * years + 1.5 * severity  # atrophy: the brain shrinks away from the skull
    # sulci: CSF-filled dips of the brain surface, deeper (wider) with age and disease
    sulci = (8.0 + 0.08 * years + 4.0 * severity) * np.clip(-subject.folds(x, y, z) - 0.8, 0.0, 0.6) / 0.6
    brain = head - subject.scalp - subject.skull - csf - sulci
    gm = subject.gm * (1 - 0.004 * years) * (1 - 0.12 * severity)
    canvas.paint(head, tone["skin"], 1)
    canvas.paint(head - subject.scalp, tone["skull"], 2)
    canvas.paint(head - subject.scalp - subject.skull, tone["csf"], 3)
    canvas.paint(brain, tone["gm"], 4)
    canvas.paint(brain - gm, tone["wm"], 5)
    nuclei = np.maximum(_ellipsoid_depth(x, y, z, (16, 2, 2), (9, 14, 9)),
                        _ellipsoid_depth(x, y, z, (-16, 2, 2), (9, 14, 9)))
    canvas.paint(nuclei, tone["gm"] * 1.15, 4)  # thalamus and basal ganglia

    cerebellum = np.minimum(_ellipsoid_depth(x, y, z, (0, -0.58 * ay, -0.5 * az), (0.6 * ax, 0.28 * ay, 0.25 * az)),
                            brain)
    canvas.paint(cerebellum + 1.5, tone["csf"], 3)  # tentorium / cisterns around it
    canvas.paint(cerebellum, tone["gm"] * 1.1, 4)
    canvas.paint(cerebellum - 0.12 * ay, tone["wm"] * 0.95, 5)
    brainstem = np.minimum(_ellipsoid_depth(x, y, z, (0, -0.12 * ay, 0), (10, 12, np.inf)), -0.05 * az - z)
    canvas.paint(brainstem, tone["wm"] * 0.9, 5)

    # lateral ventricles: curved (C-shaped) ellipsoids; volume doubles from 40 to 90 years and grows with disease
    scale = (subject.ventricles * 2 ** (years / 50) * (1 + 0.8 * severity)) ** (1 / 3)
    semi = (5.0 * scale, 22.0 * scale, 8.0 * scale)
    bent_z = z + 0.012 * (y - 4) ** 2
    ventricles = np.maximum(_ellipsoid_depth(x, y, bent_z, (1.5 + semi[0], 4, 12), semi),
                            _ellipsoid_depth(x, y, bent_z, (-1.5 - semi[0], 4, 12), semi))
    canvas.paint(ventricles, tone["csf"], 6)

    # magnitude of complex Gaussian noise: Rician, and so never negative in the background
    image = canvas.image * bias
    sigma = np.float32(rng.uniform(0.01, 0.03))
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    image = np.sqrt(real**2 + imag**2) * np.float32(rng.uniform(200, 1500))
    return image.astype(np.float32), affine, canvas.labels


def make_phantom_with_labels(rng: np.random.Generator, age: float, diagnosis: str | None, sex: str | None,
                             neck_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One T1-like head with its ground truth: (float32 volume, 4x4 affine, uint8 labels, see TISSUE_LABELS);
    ``neck_mm`` extends the field of view below the head by that much neck (a full-head-and-neck acquisition)."""
    return _scan(rng, _draw_subject(rng, sex), age, diagnosis, neck_mm)


def make_phantom(rng: np.random.Generator, age: float, diagnosis: str | None, sex: str | None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One T1-like head: (float32 volume, 4x4 affine)."""
    volume, affine, _ = make_phantom_with_labels(rng, age, diagnosis, sex)
    return volume, affine


def _save(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    # int16 like scanner exports; the global intensity scale keeps rounding below 1% of white matter
    data = np.clip(np.rint(volume), 0, np.iinfo(np.int16).max).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"medldm synthetic phantom"
    with atomic_write(path) as tmp:
        nib.save(image, tmp)


def _ida_date(day: dt.date) -> str:
    return f"{day.month}/{day.day:02d}/{day.year}"


def _uid(name: str) -> str:
    # a UUID-derived DICOM UID (the 2.25 root) that depends only on the name, so a seed writes the same files
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


@dataclass(frozen=True)
class _WrittenScan:
    """An ADNI phantom scan already saved as NIfTI: what rewriting it as a DICOM series needs."""

    path: Path
    name_head: str  # file names are <name_head>_<slice number>_<name_tail>.<suffix>, slice 1 for the NIfTI
    name_tail: str
    ptid: str
    description: str
    acquired: dt.datetime
    row: int  # its row in the collection CSV


def _is_axis_aligned(affine: np.ndarray) -> bool:
    return bool((np.count_nonzero(np.abs(affine[:3, :3]) > 1e-9, axis=0) == 1).all())


def _save_dicom(scan: _WrittenScan) -> None:
    """Rewrite a saved NIfTI as a DICOM series, one int16 file per slice along its third axis, and delete it."""
    import SimpleITK as sitk  # heavy; only DICOM phantoms need it

    nifti = cast("nib.spatialimages.SpatialImage", nib.load(scan.path))
    # SimpleITK wants the array as (z, y, x) and geometry in LPS, where NIfTI has (i, j, k) and RAS
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nifti.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    volume = sitk.GetImageFromArray(np.asarray(nifti.dataobj, dtype=np.int16).transpose(2, 1, 0))
    volume.SetSpacing(spacing.tolist())
    volume.SetOrigin(lps[:3, 3].tolist())
    volume.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    day, time = f"{scan.acquired:%Y%m%d}", f"{scan.acquired:%H%M%S}"
    series_uid = _uid(f"{scan.ptid}/{scan.path.parent.name}")  # the folder is the image id
    # the writer takes pixel spacing, position and orientation from each slice's geometry; the rest it would
    # leave out, or fill from the clock, a random UID generator or (the rescale tags) what it last read
    tags = {"0008|0060": "MR", "0010|0010": scan.ptid, "0010|0020": scan.ptid, "0008|103e": scan.description,
            "0020|000d": _uid(f"{scan.ptid}/{day}"), "0020|000e": series_uid, "0018|0050": f"{spacing[2]:.6g}",
            "0028|1052": "0", "0028|1053": "1", "0028|1054": "US",
            **{f"0008|00{code}": day for code in ("12", "20", "21", "23")},
            **{f"0008|00{code}": time for code in ("13", "30", "31", "33")}}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetSize()[2]):
        piece = volume[:, :, k:k + 1]  # a one-slice 3D image keeps the full 3D origin and direction
        for key, value in {**tags, "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1)}.items():
            piece.SetMetaData(key, value)
        with atomic_write(scan.path.with_name(f"{scan.name_head}_{k + 1}_{scan.name_tail}.dcm")) as tmp:
            writer.SetFileName(str(tmp))
            with keep_locale():
                writer.Execute(piece)
    scan.path.unlink()


def _adnimerge_diagnoses(group: str) -> tuple[str, str]:
    """(DX, DX_bl) as ADNIMERGE writes them for a subject of an IDA group."""
    dx = "CN" if group in ("CN", "SMC") else "Dementia" if group == "AD" else "MCI"
    # ADNIMERGE's DX_bl knows no plain MCI: ADNI-1 MCI subjects are late MCI there
    return dx, "LMCI" if group == "MCI" else group


def _write_adni(out_dir: Path, num: int, rng: np.random.Generator, adnimerge: bool, dicom_fraction: float) -> Path:
    rids = rng.choice(np.arange(1, 10000), size=num, replace=False)
    image_number = int(rng.integers(10000, 20000))
    series_number = int(rng.integers(8000, image_number))
    start = dt.datetime(2005, 9, 1)
    last_acquired = start.date()
    rows: list[list[str]] = []
    merge_rows: list[list[str]] = []
    written: list[_WrittenScan] = []
    for index, (rid, subject_rng) in enumerate(zip(rids, rng.spawn(num))):
        # ADNIMERGE rows and second scans draw from a child stream, so every scan that adnimerge=False would
        # write comes out the same (only the image and series numbers after a second scan shift)
        extra = subject_rng.spawn(1)[0]
        ptid = f"{_SITES[subject_rng.integers(len(_SITES))]}_S_{rid:04d}"
        group = str(subject_rng.choice(ADNI_GROUPS, p=_GROUP_P))
        sex = str(subject_rng.choice(SEXES))
        age = round(float(subject_rng.uniform(55, 90)), 1)
        subject = _draw_subject(subject_rng, sex)
        baseline = start + dt.timedelta(days=int(subject_rng.integers(0, 2500)),
                                         seconds=int(subject_rng.integers(7 * 3600, 19 * 3600)))
        visits = [("bl", baseline)]
        if subject_rng.random() < 0.3:
            months = int(subject_rng.choice((12, 24)))
            days = months * 365 // 12 + int(subject_rng.integers(-20, 21))
            visits.append((f"m{months}", baseline + dt.timedelta(days=days)))
        if adnimerge:
            dx, dx_bl = _adnimerge_diagnoses(group)
            # a clinical visit without an MRI, which discovery must not turn into a scan
            clinic = (visits + [("m06", baseline + dt.timedelta(days=182))]) if index == 0 else visits
            for visit, when in clinic:
                # the exam is often a few days before the scan; DX is missing on about a fifth of rows
                exam = when.date() - dt.timedelta(days=int(extra.integers(0, 15)))
                merge_rows.append([str(rid), ptid, visit, f"{exam:%Y-%m-%d}", f"{age:.1f}",
                                   {"M": "Male", "F": "Female"}[sex], "" if extra.random() < 0.2 else dx, dx_bl])
        for visit, acquired in visits:
            visit_age = round(age + (acquired - baseline).days / 365.25, 1)
            scans = [(acquired, "Original", subject_rng)]
            if adnimerge and extra.random() < 0.2:
                # a second T1 series minutes later (a repeat, or ADNI-2's accelerated MPRAGE), listed as
                # processed, so that one-scan-per-visit has a choice to make
                scans.append((acquired + dt.timedelta(minutes=int(extra.integers(8, 16))), "Processed", extra))
            for when, kind, scan_rng in scans:
                image_number += int(scan_rng.integers(1, 500))
                series_number += int(scan_rng.integers(1, 400))
                image_id = f"I{image_number}"
                description = str(scan_rng.choice(_DESCRIPTIONS, p=_DESCRIPTION_P))
                folder = description.replace(" ", "_")
                converted = when + dt.timedelta(days=int(scan_rng.integers(30, 200)),
                                                milliseconds=int(scan_rng.integers(0, 86_400_000)))
                stamp = converted.strftime("%Y%m%d%H%M%S") + f"{converted.microsecond // 1000:03d}"
                name_head = f"ADNI_{ptid}_MR_{folder}_br_raw_{stamp}"
                name_tail = f"S{series_number}_{image_id}"
                path = out_dir / "ADNI" / ptid / folder / f"{when:%Y-%m-%d_%H_%M_%S}.0" / image_id / \
                    f"{name_head}_1_{name_tail}.nii"
                volume, affine, _ = _scan(scan_rng, subject, visit_age, group)
                _save(path, volume, affine)
                written.append(_WrittenScan(path, name_head, name_tail, ptid, description, when, len(rows)))
                rows.append([image_id, ptid, group, sex, f"{visit_age:.1f}", visit, "MRI", description, kind,
                             _ida_date(when.date()), "NiFTI"])
                last_acquired = max(last_acquired, when.date())
    # from the seed, not the clock, so that the same seed writes the same CSV
    downloaded = _ida_date(last_acquired + dt.timedelta(days=int(rng.integers(30, 400))))
    if dicom_fraction > 0:
        # a DICOM slice stack cannot hold an oblique slab without resampling, so only axis-aligned scans qualify
        aligned = [scan for scan in written
                   if _is_axis_aligned(cast("nib.spatialimages.SpatialImage", nib.load(scan.path)).affine)]
        count = min(len(aligned), round(dicom_fraction * len(written)))
        for choice in sorted(rng.choice(len(aligned), size=count, replace=False)):
            _save_dicom(aligned[choice])
            rows[aligned[choice].row][-1] = "DCM"
    csv_path = out_dir / "ADNI_phantoms_collection.csv"
    with atomic_write(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(_COLLECTION_HEADER)
        writer.writerows(row + [downloaded] for row in rows)
    if adnimerge:
        merge_rows.sort(key=lambda row: (int(row[0]), row[3]))
        with atomic_write(out_dir / "ADNIMERGE.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(ADNIMERGE_HEADER)
            writer.writerows(merge_rows)
    return csv_path


def _write_flat(out_dir: Path, num: int, rng: np.random.Generator) -> Path:
    rows = []
    for index, subject_rng in enumerate(rng.spawn(num), start=1):
        diagnosis = str(subject_rng.choice(FLAT_DIAGNOSES, p=(0.45, 0.3, 0.25)))
        sex = str(subject_rng.choice(SEXES))
        age = round(float(subject_rng.uniform(55, 90)), 1)
        volume, affine = make_phantom(subject_rng, age, diagnosis, sex)
        subject_id = f"sub-{index:04d}"
        file = f"images/{subject_id}.nii.gz"
        _save(out_dir / file, volume, affine)
        # public cohorts have holes in their demographics (IXI: ~5% without age or sex)
        rows.append([subject_id, file, "" if subject_rng.random() < 0.1 else f"{age:.1f}",
                     "" if subject_rng.random() < 0.05 else sex, diagnosis])
    csv_path = out_dir / "participants.csv"
    with atomic_write(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("subject_id", "file", "age", "sex", "diagnosis"))
        writer.writerows(rows)
    return csv_path


def write_phantoms(out_dir: str | Path, num: int, layout: str = "adni", seed: int = 0, adnimerge: bool = False,
                   dicom_fraction: float = 0.0) -> Path:
    """Write `num` phantom heads as an ADNI-like download tree or a flat folder; return the label CSV path.

    In the ADNI layout about 30% of subjects get a second visit 12 or 24 months later, so there are more
    scans than heads.
    adnimerge: also write ADNIMERGE.csv (one row per subject-visit, plus one clinical visit without a scan)
        and give about 20% of visits a second T1 series (IDA Type "Processed"); ADNI layout only.
    dicom_fraction: write this fraction of the scans as DICOM series (one .dcm per slice, IDA Format "DCM")
        instead of NIfTI; only axis-aligned scans qualify, so fewer may come out; ADNI layout only.
    """
    if num < 1:
        raise InputError(f"num must be a positive integer (>= 1), got {num}")
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0.0 <= dicom_fraction <= 1.0:
        raise InputError(f"dicom_fraction must be between 0 and 1, got {dicom_fraction}")
    if layout != "adni" and (adnimerge or dicom_fraction):
        raise InputError(f"adnimerge and dicom_fraction apply to the ADNI layout only, not {layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if layout == "flat":
        return _write_flat(out_dir, num, rng)
    return _write_adni(out_dir, num, rng, adnimerge, dicom_fraction)
