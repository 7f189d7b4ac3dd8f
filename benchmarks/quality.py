"""One quality benchmark: train both stages at the small scale, sample, evaluate, write OUT/quality.json.

    python benchmarks/quality.py --data DATASET --out OUT [--minutes-autoencoder M] [--minutes-diffusion M]
                                 [--num 16] [--seed 0] [--guidance 1.0] [--sampler S] [--steps N]
                                 [--autoencoder AE_RUN] [--redo sample|evaluate]

DATASET is any medldm dataset dir preprocessed with configs/preprocess/small.yaml (train, val and test splits,
whatever its subjects). The stages run with the small configs (``--autoencoder-config``, ``--diffusion-config``,
``--evaluate-config`` to change them, ``--set-autoencoder``/``--set-diffusion key=value`` to override keys):

1. `medldm train autoencoder` on the train/val splits, stopped by ``--minutes-autoencoder`` (default: the
   config's ``train.time_limit_minutes``), then `medldm encode`; ``--autoencoder AE_RUN`` uses a trained run
   instead (encoded if it has no latents yet), so several diffusion recipes are compared on one autoencoder;
2. `medldm train diffusion`, stopped by ``--minutes-diffusion``;
3. `medldm sample` with the model's sampler (``--sampler`` and ``--steps`` default to those of `medldm sample`):
   ``--num`` volumes, sample i with seed ``--seed + i`` and the age and sex of test subject i (cycling; ages
   clipped to the model's training range; a subject without them gives an unconditional sample), so the
   synthetic set has the test split's demographics;
4. `medldm evaluate` against the test split (reconstruction, plausibility, memorisation, diversity, morphometry).

Every stage records itself in OUT/state.json: a rerun after a crash resumes the stage that was running and skips
the finished ones; ``--redo sample`` (or ``evaluate``) reruns from that stage on the trained models (a rerun with
other sampling settings is refused without it). A resumed training stage gets its full time limit again, and
``minutes`` records the attempt that finished each stage. Runs on the
CPU or a GPU (whatever torch sees). OUT/quality.json holds the numbers, OUT/report/ the full report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from medldm.config import load_config
from medldm.data.dataset import read_manifest, split_rows
from medldm.data.io import write_json
from medldm.versions import versions

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("autoencoder", "encode", "diffusion", "sample", "evaluate")
log = logging.getLogger("quality")


def machine() -> dict[str, Any]:
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": "cpu", "date": date.today().isoformat()}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
    return out


def sample_conditions(test: list[dict[str, Any]], encoder: Any, num: int) -> list[dict[str, str]]:
    """Sample i gets the age and sex of test subject i (cycling), where the model knows them."""
    out = []
    for i in range(num):
        row, cond = test[i % len(test)], {}
        if "age" in encoder.keys and row.get("age") not in (None, ""):
            lo, hi = encoder.numeric["age"]["min"], encoder.numeric["age"]["max"]
            age = min(max(float(row["age"]), math.ceil(lo * 10) / 10), math.floor(hi * 10) / 10)
            cond["age"] = f"{age:g}"
        if "sex" in encoder.keys and row.get("sex") in ("M", "F"):
            cond["sex"] = row["sex"]
        out.append(cond)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medldm.artifacts import DiffusionRun
    from medldm.evaluation.report import evaluate
    from medldm.inference.encode import encode_dataset
    from medldm.inference.sample import sample_run
    from medldm.training.autoencoder import train_autoencoder
    from medldm.training.diffusion import train_diffusion

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"minutes": {}, "done": []}
    if args.redo:
        state["done"] = [s for s in state["done"] if STAGES.index(s) < STAGES.index(args.redo)]
    # samples made with other settings are not what this command asks for: refuse rather than report them
    asked = {"num": args.num, "seed": args.seed, "guidance": args.guidance, "steps": args.steps,
             "sampler": args.sampler}
    if "sample" in state["done"] and state.get("sampled_with", asked) != asked:
        raise SystemExit(f"{out}: its samples were made with {state['sampled_with']}, not {asked}: add --redo sample")
    state["sampled_with"] = state.get("sampled_with", asked) if "sample" in state["done"] else asked
    ae_overrides = list(args.set_autoencoder)
    if args.minutes_autoencoder is not None:
        ae_overrides.append(f"train.time_limit_minutes={args.minutes_autoencoder}")
    ldm_overrides = list(args.set_diffusion)
    if args.minutes_diffusion is not None:
        ldm_overrides.append(f"train.time_limit_minutes={args.minutes_diffusion}")
    ae_cfg = load_config("autoencoder", args.autoencoder_config, ae_overrides)
    ldm_cfg = load_config("diffusion", args.diffusion_config, ldm_overrides)
    eval_cfg = load_config("evaluate", args.evaluate_config, [f"seed={args.seed}"])
    ae_run, ldm_run, samples, report = out / "autoencoder", out / "diffusion", out / "samples", out / "report"
    if args.autoencoder:
        ae_run = Path(args.autoencoder)
        state["autoencoder_run"] = str(ae_run.resolve())
        if "autoencoder" not in state["done"]:
            state["done"].append("autoencoder")
            state["minutes"]["autoencoder"] = 0.0  # trained elsewhere: its time is that run's
        if "encode" not in state["done"] and (ae_run / "latents").is_dir():
            state["done"].append("encode")
    test = split_rows(read_manifest(data), "test")
    if not test:
        raise SystemExit(f"{data}/manifest.csv has no test split: preprocess with split.test_fraction > 0")

    def stage(name: str, work) -> None:
        if name in state["done"]:
            log.info("%s: done in an earlier run (%.1f min), skipped", name, state["minutes"].get(name, 0))
            return
        log.info("=== %s", name)
        start = time.perf_counter()
        work()
        state["minutes"][name] = (time.perf_counter() - start) / 60  # of the run that finished it
        state["done"].append(name)
        write_json(state_path, state)

    def started(name: str) -> bool:
        """True when an earlier run began this stage and did not finish it (so it is resumed)."""
        was = name in state.setdefault("started", [])
        if not was:
            state["started"].append(name)
            write_json(state_path, state)
        return was

    stage("autoencoder", lambda: train_autoencoder(data, ae_run, ae_cfg, resume=started("autoencoder")
                                                   and (ae_run / "checkpoints" / "latest.pt").is_file()))
    stage("encode", lambda: encode_dataset(data, ae_run))
    stage("diffusion", lambda: train_diffusion(data, ae_run, ldm_run, ldm_cfg, resume=started("diffusion")
                                               and (ldm_run / "checkpoints" / "latest.pt").is_file()))

    def sample() -> None:
        shutil.rmtree(samples, ignore_errors=True)
        encoder = DiffusionRun(ldm_run).load(mmap=True).conditions
        for i, cond in enumerate(sample_conditions(test, encoder, args.num)):
            name = f"{i:02d}" + "".join(f"_{k}{v}" for k, v in cond.items())
            sample_run(ldm_run, samples / name, num=1, sampler=args.sampler, steps=args.steps, seed=args.seed + i,
                       conditions=cond, guidance=args.guidance if cond else 1.0)

    stage("sample", sample)
    stage("evaluate", lambda: evaluate(data, report, eval_cfg, autoencoder=ae_run,
                                       samples=sorted(p for p in samples.iterdir() if p.is_dir())))
    result = summarise(json.loads((report / "report.json").read_text()), state, args)
    write_json(out / "quality.json", result)
    return result


def summarise(report: dict[str, Any], state: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """quality.json: the fixed keys independent checks read, from the evaluation report."""
    rec, gen = report["reconstruction"], report["generation"]
    plaus, mem = gen["plausibility"], gen["memorisation"]
    result = {
        "autoencoder": {"test_ssim": rec["ssim"]["mean"], "test_psnr": rec["psnr"]["mean"],
                        "test_ms_ssim": rec["ms_ssim"]["mean"]},
        "samples": {"n": gen["num_samples"], "plausible": plaus["plausible"], "memorised": len(mem["flagged"]),
                    "diversity_ms_ssim": gen["synthetic"]["ms_ssim_mean"],
                    "plausible_diversity_ms_ssim": (gen.get("synthetic_plausible") or {}).get("ms_ssim_mean") if
                    plaus["plausible"] < gen["num_samples"] else gen["synthetic"]["ms_ssim_mean"],
                    "implausible": [{"file": e["file"], "reasons": e["reasons"]} for e in plaus["synthetic"]
                                    if not e["plausible"]]},
        "real": {"n": report["test_volumes"], "diversity_ms_ssim": (gen["real_test"] or {}).get("ms_ssim_mean"),
                 "plausible": plaus["real_test_plausible"]},
        "morphometry": {m: {k: v for k, v in d.items() if k in ("synthetic_vs_test", "train_vs_test",
                                                                 "synthetic_vs_reconstructed", "reconstructed_vs_test",
                                                                 "unit")}
                        for m, d in gen["morphometry"]["distances"].items()},
        "minutes": {**{k: round(v, 2) for k, v in state["minutes"].items()},
                    "total": round(sum(state["minutes"].values()), 2)},
        "machine": machine(), "versions": versions(),
        "settings": {"num": args.num, "seed": args.seed, "guidance": args.guidance, "steps": args.steps,
                     "sampler": args.sampler or "the model's default", "autoencoder_run": state.get("autoencoder_run"),
                     "minutes_autoencoder": args.minutes_autoencoder, "minutes_diffusion": args.minutes_diffusion},
        "report": str((Path(args.out) / "report" / "report.md").resolve()),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a medldm dataset dir (configs/preprocess/small.yaml)")
    p.add_argument("--out", required=True, help="where the runs, samples, report/ and quality.json go")
    p.add_argument("--minutes-autoencoder", type=float, help="time limit of the autoencoder training")
    p.add_argument("--minutes-diffusion", type=float, help="time limit of the diffusion training")
    p.add_argument("--num", type=int, default=16, help="synthetic volumes to sample (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of conditioned samples")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "rflow"), help="default: the model's (as medldm sample)")
    p.add_argument("--steps", type=int, help="sampling steps (default: medldm sample's, 50 DDIM, 10 rflow)")
    p.add_argument("--autoencoder", help="a trained autoencoder run to use instead of training one")
    p.add_argument("--redo", choices=STAGES[3:], help="rerun from this stage on the trained models")
    p.add_argument("--autoencoder-config", default=str(ROOT / "configs/autoencoder/small.yaml"))
    p.add_argument("--diffusion-config", default=str(ROOT / "configs/diffusion/small.yaml"))
    p.add_argument("--evaluate-config", default=str(ROOT / "configs/evaluate/small.yaml"))
    p.add_argument("--set-autoencoder", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--set-diffusion", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    result = run(args)
    s = result["samples"]
    print(json.dumps({k: result[k] for k in ("autoencoder", "minutes")}, indent=1))
    print(f"plausible {s['plausible']} of {s['n']}, memorised {s['memorised']} of {s['n']}; "
          f"diversity MS-SSIM {s['diversity_ms_ssim']:.3f} (real {result['real']['diversity_ms_ssim']})")
    print(f"quality.json and report/ in {args.out}")


if __name__ == "__main__":
    main()
