"""The CLI's error policy, driven as a user meets it: a separate process running the `medldm` command.

An error the user can fix is one line on stderr naming the file, key or option, with exit code 2 (-v adds the
stack); a bug in medldm keeps its traceback and exits 3. Cases that need a fault the CPU machine cannot produce
(GPU memory, a full disk, a failed export check) inject it into the same process before the CLI runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.data.io import save_volume

from .conftest import edit_manifest

EXE = Path(sys.executable).with_name("medldm")

# runs several CLI invocations in one process (torch is imported once); each case may first enter mock.patch
# contexts through `stack`, which end before the next case
DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys
    from unittest import mock
    from medldm.cli import main
    cases = json.loads(open(sys.argv[1], encoding="utf-8").read())
    results = {}
    for name, case in cases.items():
        err = io.StringIO()
        with contextlib.ExitStack() as stack:
            exec(case["setup"], {"stack": stack, "mock": mock, "called": []})
            with contextlib.redirect_stderr(err):
                code = main(case["argv"])
        results[name] = {"code": code, "stderr": err.getvalue()}
    open(sys.argv[2], "w", encoding="utf-8").write(json.dumps(results))
""")


def medldm(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300)


def error_line(stderr: str, command: str) -> str:
    """The CLI's one-line message (log lines may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"medldm {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def assert_refused(code: int, stderr: str, command: str, *names: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    line = error_line(stderr, command)
    for name in names:
        assert name in line, (name, line)
    return line


@pytest.fixture(scope="module")
def copies(dataset, ae_run, ldm_run, tmp_path_factory):
    """Broken copies of the session's dataset and runs (the originals stay intact), one per case."""
    root = tmp_path_factory.mktemp("broken")

    def data(name: str) -> Path:
        return Path(shutil.copytree(dataset, root / name))

    out = {"root": root}
    out["no_session"] = data("no_session")
    edit_manifest(out["no_session"], lambda row: row.pop("session"))
    out["bad_age"] = data("bad_age")
    edit_manifest(out["bad_age"], lambda row: row.update(age="seventy") if row["split"] == "val" else None)
    out["bad_json"] = data("bad_json")
    (out["bad_json"] / "preprocess.json").write_text('{"config": {', encoding="utf-8")
    out["missing"] = data("missing")
    train_image = next(r for r in _rows(out["missing"]) if r["split"] == "train")["image"]
    (out["missing"] / train_image).unlink()
    out["missing_image"] = train_image
    out["truncated"] = data("truncated")
    image = out["truncated"] / train_image
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    out["truncated_image"] = train_image
    out["ae_copy"] = Path(shutil.copytree(ae_run, root / "ae_copy"))
    # checkpoints of an older layout: a diffusion run without latent_shape, an AE run without its optimiser
    out["old_ldm"] = Path(shutil.copytree(ldm_run, root / "old_ldm"))
    for ckpt in (out["old_ldm"] / "checkpoints").glob("*.pt"):
        state = torch.load(ckpt, weights_only=True)
        del state["latent_shape"]
        torch.save(state, ckpt)
    out["old_ae"] = Path(shutil.copytree(ae_run, root / "old_ae"))
    state = torch.load(out["old_ae"] / "checkpoints" / "latest.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, out["old_ae"] / "checkpoints" / "latest.pt")
    out["scan"] = dataset / next(r for r in _rows(dataset) if r["split"] == "test")["image"]
    out["latin1"] = data("latin1")
    manifest = out["latin1"] / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b"\n", "\né".encode("latin-1"), 1))  # a Latin-1 export
    # a latent of a scan that was registered when it was compressed
    from medldm.inference.scan import compress_scan

    out["registered_latent"] = root / "registered.latent"
    compress_scan(out["scan"], out["registered_latent"], ae_run)
    state = torch.load(out["registered_latent"], weights_only=True)
    state["source"]["registered"] = True
    torch.save(state, out["registered_latent"])
    # a raw "scan" preprocessing cannot take (3 voxels a side)
    out["tiny"] = root / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((3, 3, 3), dtype=np.float32) * 100, np.eye(4)),
             out["tiny"])
    # a raw scan (not on the model's grid) for --native
    out["raw"] = root / "raw.nii.gz"
    save_volume(out["raw"], np.random.default_rng(1).random((40, 36, 30), dtype=np.float32), np.diag([2, 2, 2, 1.0]))
    (root / "a_folder").mkdir()
    return out


