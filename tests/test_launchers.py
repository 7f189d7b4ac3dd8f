"""The documented multi-process commands, run as a user runs them: scripts/torchrun_train.sh, plain torchrun, and
the SLURM scripts under stand-ins for srun, scontrol and squeue (SLURM runs a batch script as a bash script with
its SLURM_* variables set, which is what these tests do)."""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medldm.artifacts import load_checkpoint
from medldm.cli import build_parser
from medldm.inference.encode import encode_dataset
from medldm.training.loop import weights_fingerprint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's torchrun and medldm
AE_ARGS = ["--config", "configs/autoencoder/tiny.yaml", "--set", "train.val_every=3",
           "--set", "train.checkpoint_every=3", "--set", "adversarial_start=1", "--set", "ema_decay=0.9",
           "--set", "train.grad_accum=2"]
LDM_ARGS = ["--config", "configs/diffusion/tiny.yaml", "--set", "train.val_every=2",
            "--set", "train.checkpoint_every=2", "--set", "train.batch_size=4"]
# srun: one task per node, in parallel, each with its node's SLURM_NODEID; fails when any task fails
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
"""


def _free_port_in(low: int, high: int) -> int:
    for port in random.Random().sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _env(**extra: str) -> dict[str, str]:
    # one thread per process: two ranks share the CI machine's two cores; gloo on the CPU also where there is a GPU
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", **extra}


def _run(cmd: list[str], env: dict[str, str] | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


def _fake_slurm(tmp_path: Path, time_left: str) -> Path:
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    scontrol = ('#!/usr/bin/env bash\nif [[ $2 == hostnames ]]; then echo 127.0.0.1; else '
                f'echo "JobId=$SLURM_JOB_ID JobName=medldm-train Command={REPO}/scripts/slurm_train.sbatch"; fi\n')
    for name, body in (("srun", FAKE_SRUN), ("scontrol", scontrol),
                       ("squeue", f"#!/usr/bin/env bash\necho {time_left}\n")):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    return fake


def _check_replicas(run: Path, step: int, launches: int = 1) -> dict:
    """The run's latest checkpoint: at ``step``, written by 2 ranks whose weights were all the saved ones."""
    saved = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert saved["step"] == step and saved["world_size"] == 2 and len(saved["rng"]) == 2
    weights = {k: saved[k] for k in ("model", "discriminator", "ema") if k in saved}
    assert saved["replicas"] == [weights_fingerprint(weights)] * 2
    assert len(list((run / "tensorboard").glob("events.*"))) == launches  # rank 0 alone logs
    return saved


@pytest.fixture(scope="module")
def two_process_ae(dataset, tmp_path_factory) -> Path:
    """An autoencoder trained 6 steps by the one-node launcher with 2 processes."""
    run = tmp_path_factory.mktemp("launch") / "ae"
    _run(["scripts/torchrun_train.sh", "2", "autoencoder", "--data", str(dataset), "--run-dir", str(run),
          *AE_ARGS, "--set", "train.steps=6"])
    return run


# Put on PYTHONPATH, this makes every process of a launch keep the module DDP wraps and save its weights when the
# process ends, one file per rank: what each rank really held, not what the run says it compared.
REPLICA_PROBE = """import atexit, os
import torch
from torch.nn.parallel import DistributedDataParallel

wrapped = []
wrap = DistributedDataParallel.__init__


def recording_wrap(self, module, *args, **kwargs):
    wrap(self, module, *args, **kwargs)
    wrapped.append(module)


DistributedDataParallel.__init__ = recording_wrap


@atexit.register
def save():
    if wrapped and "RANK" in os.environ:
        out = os.path.join(os.environ["REPLICA_PROBE_OUT"], "rank" + os.environ["RANK"] + ".pt")
        torch.save(wrapped[-1].state_dict(), out)
"""


def _probed_env(tmp_path: Path, name: str) -> tuple[dict[str, str], Path]:
    probe, out = tmp_path / "replica_probe", tmp_path / name
    probe.mkdir(exist_ok=True)
    out.mkdir()
    (probe / "sitecustomize.py").write_text(REPLICA_PROBE)
    return _env(PYTHONPATH=os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")])),
                REPLICA_PROBE_OUT=str(out)), out


def _check_ranks_held(saved: dict, out: Path) -> None:
    """Both ranks ended with the weights the checkpoint holds, bit for bit."""
    for rank in (0, 1):
        assert (out / f"rank{rank}.pt").is_file(), f"rank {rank} wrapped no module in DistributedDataParallel"
        held = torch.load(out / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        assert held.keys() == saved["model"].keys()
        differ = [k for k, v in held.items() if not torch.equal(v, saved["model"][k])]
        assert not differ, (f"rank {rank}: {len(differ)} of {len(held)} tensors differ from the checkpoint's: "
                            f"{differ[:3]}")


def test_torchrun_script_and_plain_torchrun_train_both_stages_on_two_processes(dataset, two_process_ae, tmp_path):
    ae = _check_replicas(two_process_ae, 6)
    assert ae["discriminator"] is not None and ae["ema"] is not None  # all three networks were compared
    encode_dataset(dataset, two_process_ae)  # one process: not a launcher
    ldm = tmp_path / "ldm"
    env, held = _probed_env(tmp_path, "held_at_2")
    _run(["scripts/torchrun_train.sh", "2", "diffusion", "--data", str(dataset), "--autoencoder", str(two_process_ae),
          "--run-dir", str(ldm), *LDM_ARGS, "--set", "train.steps=2"], env)
    first = _check_replicas(ldm, 2)
    assert not torch.equal(first["rng"][0]["noise"], first["rng"][1]["noise"])  # each rank draws its own noise
    _check_ranks_held(first, held)
    # the README's plain form, resuming the same run
    env, held = _probed_env(tmp_path, "held_at_4")
    _run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "medldm", "train", "diffusion", "--data",
          str(dataset), "--autoencoder", str(two_process_ae), "--run-dir", str(ldm), "--resume", *LDM_ARGS,
          "--set", "train.steps=4"], env)
    resumed = _check_replicas(ldm, 4, launches=2)
    assert weights_fingerprint({"model": resumed["model"]}) != weights_fingerprint({"model": first["model"]})
    _check_ranks_held(resumed, held)


