"""Autoencoder quality within a time budget: train, then score reconstructions of unseen subjects.

    python benchmarks/gpu_autoencoder.py --data DATA --out OUT --config configs/autoencoder/ixi.yaml --minutes 7

Runs `train_autoencoder` with ``train.time_limit_minutes``; a short timing of the training step first sets the
adversarial warm-up to half of the steps the budget allows and validation to about 6 times per run. Then the
best checkpoint (EMA weights when the config keeps an EMA) reconstructs every val and test volume (subjects not
used for training); SSIM / MS-SSIM (kernel 11, sigma 1.5) / PSNR go to OUT/results.json, pictures to
OUT/reconstructions.png, and the encode stage is timed. Runs on the CPU too (use a small config and --minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medldm.artifacts import AutoencoderRun, load_checkpoint, save_checkpoint
from medldm.config import load_config, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, split_rows, volume_dataset
from medldm.devices import autocast
from medldm.evaluation.metrics import VolumeMetrics
from medldm.inference.encode import encode_dataset
from medldm.models.networks import build_autoencoder, build_discriminator
from medldm.models.ops import reconstruct
from medldm.training.autoencoder import train_autoencoder
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane


def time_steps(cfg, shape: list[int], device: torch.device, repeats: int = 10) -> float:
    """Seconds per training step (autoencoder + discriminator, forward and backward) on random data."""
    ae = build_autoencoder(cfg.model).to(device)
    disc = build_discriminator(cfg.discriminator).to(device)
    params = list(ae.parameters()) + list(disc.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.rand(cfg.train.batch_size, 1, *shape, device=device)
    torch.backends.cudnn.benchmark = True
    for i in range(repeats + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast(device, cfg.train.amp):
            recon, mu, sigma = ae(x)
            loss = (recon.float() - x).abs().mean() + disc(recon)[-1].float().mean() + disc(x)[-1].float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats * cfg.train.grad_accum
    del ae, disc, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--minutes", type=float, default=7.0)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    info = read_dataset_info(args.data)
    shape = info["reference"]["shape"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": date.today().isoformat(), "card": card, "versions": versions(), "minutes": args.minutes}

    cfg = load_config("autoencoder", args.config, args.overrides)
    sec = time_steps(cfg, list(cfg.patch_size or shape), device)
    expected = max(int(args.minutes * 60 / sec), 10)
    cfg.train.steps = expected * 2  # the time limit ends the run; this only bounds it
    cfg.train.time_limit_minutes = args.minutes
    cfg.train.val_every = cfg.train.checkpoint_every = max(expected // 6, 5)
    cfg.adversarial_start = expected // 2
    results.update(timed_seconds_per_step=sec, expected_steps=expected, config=to_dict(cfg))
    print(f"{card}: {sec * 1000:.0f} ms per step (timed) -> about {expected} steps in {args.minutes} min; "
          f"adversarial from step {cfg.adversarial_start}", flush=True)

    run = Path(tempfile.gettempdir()) / "medldm_benchmark_autoencoder"  # outside OUT: only the results travel back
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    train_autoencoder(args.data, run, cfg)
    train_s = time.perf_counter() - t0
    latest = load_checkpoint(run / "checkpoints" / "latest.pt")
    results.update(train_wall_s=train_s, steps_done=latest["step"], best_val_ssim=latest["best_val_ssim"],
                   skipped_nonfinite=latest["skipped_nonfinite"])
    if device.type == "cuda":
        results["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    ae = AutoencoderRun(run).load()
    model = ae.model(device)
    results["scored_checkpoint"] = {"file": ae.path.name, "step": load_checkpoint(ae.path, mmap=True)["step"],
                                    "weights": ae.weights_name}
    metrics = VolumeMetrics(shape)
    rows = read_manifest(args.data)
    tiles = []
    for split in ("val", "test"):
        chosen = split_rows(rows, split)
        scores: dict[str, list[float]] = {"ssim": [], "ms_ssim": [], "psnr": [], "mae": [], "psnr_brain": [],
                                          "mae_brain": []}
        for _row, item in zip(chosen, volume_dataset(args.data, chosen)):
            x = item["image"][None].to(device)
            with autocast(device, cfg.train.amp):
                recon = reconstruct(model, x, cfg)
            recon = recon.float().clamp(0, 1)
            for k, v in metrics(recon[0], x[0]).items():
                scores[k].append(v)
            # the background is zero after brain masking and easy to reconstruct: also score the brain alone
            brain = x > 0
            err = (recon - x)[brain]
            scores["psnr_brain"].append(float(-10 * torch.log10(err.pow(2).mean())))
            scores["mae_brain"].append(float(err.abs().mean()))
            if split == "test" and len(tiles) < 12:
                a, b = x[0, 0].cpu().numpy(), recon[0, 0].cpu().numpy()
                tiles += [three_plane(a), three_plane(b), three_plane(np.abs(a - b), vmax=0.25)]
        results[split] = {"count": len(chosen), **{k: summary(v) for k, v in scores.items()}}
        print(f"{split} ({len(chosen)} subjects): SSIM {results[split]['ssim']['mean']:.4f} "
              f"MS-SSIM {results[split]['ms_ssim']['mean']:.4f} PSNR {results[split]['psnr']['mean']:.2f} dB "
              f"(brain only {results[split]['psnr_brain']['mean']:.2f} dB)", flush=True)
    save_png(args.out / "reconstructions.png", grid(tiles, columns=3))

    t0 = time.perf_counter()
    encode_dataset(args.data, run, batch_size=4)
    results["encode_s"] = time.perf_counter() - t0
    results["latents"] = json.loads((run / "latents" / "latents.json").read_text())
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    # keep the scored weights (small) for later stages; drop the optimiser-laden checkpoints
    state = load_checkpoint(ae.path)
    slim = {k: v for k, v in state.items() if k not in ("optimizer", "optimizer_d", "discriminator", "rng")}
    save_checkpoint(args.out / "autoencoder_best.pt", slim)
    for tb in (run / "tensorboard").glob("events.*"):
        shutil.copy2(tb, args.out / tb.name)
    shutil.copy2(run / "config.yaml", args.out / "config.yaml")
    print(json.dumps({k: results[k] for k in ("card", "steps_done", "train_wall_s", "val", "test")}, indent=1))


if __name__ == "__main__":
    main()
