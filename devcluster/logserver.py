"""Container logs: how the runner writes them and the kubelet API that serves them.

A log file holds one line per line of output: ``<RFC 3339 nano timestamp> <stream> <text>``.
The server answers ``GET /containerLogs/{namespace}/{pod}/{container}`` with the kubelet's query
parameters (follow, tailLines, limitBytes, timestamps, sinceSeconds, sinceTime, previous) over
HTTPS with a self-signed certificate, which is what the API server calls for ``kubectl logs``.
``/portForward/{namespace}/{pod}`` (``kubectl port-forward``) is handed, bytes as they are, to
the ``gft-portforward`` helper (the kubelet's own port-forward code, built from the Go module
proxy) over a Unix socket, with the pod's IP in a header.
It does not authenticate the API server (kube-apiserver presents a client certificate; the
runner does not check it), so it listens on the node's bridge address only.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("runner.logs")


def timestamp() -> str:
    now = time.time_ns()
    secs, nanos = divmod(now, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def parse_ts(ts: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp (nanoseconds allowed)."""
    main, _, frac = ts.rstrip("Z").partition(".")
    base = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


class LogWriter:
    """Copies a process's stdout and stderr into one log file, a timestamp on every line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def attach(self, pipe, stream: str) -> None:
        t = threading.Thread(
            target=self._copy,
            args=(pipe, stream),
            daemon=True,
            name=f"log-{self.path.name}-{stream}",
        )
        t.start()
        self.threads.append(t)

    def _copy(self, pipe, stream: str) -> None:
        try:
            for line in iter(pipe.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                with self.lock:
                    self.file.write(f"{timestamp()} {stream} ".encode() + line)
        except (OSError, ValueError):
            pass
        finally:
            pipe.close()

    def close(self, timeout: float = 5) -> None:
        for t in self.threads:
            t.join(timeout)
        self.file.close()


def read_entries(path: Path) -> list[tuple[str, bytes]]:
    entries = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    for raw in data.splitlines(keepends=True):
        ts, _, rest = raw.partition(b" ")
        _stream, _, text = rest.partition(b" ")
        entries.append((ts.decode(), text))
    return entries


def plain_text(path: Path) -> str:
    return b"".join(t for _, t in read_entries(path)).decode("utf-8", "replace")


class LogRequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LogSource:
    """What the server needs from the runner for one request."""

    def __init__(self, path: Path, is_running):
        self.path = path
        self.is_running = is_running  # () -> bool: is this container instance still running


def make_cert(directory: Path, node_ip: str, node_name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "kubelet.crt", directory / "kubelet.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "365",
            "-subj",
            f"/CN={node_name}",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-addext",
            f"subjectAltName=IP:{node_ip},DNS:{node_name}",
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o600)
    return crt, key


def relay(client: ssl.SSLSocket, upstream: socket.socket) -> None:
    """Copy bytes both ways until either side closes. One thread does both directions: an
    SSL socket must not be read and written from two threads at once."""
    for sock in (client, upstream):
        sock.settimeout(None)
    while True:
        ready = [client] if client.pending() else select.select([client, upstream], [], [])[0]
        for sock in ready:
            try:
                data = sock.recv(65536)
            except ssl.SSLWantReadError:
                continue
            if not data:
                return
            (upstream if sock is client else client).sendall(data)


def serve(
    node_ip: str,
    port: int,
    cert_dir: Path,
    node_name: str,
    lookup,
    pod_ip=None,
    port_forward_socket: Path | None = None,
) -> ThreadingHTTPServer:
    """Start the HTTPS log server in a thread. ``lookup(ns, pod, container, previous)`` returns a
    LogSource or raises LogRequestError; ``pod_ip(ns, pod)`` returns a running pod's IP or
    raises LogRequestError."""
    crt, key = make_cert(cert_dir, node_ip, node_name)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        rbufsize = 0  # unbuffered: a port-forward relay must not leave bytes in a buffer

        def log_message(self, fmt, *args):  # quieter than the default
            log.debug("log server: " + fmt, *args)

        def _error(self, status: int, message: str) -> None:
            body = message.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # SPDY port-forward upgrades are POSTs
            self.do_GET()

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path in ("/healthz", "/healthz/ping"):
                return self._error(200, "ok")
            parts = url.path.strip("/").split("/")
            if parts[0] == "portForward" and len(parts) in (3, 4):
                return self._port_forward(parts[1], parts[2])
            if len(parts) != 4 or parts[0] != "containerLogs":
                return self._error(
                    404,
                    f"not found: {url.path} (this runner serves /containerLogs, /portForward "
                    "and /healthz)",
                )
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            try:
                self._logs(*parts[1:], q)
            except LogRequestError as e:
                self._error(e.status, str(e))
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

        def _port_forward(self, ns: str, pod: str) -> None:
            if pod_ip is None or port_forward_socket is None:
                return self._error(501, "this runner has no port-forward helper")
            try:
                ip = pod_ip(ns, pod)
            except LogRequestError as e:
                return self._error(e.status, str(e))
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(port_forward_socket))
            except OSError as e:
                upstream.close()
                return self._error(503, f"port-forward helper at {port_forward_socket}: {e}")
            head = [f"{self.command} {self.path} HTTP/1.1"]
            head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() != "x-gft-pod-ip"]
            head.append(f"X-Gft-Pod-Ip: {ip}")
            try:
                upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                relay(self.connection, upstream)
            except OSError:
                pass  # either side went away: the stream is over
            finally:
                upstream.close()
                self.close_connection = True

        def _logs(self, ns: str, pod: str, container: str, q: dict) -> None:
            truthy = ("true", "1", "True")
            previous = q.get("previous") in truthy
            follow = q.get("follow") in truthy
            stamps = q.get("timestamps") in truthy
            try:
                tail = int(q["tailLines"]) if "tailLines" in q else None
                limit = int(q["limitBytes"]) if "limitBytes" in q else None
                since = None
                if "sinceSeconds" in q:
                    since = time.time() - int(q["sinceSeconds"])
                if "sinceTime" in q:
                    since = parse_ts(q["sinceTime"])
            except ValueError as e:
                raise LogRequestError(400, f"bad query: {e}") from e
            src = lookup(ns, pod, container, previous)
            entries = read_entries(src.path)
            offset = src.path.stat().st_size if src.path.exists() else 0
            if since is not None:
                entries = [e for e in entries if parse_ts(e[0]) >= since]
            if tail is not None:
                entries = entries[-tail:] if tail > 0 else []
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            sent = 0

            def emit(ts: str, text: bytes) -> bool:
                nonlocal sent
                chunk = (ts.encode() + b" " + text) if stamps else text
                if limit is not None:
                    chunk = chunk[: max(0, limit - sent)]
                if chunk:
                    self.wfile.write(chunk)
                    sent += len(chunk)
                return limit is None or sent < limit

            for ts, text in entries:
                if not emit(ts, text):
                    return
            self.wfile.flush()
            if not follow or previous:
                return
            buf = b""
            while True:
                running = src.is_running()
                try:
                    with open(src.path, "rb") as f:
                        f.seek(offset)
                        data = f.read()
                except FileNotFoundError:
                    return
                offset += len(data)
                buf += data
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    ts, _, rest = raw.partition(b" ")
                    text = rest.partition(b" ")[2] + b"\n"
                    if not emit(ts.decode(), text):
                        return
                if lines:
                    self.wfile.flush()
                if not running and not data:
                    return
                time.sleep(0.2)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):  # a client gone mid-request
            log.debug("log server: request from %s failed", client_address, exc_info=True)

    server = Server((node_ip, port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    # The handshake happens in the request's thread, so a slow client blocks no one.
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, daemon=True, name="log-server").start()
    return server
