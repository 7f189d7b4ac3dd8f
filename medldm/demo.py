"""`medldm demo`: every stage on generated phantoms with the tiny configs, on the CPU, in minutes."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from medldm.config import load_config

log = logging.getLogger(__name__)


def run_demo(out: str | Path, num: int = 24, seed: int = 0) -> dict[str, Path]:
    """Phantoms -> preprocess -> autoencoder -> encode -> diffusion -> sample -> evaluate; returns the output dirs."""
    from medldm.artifacts import DiffusionRun
    from medldm.data.phantoms import write_phantoms
    from medldm.data.preprocess import preprocess_dataset
    from medldm.evaluation.report import evaluate
    from medldm.inference.encode import encode_dataset
    from medldm.inference.sample import sample_run
    from medldm.models.conditioning import ConditionEncoder
    from medldm.training.autoencoder import train_autoencoder
    from medldm.training.diffusion import train_diffusion

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: remove it or give another --out")
    dirs = {name: out / name for name in ("raw", "dataset", "autoencoder", "diffusion", "samples", "report")}
    start = time.perf_counter()

    def stage(name: str) -> None:
        log.info("=== %s (%.0f s elapsed)", name, time.perf_counter() - start)

    stage("phantoms")
    write_phantoms(dirs["raw"], num, layout="adni", seed=seed)
    stage("preprocess")
    preprocess_dataset(dirs["raw"], dirs["dataset"], load_config("preprocess"), workers=2)
    stage("train autoencoder")
    train_autoencoder(dirs["dataset"], dirs["autoencoder"], load_config("autoencoder"))
    stage("encode")
    encode_dataset(dirs["dataset"], dirs["autoencoder"])
    stage("train diffusion")
    train_diffusion(dirs["dataset"], dirs["autoencoder"], dirs["diffusion"], load_config("diffusion"))
    stage("sample")
    sample_run(dirs["diffusion"], dirs["samples"], num=8, seed=seed)  # the model's sampler and steps
    # an old brain with Alzheimer's disease: the oldest age the model was trained on (asking beyond it is an error)
    # the checkpoint's metadata only (mapped): no UNet is built to read one age
    conditions = DiffusionRun(dirs["diffusion"]).load(mmap=True).conditions
    assert isinstance(conditions, ConditionEncoder)  # trained here, not imported
    ages = conditions.numeric["age"]
    oldest = f"{math.floor(ages['max'] * 10) / 10:g}"
    sample_run(dirs["diffusion"], dirs["samples"] / "oldest_AD", num=4, seed=seed,
               conditions={"age": oldest, "diagnosis": "AD"}, guidance=3.0)
    stage("evaluate")
    evaluate(dirs["dataset"], dirs["report"], load_config("evaluate"), autoencoder=dirs["autoencoder"],
             samples=dirs["samples"])
    stage("pages")
    from medldm.view import write_page_quietly

    pages = write_page_quietly(out)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nmedldm demo finished in {minutes:.1f} min. Outputs under {out}/:")
    print(f"  dataset      {dirs['dataset']}/ (images/, manifest.csv, preprocess.json, qc/overview.png)")
    print(f"  autoencoder  {dirs['autoencoder']}/ (checkpoints/, tensorboard/, loss.png, latents/)")
    print(f"  diffusion    {dirs['diffusion']}/ (checkpoints/, tensorboard/, loss.png)")
    print(f"  samples      {dirs['samples']}/ (sample_*.nii.gz + .json + .png, contact_sheet.png; "
          "oldest_AD/ conditioned on the oldest training age and AD)")
    print(f"  report       {dirs['report']}/report.md")
    print(f"  TensorBoard: tensorboard --logdir {out}")
    if pages:
        print("Open these pages in a browser (no server or network needed; every volume in a 3D viewer):")
        for page in pages:
            print(f"  {page.resolve().as_uri()}")
    return dirs
