"""Every file medldm writes is whole or absent: a writer killed or failing halfway leaves no truncated file, the
old content (if any) stays, and a rerun recovers and removes what the killed writer left."""

from __future__ import annotations

import ast
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

import medldm
from medldm.config import load_config
from medldm.data.io import save_volume, visible

# a writer slow enough to be killed in the middle: ~100 MB of float32 through gzip
SLOW_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from medldm.data.io import save_volume
    volume = np.random.default_rng(0).random((300, 300, 300), dtype=np.float32)
    print("writing", flush=True)
    save_volume(sys.argv[1], volume, np.eye(4))
    print("done", flush=True)
""")


def _kill_while_writing(path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    # wait until the temporary file has bytes in it: the kill lands in the middle of the write
    for _ in range(600):
        temps = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
        if temps and temps[0].stat().st_size > 0:
            break
        proc.poll()
        assert proc.returncode is None, "the writer finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout.read() == ""  # it never finished


def test_a_writer_killed_mid_write_keeps_the_old_file_and_the_rerun_cleans_up(tmp_path):
    path = tmp_path / "vol.nii.gz"
    old = np.full((4, 4, 4), 0.5, np.float32)
    save_volume(path, old, np.eye(4))
    _kill_while_writing(path)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), old)  # the old file, whole
    left = [p for p in tmp_path.iterdir() if p.name != path.name]
    assert len(left) == 1 and left[0].name.startswith(".")  # the killed writer's hidden half-file
    assert visible(tmp_path, "*.nii.gz") == [path]  # never listed as an output
    # the rerun: a new process, writing the file again (another file into the same folder would do as well)
    subprocess.run([sys.executable, "-c", "import sys, numpy as np; from medldm.data.io import save_volume; "
                    "save_volume(sys.argv[1], np.full((4, 4, 4), 0.25, np.float32), np.eye(4))", str(path)],
                   check=True)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.full((4, 4, 4), 0.25, np.float32))
    assert list(tmp_path.iterdir()) == [path]  # and what the dead writer left is gone


def test_a_first_write_killed_midway_leaves_no_file(tmp_path):
    path = tmp_path / "new.nii.gz"
    _kill_while_writing(path)
    assert not path.exists()


def test_a_preprocessing_whose_qc_picture_fails_halfway_recovers_on_rerun(raw_adni, tmp_path, monkeypatch):
    from medldm import viz
    from medldm.data import preprocess

    real = viz.iio.imwrite
    calls = {"n": 0}

    def disk_fills(path, image, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the third QC picture: half of it reaches the disk, then the disk is full
            Path(path).write_bytes(b"\x89PNG\r\n\x1a\nhalf")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, image, **kw)

    monkeypatch.setattr(viz.iio, "imwrite", disk_fills)
    out = tmp_path / "data"
    cfg = load_config("preprocess", None, ["split.val_fraction=0.2", "split.test_fraction=0.3"])
    info = preprocess.preprocess_dataset(raw_adni, out, cfg, workers=1)
    # that scan failed alone, and its error names its picture, not the temporary the half went to
    assert len(info["failures"]) == 1, info["failures"]
    error = info["failures"][0]["error"]
    assert "No space left" in error and "/qc/scans/" in error and "/." not in error.split("qc/scans")[1]
    for png in out.rglob("*.png"):
        iio.imread(png)  # every picture there is whole
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no half-written temporary either
    monkeypatch.setattr(viz.iio, "imwrite", real)
    info = preprocess.preprocess_dataset(raw_adni, out, cfg, workers=1)
    assert not info["failures"]
    pngs = sorted((out / "qc" / "scans").glob("*.png"))
    assert len(pngs) == info["num_scans"]
    for png in pngs:
        iio.imread(png)
    assert all(f'src="scans/{p.name}"' in (out / "qc" / "index.html").read_text(encoding="utf-8") for p in pngs)


# calls that write a file; where one may write without atomic_write, the reason
WRITES = {"savefig", "imwrite", "imsave", "write_text", "write_bytes", "save", "to_csv", "tofile", "WriteImage"}
ALLOWED = {
    # written into a staging folder that export_model moves in only after every check passed
    ("inference/model_export.py", "_export"),
}


def _writes_outside_atomic_write(tree: ast.AST, rel: str) -> list[str]:
    found = []

    def visit(node: ast.AST, inside: bool, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.With):
            if any(isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id",
                   getattr(item.context_expr.func, "attr", None)) == "atomic_write" for item in node.items):
                inside = True
        if isinstance(node, ast.Call) and not inside and (rel, function) not in ALLOWED:
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            # open(path, mode) or path.open(mode)
            at = 0 if isinstance(node.func, ast.Attribute) else 1
            mode = node.args[at] if len(node.args) > at else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                   None)
            opens_for_writing = (name == "open" and isinstance(mode, ast.Constant) and isinstance(mode.value, str)
                                 and set(mode.value) & set("wax"))
            # a method call (path.write_text, fig.savefig, nib.save); a plain name is medldm's own atomic writer
            if (name in WRITES and isinstance(node.func, ast.Attribute)) or opens_for_writing:
                found.append(f"{rel}:{node.lineno} {name}() in {function}")
        for child in ast.iter_child_nodes(node):
            visit(child, inside, function)

    visit(tree, False, "<module>")
    return found


def test_every_file_medldm_writes_goes_through_the_atomic_writer():
    package = Path(medldm.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        found += _writes_outside_atomic_write(ast.parse(path.read_text(encoding="utf-8")), rel)
    assert found == []


def test_the_atomic_writer_check_finds_a_plain_write():
    tree = ast.parse("def f(p, fig):\n    p.write_text('x')\n    with open(p, 'w') as f:\n        pass\n"
                     "    with p.open('w', newline='') as f:\n        pass\n"
                     "    with atomic_write(p) as t:\n        fig.savefig(t)\n    p.open().read()\n")
    assert _writes_outside_atomic_write(tree, "x.py") == ["x.py:2 write_text() in f", "x.py:3 open() in f",
                                                          "x.py:5 open() in f"]


@pytest.mark.parametrize("fault", ["crash", "disk_full"])
def test_every_writer_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch, fault):
    import torch

    from medldm.artifacts import save_checkpoint
    from medldm.data import io
    from medldm.viz import save_figure, save_png

    def figure(value):
        from matplotlib.figure import Figure

        fig = Figure()
        fig.add_subplot().plot([0, value])
        return fig

    writers = {
        "a.json": (lambda p, v: io.write_json(p, {"v": v}), lambda p: p.read_text()),
        "a.csv": (lambda p, v: io.write_csv(p, ["v"], [{"v": v}]), lambda p: p.read_text()),
        "a.md": (lambda p, v: io.write_text(p, str(v)), lambda p: p.read_text()),
        "a.nii.gz": (lambda p, v: save_volume(p, np.full((3, 3, 3), v / 10, np.float32), np.eye(4)),
                     lambda p: np.asarray(nib.load(p).dataobj).tolist()),
        "a.png": (lambda p, v: save_png(p, np.full((8, 8), v, np.uint8)), lambda p: iio.imread(p).tolist()),
        "b.png": (lambda p, v: save_figure(figure(v), p), lambda p: p.read_bytes()),
        "a.pt": (lambda p, v: save_checkpoint(p, {"v": torch.tensor(v)}),
                 lambda p: torch.load(p, weights_only=True)["v"].item()),
    }
    real_replace = os.replace
    for name, (write, read) in writers.items():
        path = tmp_path / name
        write(path, 1)
        before = read(path)
        if fault == "crash":  # everything written, then the process dies before the rename
            monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        else:  # the disk fills during the rename
            monkeypatch.setattr(io.os, "replace", lambda s, d: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), s)))
        with pytest.raises((KeyboardInterrupt, OSError)) as caught:
            write(path, 2)
        if fault == "disk_full":
            assert caught.value.filename == str(path)  # the error names the file asked for, not the temporary
        monkeypatch.setattr(io.os, "replace", real_replace)
        assert read(path) == before, name
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n in writers if (tmp_path / n).exists())


def test_a_checkpoint_on_a_full_disk_is_a_named_os_error_and_the_old_one_stays(tmp_path, monkeypatch):
    import builtins

    import torch

    from medldm import artifacts as checkpoint
    from medldm.cli import user_message

    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint(path, {"step": 1})
    real_open = builtins.open
    # every write of the checkpoint's bytes hits a full disk (Linux's /dev/full), as torch's writer meets it
    monkeypatch.setattr(checkpoint, "open", lambda p, mode="r": real_open("/dev/full", mode), raising=False)
    with pytest.raises(OSError) as caught:
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(100_000)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert "disk is full" in user_message(caught.value, "train") and str(path) in user_message(caught.value, "train")
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]
