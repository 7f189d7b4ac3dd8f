"""Each preprocessing step on its own: N4, registration + brain mask, header hygiene, output dtype."""

import json

import nibabel as nib
import numpy as np
import pytest

from medldm.config import N4Config, load_config
from medldm.data.intensity import head_mask, n4_correct, normalise
from medldm.data.io import load_volume, save_volume
from medldm.data.phantoms import make_phantom_with_labels
from medldm.data.preprocess import preprocess_scan, preprocess_volume
from medldm.data.registration import load_template, register_to_template


def _ball(shape=(40, 40, 40), radius=15):
    idx = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    return (np.sqrt((idx**2).sum(0)) < radius).astype(np.float32)


def test_n4_removes_a_smooth_multiplicative_bias():
    inside = _ball() > 0
    flat = np.where(inside, 100.0, 0.0).astype(np.float32)
    flat += np.random.default_rng(0).normal(0, 1, flat.shape).astype(np.float32) * inside
    ramp = np.linspace(0.6, 1.4, flat.shape[0], dtype=np.float32)[:, None, None]
    biased = flat * ramp
    corrected = n4_correct(biased, np.diag([4.0, 4.0, 4.0, 1.0]), N4Config(shrink_factor=1, iterations=(50, 50)))
    cv = lambda v: v[inside].std() / v[inside].mean()  # noqa: E731
    assert cv(biased) > 0.1
    assert cv(corrected) < 0.5 * cv(biased)


def test_normalise_maps_the_head_percentiles_to_unit_range():
    rng = np.random.default_rng(0)
    vol = _ball() * rng.uniform(200, 1200, (40, 40, 40)).astype(np.float32)
    out, (lo, hi) = normalise(vol, head_mask(vol), (1.0, 99.0))
    assert out.min() == 0.0 and out.max() == 1.0 and 200 <= lo < hi <= 1200
    assert 0.4 < out[vol > 0].mean() < 0.6


def _template_files(tmp_path, rng, skull_stripped=False, extra=()):
    # a phantom head stands in for MNI152: the registration code is the same for any template
    vol, affine, labels = make_phantom_with_labels(rng, 70.0, "CN", "F")
    brain = np.isin(labels, (3, 4, 5, 6)).astype(np.float32)
    save_volume(tmp_path / "template.nii.gz", vol * brain if skull_stripped else vol, affine)
    save_volume(tmp_path / "template_mask.nii.gz", brain, affine)
    return load_config("preprocess", None, [
        "spacing=[4.0,4.0,4.0]", "shape=[48,56,48]", "registration.enabled=true",
        f"registration.template={tmp_path / 'template.nii.gz'}",
        f"registration.template_mask={tmp_path / 'template_mask.nii.gz'}",
        "registration.shrink_factors=[2,1]", "registration.smoothing_sigmas=[4.0,0.0]",
        "registration.sampling_fraction=0.2", "brain_mask=true", "n4.enabled=false", *extra])


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_registration_puts_another_head_on_the_template_grid_and_masks_the_brain(tmp_path):
    rng = np.random.default_rng(4)
    cfg = _template_files(tmp_path, rng)
    template = load_template(cfg)
    assert template.image.shape == (48, 56, 48) and template.mask.any()
    moving, moving_affine, labels = make_phantom_with_labels(rng, 80.0, "AD", "M")  # other size, pose, orientation
    result = preprocess_scan(moving, moving_affine, cfg, template)
    out, stats = result.volume, result.stats
    np.testing.assert_allclose(result.affine, template.affine)
    assert out.shape == (48, 56, 48) and np.isfinite(stats["registration_metric"])
    assert stats["brain_extraction"] == "deepbet"
    # the skull strip keeps the scan's own brain (deepbet's mask, registered), which lies on the template's
    assert not out[~result.brain].any(), "voxels outside the scan's brain mask survived the skull strip"
    assert _dice(result.brain, template.mask) > 0.85 and stats["registration_dice"] > 0.85
    assert stats["registration_correlation"] > cfg.qc.min_correlation
    tpl_brain = template.mask & (template.image > 0)
    assert _dice(out > 0.1, tpl_brain) > 0.85
    # its brain volume (the manifest's tiv_ml), measured on its own grid: the phantom's brain with its ventricles
    # (deepbet's mask follows the brain's surface, not the skull's: the CSF around the brain is left out)
    truth = np.isin(labels, (4, 5, 6)).sum() * abs(np.linalg.det(moving_affine[:3, :3])) / 1000.0
    assert stats["tiv_ml"] == pytest.approx(truth, rel=0.15)


