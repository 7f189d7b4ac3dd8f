"""The benchmark scripts run at tiny size on the CPU, so they are ready when a GPU session comes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_sampling_benchmark_runs_at_tiny_size(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "sample_speed.py"), "--tiny", "--out", str(tmp_path),
                    "--steps", "2", "--batches", "1", "2", "--device", "cpu"], check=True, capture_output=True)
    result = json.loads((tmp_path / "sample_speed.json").read_text(encoding="utf-8"))
    assert result["image"] == [32, 32, 32] and result["latent"][1:] == [8, 8, 8]
    assert [r["batch"] for r in result["batches"]] == [1, 2]
    for row in result["batches"]:
        assert row["sample_s_per_volume"] > 0 and row["decode_s_per_volume"] > 0 and row["export_s_per_volume"] > 0
    assert result["decode"][0]["image"] == [32, 32, 32]


def test_gpu_benchmark_runs_at_tiny_size_and_the_paths_agree(tmp_path):
    # the eager backend runs every region through dynamo without generating code (tests/test_speed.py covers the
    # AOT partitioner): the CPU run takes seconds
    subprocess.run([sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--tiny", "--out", str(tmp_path), "--device",
                    "cpu", "--compile-backend", "eager", "--repeats", "1", "--warmup", "1"],
                   check=True, capture_output=True)
    result = json.loads((tmp_path / "gpu_bench.json").read_text(encoding="utf-8"))
    assert set(result["workloads"]) == {"ae_step", "unet_step", "sample_batch1", "sample_batch2"}
    for rows in result["workloads"].values():
        assert set(rows) == {"plain", "medldm"}
        assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in rows.values())
    # float32 on the CPU: medldm's path gives the plain path's losses, gradients and volumes
    numerics = {k: c for k, c in result["checks"].items() if "within" in k}
    assert len(numerics) == 8 and all(c["ok"] for c in numerics.values()), numerics
    assert "| check | value | holds |" in (tmp_path / "gpu_bench.md").read_text(encoding="utf-8")


def test_quality_benchmark_runs_at_tiny_size_and_resumes(dataset, tmp_path):
    """benchmarks/quality.py as documented, with the tiny configs: quality.json has the keys checks read."""
    root = BENCHMARKS.parent
    out = tmp_path / "quality"
    cmd = [sys.executable, str(BENCHMARKS / "quality.py"), "--data", str(dataset), "--out", str(out), "--num", "3",
           "--steps", "2", "--minutes-autoencoder", "5", "--minutes-diffusion", "5",
           "--autoencoder-config", str(root / "configs/autoencoder/tiny.yaml"),
           "--diffusion-config", str(root / "configs/diffusion/tiny.yaml"),
           "--evaluate-config", str(root / "configs/evaluate/tiny.yaml"),
           "--set-autoencoder", "train.steps=6", "train.val_every=6", "train.checkpoint_every=6",
           "--set-diffusion", "train.steps=6", "train.val_every=6", "train.checkpoint_every=6", "preview.every=0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    q = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    assert 0 < q["autoencoder"]["test_ssim"] <= 1 and np.isfinite(q["autoencoder"]["test_psnr"])
    assert q["samples"]["n"] == 3 and 0 <= q["samples"]["plausible"] <= 3 and 0 <= q["samples"]["memorised"] <= 3
    assert 0 < q["samples"]["diversity_ms_ssim"] <= 1 and 0 < q["real"]["diversity_ms_ssim"] <= 1
    assert {"brain_ml", "csf_ml", "ventricle_ml"} <= set(q["morphometry"])
    for m in q["morphometry"].values():
        assert {"synthetic_vs_test", "train_vs_test"} <= set(m)
    assert q["minutes"]["total"] > 0 and q["machine"]["cpus"] >= 1
    assert (out / "report" / "report.md").is_file() and (out / "report" / "plausibility.png").is_file()
    # a rerun skips the trained stages and redoes only what --redo names
    first = (out / "autoencoder" / "checkpoints" / "latest.pt").stat().st_mtime_ns
    run = subprocess.run(cmd + ["--redo", "evaluate"], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "autoencoder: done in an earlier run" in run.stderr and "sample: done in an earlier run" in run.stderr
    assert (out / "autoencoder" / "checkpoints" / "latest.pt").stat().st_mtime_ns == first
    # another diffusion recipe on the same autoencoder (levers compared side by side): no autoencoder is trained
    other = tmp_path / "other"
    i = cmd.index("--out")
    run = subprocess.run(cmd[:i + 1] + [str(other)] + cmd[i + 2:] + ["--autoencoder", str(out / "autoencoder"),
                                                                       "--sampler", "rflow"],
                         check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "autoencoder: done in an earlier run" in run.stderr and not (other / "autoencoder").exists()
    q = json.loads((other / "quality.json").read_text(encoding="utf-8"))
    assert q["settings"]["autoencoder_run"] == str((out / "autoencoder").resolve()) and q["samples"]["n"] == 3
    assert q["settings"]["sampler"] == "rflow"


def test_cpu_tiny_benchmark_prints_its_table():
    """benchmarks/cpu_tiny.py as RESULTS.md runs it: a row per workload, each with a time, sampling with the tiny
    model's own sampler."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_tiny.py"), "--repeats", "1"], check=True,
                         capture_output=True, text=True).stdout
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| ") and "median" not in line]
    assert [name.split(",")[0].strip() for name, _ in rows] == [
        "autoencoder train step", "UNet train step", "rflow 10 steps (guidance 3) + decode"]
    assert all(float(ms) > 0 for _, ms in rows)
