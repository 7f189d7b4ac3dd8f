"""The benchmark scripts run at tiny size on the CPU, so they are ready when a GPU session comes."""

import json
import subprocess
import sys
from pathlib import Path

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
