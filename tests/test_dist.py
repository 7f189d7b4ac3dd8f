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
        import medldm.training.autoencoder as ae

        built = []  # keep this rank's networks to compare the ranks after training
        for name in ("build_autoencoder", "build_discriminator"):
            real = getattr(ae, name)
            setattr(ae, name, lambda cfg, real=real, **kw: built.append(real(cfg, **kw)) or built[-1])
        data, run, out = args
        overrides = AE_FAST + ["adversarial_start=1", "ema_decay=0.9", "train.grad_accum=2"]
        ae.train_autoencoder(data, run, load_config("autoencoder", None, overrides))
        real_nets = [m for m in built if next(m.parameters()).device.type != "meta"]  # not the shape dry run
        torch.save([m.state_dict() for m in real_nets], out / f"rank{rank}.pt")
    else:
        from medldm.training.diffusion import train_diffusion

        train_diffusion(*args, load_config("diffusion", None, LDM_FAST))


def test_two_process_ddp_training_writes_one_run_with_identical_replicas(dataset, ae_run, tmp_path):
    ae = tmp_path / "ae"
    mp.spawn(_worker, args=(2, _free_port(), "autoencoder", (dataset, ae, tmp_path)), nprocs=2, join=True)
    saved = load_checkpoint(ae / "checkpoints" / "latest.pt")
    assert saved["step"] == 6 and saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert len(list((ae / "tensorboard").glob("events.*"))) == 1  # rank 0 alone logs
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for net0, net1 in zip(rank0, rank1):  # autoencoder, discriminator: the same weights on both ranks
        assert all(torch.equal(v, net1[k]) for k, v in net0.items())
    assert all(torch.equal(v, saved["model"][k]) for k, v in rank0[0].items())
    assert all(torch.equal(v, saved["discriminator"][k]) for k, v in rank0[1].items())
    ldm = tmp_path / "ldm"
    mp.spawn(_worker, args=(2, _free_port(), "diffusion", (dataset, ae_run, ldm)), nprocs=2, join=True)
    saved = load_checkpoint(ldm / "checkpoints" / "latest.pt")
    assert saved["step"] == 6 and saved["world_size"] == 2
    assert not torch.equal(saved["rng"][0]["noise"], saved["rng"][1]["noise"])  # each rank draws its own noise
