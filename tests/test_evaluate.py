import json

import numpy as np
import pytest
import torch

from medldm.config import load_config
from medldm.data.dataset import read_dataset_info, read_manifest
from medldm.data.io import load_volume, save_volume
from medldm.evaluation.memorisation import NearestTraining, memorisation
from medldm.evaluation.metrics import VolumeMetrics, ms_ssim_scales, pairwise_similarity, random_pairs
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
    with pytest.raises(ValueError, match="too small .* at least 11 voxels"):
        ms_ssim_scales((8, 8, 8), 11)


def test_random_pairs_are_distinct_and_capped():
    assert len(random_pairs(5, 100, 0)) == 10
    pairs = random_pairs(100, 50, 0)
    assert len(set(pairs)) == 50 and all(i < j for i, j in pairs)


def test_report_has_reconstruction_diversity_and_memorisation(dataset, ae_run, ldm_run, tmp_path):
    samples = tmp_path / "samples"
    sample_run(ldm_run, samples, num=3, steps=3, seed=0)
    # a planted copy of a training volume among the samples: the privacy check must catch it, and only it
    train = [r for r in read_manifest(dataset) if r["split"] == "train"]
    data, affine = load_volume(dataset / train[1]["image"])
    save_volume(samples / "sample_9999.nii.gz", data, affine, dtype="int16")
    out = tmp_path / "report"
    # the reference statistics come from the few test volumes decoded by a 6-step autoencoder: the real copy's
    # grey-matter share sits at their range's edge (0.2097 against 0.2098 in one run), so the statistics' cut-off is
    # widened here; test_plausibility.py checks the cut-off itself
    cfg = load_config("evaluate", None, ["plausibility_z=8"])
    report = evaluate(dataset, out, cfg, autoencoder=ae_run, samples=samples)
    rec = report["reconstruction"]
    assert rec["ssim"]["n"] == report["test_volumes"] >= 2
    assert 0.0 < rec["ms_ssim"]["mean"] <= 1.0
    assert rec["worst"][0] == min(rec["per_subject"], key=lambda s: s["ssim"])["image"]
    gen = report["generation"]
    assert gen["synthetic"]["pairs"] == 6 and len(gen["synthetic"]["ms_ssim_scores"]) == 6
    assert gen["ms_ssim_difference"] == pytest.approx(gen["synthetic"]["ms_ssim_mean"]
                                                      - gen["real_test"]["ms_ssim_mean"])
    mem = gen["memorisation"]
    assert mem["flagged"] == [3] and gen["files"][3] == "sample_9999.nii.gz"
    # the copy is a brain (plausible) and a copy (memorised); the verdict table says both first
    assert (gen["plausibility"]["synthetic"][3]["plausible"]
            and gen["plausibility"]["real_test_n"] == len(mem["real_test"]))
    copy = mem["synthetic"][3]
    assert copy["nearest_train_image"] == train[1]["image"] and copy["ssim"] == pytest.approx(1.0, abs=1e-3)
    assert len(mem["real_test"]) == report["test_volumes"]
    assert gen["mmd"]["synthetic_vs_test"] >= gen["mmd"]["train_vs_test"]  # noise-like tiny samples are further away
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["generation"]["num_samples"] == 4 and saved["generation"]["memorisation"]["flagged"] == [3]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "MS-SSIM" in md and "1 of 4 synthetic volumes are closer" in md and "sample_9999.nii.gz" in md
    assert gen["conditioning"]["synthetic"]["skipped"] == "fewer than 3 different ages"  # sampled without an age
    assert md.index("## Verdict") < md.index("## Autoencoder") and "possibly memorised: 1 of 4" in md
    assert set(gen["morphometry"]["distances"]) >= {"brain_ml", "csf_fraction", "ventricle_ml"}
    assert "## Conditioning check: age" in md
    for png in ("reconstructions_worst.png", "synthetic_vs_real.png", "nearest_training.png", "scores.png",
                "plausibility.png", "morphometry.png"):
        assert (out / png).is_file()


