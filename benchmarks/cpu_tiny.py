"""Time the tiny configs' hot paths on this machine (CPU or GPU): autoencoder step, UNet step, DDIM-50 + decode.

    python benchmarks/cpu_tiny.py [--repeats 20]

Prints a Markdown table row set to paste into benchmarks/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch

from medldm.config import load_config
from medldm.inference.sample import DEFAULT_STEPS
from medldm.models.conditioning import ConditionEncoder
from medldm.models.networks import (
    build_autoencoder,
    build_scheduler,
    build_unet,
    default_sampler,
    set_sampling_steps,
)
from medldm.models.ops import sample_latents
from medldm.training.autoencoder import kl_loss
from medldm.training.diffusion import diffusion_target, training_timesteps


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    ae_cfg, ldm_cfg = load_config("autoencoder"), load_config("diffusion")
    shape = load_config("preprocess").shape

    ae = build_autoencoder(ae_cfg.model)
    ae_opt = torch.optim.AdamW(ae.parameters(), lr=1e-4)
    x = torch.rand(ae_cfg.train.batch_size, 1, *shape)

    def ae_step() -> None:
        recon, mu, sigma = ae(x)
        loss = (recon - x).abs().mean() + ae_cfg.kl_weight * kl_loss(mu, sigma)
        ae_opt.zero_grad()
        loss.backward()
        ae_opt.step()

    rows = [{"age": 60 + 5 * i, "sex": "MF"[i % 2], "diagnosis": ("CN", "MCI", "AD")[i % 3]} for i in range(6)]
    encoder = ConditionEncoder.fit(ldm_cfg.conditioning.keys, rows)
    latent = [ae_cfg.model.latent_channels] + [s // ae_cfg.model.downsample_factor for s in shape]
    unet = build_unet(ldm_cfg.model, latent[0], encoder.dim)
    unet_opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = build_scheduler(ldm_cfg.scheduler)
    z = torch.randn(ldm_cfg.train.batch_size, *latent)
    gen = torch.Generator().manual_seed(0)
    context = encoder.encode([{"age": 70, "sex": "F", "diagnosis": "CN"}] * z.shape[0])

    def unet_step() -> None:
        noise = torch.randn_like(z)
        t = training_timesteps(scheduler, z, gen)
        target = diffusion_target(scheduler, z, noise, t)
        loss = ((unet(scheduler.add_noise(z, noise, t), timesteps=t, context=context) - target) ** 2).mean()
        unet_opt.zero_grad()
        loss.backward()
        unet_opt.step()

    name = default_sampler(ldm_cfg.scheduler)
    steps = DEFAULT_STEPS[name]
    sampler = build_scheduler(ldm_cfg.scheduler, name)
    set_sampling_steps(sampler, steps, latent)
    unet.eval()
    ae.eval()

    def sample_one() -> None:
        with torch.no_grad():
            out = sample_latents(unet, sampler, torch.randn(1, *latent), context[:1], guidance=3.0)
            ae.decode(out)

    rows = [
        (f"autoencoder train step, batch {x.shape[0]}, {list(shape)}", timed(ae_step, args.repeats)),
        (f"UNet train step, batch {z.shape[0]}, latent {latent}", timed(unet_step, args.repeats)),
        (f"{name} {steps} steps (guidance 3) + decode, 1 volume",
         timed(sample_one, max(3, args.repeats // 4), warmup=1)),
    ]
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nTiny configs, {device}, torch {torch.__version__}, {dt.date.today()}\n")
    print("| what | median ms |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1000:.0f} |")


if __name__ == "__main__":
    main()