@pytest.mark.parametrize("skull_stripped", [False, True], ids=["head template", "brain-only template"])
def test_registration_improves_on_the_starting_overlap(tmp_path, skull_stripped):
    import SimpleITK as sitk

    from medldm.data.io import from_sitk, to_sitk

    rng = np.random.default_rng(5)
    cfg = _template_files(tmp_path, rng, skull_stripped)
    template = load_template(cfg)
    assert template.skull_stripped == skull_stripped
    moving, moving_affine, _ = make_phantom_with_labels(rng, 60.0, "CN", "M")
    # the subject lies 30 mm off and tilted by 12 degrees in the scanner
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    pose = np.array([[1, 0, 0, 20.0], [0, c, -s, -15.0], [0, s, c, 20.0], [0, 0, 0, 1]])
    moving_affine = pose @ moving_affine
    grid = to_sitk(template.image, template.affine)
    unregistered = from_sitk(sitk.Resample(to_sitk(moving, moving_affine), grid, sitk.Transform()))[0]
    from medldm.data.brain import rough_brain_mask

    reg = register_to_template(moving, moving_affine, rough_brain_mask(moving, moving_affine), template,
                               cfg.registration)
    registered = reg.image
    inside = template.mask

    def correlation(v):
        return np.corrcoef(v[inside], template.image[inside])[0, 1]

    # brains of two phantoms share their outline and ventricles, not their sulci: a brain-only match is lower
    assert correlation(registered) > (0.45 if skull_stripped else 0.8)
    assert correlation(registered) > correlation(unregistered) + 0.15
    # the correlation QC reads is the one measured here (the brain-only template: inside the scan's mask)
    assert reg.correlation == pytest.approx(correlation(registered * reg.mask if skull_stripped else registered),
                                            abs=1e-4)


def test_output_header_carries_nothing_from_the_source_and_uint8_reads_back_in_unit_range(tmp_path, raw_adni):
    from medldm.data.preprocess import preprocess_dataset

    src = tmp_path / "in"
    (src / "images").mkdir(parents=True)
    vol, affine = load_volume(sorted(raw_adni.rglob("*.nii"))[0])
    img = nib.Nifti1Image(vol, affine)
    img.header["descrip"] = b"Patient DOE^JOHN 1950-01-01"
    img.header["aux_file"] = b"MRN123456"
    img.header["intent_name"] = b"secret"
    nib.save(img, src / "images" / "s1.nii.gz")
    (src / "participants.csv").write_text("subject_id,file,age,sex\ns1,images/s1.nii.gz,70,F\n")
    out = tmp_path / "out"
    preprocess_dataset(src, out, load_config("preprocess", None, ["output_dtype=uint8", "split.test_fraction=0",
                                                                   "split.val_fraction=0"]))
    written = nib.load(out / "images" / "s1_bl.nii.gz")
    header = written.header
    for field in ("descrip", "aux_file", "intent_name"):
        text = header[field].tobytes().decode(errors="ignore")
        assert "DOE" not in text and "MRN" not in text and "secret" not in text
    assert written.get_data_dtype() == np.uint8
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    data = np.asanyarray(written.dataobj)
    assert data.min() >= 0.0 and data.max() == pytest.approx(1.0)


def test_mni152_without_nilearn_is_a_clear_error(monkeypatch):
    import importlib.util

    from medldm.data import registration

    real = importlib.util.find_spec
    monkeypatch.setattr(registration.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nilearn" else real(name, *a))
    registration._CACHE.clear()
    cfg = load_config("preprocess", None, ["registration.enabled=true"])
    with pytest.raises(ValueError, match="pip install nilearn"):
        load_template(cfg)


def test_a_registered_scan_does_not_depend_on_the_number_of_threads(tmp_path):
    """Shards, --workers and machines with other core counts must make the same dataset (ITK's multithreaded
    sums made N4 and every registration fit depend on the thread count, and the fits even on timing)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(5)
    cfg = _template_files(tmp_path, rng, extra=("n4.enabled=true", "registration.starts=2",
                                                "registration.iterations=40"))
    template = load_template(cfg)
    moving, moving_affine, _ = make_phantom_with_labels(rng, 75.0, "MCI", "M")
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    outs = []
    try:
        for threads in (1, 4):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            outs.append(preprocess_volume(moving, moving_affine, cfg, template))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    for volume, _, stats in outs[1:]:
        assert np.array_equal(volume, outs[0][0]) and stats == outs[0][2]


def test_a_template_replaced_at_the_same_path_redoes_the_registered_scans(tmp_path, caplog):
    """The config names the template by its path; what a registered volume was made against is its content."""
    from medldm.data.preprocess import preprocess_dataset

    rng = np.random.default_rng(6)
    cfg = _template_files(tmp_path, rng, extra=(
        "brain_extraction.method=rough", "registration.starts=1", "registration.iterations=30",
        "split.val_fraction=0", "split.test_fraction=0", "qc.exclude_failed=false"))
    raw = tmp_path / "raw"
    lines = ["subject_id,file,age,sex,diagnosis"]
    for name in ("s1", "s2"):
        vol, affine, _ = make_phantom_with_labels(rng, 72.0, "CN", "M")
        save_volume(raw / "images" / f"{name}.nii.gz", vol, affine)
        lines.append(f"{name},images/{name}.nii.gz,72,M,CN")
    (raw / "participants.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    preprocess_dataset(raw, out, cfg)
    assert preprocess_dataset(raw, out, cfg)["resumed"] == 2  # same template: kept

    template = tmp_path / "template.nii.gz"
    image, affine = load_volume(template)
    save_volume(template, image * 1.5, affine)  # another template file at the same path: the config is the same
    caplog.set_level("INFO", logger="medldm.data.preprocess")
    info = preprocess_dataset(raw, out, cfg)
    assert info["resumed"] == 0 and info["redone_changed"] == 2
    said = [r.getMessage() for r in caplog.records if "preprocessed again from" in r.getMessage()]
    assert len(said) == 2 and all(m.endswith("(changed: template)") for m in said)
    from medldm.data.registration import template_sha256

    for name in ("s1", "s2"):
        sidecar = json.loads((out / "images" / f"{name}_bl.json").read_text(encoding="utf-8"))
        assert sidecar["template_sha256"] == template_sha256(cfg.registration)