def test_noise_is_not_similar_and_not_a_copy():
    g = torch.Generator().manual_seed(0)
    metrics = VolumeMetrics((32, 32, 32), kernel_size=3, kernel_sigma=0.5)
    # "subjects": one smooth anatomy with individual variation; the synthetic set is pure noise
    anatomy = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 32, 32, 32, generator=g), 5, 1, 2)[0]
    subject = lambda: (anatomy + 0.05 * torch.randn(1, 32, 32, 32, generator=g)).clamp(0, 1)  # noqa: E731
    train = [subject() for _ in range(6)]
    test = [subject() for _ in range(4)]
    noise = [torch.rand(1, 32, 32, 32, generator=g) for _ in range(3)]
    nearest = NearestTraining(lambda i: train[i], len(train), metrics, factor=4, candidates=3)
    mem = memorisation([*noise, train[4].clone()], test, nearest)
    assert mem["flagged"] == [3] and mem["synthetic"][3]["nearest_train"] == 4
    assert all(e["ssim"] < 0.2 for e in mem["synthetic"][:3])  # independent noise: nothing alike
    pairs = pairwise_similarity(noise, metrics, 10, 0)
    assert pairs["pairs"] == 3 and pairs["ssim_mean"] < 0.1
    assert pairwise_similarity([noise[0]] * 3, metrics, 10, 0)["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-4)


def test_samples_of_another_shape_spacing_or_orientation_are_refused(dataset, tmp_path):
    ref = read_dataset_info(dataset)["reference"]
    affine = np.asarray(ref["affine"])
    save_volume(tmp_path / "s" / "a.nii.gz", np.zeros(ref["shape"]) + 0.5, affine)
    save_volume(tmp_path / "s" / "b.nii.gz", np.zeros(ref["shape"]) + 0.5, affine @ np.diag([2.0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"b.nii.gz .* never resamples"):
        evaluate(dataset, tmp_path / "r", load_config("evaluate"), samples=tmp_path / "s")
    # same shape and spacing, x mirrored (say, samples of a model saved in LAS): the arrays would be compared mirrored
    mirrored = affine @ np.diag([-1.0, 1, 1, 1])
    save_volume(tmp_path / "m" / "c.nii.gz", np.zeros(ref["shape"]) + 0.5, mirrored)
    with pytest.raises(ValueError, match=r"c.nii.gz \(\[32, 32, 32\], LAS at"):
        evaluate(dataset, tmp_path / "r", load_config("evaluate"), samples=tmp_path / "m")


def test_nothing_to_evaluate_is_an_error(dataset, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(dataset, tmp_path, load_config("evaluate"))


def test_ms_ssim_runs_on_every_volume_size_it_accepts():
    # 96 voxels: 4 scales would pass a 2^3 check but not MONAI's own (k-1)^2 = 9 check
    for shape in ((96, 112, 96), (32, 32, 32), (24, 40, 24)):
        a = torch.rand(1, *shape)
        assert VolumeMetrics(shape)(a, a)["ms_ssim"] == pytest.approx(1.0, abs=1e-4)


def test_age_check_finds_ventricles_that_grow_with_the_requested_age():
    from medldm.evaluation.anatomy import age_trend
    from medldm.evaluation.morphometry import Morphometry

    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij")) - 15.5
    radius = np.sqrt((grid ** 2).sum(0))
    ages = [50, 60, 70, 80, 55, 75]
    morph = Morphometry(0.001, radius < 8)
    values = []
    for age in ages:  # a "brain" ball (grey rim, white core) with a dark "ventricle" that widens with age
        v = np.where(radius < 14, 0.5, 0.0)
        v[radius < 11] = 0.8
        v[radius < (age - 30) / 10] = 0.1
        values.append(morph(v)["ventricle_ml"])
    trend = age_trend(ages, values)
    assert trend["n"] == 6 and trend["pearson_r"] > 0.95 and trend["slope_per_decade"] > 0
    assert age_trend([70, 70, 70], [0.1, 0.2, 0.3])["skipped"] == "fewer than 3 different ages"
    # three seeds far apart, each a little darker with age: pooled, the seeds hide it; within seed it is clear
    seeds = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    values = [0.10, 0.11, 0.12, 0.40, 0.41, 0.42, 0.25, 0.26, 0.27]
    trend = age_trend([50, 65, 80] * 3, values, seeds)
    assert abs(trend["pearson_r"]) < 0.2 and trend["within_seed_r"] == pytest.approx(1.0)
    assert trend["within_seed_slope_per_decade"] == pytest.approx(0.01 / 1.5)


def test_fid_uses_local_medicalnet_weights_or_says_why_not(dataset, ldm_run, tmp_path):
    from medldm.evaluation.fid import medicalnet

    samples = tmp_path / "samples"
    sample_run(ldm_run, samples, num=3, steps=2, seed=0)
    report = evaluate(dataset, tmp_path / "r0", load_config("evaluate"), samples=samples)
    assert "fid_weights is empty" in report["generation"]["fid"]["skipped"]
    assert "FID skipped" in (tmp_path / "r0" / "report.md").read_text(encoding="utf-8")
    # a checkpoint in the MedicalNet release layout: DataParallel prefixes and a segmentation head
    net = medicalnet(10)
    weights = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}
                | {"module.conv_seg.0.weight": torch.zeros(1)}}, weights)
    cfg = load_config("evaluate", None, [f"fid_weights={weights}"])
    fid = evaluate(dataset, tmp_path / "r1", cfg, samples=samples)["generation"]["fid"]
    assert np.isfinite(fid["synthetic_vs_test"]) and np.isfinite(fid["train_vs_test"]) and fid["depth"] == 10
    with pytest.raises(ValueError, match="does not fit a MedicalNet resnet18"):
        evaluate(dataset, tmp_path / "r2", load_config("evaluate", None, [f"fid_weights={weights}", "fid_depth=18"]),
                 samples=samples)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        evaluate(dataset, tmp_path / "r3", load_config("evaluate", None, [f"fid_weights={tmp_path / 'no.pth'}"]),
                 samples=samples)


def test_samples_from_several_dirs_give_the_within_seed_age_check(dataset, ldm_run, tmp_path):
    from .conftest import train_age_range

    low, high = train_age_range(dataset)
    train = [r for r in read_manifest(dataset) if r["split"] == "train"]
    dirs = []
    for k, age in enumerate((low, (low + high) / 2, high)):  # the same two seeds at three requested ages
        dirs.append(tmp_path / f"age{age:.0f}")
        sample_run(ldm_run, dirs[-1], num=2, steps=2, seed=0, conditions={"age": f"{age}"})
        # a tiny model's 2-step samples are not brains, and the age check only measures brains: each seed becomes
        # a training head whose central dark ("ventricle") ball widens with the requested age
        for seed in (0, 1):
            data, affine = load_volume(dataset / train[seed]["image"])
            grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in data.shape], indexing="ij"))
            data[np.sqrt((grid ** 2).sum(0)) < 1.5 + k] = 0.05
            save_volume(dirs[-1] / f"sample_{seed:04d}.nii.gz", data, affine, dtype="int16")
    report = evaluate(dataset, tmp_path / "r", load_config("evaluate"), samples=dirs)
    gen = report["generation"]
    assert gen["num_samples"] == 6 and gen["files"][0] == f"{dirs[0].name}/sample_0000.nii.gz"
    assert gen["plausibility"]["plausible"] == 6
    # no --autoencoder: the one the samples' sidecars name (SHA-256 checked) decodes the reference volumes
    assert ("sidecars" in report["reconstruction"]["found_in"]
            and "through the autoencoder" in gen["plausibility"]["reference"])
    for measure in ("csf_fraction", "ventricle_ml"):
        trend = gen["conditioning"]["measures"][measure]["synthetic"]
        assert trend["n"] == 6 and trend["seeds_at_several_ages"] == 2 and trend["within_seed_r"] > 0.9
    assert "within seed (2 seeds at several ages)" in (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate(dataset, tmp_path / "r2", load_config("evaluate"), samples=[dirs[0], tmp_path / "nope"])


def write_samples(data_dir, folder, num, noise_every=4):
    """``num`` samples on the dataset's grid: val/test volumes with noise inside the head (plausible brains that are
    no copies), every ``noise_every``-th one pure noise (implausible)."""
    rows = [r for r in read_manifest(data_dir) if r["split"] != "train"]
    affine = np.asarray(read_dataset_info(data_dir)["reference"]["affine"])
    for i in range(num):
        rng = np.random.default_rng(i)
        base = load_volume(data_dir / rows[i % len(rows)]["image"])[0]
        v = (rng.uniform(0, 1, base.shape) if i % noise_every == noise_every - 1
             else np.clip(base + rng.normal(0, 0.02, base.shape) * (base > 0), 0, 1))
        save_volume(folder / f"sample_{i:04d}.nii.gz", v, affine, dtype="int16")
    return folder


class CountedReads:
    """Stands in for samples.read_sample: counts the reads and the most sample volumes alive at once."""

    def __init__(self):
        from medldm.evaluation import samples

        self.read, self.reads, self.alive, self.peak = samples.read_sample, 0, 0, 0

    def __call__(self, path):
        import weakref

        volume = self.read(path)
        self.reads, self.alive = self.reads + 1, self.alive + 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(volume, self.freed)
        return volume

    def freed(self):
        self.alive -= 1


def test_evaluation_holds_a_few_samples_whatever_their_number_and_scores_as_in_memory(dataset, tmp_path,
                                                                                       monkeypatch):
    from monai.metrics import MMDMetric

    from medldm.evaluation import samples as samples_module
    from medldm.evaluation.memorisation import pooled

    # a cache of 2: alive at once are then the volume being scored, a batch of pairs (8) and two caches (all samples,
    # the plausible ones)
    monkeypatch.setattr(samples_module, "CACHE", 2)
    cfg = load_config("evaluate", None, ["diversity_pairs=12"])
    peaks = {}
    for num in (8, 32):
        counted = CountedReads()
        monkeypatch.setattr(samples_module, "read_sample", counted)
        folder = write_samples(dataset, tmp_path / f"s{num}", num)
        report = evaluate(dataset, tmp_path / f"r{num}", cfg, samples=folder)
        peaks[num] = counted.peak
        assert counted.alive == 0 and counted.reads >= num  # every sample read, none kept after the report
    assert peaks[32] <= 1 + 8 + 2 * 2 < 32, peaks

    # the streamed report has the scores of the volumes held in memory (same pairs, same nearest volumes, same MMD)
    gen = report["generation"]
    files = sorted(folder.glob("*.nii.gz"))
    held = [counted.read(f) for f in files]
    metrics = VolumeMetrics(read_dataset_info(dataset)["reference"]["shape"], cfg.kernel_size, cfg.kernel_sigma)
    assert pairwise_similarity(held, metrics, cfg.diversity_pairs, cfg.seed) == gen["synthetic"]
    keep = [i for i, e in enumerate(gen["plausibility"]["synthetic"]) if e["plausible"]]
    assert 2 <= len(keep) < len(files)  # the noise samples are not brains
    assert pairwise_similarity([held[i] for i in keep], metrics, cfg.diversity_pairs, cfg.seed) \
        == gen["synthetic_plausible"]
    rows = read_manifest(dataset)
    train = [r for r in rows if r["split"] == "train"]
    real = [torch.from_numpy(load_volume(dataset / r["image"])[0])[None].half() for r in rows if r["split"] == "test"]
    nearest = NearestTraining(lambda i: torch.from_numpy(load_volume(dataset / train[i]["image"])[0])[None].half(),
                              len(train), metrics, cfg.prefilter_factor, cfg.nearest_candidates)
    mem = memorisation(held, real, nearest, cfg.memorisation_percentile)
    assert [(e["nearest_train"], e["ssim"]) for e in mem["synthetic"]] == [
        (e["nearest_train"], e["ssim"]) for e in gen["memorisation"]["synthetic"]]
    # MMD draws as many samples as there are test volumes (seeded): the same draw from the whole set in memory
    real_f, syn_f = (torch.stack([pooled(v, cfg.prefilter_factor) for v in vs]) for vs in (real, held))
    g, n = torch.Generator().manual_seed(cfg.seed), len(real)
    a, b = real_f[torch.randperm(n, generator=g)], syn_f[torch.randperm(len(held), generator=g)[:n]]
    assert gen["mmd"]["synthetic_vs_test"] == pytest.approx(float(MMDMetric()(a, b)), rel=1e-6)


def test_a_bad_sample_is_refused_before_any_sample_is_read(dataset, tmp_path, monkeypatch):
    from medldm.evaluation import samples as samples_module

    counted = CountedReads()
    monkeypatch.setattr(samples_module, "read_sample", counted)
    folder = write_samples(dataset, tmp_path / "s", 6)
    ref = read_dataset_info(dataset)["reference"]
    half = np.zeros([s // 2 for s in ref["shape"]]) + 0.5
    save_volume(folder / "sample_0005.nii.gz", half, np.asarray(ref["affine"]))
    with pytest.raises(ValueError, match=r"sample_0005.nii.gz \(\[16, 16, 16\].* never resamples"):
        evaluate(dataset, tmp_path / "r", load_config("evaluate"), samples=folder)
    assert counted.reads == 0 and not (tmp_path / "r").exists()  # refused from the headers, before anything is written


def test_the_verdict_sheet_shows_the_implausible_samples_first_and_a_bounded_number(tmp_path):
    from medldm.evaluation.plots import SHEET_TILES, sheet_order, verdict_sheet

    verdicts = [{"plausible": i % 10 != 3, "reasons": ["off the data manifold: ..."], "nearest_train_ssim": 0.5}
                for i in range(1000)]
    drawn = []

    def tile(i):
        drawn.append(i)
        return np.zeros((8, 24), np.uint8)

    shown = verdict_sheet(tmp_path / "sheet.png", tile, [f"s{i}" for i in range(1000)], verdicts)
    assert len(shown) == SHEET_TILES == len(drawn) and (tmp_path / "sheet.png").is_file()
    bad = [i for i in range(1000) if i % 10 == 3]
    # a hundred implausible: 64 of them, spread over the set, and no plausible one
    assert shown == drawn and set(shown) <= set(bad) and shown[0] == 3 and shown[-1] == 993
    few = sheet_order(verdicts[:100])
    assert few[:10] == bad[:10] and len(few) == 64 and all(verdicts[i]["plausible"] for i in few[10:])
    assert sheet_order(verdicts[:20]) == [3, 13] + [i for i in range(20) if i % 10 != 3]


def test_evaluate_scale_benchmark_runs_at_tiny_size(dataset, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate_scale.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(dataset), "--out", str(tmp_path), "--num", "4",
                           "--set", "diversity_pairs=4"], check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / "evaluate_scale.json").read_text(encoding="utf-8"))
    (run,) = result["runs"]
    assert run["num"] == 4 and run["returncode"] == 0 and run["wall_s"] > 0 and run["peak_rss_mib"] > 0
    assert run["pairs"] == 4 and 0 <= run["plausible"] <= 4 and run["sheet"]["of"] == 4
    assert "| samples | wall s | s per sample | peak RSS MiB | exit |" in done.stdout
