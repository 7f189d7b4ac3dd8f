"""Registration of hard cases (multi-site scans, made here from phantoms): each registers or is flagged, none
silently wrong."""

import csv
import functools
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medldm.config import QCConfig, load_config
from medldm.data import registration
from medldm.data.hard_cases import CASES
from medldm.data.io import save_volume
from medldm.data.phantoms import make_phantom_with_labels
from medldm.data.preprocess import preprocess_dataset, preprocess_scan
from medldm.data.qc import assess
from medldm.data.registration import load_template

BRAIN = (3, 4, 5, 6)  # CSF, grey and white matter, ventricles: what a brain-only template holds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A brain-only phantom template (as MNI152 in nilearn is) and the config that registers to it."""
    tmp = tmp_path_factory.mktemp("template")
    vol, affine, labels = make_phantom_with_labels(np.random.default_rng(40), 70.0, "CN", "F")
    brain = np.isin(labels, BRAIN).astype(np.float32)
    save_volume(tmp / "template.nii.gz", vol * brain, affine)
    save_volume(tmp / "template_mask.nii.gz", brain, affine)
    cfg = load_config("preprocess", None, [
        "spacing=[4.0,4.0,4.0]", "shape=[48,56,48]", "registration.enabled=true",
        f"registration.template={tmp / 'template.nii.gz'}",
        f"registration.template_mask={tmp / 'template_mask.nii.gz'}",
        "registration.shrink_factors=[2,1]", "registration.smoothing_sigmas=[4.0,0.0]",
        "registration.sampling_fraction=0.05", "brain_mask=true", "n4.enabled=true", "n4.shrink_factor=3",
        "max_input_spacing=5.5",
        # deepbet's networks at a 128 cube instead of 256: the same code, 8x fewer voxels for the CPU tests
        "brain_extraction.method=deepbet", "brain_extraction.network_size=128"])
    return cfg, load_template(cfg)


@functools.cache
def _subject(neck_mm=0.0):
    """The one head every hard case is made from, drawn once (a second or two per draw) and read-only, so that no
    case or step can change it for the next."""
    head = make_phantom_with_labels(np.random.default_rng(41), 75.0, "MCI", "M", neck_mm=neck_mm)
    for array in head:
        array.setflags(write=False)
    return head


def _true_dice(labels, case_affine, matrix, template):
    """Dice of the scan's true brain, carried onto the template grid by the found transform, with the template's."""
    index = np.indices(template.mask.shape).reshape(3, -1)
    world = template.affine @ np.vstack([index, np.ones(index.shape[1])])
    voxel = np.linalg.inv(case_affine) @ np.asarray(matrix) @ world
    warped = ndimage.map_coordinates(np.isin(labels, BRAIN).astype(np.float32), voxel[:3], order=1) > 0.5
    warped = warped.reshape(template.mask.shape)
    return 2 * (warped & template.mask).sum() / (warped.sum() + template.mask.sum())


# a larger field of view is tested with a neck in it (a phantom's background is dark air, not padding)
@pytest.mark.parametrize("case", [c for c in CASES if c != "larger field of view"] + ["neck in the field of view"])
def test_a_hard_case_registers_and_passes_qc(setup, case):
    cfg, template = setup
    vol, affine, labels = _subject(neck_mm=80.0) if case == "neck in the field of view" else CASES[case](*_subject())
    out = preprocess_scan(vol, affine, cfg, template)
    [(status, reasons)] = assess([out.stats], cfg.qc)
    truth = _true_dice(labels, affine, out.stats["registration_matrix"], template)
    # the QC figures on the absolute scale and the truth (the phantom's own labels) agree that the fit is good
    # (a warning is allowed: phantom heads differ in proportions more than people, so an affine may be refused)
    assert status != "fail", f"{case}: {reasons} (true Dice {truth:.2f})"
    assert all("similarity fit was kept" in r for r in reasons), reasons
    assert truth > 0.85, f"{case}: passed QC, but the brain is not on the template's (true Dice {truth:.2f})"