def _rows(data_dir: Path) -> list[dict]:
    from medldm.data.dataset import read_manifest

    return read_manifest(data_dir)


@pytest.fixture(scope="module")
def results(copies, dataset, ae_run, ldm_run):
    """Every injected case run through the CLI in one subprocess."""
    c, root = copies, copies["root"]
    cases = {
        "bad_age": ("", ["train", "autoencoder", "--data", c["bad_age"], "--run-dir", root / "r_age"]),
        "bad_json": ("", ["train", "autoencoder", "--data", c["bad_json"], "--run-dir", root / "r_json"]),
        "missing": ("", ["train", "autoencoder", "--data", c["missing"], "--run-dir", root / "r_missing"]),
        "truncated_cached": ("", ["train", "autoencoder", "--data", c["truncated"], "--run-dir", root / "r_trunc"]),
        # encode reads lazily (nothing cached): the error comes from the data loader
        "truncated_lazy": ("", ["encode", "--data", c["truncated"], "--autoencoder", c["ae_copy"]]),
        # read in a worker process: torch re-raises its error with the worker's traceback as the message
        "truncated_worker": ("", ["encode", "--data", c["truncated"], "--autoencoder", c["ae_copy"], "--workers", "1"]),
        "not_utf8": ("", ["train", "autoencoder", "--data", c["latin1"], "--run-dir", root / "r_latin1"]),
        "native_decompress": (NATIVE_SETUP, ["decompress", c["registered_latent"], root / "n3.nii.gz", "--native"]),
        "nan_eta": ("", ["sample", "--run", ldm_run, "--out", root / "s_nan", "--eta", "nan"]),
        "other_kind": ("", ["sample", "--run", ae_run, "--out", root / "s_kind", "--num", "1", "--steps", "2"]),
        "old_layout": ("", ["sample", "--run", c["old_ldm"], "--out", root / "s_old", "--num", "1", "--steps", "2"]),
        "old_resume": ("", ["train", "autoencoder", "--data", dataset, "--run-dir", c["old_ae"], "--resume"]),
        "folder_output": ("", ["show-noising", c["scan"], root / "a_folder", "--run", ldm_run]),
        "raw_fails": ("", ["reconstruct", c["tiny"], root / "tiny_out.nii.gz", "--autoencoder", ae_run]),
        "native_reconstruct": (NATIVE_SETUP, ["reconstruct", c["raw"], root / "n1.nii.gz", "--autoencoder", ae_run,
                                              "--native"]),
        "native_denoise": (NATIVE_SETUP, ["denoise", c["raw"], root / "n2.nii.gz", "--run", ldm_run, "--native"]),
        "gpu_memory": (OOM_SETUP, ["sample", "--run", ldm_run, "--out", root / "s_oom", "--num", "1", "--steps", "2"]),
        "disk_full": (DISK_FULL_SETUP, ["reconstruct", c["scan"], root / "full" / "r.nii.gz", "--autoencoder",
                                        ae_run]),
        "no_permission": (PERMISSION_SETUP, ["evaluate", "--data", dataset, "--out", root / "locked" / "report",
                                             "--autoencoder", ae_run]),
        "export_check": (EXPORT_SETUP, ["export-model", ldm_run, "--out", root / "export"]),
        "bug": ("stack.enter_context(mock.patch('medldm.data.phantoms.write_phantoms', side_effect=ZeroDivisionError))",
                ["phantoms", root / "never"]),
    }
    spec = {name: {"setup": setup, "argv": [str(a) for a in argv]} for name, (setup, argv) in cases.items()}
    (root / "cases.json").write_text(json.dumps(spec), encoding="utf-8")
    subprocess.run([sys.executable, "-c", DRIVER, str(root / "cases.json"), str(root / "results.json")], check=True,
                   timeout=600, capture_output=True)
    return json.loads((root / "results.json").read_text(encoding="utf-8"))


