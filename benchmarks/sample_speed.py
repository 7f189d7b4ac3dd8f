"""Seconds per synthetic volume: DDIM sampling + decode (+ NIfTI export) at the ADNI default shapes.

    python benchmarks/sample_speed.py --out OUT [--batches 1 8] [--steps 50] [--guidance 3.0]
    python benchmarks/sample_speed.py --out OUT --tiny          # the tiny configs, seconds on a CPU
    python benchmarks/sample_speed.py --out OUT --run LDM_RUN [--autoencoder AE_RUN] [--tiny]

Random-weight networks of the configs (configs/autoencoder/adni.yaml, configs/diffusion/adni.yaml, image shape of
configs/preprocess/adni.yaml) run through medldm's own sampling path: ``sample_latents`` (bf16 autocast on CUDA,
one generator per sample), ``decode_latents`` (one volume at a time) and ``SampleWriter``
(int16 NIfTI + sidecar + PNG, on the CPU). For each batch size it reports seconds per volume for each phase and
the peak GPU memory of the UNet and of the decoder. It also decodes one volume at each ``--decode-shapes`` image
size (default: ADNI 1.5 mm and the brain-LDM 1 mm 160x224x160), for the memory a decode needs.
Writes OUT/sample_speed.json and prints a Markdown table.

With ``--run`` it also samples from a trained run through ``sample_run`` itself (the `medldm sample` path, export
included) and checks on this device what the tests check on the CPU: the same seed twice, batch 8 vs batch 1,
DDIM vs DDPM (1000 steps); OUT/run_check.json and the contact sheets come back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medldm.config import load_config
from medldm.inference.cuda_graphs import GraphedUNet
from medldm.inference.sample import sample_run
from medldm.inference.sample_writer import SampleWriter
from medldm.models.conditioning import condition_width
from medldm.models.networks import build_autoencoder, build_scheduler, build_unet, default_sampler, set_sampling_steps
from medldm.models.ops import decode_latents, sample_latents
from medldm.models.speed import apply_speed
from medldm.versions import versions

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device):
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, peak_gib(device)


def run_check(run: Path, autoencoder: Path | None, out: Path, device: torch.device) -> dict:
    """`sample_run` on a trained run: seconds per volume, and how exactly seeds reproduce on this device."""
    import nibabel as nib

    def sample(name: str, **kw) -> tuple[list[np.ndarray], float]:
        start = time.perf_counter()
        paths = sample_run(run, work / name, autoencoder_run=autoencoder, device=str(device), **kw)
        seconds = time.perf_counter() - start
        return [np.asanyarray(nib.load(p).dataobj.get_unscaled()).astype(np.int32) for p in paths], seconds

    work = Path(tempfile.mkdtemp(prefix="medldm_run_check_"))
    ddim8, t8 = sample("ddim8", num=8, batch_size=8, seed=0)
    again, _ = sample("again", num=8, batch_size=8, seed=0)
    one, t1 = sample("ddim1", num=1, batch_size=1, seed=0)
    eta, _ = sample("eta", num=2, batch_size=2, seed=0, eta=1.0)
    eta_again, _ = sample("eta_again", num=2, batch_size=2, seed=0, eta=1.0)
    ddpm, tp = sample("ddpm", num=4, batch_size=4, seed=0, sampler="ddpm")
    for name in ("ddim8", "ddpm"):
        (out / f"{name}_contact_sheet.png").write_bytes((work / name / "contact_sheet.png").read_bytes())
    levels = lambda a, b: int(max(np.abs(x - y).max() for x, y in zip(a, b)))  # noqa: E731
    result = {"run": str(run), "seconds_per_volume": {"ddim50_batch8": t8 / 8, "ddim50_batch1": t1,
                                                      "ddpm1000_batch4": tp / 4},
              "max_level_difference": {"same_seed_twice_ddim": levels(ddim8, again),
                                       "same_seed_twice_eta1": levels(eta, eta_again),
                                       "batch8_vs_batch1_sample0": levels(ddim8[:1], one)},
              "stored_levels": 4095}
    (out / "run_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny configs (CPU-sized)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.0, help="!= 1 doubles the UNet batch (guidance)")
    parser.add_argument("--decode-shapes", type=int, nargs="+", help="image sizes (3 ints each) for the decode check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--run", type=Path, help="a trained diffusion run to sample through `sample_run` as well")
    parser.add_argument("--autoencoder", type=Path, help="its autoencoder run, if moved since training")
    parser.add_argument("--eager", action="store_true", help="no compile, no CUDA graph (the issue-6 numbers)")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "adni"
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    ae_cfg = load_config("autoencoder", CONFIGS / "autoencoder" / f"{size}.yaml")
    ldm_cfg = load_config("diffusion", CONFIGS / "diffusion" / f"{size}.yaml")
    image = list(load_config("preprocess", CONFIGS / "preprocess" / f"{size}.yaml").shape)
    factor = 2 ** (len(ae_cfg.model.channels) - 1)
    latent = [ae_cfg.model.latent_channels, *(s // factor for s in image)]
    dim = sum(condition_width(k) for k in ldm_cfg.conditioning.keys) or None
    speed = dataclasses.replace(ldm_cfg.speed, compile="off", cuda_graphs=False) if args.eager else ldm_cfg.speed
    autoencoder = build_autoencoder(ae_cfg.model, sdpa=speed.sdpa).to(device).eval()
    unet = build_unet(ldm_cfg.model, latent[0], dim, sdpa=speed.sdpa).to(device).eval()
    # the levers `medldm sample` applies (models.speed, GraphedUNet)
    speedups = (apply_speed(unet, speed, device, training=False)
                + apply_speed(autoencoder, speed, device, training=False))
    net = GraphedUNet(unet) if speed.cuda_graphs and device.type == "cuda" else unet
    scheduler = build_scheduler(ldm_cfg.scheduler, default_sampler(ldm_cfg.scheduler))
    set_sampling_steps(scheduler, args.steps, latent)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    reference = {"affine": np.diag([1.5, 1.5, 1.5, 1.0]).tolist(), "shape": image, "image": None}
    results: dict = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(device)
                     if device.type == "cuda" else "cpu", "versions": versions(), "size": size, "image": image,
                     "latent": latent, "steps": args.steps, "guidance": args.guidance,
                     "speed": ", ".join(speedups) or "eager",
                     "unet_parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
                     "autoencoder_parameters_m": sum(p.numel() for p in autoencoder.parameters()) / 1e6, "batches": []}

    def sample(batch: int, steps_scheduler=scheduler) -> torch.Tensor:
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        noise = torch.stack([torch.randn(latent, generator=g, device=device) for g in gens])
        context = torch.rand(batch, 1, dim, device=device) if dim else None
        return sample_latents(net, steps_scheduler, noise, context, args.guidance, 0.0, gens)

    # warm-up (compilation, graph capture, cuDNN autotuning, allocator) at every batch size, with a 2-step schedule
    warm = build_scheduler(ldm_cfg.scheduler, default_sampler(ldm_cfg.scheduler))
    set_sampling_steps(warm, 2, latent)
    for batch in args.batches:
        with amp:
            decode_latents(autoencoder, sample(batch, warm)[:1])

    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            z, t_sample, m_sample = timed(lambda: sample(batch), device)
            with amp:
                x, t_decode, m_decode = timed(lambda: decode_latents(autoencoder, z), device)
            writer = SampleWriter(Path(tmp), reference, {"conditions": {}})
            volumes = x.cpu().numpy()
            _, t_export, _ = timed(lambda: [writer.write(v[0], i) for i, v in enumerate(volumes)], torch.device("cpu"))
            row = {"batch": batch, "sample_s_per_volume": t_sample / batch, "decode_s_per_volume": t_decode / batch,
                   "export_s_per_volume": t_export / batch,
                   "gpu_s_per_volume": (t_sample + t_decode) / batch,
                   "volumes_per_s_gpu": batch / (t_sample + t_decode),
                   "sample_peak_gib": m_sample, "decode_peak_gib": m_decode}
            results["batches"].append(row)
            print(json.dumps(row), flush=True)
            del z, x

    decode_shapes = [args.decode_shapes[i:i + 3] for i in range(0, len(args.decode_shapes or []), 3)] or (
        [image] if args.tiny else [image, [160, 224, 160]])
    results["decode"] = []
    for shape in decode_shapes:
        z = torch.randn(1, latent[0], *(s // factor for s in shape), device=device)
        with amp:
            decode_latents(autoencoder, z)  # warm-up: cuDNN picks its kernels for this shape
            _, seconds, peak = timed(lambda: decode_latents(autoencoder, z), device)
        row = {"image": shape, "seconds": seconds, "peak_gib": peak}
        results["decode"].append(row)
        print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.run:
        results["run_check"] = run_check(args.run, args.autoencoder, args.out, device)
    (args.out / "sample_speed.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, {results['date']}, torch {results['versions'].get('torch')}, "
          f"MONAI {results['versions'].get('monai')}; image {image}, latent {latent}, DDIM {args.steps}, "
          f"guidance {args.guidance}; speed: {results['speed']}\n")
    print("| batch | DDIM s/volume | decode s/volume | GPU total s/volume | volumes/s | export s/volume (CPU) "
          "| UNet peak GiB | decode peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["batches"]:
        print(f"| {r['batch']} | {r['sample_s_per_volume']:.3f} | {r['decode_s_per_volume']:.3f} | "
              f"{r['gpu_s_per_volume']:.3f} | {r['volumes_per_s_gpu']:.2f} | {r['export_s_per_volume']:.2f} | "
              f"{r['sample_peak_gib'] or 0:.1f} | {r['decode_peak_gib'] or 0:.1f} |")
    print("\n| decode of one volume | seconds | peak GiB |\n|---|---|---|")
    for r in results["decode"]:
        print(f"| {'x'.join(map(str, r['image']))} | {r['seconds']:.3f} | {r['peak_gib'] or 0:.1f} |")


if __name__ == "__main__":
    main()
