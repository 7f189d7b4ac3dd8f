"""One offline page per output folder (``DIR/index.html`` and ``DIR/view/``): what kind of folder it is, the page's
shell and assets, and the index page of a folder that holds several (a demo's output)."""

from __future__ import annotations

import filecmp
import html
import json
import logging
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medldm import __version__
from medldm.data.io import atomic_write, read_json, visible, write_text
from medldm.errors import InputError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
# copied into every page's view/ folder: a page folder can be moved, zipped or sent on its own
COPIED = ("niivue.umd.js", "LICENSE-niivue.txt", "NIIVUE.json", "page.js", "page.css")
PAGE = "index.html"
# the default cap on embedded volumes (flagged scans first): each is its uint8 NIfTI in base64, 0.1 to 8 MB
DEFAULT_MAX_VOLUMES = 200


def folder_kind(folder: Path) -> str | None:
    """"evaluation", "samples", "run" or "dataset" by the files each stage writes; None for any other folder."""
    if (folder / "report.json").is_file():
        return "evaluation"
    if (folder / "sampling.json").is_file() or visible(folder, "sample_*.json"):
        return "samples"  # before "dataset": samples written --as-dataset have a manifest.csv too
    if (folder / "config.yaml").is_file() and ((folder / "checkpoints").is_dir() or (folder / "tensorboard").is_dir()):
        return "run"
    if (folder / "manifest.csv").is_file() and (folder / "preprocess.json").is_file():
        return "dataset"
    return None


def write_page(folder: str | Path, max_volumes: int = DEFAULT_MAX_VOLUMES, data_dir: str | Path | None = None,
               compare: bool = True) -> list[Path]:
    """Write ``folder/index.html`` for a dataset, training run, samples or evaluation folder; for a folder that
    holds such folders (a demo's output), the page of each and an index of them. Returns the pages written.

    ``max_volumes``: volumes embedded for the 3D viewer per page (a dataset page shows every row; past the cap a
    scan opens only when the page is served). ``data_dir``: the dataset of a samples folder, when its
    autoencoder's checkpoint does not record it or it moved. ``compare``: find each sample's nearest training
    volume and a real test scan of its age (reads the training split once)."""
    from medldm.view import content

    folder = Path(folder)
    if max_volumes < 0:
        raise InputError(f"--max-volumes {max_volumes}: give 0 (no volume in the viewer) or more")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    kind = folder_kind(folder)
    if kind is None:
        children = [c for c in sorted(folder.iterdir()) if c.is_dir() and not c.name.startswith(".")
                    and c.name != "view" and folder_kind(c)]
        if not children:
            raise InputError(f"{folder}: not a medldm dataset, run, samples or evaluation folder (none of "
                             "manifest.csv + preprocess.json, config.yaml + checkpoints/, sampling.json, report.json), "
                             "and no such folder inside it")
        pages, entries = [], []
        for c in children:
            # one folder's page that cannot be written leaves the others and the index (which says so)
            written = write_page_quietly(c, max_volumes=max_volumes, data_dir=data_dir, compare=compare)
            pages += written
            if not written:
                entries.append({"href": "", "title": c.name, "kind": folder_kind(c),
                                "summary": f"no page (see the warning; retry with medldm view {c})"})
                continue
            summary = read_json(c / "view" / "summary.json")
            entries.append({"href": f"{quote(c.name)}/{PAGE}", "title": c.name, "kind": summary["kind"],
                            "summary": summary["summary"]})
        _write(folder, {"kind": "index", "title": f"medldm: {folder.resolve().name}",
                        "subtitle": f"{len(children)} pages", "index": {"pages": entries}, "volumes": {}})
        return [*pages, folder / PAGE]
    data = content.COLLECT[kind](folder, max_volumes=max_volumes, data_dir=data_dir, compare=compare)
    _write(folder, data)
    log.info("view: %s", folder / PAGE)
    return [folder / PAGE]


def write_page_quietly(folder: str | Path, **kwargs: Any) -> list[Path]:
    """``write_page`` at the end of a stage: a page that cannot be written is a warning, never the stage's failure
    (its results are on disk; ``medldm view`` makes the page later)."""
    try:
        return write_page(folder, **kwargs)
    except Exception as e:
        log.warning("the page of %s was not written (%s: %s); run `medldm view %s` to retry", folder,
                    type(e).__name__, e, folder)
        return []


def _finite(obj: Any) -> Any:
    """NaN and infinities (a score that could not be computed) as null: JSON has no NaN, and the page shows a blank."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write(folder: Path, data: dict[str, Any]) -> None:
    view = folder / "view"
    view.mkdir(exist_ok=True)
    for name in COPIED:
        if not (view / name).is_file() or not filecmp.cmp(ASSETS / name, view / name, shallow=False):
            with atomic_write(view / name) as tmp:
                shutil.copyfile(ASSETS / name, tmp)
    niivue = json.loads((ASSETS / "NIIVUE.json").read_text())
    data = {**data, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "medldm": __version__}
    write_text(view / "summary.json", json.dumps({"kind": data["kind"], "summary": data.get("subtitle", "")}) + "\n")
    # JSON inside <script>: "<" escaped, so no string in it can close the element
    embedded = json.dumps(_finite(data), allow_nan=False, default=str).replace("<", "\\u003c")
    write_text(folder / PAGE, f"""<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(data["title"])}</title>
<link rel="stylesheet" href="view/page.css">
<body>
<h1>{html.escape(data["title"])}</h1>
<p class="sub">{html.escape(data.get("subtitle", ""))}</p>
<noscript><p class="warning">This page needs JavaScript (it runs only the files in its view/ folder).</p></noscript>
<div id="main"></div>
<footer>Written by medldm {html.escape(__version__)} at {data["generated"]}. Everything on this page is in this folder
(index.html and view/); nothing is fetched from a network. 3D viewer: <a href="https://niivue.com">NiiVue</a>
{html.escape(niivue["version"])} ({html.escape(niivue["license"])}, <a href="view/LICENSE-niivue.txt">licence</a>).
Volumes in the viewer are 8-bit copies with the original grid and affine; the files themselves are unchanged.</footer>
<script id="medldm-data" type="application/json">{embedded}</script>
<script src="view/niivue.umd.js"></script>
<script src="view/page.js"></script>
</body>
</html>
""")