# --native after registration: the dataset's preprocessing registered its scans; loading a model or preprocessing
# would be work done before the refusal, so they fail the case
NATIVE_SETUP = textwrap.dedent("""
    from pathlib import Path
    from medldm.config import PreprocessConfig
    cfg = PreprocessConfig(); cfg.registration.enabled = True
    stack.enter_context(mock.patch("medldm.inference.scan._dataset_preprocessing", return_value=(Path("d"), cfg)))
    # building a network is the first work: the refusal comes before it
    for name in ("AutoencoderCheckpoint.model", "DiffusionCheckpoint.unet"):
        stack.enter_context(mock.patch(f"medldm.artifacts.{name}", side_effect=AssertionError("work done")))
""")
OOM_SETUP = textwrap.dedent("""
    import torch
    stack.enter_context(mock.patch("medldm.inference.sample.sample_latents", side_effect=torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB")))
""")
# the disk fills while the volume is written: half a file reaches the temporary name, then ENOSPC
DISK_FULL_SETUP = textwrap.dedent("""
    import errno, os
    import nibabel
    def full(img, path):
        open(path, "wb").write(b"half a volume")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name
    stack.enter_context(mock.patch.object(nibabel, "save", side_effect=full))
""")
PERMISSION_SETUP = textwrap.dedent("""
    import errno, os, pathlib
    real = pathlib.Path.mkdir
    def mkdir(self, *a, **k):
        if "locked" in str(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)
    stack.enter_context(mock.patch.object(pathlib.Path, "mkdir", mkdir))
""")
EXPORT_SETUP = "stack.enter_context(mock.patch('medldm.inference.model_export._export', return_value=0.5))"


