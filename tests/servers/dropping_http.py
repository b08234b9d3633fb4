"""A file server that drops connections mid-file, run as its own process by the remote tests.

``python tests/servers/dropping_http.py DIR --log FILE [--drop-first N]``: serves DIR over
HTTP/1.1 on a free loopback port (printed on stdout); every GET of a ``.tar`` file sends the
full ``Content-Length`` header, then half the bytes, then closes the socket, for the first N
requests of each path (default: all of them). Each request is one line in FILE.

Why not nginx: killing nginx mid-transfer depends on timing (the shard may already be in the
socket buffers), while this server drops at a known byte on every try, so a test can count
the client's tries.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import os
import sys
import threading
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--drop-first", type=int, default=sys.maxsize)
    args = p.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, directory=str(args.dir), **kw)

        def log_message(self, fmt: str, *a) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                counts[self.path] += 1
                n = counts[self.path]
                with open(args.log, "a") as f:
                    f.write(f"GET {self.path}\n")
            local = args.dir / self.path.lstrip("/").split("?")[0]
            if not (self.path.endswith(".tar") and local.is_file() and n <= args.drop_first):
                return super().do_GET()
            data = local.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

        def do_HEAD(self) -> None:  # noqa: N802
            return super().do_HEAD()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
