"""Drive the `medldm` command through every stage at tiny size, as a user would."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib

from medldm.cli import build_parser, main

from .conftest import train_age_range


def test_every_stage_through_the_cli(tmp_path, capsys):
    raw, data, ae, ldm, samples, report = (tmp_path / n for n in ("raw", "data", "ae", "ldm", "samples", "report"))
    fast = ["--set", "train.steps=4", "--set", "train.val_every=2"]
    assert main(["phantoms", str(raw), "--num", "6", "--layout", "flat", "--seed", "1"]) == 0
    assert main(["preprocess", str(raw), str(data), "--set", "split.test_fraction=0.34"]) == 0
    assert main(["train", "autoencoder", "--data", str(data), "--run-dir", str(ae), *fast]) == 0
    assert main(["encode", "--data", str(data), "--autoencoder", str(ae)]) == 0
    # the old spelling --run still works where no launcher reads the command line first
    assert main(["train", "diffusion", "--data", str(data), "--autoencoder", str(ae), "--run", str(ldm), *fast]) == 0
    age = min(train_age_range(data))
    assert main(["sample", "--run", str(ldm), "--out", str(samples), "--num", "2", "--steps", "3",
                 "--condition", f"age={age}", "sex=M", "--guidance", "1.5"]) == 0
    assert main(["evaluate", "--data", str(data), "--out", str(report), "--autoencoder", str(ae),
                 "--samples", str(samples)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 synthetic volumes" in printed and "report.md" in printed
    for folder in (data, ae, ldm, samples, report):  # each stage ends with its folder's page
        assert f"page: {folder / 'index.html'}" in printed and (folder / "view" / "niivue.umd.js").is_file()
    assert (json.loads((samples / "sample_0000.json").read_text(encoding="utf-8"))["conditions"]
            == {"age": age, "sex": "M"})
    again = ["sample", "--run", str(ldm), "--out", str(samples), "--num", "1", "--steps", "2"]
    assert main(again) == 2 and "--overwrite to replace them" in capsys.readouterr().err
    assert main([*again, "--overwrite", "--format", "both", "--dtype", "float32", "--eager"]) == 0
    assert (samples / "sample_0000_dicom").is_dir() and not (samples / "sample_0001.nii.gz").exists()
    assert "sample_0001" not in (samples / "index.html").read_text(encoding="utf-8")  # the page was redone
    assert nib.load(samples / "sample_0000.nii.gz").get_data_dtype() == "float32"
    assert json.loads((samples / "sample_0000.json").read_text(encoding="utf-8"))["speed"] == "eager"
    assert nib.load(samples / "sample_0000.nii.gz").shape == (32, 32, 32)
    assert json.loads((report / "report.json").read_text(encoding="utf-8"))["reconstruction"]["ssim"]["n"] >= 2
    for run in (ae, ldm):
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest.pt").is_file()


def test_bad_input_gives_a_short_error_and_exit_code_2(tmp_path, capsys):
    assert main(["train", "autoencoder", "--data", str(tmp_path), "--run", str(tmp_path / "r")]) == 2
    assert "preprocess.json not found" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path), str(tmp_path / "o"), "--set", "train.steps=3"]) == 2
    assert "unknown key(s) ['train']" in capsys.readouterr().err


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _listed(help_text: str) -> list[str]:
    """The subcommands a --help lists with their help line (argparse indents each by 4; a subcommand added without
    help appears only inside the {a,b,...} choices)."""
    return re.findall(r"^    (\S+)", help_text.split("positional arguments:")[1], re.MULTILINE)


def test_console_script_lists_every_subcommand():
    # the package is pip-installed (make test does it), so the script sits beside this interpreter
    exe = str(Path(sys.executable).with_name("medldm"))

    def help_of(*words: str) -> str:
        done = subprocess.run([exe, *words, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"medldm {' '.join(words)} --help exited {done.returncode}: {done.stderr[-2000:]}"
        assert done.stdout.startswith(f"usage: {' '.join(['medldm', *words])}")
        return done.stdout

    commands = _subcommands(build_parser())
    assert {"phantoms", "preprocess", "train", "encode", "sample", "evaluate", "demo"} <= set(commands)
    assert _listed(help_of()) == list(commands)  # every one, with its help line, in the parser's order
    for name, parser in commands.items():
        shown = help_of(name)
        if name == "train":
            stages = _subcommands(parser)
            assert _listed(shown) == list(stages) == ["autoencoder", "diffusion"]
            for stage in stages:
                help_of(name, stage)
