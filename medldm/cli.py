"""The `medldm` command: parses arguments and calls one typed function per subcommand (imports are lazy)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from pathlib import Path

from medldm.errors import InputError, UserError


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{flag} {item!r}: expected key=value, e.g. {flag} age=70")
        out[key.strip()] = value.strip()
    return out


def _add_page_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-page", action="store_true", help="do not write the output folder's web page (index.html; "
                                                          "medldm view writes it later)")


def _page(args: argparse.Namespace, folder: Path) -> None:
    """The output folder's page at the end of a stage (a warning, never the stage's failure, when it cannot be
    written); under torchrun only rank 0 writes it."""
    if getattr(args, "no_page", False) or os.environ.get("RANK", "0") != "0":
        return
    from medldm.view import write_page_quietly

    for page in write_page_quietly(folder):
        print(f"page: {page}")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the tiny CPU config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=1000 (repeatable)")


def _usable_cores() -> int:
    # the cores this process may run on (a SLURM or cgroup allotment), not the machine's
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _add_run_dir_arg(p: argparse.ArgumentParser, what: str) -> None:
    # --run-dir, because torchrun reads any --run... in the whole command line as an abbreviation of its own
    # --run-path ("ambiguous option"); the old --run still works where no launcher parses the line first
    p.add_argument("--run-dir", "--run", dest="run", type=Path, required=True, metavar="RUN_DIR", help=what)


def _add_patient_args(p: argparse.ArgumentParser, refine: bool = True) -> None:
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help="the diffusion run")
    p.add_argument("--labels", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="the scan's own labels (default: its row in the training dataset's manifest.csv)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the whole schedule (default 50)")
    if refine:
        p.add_argument("--refine", type=int, default=2, help="fixed-point iterations per inversion step (default "
                       "2; 0 is plain DDIM inversion)")
    p.add_argument("--autoencoder", type=Path, help="AE run dir when the runs were moved since training")
    _add_device_arg(p)


def _patient(args: argparse.Namespace) -> None:
    from medldm.inference import patient

    common = {"labels": _key_values(args.labels, "--labels"), "steps": args.steps,
              "autoencoder_run": args.autoencoder, "device": args.device}
    if args.command == "invert":
        r = patient.invert_scan(args.input, args.output, args.run, refine=args.refine, **common)
        trip = r["round_trip"]
        print(f"wrote {args.output}: round trip latent error {trip['latent_relative_error']:.2e}, SSIM "
              f"{trip['ssim_vs_reconstruction']:.4f} against the autoencoder's reconstruction")
    elif args.command == "counterfactual":
        r = patient.counterfactual_scan(args.input, args.output, args.run, _key_values(args.condition, "--condition"),
                                        guidance=args.guidance, refine=args.refine, strength=args.strength,
                                        native=args.native, **common)
        change = r["morphometry"]["change"]
        print(f"wrote {args.output} (a model's guess, not a prognosis): ventricles {change.get('ventricle_ml', 0):+.1f}"
              f" ml, brain {change.get('brain_ml', 0):+.1f} ml against the reconstruction under its own labels")
    else:
        r = patient.anomaly_scan(args.input, args.output, args.run, strength=args.strength, seeds=args.seeds,
                                 sigma=args.sigma, **common)
        print(f"wrote {args.output}: anomaly score {r['score']:.4f} (the map's maximum in the brain) at voxel "
              f"{r['peak_voxel']}")


def _add_init_from_arg(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--init-from", type=Path, metavar="RUN_OR_BUNDLE",
                   help=f"start a new run from the weights of a {stage} run (best.pt, else latest.pt), a checkpoint, "
                        "or a MONAI bundle folder (imported on first use): fresh optimiser, "
                        "train.finetune_warmup_steps of warm-up, train.trainable freezes the rest (docs/training.md)")


def _init_from(path: Path | None) -> Path | None:
    """--init-from as the training functions take it: a MONAI bundle folder is imported (once, as `medldm sample
    --run BUNDLE` does) and stands for the folder of its import, which holds both runs."""
    if path is None:
        return None
    from medldm.inference.bundle import imported_diffusion_run, is_bundle

    return imported_diffusion_run(path).parent if is_bundle(path) else path


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when there is one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medldm", description="3D brain-MRI latent diffusion toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="write synthetic T1 head phantoms (ADNI-like tree or flat folder)")
    p.add_argument("out_dir", type=Path, help="folder to write the phantoms and their labels CSV into")
    p.add_argument("--num", type=int, default=16, help="number of subjects (default 16)")
    p.add_argument("--layout", choices=("adni", "flat"), default="adni",
                   help="adni: an ADNI download tree with an IDA CSV (default); flat: NIfTI files + participants.csv")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms' anatomy (default 0)")

    p = sub.add_parser("preprocess", help="discover, preprocess and split scans into a dataset dir")
    p.add_argument("input_dir", type=Path,
                   help="an ADNI download (the folder holding ADNI/) or a folder of NIfTI files")
    p.add_argument("output_dir", type=Path, help="the dataset dir to write (or to resume into)")
    p.add_argument("--metadata", type=Path, help="IDA collection CSV or flat-layout CSV (default: found in INPUT_DIR)")
    p.add_argument("--adnimerge", type=Path, help="ADNIMERGE.csv for age at scan, sex and diagnosis per visit")
    p.add_argument("--workers", type=int, help="scans preprocessed in parallel, one core each (default: one per core "
                                               "this process may use)")
    p.add_argument("--shard", metavar="I/N", help="preprocess only the I-th of N deterministic shares of the scans "
                                                  "(1 <= I <= N; e.g. one SLURM array task each) and write only their "
                                                  "per-scan files; then run --assemble once")
    p.add_argument("--assemble", action="store_true",
                   help="preprocess nothing: build manifest, splits, failures and QC from the per-scan results the "
                        "shards wrote (an error lists scans without one)")
    _add_config_args(p)
    _add_page_arg(p)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="stage", required=True)
    p = train.add_parser("autoencoder", help="stage 1: KL autoencoder")
    p.add_argument("--data", type=Path, required=True, help="dataset dir written by medldm preprocess")
    _add_run_dir_arg(p, "the autoencoder run dir to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest.pt (it "
                                                          "records its --init-from; one given too must be the same)")
    _add_init_from_arg(p, "autoencoder")
    _add_config_args(p)
    _add_page_arg(p)
    p = train.add_parser("diffusion", help="stage 2: latent diffusion UNet")
    p.add_argument("--data", type=Path, required=True, help="dataset dir written by medldm preprocess")
    p.add_argument("--autoencoder", type=Path, required=True,
                   help="the autoencoder run (encoded with medldm encode) whose latents the UNet learns")
    _add_run_dir_arg(p, "the diffusion run dir to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest.pt (it "
                                                          "records its --init-from; one given too must be the same)")
    _add_init_from_arg(p, "diffusion")
    _add_config_args(p)
    _add_page_arg(p)

    p = sub.add_parser("encode", help="cache posterior means and the latent scale factor")
    p.add_argument("--data", type=Path, required=True, help="dataset dir written by medldm preprocess")
    p.add_argument("--autoencoder", type=Path, required=True, help="the trained autoencoder run; the latents are "
                                                                    "written to AE_RUN/latents/")
    p.add_argument("--batch-size", type=int, default=4, help="volumes encoded together (default 4)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")

    p = sub.add_parser("sample", help="sample synthetic volumes (DDIM or DDPM) and export NIfTI/DICOM + previews")
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help="diffusion run dir")
    p.add_argument("--out", type=Path, required=True, help="output folder (refused if it holds earlier samples, "
                                                            "unless --resume or --overwrite)")
    p.add_argument("--num", type=int, help="number of volumes (default 4, or every row of --conditions)")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "rflow"),
                   help="default: ddim (--steps) for a DDPM-trained model, rflow (Euler steps) for a rectified-flow "
                        "one; ddpm runs every training timestep")
    p.add_argument("--steps", type=int, help="sampling steps (default 50 for ddim, 10 for rflow)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i, whatever the batch size")
    p.add_argument("--batch-size", type=int, default=4, help="volumes denoised together (default 4; decoding is "
                                                              "always one volume at a time)")
    p.add_argument("--condition", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="e.g. --condition age=75 sex=F diagnosis=AD (within the training range; "
                        "conditions not given are unknown)")
    p.add_argument("--conditions", type=Path, metavar="FILE.csv",
                   help="one row per sample: columns among the model's conditions (age, sex, diagnosis, ...) and an "
                        "optional seed; an empty cell is an unknown condition")
    p.add_argument("--like", type=Path, metavar="DATASET",
                   help="draw each sample's conditions (jointly, every matching scan equally often) from a dataset's "
                        "manifest, so the synthetic cohort has its label distribution")
    p.add_argument("--split", default="train", help="with --like: the split to draw from (train, val, test or all; "
                                                    "default train)")
    p.add_argument("--where", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="with --like: keep scans with e.g. diagnosis=AD, diagnosis=AD,MCI or age=70:80")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out (killed or shorter) to --num: the same volumes an "
                        "uninterrupted run writes; give the first run's options again")
    p.add_argument("--as-dataset", action="store_true",
                   help="also write manifest.csv and preprocess.json: --out is then a medldm dataset (synthetic=1, a "
                        "split per sample) for evaluate, training or mixing with real data")
    p.add_argument("--format", dest="fmt", choices=("nifti", "dicom", "both"), default="nifti",
                   help="NIfTI .nii.gz (default), one DICOM series folder per volume, or both")
    p.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="NIfTI voxel type (default int16)")
    p.add_argument("--overwrite", action="store_true", help="replace the samples already in --out")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    p.add_argument("--autoencoder", type=Path, help="AE run dir (or checkpoint) when the runs were moved since "
                                                     "training; the file with the recorded SHA-256 is used")
    p.add_argument("--decode-device", help="where volumes are decoded (default: --device); cpu when the GPU is "
                                           "too small for one decode (10.4 GiB at 1 mm 160x224x160)")
    p.add_argument("--eager", action="store_true", help="no torch.compile and no CUDA graph (they cost a minute of "
                                                         "compilation on the first run; see the run's speed section)")
    _add_page_arg(p)

    p = sub.add_parser("import-bundle", help="a downloaded MONAI latent diffusion bundle (e.g. the brain-LDM) as "
                                             "medldm runs for sample and evaluate")
    p.add_argument("bundle_dir", type=Path, help="the bundle folder (configs/inference.json, models/*.pt)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/autoencoder, OUT/diffusion, OUT/bundle.json")
    p.add_argument("--age-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="ages (years) that the bundle's age 0 and 1 stand for (default 44 82, UK Biobank)")
    p.add_argument("--reference", type=Path, help="a NIfTI on the model's grid whose affine the samples get "
                                                  "(default: the affine the bundle's authors used)")
    p.add_argument("--overwrite", action="store_true", help="replace runs imported earlier into --out")

    p = sub.add_parser("export-model", help="the decoder and UNet of a run as TorchScript or ONNX, checked "
                                            "against PyTorch")
    p.add_argument("run", type=Path, help="a diffusion run (UNet + its decoder) or an autoencoder run (decoder)")
    p.add_argument("--format", dest="fmt", choices=("torchscript", "onnx"), default="torchscript",
                   help="torchscript (default) or onnx (needs the [onnx] extra)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/export)")
    p.add_argument("--autoencoder", type=Path, help="AE run dir when the runs were moved since training")

    p = sub.add_parser("reconstruct", help="one scan through the autoencoder (encode, decode), with a difference PNG")
    p.add_argument("input", type=Path,
                   help="a preprocessed volume, or a raw scan (preprocessed like the training data)")
    p.add_argument("output", type=Path, help="the reconstruction (.nii.gz), with OUT.png and OUT.json beside it")
    p.add_argument("--autoencoder", type=Path, required=True, help="the autoencoder run")
    p.add_argument("--native", action="store_true", help="resample the result onto the input scan's own grid")
    _add_device_arg(p)

    p = sub.add_parser("compress", help="one scan to its latent (posterior mean) file")
    p.add_argument("input", type=Path, help="a preprocessed volume, or a raw scan (NIfTI or DICOM folder)")
    p.add_argument("output", type=Path, help="e.g. scan.latent")
    p.add_argument("--autoencoder", type=Path, required=True, help="the autoencoder run")
    p.add_argument("--float16", action="store_true", help="store the latent in float16 (half the size)")
    _add_device_arg(p)

    p = sub.add_parser("decompress", help="a latent file back to a NIfTI volume, in the scan's space")
    p.add_argument("input", type=Path, help="a file written by medldm compress")
    p.add_argument("output", type=Path, help="the decoded volume (.nii.gz)")
    p.add_argument("--autoencoder", type=Path, help="the AE run, when it was moved since compressing")
    p.add_argument("--native", action="store_true", help="resample onto the original scan's own grid")
    _add_device_arg(p)

    p = sub.add_parser("denoise", help="SDEdit: noise a scan's latent to a strength, denoise it with a diffusion run")
    p.add_argument("input", type=Path, help="a preprocessed volume, or a raw scan (NIfTI or DICOM folder)")
    p.add_argument("output", type=Path, help="the denoised volume (.nii.gz), with OUT.png and OUT.json beside it")
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, help="the diffusion run")
    p.add_argument("--strength", type=float, default=0.3, help="0 = reconstruction only, 1 = a new sample")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the whole schedule (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the added noise (default 0)")
    p.add_argument("--condition", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="conditions of the denoising, as in medldm sample (e.g. age=70 sex=F)")
    p.add_argument("--native", action="store_true", help="resample the result onto the input scan's own grid")
    p.add_argument("--autoencoder", type=Path, help="AE run dir when the runs were moved since training")
    _add_device_arg(p)

    p = sub.add_parser("invert", help="DDIM / flow inversion of one scan's latent to the noise the model turns back "
                       "into it, with the round trip's error")
    p.add_argument("input", type=Path, help="a preprocessed volume, or a raw scan (NIfTI or DICOM folder)")
    p.add_argument("output", type=Path, help="the inversion file (e.g. scan.inv), with OUT.json beside it")
    _add_patient_args(p)

    p = sub.add_parser("counterfactual", help="one scan under other labels (older, another diagnosis): inverted "
                       "under its own labels, regenerated under the new ones; a model's guess, not a prognosis")
    p.add_argument("input", type=Path, help="a preprocessed volume, or a raw scan (NIfTI or DICOM folder)")
    p.add_argument("output", type=Path, help="the counterfactual volume (.nii.gz), with OUT.png and OUT.json")
    p.add_argument("--condition", action="extend", nargs="+", default=[], metavar="KEY=VALUE", required=True,
                   help="the labels to change, e.g. age=85 or diagnosis=AD")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of the regeneration "
                   "(default 1: none; above 1 exaggerates the change and loses some of the scan)")
    p.add_argument("--strength", type=float, default=1.0, help="how far towards noise to invert (default 1: the "
                   "whole way; lower keeps more of the scan and changes less)")
    p.add_argument("--native", action="store_true", help="resample the result onto the input scan's own grid")
    _add_patient_args(p)

    p = sub.add_parser("anomaly", help="a pseudo-healthy reconstruction of one scan and a map of where the scan "
                       "departs from it, with a score")
    p.add_argument("input", type=Path, help="a preprocessed volume, or a raw scan (NIfTI or DICOM folder)")
    p.add_argument("output", type=Path, help="a folder: pseudo_healthy.nii.gz, anomaly_map.nii.gz, anomaly.json, "
                   "anomaly.png")
    p.add_argument("--strength", type=float, default=0.4, help="noise level of the pseudo-healthy reconstruction "
                   "(default 0.4)")
    p.add_argument("--seeds", type=int, default=4, help="reconstructions averaged (default 4)")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing of the map in voxels (default 1)")
    _add_patient_args(p, refine=False)

    p = sub.add_parser("show-noising", help="a PNG of one scan under the model's forward (noising) process")
    p.add_argument("input", type=Path, help="a preprocessed volume, or a raw scan (NIfTI or DICOM folder)")
    p.add_argument("output", type=Path, help="the PNG")
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                   help="the diffusion run (its noise schedule and autoencoder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the added noise (default 0)")
    p.add_argument("--autoencoder", type=Path, help="AE run dir when the runs were moved since training")
    _add_device_arg(p)

    p = sub.add_parser("evaluate", help="SSIM/MS-SSIM/PSNR of reconstructions and diversity of samples")
    p.add_argument("--data", type=Path, required=True, help="dataset dir written by medldm preprocess")
    p.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md, pictures)")
    p.add_argument("--autoencoder", type=Path, help="autoencoder run: scores its reconstructions of the test split")
    p.add_argument("--samples", type=Path, nargs="+", help="one or more sample dirs (e.g. one per requested age)")
    _add_config_args(p)
    _add_page_arg(p)

    p = sub.add_parser("view", help="write a folder's offline web page (index.html: tables, curves, every volume in a "
                                    "3D viewer) and print its path; or serve it on this machine")
    p.add_argument("folder", type=Path, help="a dataset, training run, samples or evaluation folder, or a folder of "
                                             "them (a demo's output: each gets its page, and an index)")
    p.add_argument("--max-volumes", type=int, default=None, metavar="N",
                   help="volumes embedded per page for the 3D viewer, flagged scans first (default 200; each is an "
                        "8-bit copy, 0.1 to 8 MB); --serve shows the rest from their files")
    p.add_argument("--data", type=Path, help="the samples' dataset, when their autoencoder's checkpoint names none "
                                             "that exists (for their nearest training volumes and real scans)")
    p.add_argument("--no-compare", action="store_true", help="samples: no nearest training volume or real scan "
                                                             "beside each (reads the training split once)")
    p.add_argument("--serve", action="store_true", help="also serve the folder on http://127.0.0.1 (for a machine "
                                                       "reached over ssh: ssh -L PORT:127.0.0.1:PORT) until Ctrl-C")
    p.add_argument("--port", type=int, default=8765, help="--serve's port (default 8765; 0: any free port)")

    p = sub.add_parser("demo", help="the whole pipeline on generated phantoms with the tiny configs (CPU)")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--num", type=int, default=24, help="phantom subjects (default 24)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run one subcommand; returns the exit code (1 when a batch finished with failures)."""
    from medldm.config import load_config

    if args.command == "phantoms":
        from medldm.data.phantoms import write_phantoms

        csv_path = write_phantoms(args.out_dir, args.num, layout=args.layout, seed=args.seed)
        print(f"wrote {args.num} phantoms to {args.out_dir} (labels: {csv_path})")
    elif args.command == "preprocess":
        from medldm.data.preprocess import Shard, preprocess_dataset

        shard = Shard.parse(args.shard) if args.shard else None
        cfg = load_config("preprocess", args.config, args.overrides)
        info = preprocess_dataset(args.input_dir, args.output_dir, cfg, metadata=args.metadata,
                                  adnimerge=args.adnimerge, workers=args.workers or _usable_cores(), shard=shard,
                                  assemble=args.assemble)
        if shard is not None:
            print(f"shard {shard}: {info['num_scans']} of {info['of_scans']} scans -> {args.output_dir / 'images'} "
                  f"({info['resumed']} kept from an earlier run, {info['redone_changed']} redone because their source, "
                  f"config or template changed, {len(info['failures'])} failed); when every shard "
                  "has finished, run the same command with --assemble instead of --shard")
            return 1 if info["failures"] else 0
        print(f"{info['num_scans']} scans of {info['num_subjects']} subjects -> {args.output_dir} "
              f"(splits {info['splits']}; {info['resumed']} kept from an earlier run, {info['redone_changed']} redone "
              "because their source, config or template changed; "
              f"QC {info['qc']['pass']} pass, {info['qc']['warn']} warn, {info['qc']['fail']} fail "
              f"({info['splits']['excluded']} excluded): {args.output_dir / 'qc' / 'index.html'})")
        _page(args, args.output_dir)
        if info["failures"]:
            print(f"{len(info['failures'])} scan(s) failed: see {args.output_dir / 'failures.csv'}", file=sys.stderr)
            return 1
    elif args.command == "train" and args.stage == "autoencoder":
        from medldm.training.autoencoder import train_autoencoder

        cfg = load_config("autoencoder", args.config, args.overrides)
        latest = train_autoencoder(args.data, args.run, cfg, resume=args.resume, init_from=_init_from(args.init_from))
        print(f"checkpoint: {latest}")
        _page(args, args.run)
    elif args.command == "train" and args.stage == "diffusion":
        from medldm.training.diffusion import train_diffusion

        cfg = load_config("diffusion", args.config, args.overrides)
        latest = train_diffusion(args.data, args.autoencoder, args.run, cfg, resume=args.resume,
                                 init_from=_init_from(args.init_from))
        print(f"checkpoint: {latest}")
        _page(args, args.run)
    elif args.command == "encode":
        from medldm.inference.encode import encode_dataset

        print(f"latents: "
              f"{encode_dataset(args.data, args.autoencoder, batch_size=args.batch_size, num_workers=args.workers)}")
    elif args.command == "sample":
        from medldm.inference.cohort import Cohort
        from medldm.inference.sample import sample_run

        cohort = Cohort(condition=_key_values(args.condition, "--condition"), file=args.conditions, like=args.like,
                        split=args.split, where=_key_values(args.where, "--where"))
        paths = sample_run(args.run, args.out, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                           seed=args.seed, cohort=cohort, guidance=args.guidance, batch_size=args.batch_size,
                           fmt=args.fmt, dtype=args.dtype, overwrite=args.overwrite, device=args.device,
                           decode_device=args.decode_device, autoencoder_run=args.autoencoder, eager=args.eager,
                           resume=args.resume, as_dataset=args.as_dataset)
        volumes = f"{len(paths)} synthetic volume{'s' * (len(paths) != 1)}"
        print((f"{args.out} holds {volumes}" if args.resume else f"wrote {volumes} to {args.out}")
              + (" (a medldm dataset: manifest.csv)" if args.as_dataset else ""))
        _page(args, args.out)
    elif args.command == "import-bundle":
        from medldm.inference.bundle import DEFAULT_AGE_RANGE, import_bundle

        runs = import_bundle(args.bundle_dir, args.out, age_range=tuple(args.age_range or DEFAULT_AGE_RANGE),
                             reference_image=args.reference, overwrite=args.overwrite)
        print(f"imported: {runs['autoencoder']} and {runs['diffusion']} (see {args.out / 'bundle.json'}); sample "
              f"with: medldm sample --run {runs['diffusion']} --out SAMPLES --num 4 --condition age=70 sex=F")
    elif args.command == "export-model":
        from medldm.inference.model_export import export_model

        paths = export_model(args.run, args.fmt, args.out, autoencoder_run=args.autoencoder)
        print("exported: " + ", ".join(str(p) for p in paths))
    elif args.command == "reconstruct":
        from medldm.inference.scan import reconstruct_scan

        q = reconstruct_scan(args.input, args.output, args.autoencoder, native=args.native, device=args.device)
        print(f"{args.output}: SSIM {q['ssim']:.4f}, PSNR {q['psnr']:.2f} dB against the input")
    elif args.command == "compress":
        from medldm.inference.scan import compress_scan

        r = compress_scan(args.input, args.output, args.autoencoder, float16=args.float16, device=args.device)
        print(f"{args.output}: {r['latent_bytes'] / 1024:.1f} kB, {r['values_ratio']:.0f}x fewer values than the "
              f"volume, {r['float32_ratio']:.0f}x smaller than it in float32"
              + (f", {r['input_bytes'] / r['latent_bytes']:.0f}x smaller than {args.input.name}" if r["input_bytes"]
                 else "") + f"; round trip SSIM {r['ssim']:.4f}, PSNR {r['psnr']:.2f} dB")
    elif args.command == "decompress":
        from medldm.inference.scan import decompress_latent

        print(f"wrote {decompress_latent(args.input, args.output, args.autoencoder, args.native, args.device)}")
    elif args.command == "denoise":
        from medldm.inference.scan import denoise_scan

        out = denoise_scan(args.input, args.output, args.run, strength=args.strength, steps=args.steps, seed=args.seed,
                           conditions=_key_values(args.condition, "--condition"), native=args.native,
                           autoencoder_run=args.autoencoder, device=args.device)
        print(f"wrote {out}")
    elif args.command == "show-noising":
        from medldm.inference.scan import show_noising

        show_noising(args.input, args.output, args.run, seed=args.seed, autoencoder_run=args.autoencoder,
                     device=args.device)
        print(f"wrote {args.output}")
    elif args.command in ("invert", "counterfactual", "anomaly"):
        _patient(args)
    elif args.command == "evaluate":
        from medldm.evaluation.report import evaluate

        cfg = load_config("evaluate", args.config, args.overrides)
        evaluate(args.data, args.out, cfg, autoencoder=args.autoencoder, samples=args.samples)
        print(f"report: {args.out / 'report.md'}")
        _page(args, args.out)
    elif args.command == "view":
        from medldm.view import DEFAULT_MAX_VOLUMES, write_page

        pages = write_page(args.folder, max_volumes=args.max_volumes if args.max_volumes is not None
                           else DEFAULT_MAX_VOLUMES, data_dir=args.data, compare=not args.no_compare)
        for page in pages:
            print(f"page: {page}")
        if args.serve:
            from medldm.view.serve import serve

            serve(args.folder, args.port)
    elif args.command == "demo":
        from medldm.demo import run_demo

        run_demo(args.out, num=args.num)
    return 0


