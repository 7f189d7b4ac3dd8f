"""The torchrun code path (DDP over gloo) on the CPU with two processes."""

import os
import socket

import torch
import torch.multiprocessing as mp

from medldm.config import load_config
from medldm.training.checkpoint import load_checkpoint

from .conftest import AE_FAST, LDM_FAST


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, stage: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if stage == "autoencoder":
        from medldm.training.autoencoder import train_autoencoder

        train_autoencoder(*args, load_config("autoencoder", None, AE_FAST))
    else:
        from medldm.training.diffusion import train_diffusion

        train_diffusion(*args, load_config("diffusion", None, LDM_FAST))


def test_two_process_ddp_training_writes_one_run(dataset, ae_run, tmp_path):
    ae = tmp_path / "ae"
    mp.spawn(_worker, args=(2, _free_port(), "autoencoder", (dataset, ae)), nprocs=2, join=True)
    assert load_checkpoint(ae / "checkpoints" / "latest.pt")["step"] == 6
    assert len(list((ae / "tensorboard").glob("events.*"))) == 1  # rank 0 alone logs
    ldm = tmp_path / "ldm"
    mp.spawn(_worker, args=(2, _free_port(), "diffusion", (dataset, ae_run, ldm)), nprocs=2, join=True)
    assert load_checkpoint(ldm / "checkpoints" / "latest.pt")["step"] == 6
