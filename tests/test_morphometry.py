"""Morphometry recovers the tissue volumes of phantoms with a known truth, and ventricles that grow with age."""

import nibabel as nib
import numpy as np
import pytest

from medldm.config import N4Config
from medldm.data.intensity import n4_correct, normalise
from medldm.data.phantoms import _draw_subject, _scan
from medldm.evaluation.morphometry import Morphometry, central_region, distances, yardstick


def skull_stripped(volume, affine, labels):
    """As preprocessing leaves a scan: RAS, bias-corrected, brain mask kept, normalised to [0, 1]."""
    img = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    lab = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, affine)).dataobj).astype(np.uint8)
    data = n4_correct(np.asarray(img.dataobj, np.float32), img.affine, N4Config(shrink_factor=4, iterations=(30, 20)))
    brain = np.isin(lab, (3, 4, 5, 6))  # CSF, grey, white matter, ventricles
    return normalise(data, brain, (0.5, 99.5))[0] * brain, img.affine, lab


def test_tissue_volumes_and_ventricles_of_phantoms():
    subject = _draw_subject(np.random.default_rng(5), "F")
    scans = [skull_stripped(*_scan(np.random.default_rng(7), subject, age, "CN")) for age in (45, 65, 85)]
    # the ventricle region: a box around where this head's ventricles lie (phantom grids are not a template's)
    _, affine, oldest = scans[-1]
    region = np.zeros(oldest.shape, bool)
    lo, hi = np.argwhere(oldest == 6).min(0) - 3, np.argwhere(oldest == 6).max(0) + 4
    region[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    morph = Morphometry(voxel_ml, region)
    ventricles = []
    for volume, _, labels in scans:
        m = morph(volume)
        truth = {"csf_ml": np.isin(labels, (3, 6)).sum() * voxel_ml, "gm_ml": (labels == 4).sum() * voxel_ml,
                 "wm_ml": (labels == 5).sum() * voxel_ml}
        for key, value in truth.items():
            assert m[key] == pytest.approx(value, rel=0.05), key
        assert m["brain_ml"] == pytest.approx(truth["gm_ml"] + truth["wm_ml"], rel=0.03)
        ventricles.append(m["ventricle_ml"])
        assert m["ventricle_ml"] == pytest.approx((labels == 6).sum() * voxel_ml, rel=0.25)
    assert ventricles[0] < ventricles[1] < ventricles[2] and ventricles[2] > 1.4 * ventricles[0]


def test_central_region_and_distances():
    mask = np.zeros((40, 50, 40))
    mask[5:35, 5:45, 5:35] = 1
    region = central_region(mask)
    idx = np.argwhere(region)
    assert region.sum() > 0 and np.allclose((idx.min(0) + idx.max(0)) / 2, [19.5, 26.5, 19.5], atol=1.5)
    same, apart = distances([1, 2, 3, 4], [1, 2, 3, 4]), distances([1, 2, 3, 4], [11, 12, 13, 14])
    assert same["ks"] == 0 and same["wasserstein"] == 0 and apart["ks"] == 1 and apart["wasserstein"] == 10
    # the yardstick is computed at the synthetic set's size: a subset of the same distribution, not the whole
    rng = np.random.default_rng(0)
    train, test = rng.normal(0, 1, 500), rng.normal(0, 1, 20)
    small, full = yardstick(train, test, 8), distances(train, test)
    assert small["n"] == [8, 20] and small["ks"] > full["ks"]
