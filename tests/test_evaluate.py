import json

import pytest
import torch

from medldm.config import load_config
from medldm.evaluation.metrics import VolumeMetrics, ms_ssim_scales, random_pairs
from medldm.evaluation.report import evaluate
from medldm.inference.sample import sample_run


def test_a_volume_compared_with_itself_scores_one():
    x = torch.rand(1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    m = VolumeMetrics((32, 32, 32), kernel_size=3, kernel_sigma=0.5)(x, x)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert m["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert m["mae"] == 0.0
    y = (x + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.25).clamp(0, 1)
    worse = VolumeMetrics((32, 32, 32), kernel_size=3, kernel_sigma=0.5)(x, y)
    assert worse["ssim"] < 0.9 and worse["ms_ssim"] < 0.99 and worse["psnr"] < m["psnr"]


def test_ms_ssim_scales_fit_the_volume():
    assert ms_ssim_scales((160, 224, 160), 11) == 4
    assert ms_ssim_scales((32, 32, 32), 3) == 4
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales((8, 8, 8), 11)


def test_random_pairs_are_distinct_and_capped():
    assert len(random_pairs(5, 100, 0)) == 10
    pairs = random_pairs(100, 50, 0)
    assert len(set(pairs)) == 50 and all(i < j for i, j in pairs)


def test_report_has_reconstruction_and_diversity(dataset, ae_run, ldm_run, tmp_path):
    samples = tmp_path / "samples"
    sample_run(ldm_run, samples, num=3, steps=3, seed=0)
    out = tmp_path / "report"
    report = evaluate(dataset, out, load_config("evaluate"), autoencoder=ae_run, samples=samples)
    rec = report["reconstruction"]
    assert rec["ssim"]["n"] == report["test_volumes"] >= 2
    assert 0.0 < rec["ms_ssim"]["mean"] <= 1.0
    gen = report["generation"]
    assert gen["synthetic"]["pairs"] == 3
    assert gen["ms_ssim_difference"] == pytest.approx(gen["synthetic"]["ms_ssim_mean"] - gen["real_test"]["ms_ssim_mean"])
    assert json.loads((out / "report.json").read_text())["generation"]["num_samples"] == 3
    assert "MS-SSIM" in (out / "report.md").read_text()
    assert (out / "reconstructions.png").is_file() and (out / "synthetic_vs_real.png").is_file()


def test_nothing_to_evaluate_is_an_error(dataset, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(dataset, tmp_path, load_config("evaluate"))


def test_ms_ssim_runs_on_every_volume_size_it_accepts():
    # 96 voxels: 4 scales would pass a 2^3 check but not MONAI's own (k-1)^2 = 9 check
    for shape in ((96, 112, 96), (32, 32, 32), (24, 40, 24)):
        a = torch.rand(1, *shape)
        assert VolumeMetrics(shape)(a, a)["ms_ssim"] == pytest.approx(1.0, abs=1e-4)
