"""Cluster preprocessing as the README shows it: scripts/slurm_preprocess.sbatch as array tasks (--shard I/N),
then the same script once more to assemble, against one unsharded run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medldm.cli import main
from medldm.config import load_config
from medldm.data.dataset import read_manifest
from medldm.data.phantoms import write_phantoms
from medldm.data.preprocess import Shard, preprocess_dataset, shard_of

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _job(raw: Path, out: Path, **slurm: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **slurm}
    return subprocess.Popen(["bash", "scripts/slurm_preprocess.sbatch", str(raw), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(job: subprocess.Popen) -> tuple[int, str]:
    _, err = job.communicate(timeout=300)
    return job.returncode, err


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.parent.name == "images" or p.name in ("manifest.csv", "failures.csv"))
            or p.relative_to(root).as_posix() == "qc/summary.csv"}


def test_three_shards_then_the_assembly_give_the_unsharded_dataset_without_redoing_a_scan(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_phantoms(raw, 6, layout="flat", seed=5)
    broken = sorted(raw.rglob("*.nii.gz"))[2]
    broken.write_bytes(broken.read_bytes()[:2000])  # a truncated download: its failure is listed, not retried
    reference = tmp_path / "unsharded"
    preprocess_dataset(raw, reference, load_config("preprocess", None, []))

    out = tmp_path / "sharded"
    array = {"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3", "SLURM_ARRAY_TASK_COUNT": "3"}
    shards = [_job(raw, out, SLURM_ARRAY_TASK_ID=str(i), **array) for i in (1, 2, 3)]
    codes = [_finish(job)[0] for job in shards]
    records = [json.loads((out / "shards" / f"shard_{i:04d}_of_0003.json").read_text(encoding="utf-8"))
               for i in (1, 2, 3)]
    owned = [set(r["images"]) for r in records]
    assert sum(map(len, owned)) == len(set().union(*owned)) == 6  # every scan in exactly one shard
    assert all(r["finished"] for r in records)
    assert codes == [1 if r["failures"] else 0 for r in records] and sum(len(r["failures"]) for r in records) == 1
    assert not (out / "manifest.csv").exists()  # shards write per-scan files only

    # a shard killed by the scheduler before its last scan: its record says started, not finished
    late = next(i for i in (3, 2) if owned[i - 1] and not records[i - 1]["failures"])
    victim = sorted(owned[late - 1])[0].replace(".nii.gz", ".json")
    (out / "images" / victim).unlink()
    record = out / "shards" / f"shard_{late:04d}_of_0003.json"
    record.write_text(json.dumps({**records[late - 1], "finished": False}), encoding="utf-8")
    assert main(["preprocess", str(raw), str(out), "--assemble"]) == 2
    err = capsys.readouterr().err
    assert f"shard(s) {late}/3" in err and "never finished" in err and "1 of 6 scans" in err
    # resubmitted alone (sbatch --array=LATE), SLURM reports an array of one: the script asks for N; and medldm
    # refuses a shard count other than the one the records were made with
    alone = {"SLURM_ARRAY_TASK_ID": str(late), "SLURM_ARRAY_TASK_MIN": str(late), "SLURM_ARRAY_TASK_MAX": str(late),
             "SLURM_ARRAY_TASK_COUNT": "1"}
    code, err = _finish(_job(raw, out, **alone))
    assert code == 2 and "SHARDS=N" in err
    assert main(["preprocess", str(raw), str(out), "--shard", "1/1"]) == 2
    assert "SHARDS=3" in capsys.readouterr().err
    code, _ = _finish(_job(raw, out, **alone, SHARDS="3"))
    redone = json.loads(record.read_text(encoding="utf-8"))
    assert code == 0 and redone["finished"] and redone["resumed"] == len(owned[late - 1]) - 1

    before = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    code, _ = _finish(_job(raw, out))
    assert code == 1  # the truncated scan is a failure of the dataset, as in the unsharded run
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before  # nothing preprocessed again
    assert _files(out) == _files(reference)  # manifest, splits, failures, QC summary and every image, byte for byte
    info = json.loads((out / "preprocess.json").read_text(encoding="utf-8"))
    assert info["resumed"] == info["num_scans"] == 5 and (out / "qc" / "overview.png").is_file()


def test_shards_are_numbered_from_one_and_depend_only_on_the_scan():
    assert Shard.parse("3/10") == Shard(3, 10) and str(Shard(3, 10)) == "3/10"
    for bad in ("0/10", "11/10", "3", "a/b", "3/0"):
        with pytest.raises(ValueError, match="1 <= I <= N"):
            Shard.parse(bad)
    names = [f"sub{i:03d}_bl" for i in range(300)]
    counts = [sum(shard_of(n, 4) == k for n in names) for k in (1, 2, 3, 4)]
    assert sum(counts) == 300 and min(counts) > 50  # all shards get a fair share


def test_bad_shard_options_are_one_line_errors(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path), str(tmp_path / "o"), "--shard", "0/3"]) == 2
    assert "numbered from 1" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path), str(tmp_path / "o"), "--shard", "1/3", "--assemble"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_the_assembly_refuses_results_made_from_a_source_that_changed_after_its_shard_ran(tmp_path):
    import hashlib

    raw = tmp_path / "raw"
    write_phantoms(raw, 4, layout="flat", seed=8)
    files = sorted((raw / "images").glob("*.nii.gz"))
    cut, replaced = files[0], files[1]
    whole = cut.read_bytes()
    cut.write_bytes(whole[:2000])  # a download cut short: its shard records the failure
    out = tmp_path / "out"
    cfg = load_config("preprocess", None, ["split.val_fraction=0", "split.test_fraction=0.25"])
    for i in (1, 2):
        preprocess_dataset(raw, out, cfg, shard=Shard(i, 2))

    # between the shards and the assembly the cut download is fetched again and another scan is re-exported
    cut.write_bytes(whole)
    replaced.write_bytes(files[2].read_bytes())
    with pytest.raises(ValueError, match="2 of 4 scans have no result made from their current source") as refused:
        preprocess_dataset(raw, out, cfg, assemble=True)
    for source in (cut, replaced):
        assert f"{source} (source content changed since its result was made)" in str(refused.value)
    owners = sorted({shard_of(f"{p.name.removesuffix('.nii.gz')}_bl", 2) for p in (cut, replaced)})
    assert f"shard(s) {', '.join(f'{i}/2' for i in owners)}" in str(refused.value)

    summaries = [preprocess_dataset(raw, out, cfg, shard=Shard(i, 2)) for i in (1, 2)]
    assert sum(s["resumed"] for s in summaries) == 2 and sum(s["redone_changed"] for s in summaries) == 1
    info = preprocess_dataset(raw, out, cfg, assemble=True)
    assert info["resumed"] == info["num_scans"] == 4 and not info["failures"]
    sha = {row["source"]: row["source_sha256"] for row in read_manifest(out)}
    assert all(sha[str(p)] == hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