def test_qc_fails_what_is_bad_on_the_absolute_scale_or_far_from_the_cohort():
    def stats(corr, dice=0.95, problem=None, fg=1500.0):
        return {"registration_correlation": corr, "registration_dice": dice, "registration_problem": problem,
                "foreground_ml": fg, "foreground_mean": 0.5}

    cohort = [stats(0.80 + 0.005 * (i % 5)) for i in range(12)]
    cases = cohort + [stats(0.45), stats(0.66), stats(0.81, dice=0.7),
                      stats(0.8, problem="implausible registration: x"),
                      stats(0.8, problem="affine refused (y); the similarity fit was kept"), stats(0.8, fg=300.0)]
    verdicts = assess(cases, QCConfig())
    assert [v[0] for v in verdicts[:12]] == ["pass"] * 12
    (bad, why), (far, far_why), (dice, dice_why), (implausible, _), (refused, _), (volume, volume_why) = verdicts[12:]
    assert bad == "fail" and "registration_correlation 0.450 < 0.5" in why[0]
    assert far == "fail" and "registration_correlation low" in far_why[0]  # above the floor, far below the cohort
    assert dice == "fail" and "registration_dice 0.700 < 0.8" in dice_why[0]
    assert implausible == "fail" and refused == "warn"
    assert volume == "warn" and "foreground_ml low" in volume_why[0]


def test_a_registration_that_went_wrong_is_failed_listed_framed_and_kept_out_of_the_splits(setup, tmp_path,
                                                                                          monkeypatch):
    cfg, _ = setup
    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(4):
        vol, affine, _ = make_phantom_with_labels(np.random.default_rng(50 + i), 60.0 + i, "CN", "F")
        nib.save(nib.Nifti1Image(vol, affine), root / "images" / f"sub{i}.nii.gz")
        rows.append({"subject_id": f"sub{i}", "file": f"images/sub{i}.nii.gz", "age": 60 + i, "sex": "F"})
    with (root / "participants.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import medldm.data.preprocess as pre

    state = {"current": ""}
    real_run_job, real_starts, real_fit = pre._run_job, registration._starts, registration._fit

    def tracking_run_job(job):
        state["current"] = job.stem
        return real_run_job(job)

    def upside_down_for_sub2(template, mask, affine, reg_cfg):
        found = real_starts(template, mask, affine, reg_cfg)
        if state["current"] != "sub2_bl":
            return found
        flip = nib.affines.from_matvec(np.diag([1.0, -1.0, -1.0]))  # the only start: turned upside down
        return [("upside down", found[0][1] @ flip)]

    def stuck_for_sub2(fixed, moving, transform, reg_cfg, seed):  # the optimiser stays in its (wrong) minimum
        return -0.1 if state["current"] == "sub2_bl" else real_fit(fixed, moving, transform, reg_cfg, seed)

    monkeypatch.setattr(pre, "_run_job", tracking_run_job)
    monkeypatch.setattr(registration, "_starts", upside_down_for_sub2)
    monkeypatch.setattr(registration, "_fit", stuck_for_sub2)
    out = tmp_path / "out"
    info = preprocess_dataset(root, out, cfg, workers=1)

    with (out / "manifest.csv").open() as f:
        manifest = {r["subject_id"]: r for r in csv.DictReader(f)}
    assert manifest["sub2"]["qc_status"] == "fail" and manifest["sub2"]["split"] == "excluded"
    assert all(manifest[s]["qc_status"] != "fail" and manifest[s]["split"] != "excluded"
               for s in ("sub0", "sub1", "sub3"))
    assert all(float(manifest[s]["tiv_ml"]) > 500 for s in manifest)
    assert [f["image"] for f in info["qc_failed"]] == ["images/sub2_bl.nii.gz"] and info["splits"]["excluded"] == 1
    assert json.loads((out / "preprocess.json").read_text())["qc_failed"][0]["reasons"]
    with (out / "qc" / "summary.csv").open() as f:
        summary = {r["subject_id"]: r for r in csv.DictReader(f)}
    assert summary["sub2"]["qc_status"] == "fail" and "registration_correlation" in summary["sub2"]["flags"]
    page = (out / "qc" / "index.html").read_text()
    assert 'id="sub2_bl" style="border:3px solid #d33"' in page and "1 fail" in page
    # every scan's own brain mask is kept on the output grid, beside its image
    mask = nib.load(out / "masks" / "sub0_bl.nii.gz")
    assert mask.get_data_dtype() == np.uint8 and mask.shape == tuple(cfg.shape)
    assert np.allclose(mask.affine, nib.load(out / "images" / "sub0_bl.nii.gz").affine)