def test_two_node_slurm_job_resumed_by_the_next_job_equals_an_uninterrupted_run(dataset, two_process_ae, tmp_path):
    run = tmp_path / "ae"
    # sbatch runs a copy of the script from its spool folder, in the folder it was submitted from
    spool, submit = tmp_path / "spool", tmp_path / "submitted_here"
    spool.mkdir(), submit.mkdir()
    (spool / "slurm_script").write_bytes((REPO / "scripts" / "slurm_train.sbatch").read_bytes())
    env = _env(PATH=f"{_fake_slurm(tmp_path, '1:05:00')}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(submit), GPUS_PER_NODE="1",
               SLURM_JOB_ID=str(100000 + _free_port_in(20000, 40000) - 20000))  # the script's port: 20000 + id % 20000
    config = [a if not a.startswith("configs/") else str(REPO / a) for a in AE_ARGS]
    job = ["bash", str(spool / "slurm_script"), "autoencoder", "--data", str(dataset), "--run-dir", str(run), *config]
    # two nodes, one process each: two torchrun invocations (--node_rank 0 and 1) meet at one rendezvous
    _run([*job, "--set", "train.steps=3"], env)
    _check_replicas(run, 3)
    saved_cfg = (run / "config.yaml").read_text(encoding="utf-8")
    assert "time_limit_minutes: 35" in saved_cfg  # 65 minutes left in the job, less the 30-minute margin
    # the same job submitted again finds the checkpoint and continues the run under torchrun
    env["SLURM_JOB_ID"] = str(100000 + _free_port_in(20000, 40000) - 20000)
    _run([*job, "--set", "train.steps=6"], env)
    resumed, uninterrupted = (_check_replicas(run, 6, launches=2),
                              load_checkpoint(two_process_ae / "checkpoints" / "latest.pt"))
    for net in ("model", "discriminator", "ema"):
        assert all(torch.equal(v, uninterrupted[net][k]) for k, v in resumed[net].items()), net


def test_the_launcher_refuses_the_old_spelling_with_the_fix(dataset, tmp_path):
    done = _run(["scripts/torchrun_train.sh", "2", "autoencoder", "--data", str(dataset), "--run", str(tmp_path)],
                expect=2)
    assert "--run-dir" in done.stderr


def test_replicas_that_differ_stop_the_run_on_every_rank(monkeypatch):
    """What each rank does when the fingerprints it gathers disagree (the collective stood in for)."""
    import torch.distributed as dist

    from medldm.training.dist import DistContext
    from medldm.training.loop import check_replicas

    weights = {"model": {"w": torch.ones(3)}, "ema": None}
    ctx = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))

    def gather(out, mine, others):
        out[:] = [others, mine]

    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: gather(out, mine, mine))
    assert check_replicas(ctx, 7, weights) == [weights_fingerprint(weights)] * 2
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: gather(out, mine, "0" * 64))
    with pytest.raises(RuntimeError, match=r"diverged at step 7: the weights of rank\(s\) \[1\] differ"):
        check_replicas(ctx, 7, weights)
    flipped = {"model": {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-23])}, "ema": None}  # one bit
    assert weights_fingerprint(flipped) != weights_fingerprint(weights)


def _train_options() -> list[argparse.Action]:
    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    stages = next(a for a in train._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [a for p in stages.values() for a in p._actions if a.option_strings and a.dest != "help"]


def test_no_train_option_is_taken_by_torchruns_own_parser():
    """torchrun reads every option in the whole command line against its own, abbreviations included; one of
    medldm train's that abbreviates one of torchrun's (as --run did --run-path) breaks the launcher."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    for action in _train_options():
        for option in action.option_strings:
            if option == "--run":
                continue  # the old spelling, kept for plain `medldm train`; the launcher refuses it
            script_args = [option] + ([] if action.nargs == 0 else ["X"])
            args = torchrun.parse_args(["--nproc-per-node", "2", "-m", "medldm", "train", "autoencoder", *script_args])
            assert args.training_script_args == ["train", "autoencoder", *script_args], option


def test_every_option_of_every_subcommand_has_a_help_line():
    def missing(parser: argparse.ArgumentParser, name: str) -> list[str]:
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    out += missing(p, f"{name} {sub}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                out.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        return out

    assert missing(build_parser(), "medldm") == []
    shown = _run(["medldm", "train", "diffusion", "--help"]).stdout
    assert "--run-dir RUN_DIR" in shown and "dataset dir written by medldm preprocess" in shown
