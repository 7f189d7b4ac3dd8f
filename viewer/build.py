"""Copy the pinned NiiVue build into medldm/view/assets (run by `make viewer`, after `npm ci --prefix viewer`).

The assets are committed, so a pip install needs no Node.js; NIIVUE.json records what was copied (version, sha256,
the lockfile's integrity hash) and tests/test_view.py checks the committed file against it and the lockfile."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HERE = Path(__file__).parent
ASSETS = HERE.parent / "medldm" / "view" / "assets"
PACKAGE = "node_modules/@niivue/niivue"
# NiiVue's one-file browser build: a classic script that defines window.niivue, which a page opened from file://
# can load (an ES module with bare imports needs a bundler or a server)
BUILD = "dist/niivue.umd.js"


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (an interrupted build leaves the committed asset as it was)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main() -> None:
    lock = json.loads((HERE / "package-lock.json").read_text())["packages"]
    pinned = lock[PACKAGE]
    installed = json.loads((HERE / PACKAGE / "package.json").read_text())["version"]
    if installed != pinned["version"]:
        raise SystemExit(f"viewer/{PACKAGE} is {installed}, the lockfile pins {pinned['version']}: run npm ci")
    ASSETS.mkdir(parents=True, exist_ok=True)
    data = (HERE / PACKAGE / BUILD).read_bytes()
    _write(ASSETS / "niivue.umd.js", data)
    # NiiVue ships no licence file in its package: its BSD-2-Clause text is kept here, and the licences of the
    # packages its build bundles (the lockfile's runtime dependencies) follow it
    notices = [(HERE / "LICENSE-niivue.txt").read_text()]
    for key, entry in sorted(lock.items()):
        if not key or key == PACKAGE or entry.get("optional") or entry.get("dev"):
            continue
        folder = HERE / key
        texts = sorted(p for p in folder.iterdir() if p.name.lower().startswith(("license", "licence", "copying")))
        body = texts[0].read_text() if texts else f"(no licence file in the package; its package.json says " \
                                                     f"{entry.get('license')})\n"
        notices.append(f"{'=' * 78}\n{key.removeprefix('node_modules/')} {entry['version']} "
                       f"({entry.get('license')}), bundled in NiiVue's build\n{'=' * 78}\n{body}")
    _write(ASSETS / "LICENSE-niivue.txt", "\n".join(notices).encode())
    record = {"package": "@niivue/niivue", "version": pinned["version"], "license": pinned.get("license"),
              "file": BUILD, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "lockfile_integrity": pinned["integrity"]}
    _write(ASSETS / "NIIVUE.json", (json.dumps(record, indent=2) + "\n").encode())
    print(f"medldm/view/assets: NiiVue {record['version']} ({len(data) / 1e6:.1f} MB, sha256 {record['sha256'][:12]})")


if __name__ == "__main__":
    main()
