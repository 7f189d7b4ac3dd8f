"""Shared fixtures: a small phantom dataset and tiny trained runs, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs one pytest-xdist worker per core: each worker, and every process it starts (CLI commands, the
    # notebook's kernel), computes on one thread. OpenMP threads that outnumber the cores spin against each other
    # (the notebook took 4.7 times as long beside another worker)
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402 (after OMP_NUM_THREADS)

from medldm.config import load_config  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# very short runs: the tests check plumbing and contracts, not image quality. The diffusion runs draw no preview
# samples (each is a 10-step DDIM chain and a decode per picture); the tests that check previews ask for them
AE_FAST = ["train.steps=6", "train.val_every=3", "train.checkpoint_every=3"]
LDM_FAST = ["train.steps=6", "train.val_every=3", "train.checkpoint_every=3", "train.batch_size=4",
            "preview.every=0"]


class Crash(Exception):
    """Stands for a process killed by the scheduler or a power cut."""


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    """Make training die right after it has written ``latest.pt`` at ``step`` (both trainers save through the
    training loop's ``save_checkpoint``)."""
    from medldm.training import loop as trainer_module

    real_save = trainer_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if path.name == "latest.pt" and state["step"] == step:
            raise Crash

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)


def train_age_range(data_dir: Path) -> tuple[float, float]:
    """The youngest and oldest age in the train split: the range a conditioned model accepts."""
    from medldm.data.dataset import read_manifest

    ages = [r["age"] for r in read_manifest(data_dir) if r["split"] == "train" and r["age"] is not None]
    return min(ages), max(ages)


@pytest.fixture(scope="session")
def raw_adni(tmp_path_factory) -> Path:
    from medldm.data.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("raw_adni")
    write_phantoms(root, 8, layout="adni", seed=3)
    return root


@pytest.fixture(scope="session")
def dataset(raw_adni, tmp_path_factory) -> Path:
    from medldm.data.preprocess import preprocess_dataset

    out = tmp_path_factory.mktemp("dataset")
    cfg = load_config("preprocess", None, ["split.val_fraction=0.2", "split.test_fraction=0.3"])
    preprocess_dataset(raw_adni, out, cfg)
    return out


@pytest.fixture(scope="session")
def ae_run(dataset, tmp_path_factory) -> Path:
    from medldm.inference.encode import encode_dataset
    from medldm.training.autoencoder import train_autoencoder

    run = tmp_path_factory.mktemp("runs") / "ae"
    train_autoencoder(dataset, run, load_config("autoencoder", None, AE_FAST))
    encode_dataset(dataset, run)
    return run


@pytest.fixture(scope="session")
def ldm_run(dataset, ae_run, tmp_path_factory) -> Path:
    from medldm.training.diffusion import train_diffusion

    run = tmp_path_factory.mktemp("runs") / "ldm"
    train_diffusion(dataset, ae_run, run, load_config("diffusion", None, LDM_FAST))
    return run


@pytest.fixture(scope="session")
def ddpm_run(dataset, ae_run, tmp_path_factory) -> Path:
    """A DDPM-trained diffusion model (1000 timesteps), sampled with DDIM or DDPM."""
    from medldm.training.diffusion import train_diffusion

    run = tmp_path_factory.mktemp("runs") / "ldm_ddpm"
    train_diffusion(dataset, ae_run, run, load_config("diffusion", None, [*LDM_FAST, "scheduler.kind=ddpm"]))
    return run


@pytest.fixture(scope="session")
def short_schedule_run(dataset, ae_run, tmp_path_factory) -> Path:
    """A DDPM model trained with 20 timesteps, so a full DDPM chain takes a second on the CPU."""
    from medldm.training.diffusion import train_diffusion

    run = tmp_path_factory.mktemp("runs") / "ldm20"
    cfg = load_config("diffusion", None, [*LDM_FAST, "scheduler.kind=ddpm", "scheduler.num_train_timesteps=20"])
    train_diffusion(dataset, ae_run, run, cfg)
    return run


def pytest_collection_modifyitems(config, items):
    # tests marked gpu need CUDA: they run on GPU machines and are reported as skipped elsewhere
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def encoded_copy(dataset: Path, ae_run: Path, out: Path, edit=None) -> tuple[Path, Path]:
    """``out/data``, a copy of ``dataset`` with ``edit(row)`` applied to each manifest row, and ``out/ae``, a copy of
    ``ae_run`` whose latents are encoded from it (the session's shared dataset and runs stay as they are)."""
    import shutil

    from medldm.inference.encode import encode_dataset

    data, ae = out / "data", out / "ae"
    shutil.copytree(dataset, data)
    shutil.copytree(ae_run, ae)
    if edit is not None:
        edit_manifest(data, edit)
    encode_dataset(data, ae)
    return data, ae


def edit_manifest(data_dir: Path, edit) -> None:
    """Apply ``edit(row)`` to every row of ``data_dir/manifest.csv`` (a row is a dict of strings)."""
    import csv

    path = data_dir / "manifest.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        edit(row)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
