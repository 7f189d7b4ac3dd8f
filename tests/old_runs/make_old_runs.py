"""How tests/old_runs/0.1.0/ was written: with medldm 0.1.0 at commit aedae09 (the layout before issue 21), so that
test_old_runs.py checks that runs written by that version keep loading, sampling, decoding and resuming.

It is a record, not a test: it imports that version's modules, some of which have moved since. To write runs of a
later layout, check that version out and run ``python tests/old_runs/make_old_runs.py OUT``.
Tiny models (1.6 MB in all) so that the files can live in the repository: a test cannot generate what an
earlier version wrote."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from medldm.config import load_config
from medldm.data.phantoms import write_phantoms
from medldm.data.preprocess import preprocess_dataset
from medldm.inference.encode import encode_dataset
from medldm.inference.scan import compress_scan
from medldm.training.autoencoder import train_autoencoder
from medldm.training.diffusion import train_diffusion

AE = ["model.channels=[4,8]", "model.attention_levels=[false,false]", "model.norm_num_groups=4",
      "discriminator.channels=4", "train.steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1"]
LDM = ["model.channels=[4,4]", "model.attention_levels=[false,true]", "model.num_head_channels=[0,4]",
       "model.norm_num_groups=4", "train.steps=2", "train.val_every=2", "train.checkpoint_every=2",
       "train.log_every=1", "train.batch_size=2", "preview.every=0", "scheduler.num_train_timesteps=20"]


def main(out: Path) -> None:
    scratch = out.parent / (out.name + ".scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    write_phantoms(scratch / "raw", 5, layout="adni", seed=3)
    data = out / "dataset"
    preprocess_dataset(scratch / "raw", data, load_config("preprocess", None,
                                                          ["split.val_fraction=0.2", "split.test_fraction=0.2"]))
    shutil.rmtree(data / "qc", ignore_errors=True)  # pictures: not needed to load the runs
    train_autoencoder(data, out / "autoencoder", load_config("autoencoder", None, AE))
    encode_dataset(data, out / "autoencoder")
    train_diffusion(data, out / "autoencoder", out / "diffusion", load_config("diffusion", None, LDM))
    first = sorted((data / "images").glob("*.nii.gz"))[0]
    compress_scan(first, out / "scan.latent", out / "autoencoder")
    for run in ("autoencoder", "diffusion"):  # TensorBoard logs and pictures: not what the test loads
        shutil.rmtree(out / run / "tensorboard", ignore_errors=True)
        for png in (out / run).glob("*.png"):
            png.unlink()
    # at two steps best.pt and latest.pt hold the same weights: one of each is kept (a run falls back to latest.pt)
    (out / "autoencoder" / "checkpoints" / "latest.pt").unlink()
    (out / "diffusion" / "checkpoints" / "best.pt").unlink()
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