# what to change when a command runs out of memory, by subcommand (the rest: the general advice)
MEMORY_OPTIONS = {
    "sample": "--batch-size 1, --decode-device cpu (decoding needs the most memory), or a smaller model",
    "train": "a smaller train.batch_size or train.patch_size (--set), train.amp=true, or more processes (torchrun)",
    "encode": "--batch-size 1",
    "evaluate": "fewer --samples at a time, or run it on a machine with more memory",
}
# OSError numbers that are the machine's state, not a bug: the message says what to do
OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another folder (what was written is complete; rerun)",
    errno.EDQUOT: "the disk quota is used up: free space or choose another folder (rerun afterwards)",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.EACCES: "permission denied: choose another folder or change its permissions",
    errno.EPERM: "operation not permitted: choose another folder or change its permissions",
    errno.EISDIR: "is a folder: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "not found",
    errno.EEXIST: "already exists",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --workers",
}


def user_message(e: BaseException, command: str) -> str | None:
    """The one line a user gets for an error they can fix, or None for a bug in medldm (which keeps its traceback)."""
    import torch

    # torch.OutOfMemoryError from torch 2.5; torch.cuda's name for it exists in every supported version
    if isinstance(e, torch.cuda.OutOfMemoryError):
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        return f"out of GPU memory ({first}); use {MEMORY_OPTIONS.get(command, MEMORY_OPTIONS['evaluate'])}"
    if isinstance(e, MemoryError):
        return f"out of memory (RAM); use {MEMORY_OPTIONS.get(command, MEMORY_OPTIONS['evaluate'])}"
    if isinstance(e, UserError):
        return _worker_message(str(e))
    if isinstance(e, OSError) and e.errno in OS_FIXES:
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{OS_FIXES[e.errno]}" + (f" ({e.strerror})" if e.strerror else "")
    if isinstance(e, (FileNotFoundError, FileExistsError)):  # raised by medldm with a message that names the file
        return str(e)
    return None


def _worker_message(message: str) -> str:
    """A data-loading worker's error, which torch re-raises with the worker's whole traceback as its message, as
    the worker's own one-line message."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a batch finished with failures (listed), 2 an error the user can fix (one line on
    stderr naming the file or key; -v adds the stack), 3 a bug in medldm (the traceback, to report)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = args.command
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"medldm {command}: interrupted (every file written is complete; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # sorted into the user's errors and medldm's bugs; neither is swallowed
        message = user_message(e, command)
        if message is None:
            traceback.print_exc()
            print(f"medldm {command}: internal error ({type(e).__name__}): a bug in medldm, not in your input; "
                  "please report it with the traceback above", file=sys.stderr)
            return 3
        if args.verbose:
            traceback.print_exc()
        print(f"medldm {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
