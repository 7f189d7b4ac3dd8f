"""``medldm view --serve``: the folder over http on this machine only, for a browser that cannot open its files
(a cluster node reached through ``ssh -L``); a served page also shows volumes past ``--max-volumes`` from their
files."""

from __future__ import annotations

import functools
import http.server
from pathlib import Path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per volume request is noise; errors still reach the browser


def serve(folder: str | Path, port: int = 8765) -> None:
    """Serve ``folder`` on 127.0.0.1:``port`` (0: a free port) until Ctrl-C; nothing outside it is reachable."""
    handler = functools.partial(_Quiet, directory=str(Path(folder).resolve()))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        port = server.server_address[1]
        print(f"serving {folder} at http://127.0.0.1:{port}/ (from another machine: ssh -L {port}:127.0.0.1:{port} "
              "HOST, then open that address); Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
