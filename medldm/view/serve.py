"""``medldm view --serve``: the folder over http on this machine only, for a browser that cannot open its files
(a cluster node reached through ``ssh -L``); a served page also shows volumes past ``--max-volumes`` from their
files.

127.0.0.1 keeps other machines out, but not other users of a shared node. The folder is therefore served under
a random path (``/<token>/``) printed only to the user who started the server: any other path is 404, so a
neighbour who finds the port cannot list or read the scans."""

from __future__ import annotations

import functools
import http.server
import secrets
from http import HTTPStatus
from pathlib import Path
from typing import Any


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, token: str, **kwargs: Any) -> None:
        self.prefix = f"/{token}/"  # set before the base class, which handles the request in __init__
        super().__init__(*args, **kwargs)

    def send_head(self) -> Any:  # GET and HEAD: a path without the token is not found, whatever it names
        if not self.path.startswith(self.prefix):
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        return super().send_head()

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.removeprefix(self.prefix[:-1]))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per volume request is noise; errors still reach the browser


def serve(folder: str | Path, port: int = 8765) -> None:
    """Serve ``folder`` on 127.0.0.1:``port`` (0: a free port) under a random path until Ctrl-C; nothing outside
    the folder, and nothing without the path, is reachable."""
    token = secrets.token_urlsafe(18)
    handler = functools.partial(_Handler, token=token, directory=str(Path(folder).resolve()))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        port = server.server_address[1]
        print(f"serving {folder} at http://127.0.0.1:{port}/{token}/ (from another machine: ssh -L "
              f"{port}:127.0.0.1:{port} HOST, then open that address; the random path keeps other users of this "
              "machine out); Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