def test_a_manifest_without_its_session_column_is_one_line_with_exit_2_and_v_adds_the_stack(copies, tmp_path):
    data = copies["no_session"]
    r = medldm("train", "autoencoder", "--data", data, "--run-dir", tmp_path / "run")
    assert_refused(r.returncode, r.stderr, "train", str(data / "manifest.csv"), "session", "--assemble")
    assert not (tmp_path / "run").exists()
    r = medldm("-v", "train", "autoencoder", "--data", data, "--run-dir", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" in r.stderr and "InputError" in r.stderr
    error_line(r.stderr, "train")


def test_a_gpu_that_is_not_there_is_named(copies, ae_run, tmp_path):
    r = medldm("reconstruct", copies["scan"], tmp_path / "r.nii.gz", "--autoencoder", ae_run, "--device", "cuda:7")
    assert_refused(r.returncode, r.stderr, "reconstruct", "--device cuda:7")


def test_bad_values_in_the_dataset_are_named_with_the_file_and_the_fix(results, copies):
    r = results["bad_age"]
    assert_refused(r["code"], r["stderr"], "train", "manifest.csv line", "'seventy'", "leave it empty")
    r = results["bad_json"]
    assert_refused(r["code"], r["stderr"], "train", str(copies["bad_json"] / "preprocess.json"), "damaged JSON")
    r = results["not_utf8"]
    assert_refused(r["code"], r["stderr"], "train", str(copies["latin1"] / "manifest.csv"), "not UTF-8", "CSV UTF-8")
    r = results["nan_eta"]
    assert_refused(r["code"], r["stderr"], "sample", "--eta nan")


def test_a_missing_or_truncated_image_listed_in_the_manifest_is_named(results, copies):
    r = results["missing"]
    assert_refused(r["code"], r["stderr"], "train", copies["missing_image"], "not there", "medldm preprocess")
    for case, command in (("truncated_cached", "train"), ("truncated_lazy", "encode"), ("truncated_worker", "encode")):
        r = results[case]
        assert_refused(r["code"], r["stderr"], command, copies["truncated_image"], "cannot be read")


def test_a_checkpoint_of_another_kind_or_an_older_layout_is_refused_by_name(results, copies):
    r = results["other_kind"]
    assert_refused(r["code"], r["stderr"], "sample", "is not a diffusion checkpoint", "kind='autoencoder'")
    r = results["old_layout"]
    assert_refused(r["code"], r["stderr"], "sample", str(copies["old_ldm"] / "checkpoints"), "latent_shape")
    r = results["old_resume"]
    assert_refused(r["code"], r["stderr"], "train", "latest.pt", "'optimizer'", "without --resume")


def test_an_output_that_is_a_folder_and_a_raw_scan_preprocessing_cannot_take(results, copies):
    r = results["folder_output"]
    assert_refused(r["code"], r["stderr"], "show-noising", str(copies["root"] / "a_folder"), "is a folder")
    r = results["raw_fails"]
    assert_refused(r["code"], r["stderr"], "reconstruct", str(copies["tiny"]), "preprocessing", "failed")


def test_native_after_registration_is_refused_before_any_model_is_loaded(results, copies):
    for case, command in (("native_reconstruct", "reconstruct"), ("native_denoise", "denoise"),
                          ("native_decompress", "decompress")):
        r = results[case]
        assert_refused(r["code"], r["stderr"], command, "--native", "registered", "leave out --native")
    assert not list(copies["root"].glob("n[123].*"))


def test_resource_limits_suggest_the_fix_and_leave_no_half_file(results, copies):
    r = results["gpu_memory"]
    assert_refused(r["code"], r["stderr"], "sample", "out of GPU memory", "--decode-device cpu", "--batch-size 1")
    r = results["disk_full"]
    assert_refused(r["code"], r["stderr"], "reconstruct", str(copies["root"] / "full" / "r.nii.gz"), "disk is full")
    assert list((copies["root"] / "full").iterdir()) == []  # neither the volume nor its temporary half
    r = results["no_permission"]
    assert_refused(r["code"], r["stderr"], "evaluate", str(copies["root"] / "locked"), "permission denied")


def test_a_failed_export_check_writes_no_graph(results, copies):
    r = results["export_check"]
    assert_refused(r["code"], r["stderr"], "export-model", "differs from PyTorch", "nothing was written")
    assert list((copies["root"] / "export").iterdir()) == []  # no graph, no staging folder, no export.json


def test_a_bug_keeps_its_traceback_and_exit_3(results):
    r = results["bug"]
    assert r["code"] == 3
    assert "Traceback" in r["stderr"] and "ZeroDivisionError" in r["stderr"] and "a bug in medldm" in r["stderr"]


def test_a_non_finite_loss_stops_training_with_the_fix(dataset, tmp_path):
    r = medldm("train", "autoencoder", "--data", dataset, "--run-dir", tmp_path / "run", "--set", "train.lr=1e30",
               "--set", "train.steps=12", "--set", "train.log_every=1", "--set", "train.val_every=100")
    assert_refused(r.returncode, r.stderr, "train", "non-finite gradients", "lower train.lr")


def test_a_failed_cuda_graph_capture_says_to_sample_eager(monkeypatch):
    # GPU-only: the capture is faked on the CPU, the error type and message are what the CLI reports
    from contextlib import nullcontext

    from medldm.cli import user_message
    from medldm.inference import cuda_graphs as graphs

    class FailingGraph:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *a):
            return False

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in (("graph_pool_handle", lambda: None), ("Stream", Stream), ("current_stream", Stream),
                        ("stream", lambda s: nullcontext()), ("CUDAGraph", lambda: None), ("graph", FailingGraph)):
        monkeypatch.setattr(torch.cuda, name, value)
    unet = graphs.GraphedUNet(lambda x, timesteps, context: x, amp=False, warmup=0)
    with pytest.raises(Exception) as caught:
        unet(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, dtype=torch.long))
    message = user_message(caught.value, "sample")
    assert message is not None and "CUDA graph capture" in message and "--eager" in message
