"""Latent diffusion within a time budget: train, sample 16 brains, compare their diversity with real brains.

    python benchmarks/ldm_samples.py --data DATA --autoencoder AE_RUN --out OUT \
        --config configs/diffusion/ixi.yaml --minutes 8 [--guidance 1.0] [--set key=value ...]
    python benchmarks/ldm_samples.py --unet-speed configs/diffusion/adni.yaml --out OUT [--latent 3 20 28 20]

The first form encodes DATA with AE_RUN if its latents are missing, trains `train_diffusion` under
``train.time_limit_minutes`` in ``--run`` (default: a temporary folder, resumed when it holds a run), then
DDIM-samples ``--num`` volumes, each conditioned on the labels of one real val/test subject (age and sex where
known, in order). It reports the mean pairwise MS-SSIM among the samples
and among as many real val/test volumes (lower = more diverse), and for every sample and every real val/test
volume the SSIM to its most similar training volume (a first look at copying). Pictures: OUT/samples.png
(samples, with their conditions in results.json) and OUT/real.png (the real subjects whose labels they got);
the TensorBoard events (with the preview samples) are copied to OUT.

The second form times one training step (forward, backward, AdamW) of a UNet config on random latents
(bf16 autocast on CUDA) and reports the peak GPU memory: the ADNI default is 3x20x28x20, batch 8.
Both forms run on the CPU at small sizes.
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

from medldm.artifacts import AutoencoderRun, load_checkpoint
from medldm.config import load_config, to_dict
from medldm.data.dataset import read_dataset_info, read_manifest, volume_dataset
from medldm.devices import autocast
from medldm.evaluation.memorisation import NearestTraining, memorisation
from medldm.evaluation.metrics import VolumeMetrics, pairwise_similarity
from medldm.inference.encode import encode_dataset
from medldm.inference.sample import sample_run
from medldm.models.conditioning import condition_width
from medldm.models.networks import build_scheduler, build_unet
from medldm.training.diffusion import train_diffusion
from medldm.versions import versions
from medldm.viz import grid, save_png, three_plane


def unet_speed(config: Path, latent: list[int], batch: int, device: torch.device, repeats: int = 10) -> dict:
    """Seconds per training step and peak memory of a diffusion UNet config on random latents."""
    cfg = load_config("diffusion", config)
    dim = sum(condition_width(k) for k in cfg.conditioning.keys) or None
    unet = build_unet(cfg.model, latent[0], dim).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    scheduler = build_scheduler(cfg.scheduler)
    z = torch.randn(batch, *latent, device=device)
    context = torch.randn(batch, 1, dim, device=device) if dim else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(repeats + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        t = torch.randint(0, scheduler.num_train_timesteps, (batch,), device=device)
        noise = torch.randn_like(z)
        with autocast(device, cfg.train.amp):
            pred = unet(scheduler.add_noise(z, noise, t), timesteps=t, context=context)
        loss = (pred.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"config": str(config), "latent": latent, "batch": batch, "amp_bf16": cfg.train.amp and device.type == "cuda",
           "parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
           "seconds_per_step": (time.perf_counter() - t0) / repeats}
    if device.type == "cuda":
        out["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--autoencoder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[])
    ap.add_argument("--run", type=Path, help="diffusion run dir (default: a temporary folder; resumed if it exists)")
    ap.add_argument("--unet-speed", type=Path, help="time this UNet config instead (no data needed)")
    ap.add_argument("--latent", type=int, nargs=4, default=[3, 20, 28, 20])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": date.today().isoformat(), "card": card, "versions": versions()}

    if args.unet_speed:
        results["unet_speed"] = unet_speed(args.unet_speed, args.latent, args.batch, device)
        (args.out / "unet_speed.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results["unet_speed"], indent=1))
        return
    if args.data is None or args.autoencoder is None:
        ap.error("--data and --autoencoder are needed (or --unet-speed)")

    if not AutoencoderRun(args.autoencoder).latents.is_file():
        t0 = time.perf_counter()
        encode_dataset(args.data, args.autoencoder)
        results["encode_s"] = time.perf_counter() - t0
    cfg = load_config("diffusion", args.config, args.overrides)
    cfg.train.time_limit_minutes = args.minutes
    # checkpoints stay out of OUT (only results, pictures and samples travel back from a GPU machine)
    run = args.run or Path(tempfile.gettempdir()) / "medldm_benchmark_ldm"
    t0 = time.perf_counter()
    train_diffusion(args.data, args.autoencoder, run, cfg, resume=(run / "checkpoints" / "latest.pt").is_file())
    latest = load_checkpoint(run / "checkpoints" / "latest.pt")
    results.update(config=to_dict(cfg), train_wall_s=time.perf_counter() - t0, steps_done=latest["step"],
                   best_val_loss=latest["best_val_loss"], skipped_nonfinite=latest["skipped_nonfinite"])
    if device.type == "cuda":
        results["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    rows = read_manifest(args.data)
    held_out = [r for r in rows if r["split"] in ("val", "test")][: args.num]
    train_rows = [r for r in rows if r["split"] == "train"]
    keys = latest["conditioning"]["keys"]
    t0 = time.perf_counter()
    samples_dir = args.out / "samples"
    paths, conditions = [], []
    for i in range(args.num):
        # the labels of held-out subject i (unknown labels stay unknown), within the training range
        labels = {k: held_out[i % len(held_out)].get(k) for k in keys}
        labels = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in labels.items() if v is not None}
        numeric = latest["conditioning"]["numeric"]
        labels = {k: (v if k not in numeric else f"{min(max(float(v), numeric[k]['min']), numeric[k]['max']):g}")
                  for k, v in labels.items()}
        conditions.append(labels)
        paths += sample_run(run, samples_dir / f"{i:02d}", num=1, steps=args.ddim_steps, seed=i, conditions=labels,
                            guidance=args.guidance)
    results.update(sample_s=time.perf_counter() - t0, sample_conditions=conditions, guidance=args.guidance,
                   ddim_steps=args.ddim_steps)

    import nibabel as nib

    synthetic = [torch.from_numpy(np.asarray(nib.load(p).dataobj, dtype=np.float32))[None] for p in paths]
    real = [item["image"] for item in volume_dataset(args.data, held_out)]
    train = [item["image"] for item in volume_dataset(args.data, train_rows)]
    shape = read_dataset_info(args.data)["reference"]["shape"]
    metrics = VolumeMetrics(shape)
    results["ms_ssim_scales"] = metrics.scales
    results["diversity"] = {"synthetic": pairwise_similarity(synthetic, metrics, 1000, 0),
                            "real_held_out": pairwise_similarity(real, metrics, 1000, 0)}
    # every training volume is a candidate here (the set is small): exact nearest neighbours
    nearest = NearestTraining(lambda i: train[i], len(train), metrics, candidates=len(train))
    mem = memorisation(synthetic, real, nearest)
    nearest_syn = [e["ssim"] for e in mem["synthetic"]]
    nearest_real = [e["ssim"] for e in mem["real_test"]]
    results["nearest_training_ssim"] = {"synthetic": nearest_syn, "real_held_out": nearest_real,
                                        "synthetic_max": max(nearest_syn), "real_held_out_max": max(nearest_real),
                                        "flagged": mem["flagged"], "threshold": mem["threshold_ssim"]}
    save_png(args.out / "samples.png", grid([three_plane(v[0].numpy()) for v in synthetic], columns=4))
    save_png(args.out / "real.png", grid([three_plane(v[0].numpy()) for v in real], columns=4))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    for tb in (run / "tensorboard").glob("events.*"):
        shutil.copy2(tb, args.out / tb.name)
    d = results["diversity"]
    print(f"{card}: {results['steps_done']} steps in {results['train_wall_s'] / 60:.1f} min; pairwise MS-SSIM "
          f"synthetic {d['synthetic']['ms_ssim_mean']:.3f} vs real {d['real_held_out']['ms_ssim_mean']:.3f}; "
          f"nearest-training SSIM max synthetic {max(nearest_syn):.3f} vs real {max(nearest_real):.3f}")


if __name__ == "__main__":
    main()
