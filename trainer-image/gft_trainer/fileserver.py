"""A short-lived file server over a volume: how the client (``gft``, ``kubectl gft``) reads a
run's folder from its output claim, and puts a local dataset on a claim.

The client starts it in a pod of its own, in the run's namespace, from the trainer's image (it
needs only the standard library), mounting the claim read-only (``--writable`` for an upload),
and reaches it through the API server's pod proxy with the user's own credentials; it deletes
the pod afterwards. The pod ends by itself after ``--idle-exit`` seconds without a request.

    python -m gft_trainer.fileserver --root /data [--writable] [--port 8080]

Every request but ``/healthz`` (the readiness probe) carries the token of ``GFT_FILES_TOKEN``
in ``X-Gft-Token``: anything else on the pod network that finds the pod reads and writes
nothing. Paths are checked to stay under the root: no ``..``, no absolute paths, and no
symbolic link is followed out of it (nor listed).

- ``GET /index?prefix=P``: ``{"files": [{"path", "size"}]}``, the regular files under P.
- ``GET /files/PATH``: the file's bytes. ``HEAD`` its size.
- ``PUT /files/PATH`` (``--writable``): the body, ``Content-Length`` bytes, written beside and
  renamed into place; with ``X-Gft-Sha256`` the digest must match or nothing is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN_ENV = "GFT_FILES_TOKEN"
TOKEN_HEADER = "X-Gft-Token"
SHA256_HEADER = "X-Gft-Sha256"
CHUNK = 1 << 20
MAX_PATH = 1024


class PathRefused(ValueError):
    pass


def safe_relative(path: str) -> str:
    """``path`` as a relative path of plain segments; refused when it could leave the root."""
    if not path or len(path) > MAX_PATH or "\0" in path or "\\" in path or path.startswith("/"):
        raise PathRefused(f"{path[:80]!r}: not a relative path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathRefused(f"{path[:80]!r}: empty, '.' or '..' segments")
    return "/".join(parts)


def inside(root: Path, relative: str) -> Path:
    """The file at ``relative`` under ``root``, with every link resolved; refused outside."""
    target = (root / safe_relative(relative)).resolve()
    if target != root and root not in target.parents:
        raise PathRefused(f"{relative[:80]!r}: leads outside the served folder")
    return target


def index(root: Path, prefix: str = "") -> list[dict[str, object]]:
    """The regular files under ``root/prefix`` (links neither listed nor followed), sorted."""
    start = inside(root, prefix) if prefix else root
    files: list[dict[str, object]] = []
    if not start.is_dir():
        return files
    for folder, dirs, names in os.walk(start, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            files.append({"path": path.relative_to(root).as_posix(), "size": path.stat().st_size})
    return files


class Handler(BaseHTTPRequestHandler):
    server_version = "gft-files"
    protocol_version = "HTTP/1.1"
    root: Path
    token: str
    writable: bool
    touched: list[float]

    def log_message(self, format: str, *args: object) -> None:  # one line per request
        sys.stderr.write(f"{self.command} {self.path.split('?')[0][:200]} {args[1:2]}\n")

    def _send(self, status: int, body: dict | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _allowed(self) -> bool:
        self.touched[0] = time.monotonic()
        given = self.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self._error(HTTPStatus.UNAUTHORIZED, f"missing or wrong {TOKEN_HEADER}")
            return False
        return True

    def _target(self, route: str) -> tuple[Path, str] | None:
        url = urllib.parse.urlsplit(self.path)
        if not url.path.startswith(route):
            self._error(HTTPStatus.NOT_FOUND, "no such route")
            return None
        relative = urllib.parse.unquote(url.path[len(route) :])
        try:
            return inside(self.root, relative), relative
        except PathRefused as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return None

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            self._send(HTTPStatus.OK, {"ok": True})
            return
        if not self._allowed():
            return
        if url.path == "/index":
            prefix = urllib.parse.parse_qs(url.query).get("prefix", [""])[0].strip("/")
            try:
                self._send(HTTPStatus.OK, {"files": index(self.root, prefix)})
            except PathRefused as e:
                self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        self._file(send_body=True)

    def do_HEAD(self) -> None:
        if self._allowed():
            self._file(send_body=False)

    def _file(self, send_body: bool) -> None:
        found = self._target("/files/")
        if found is None:
            return
        path, relative = found
        if not path.is_file():
            self._error(HTTPStatus.NOT_FOUND, f"{relative}: no such file")
            return
        size = path.stat().st_size
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if send_body:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    self.wfile.write(chunk)

    def do_PUT(self) -> None:
        if not self._allowed():
            return
        if not self.writable:
            self._error(HTTPStatus.FORBIDDEN, "this server is read-only")
            return
        found = self._target("/files/")
        if found is None:
            return
        path, relative = found
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "send Content-Length")
            return
        expected = self.headers.get(SHA256_HEADER, "").lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        digest, left = hashlib.sha256(), int(length)
        try:
            with partial.open("wb") as f:
                while left:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        break
                    digest.update(chunk)
                    f.write(chunk)
                    left -= len(chunk)
                    self.touched[0] = time.monotonic()
                f.flush()
                os.fsync(f.fileno())
            if left:
                raise ValueError(f"the body ended {left} bytes short of Content-Length")
            if expected and digest.hexdigest() != expected:
                raise ValueError(f"sha256 {digest.hexdigest()} is not the {expected} sent")
            os.replace(partial, path)
        except (OSError, ValueError) as e:
            partial.unlink(missing_ok=True)
            self._error(HTTPStatus.BAD_REQUEST, f"{relative}: {e}")
            return
        self._send(
            HTTPStatus.CREATED,
            {"path": relative, "size": int(length), "sha256": digest.hexdigest()},
        )


def serve(root: Path, port: int, token: str, writable: bool, idle_exit: float) -> None:
    touched = [time.monotonic()]
    handler = type(
        "Bound",
        (Handler,),
        {"root": root.resolve(), "token": token, "writable": writable, "touched": touched},
    )
    server = ThreadingHTTPServer(("0.0.0.0", port), handler)  # the pod's own address

    def idle() -> None:
        while time.monotonic() - touched[0] < idle_exit:
            time.sleep(1)
        server.shutdown()

    threading.Thread(target=idle, daemon=True).start()
    print(f"serving {root} on :{port} ({'read-write' if writable else 'read-only'})", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gft_trainer.fileserver", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="the folder to serve")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--writable", action="store_true", help="accept PUT")
    parser.add_argument(
        "--idle-exit", type=float, default=600, help="exit after this many idle seconds"
    )
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        print(f"{TOKEN_ENV} must hold a token of 16 characters or more", file=sys.stderr)
        return 2
    if args.writable:
        args.root.mkdir(parents=True, exist_ok=True)
    if not args.root.is_dir():
        print(f"{args.root}: no such folder", file=sys.stderr)
        return 66
    serve(args.root, args.port, token, args.writable, args.idle_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
