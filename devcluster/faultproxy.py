"""A front for the API server, the way a load balancer or an API gateway stands in front of one,
that can answer chosen requests itself with the faults such fronts really produce: an HTML
``502 Bad Gateway`` or ``503 Service Unavailable`` page, a plain-text error, a ``429`` with
``Retry-After``.

    proxy = FaultProxy(cluster).start()          # http://127.0.0.1:PORT, forwards over TLS
    proxy.inject(Fault(status=503, body=HTML_503, content_type="text/html", times=4,
                       method="PATCH", path=r"/status$"))
    proxy.inject(Fault(delay=8, forward=True, method="GET", path=r"/pods$",
                       query=r"^(?!.*watch=)"))   # hold lists back (watches pass), then forward
    proxy.seen(...)                              # what came through, and what was answered how

Clients speak plain HTTP to it on loopback with a bearer token (``kubeconfig_for``); it
forwards every other request, watches included (streamed), to the API server with the same
token. Nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

HTML_503 = (
    "<html><head><title>503 Service Temporarily Unavailable</title></head><body>\n"
    "<center><h1>503 Service Temporarily Unavailable</h1></center>\n"
    "<hr><center>nginx</center>\n</body></html>\n"
)
HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body>\n"
    "<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n</body></html>\n"
)
# Not forwarded either way: they describe one hop, not the message.
_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "upgrade",
    "proxy-connection",
}


@dataclass
class Fault:
    """Answer matching requests with this, ``times`` times (then forward again); with
    ``forward``, hold them back ``delay`` seconds and then forward them (a slow API server)."""

    status: int = 0
    body: str = ""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    method: str | None = None
    path: str = ""
    """A regular expression searched in the request's path (query excluded)."""
    query: str = ""
    """A regular expression searched in the request's query string."""
    delay: float = 0.0
    forward: bool = False

    def matches(self, method: str, path: str, query: str = "") -> bool:
        return bool(
            (self.method is None or self.method == method)
            and re.search(self.path, path)
            and re.search(self.query, query)
        )


@dataclass
class Seen:
    at: float
    method: str
    path: str
    status: int
    injected: bool


class FaultProxy:
    def __init__(self, cluster) -> None:
        self.upstream = cluster.server
        self.ca = str(cluster.pki_dir / "ca.crt")
        self.faults: list[Fault] = []
        self.log: list[Seen] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- control, from the test's thread ---------------------------------------------------
    def inject(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def seen(self, method: str | None = None, path: str = "") -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.log
                if (method is None or s.method == method) and re.search(path, s.path)
            ]

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name="fault-proxy")
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def kubeconfig_for(self, token: str, path: Path) -> Path:
        """A kubeconfig that reaches the API server through this proxy with ``token``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxied", "cluster": {"server": self.url}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "proxied", "context": {"cluster": "proxied", "user": "user"}}],
            "current-context": "proxied",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- the server --------------------------------------------------------------------------
    async def _start(self) -> None:
        context = ssl.create_default_context(cafile=self.ca)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=64),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        # Closing the upstream session first ends the watches still being relayed.
        await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _fault_for(self, method: str, path: str, query: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.matches(method, path, query):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, method: str, path: str, status: int, injected: bool) -> None:
        with self._lock:
            self.log.append(Seen(time.monotonic(), method, path, status, injected))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault_for(request.method, request.path, request.query_string)
        if fault is not None and fault.forward:
            await asyncio.sleep(fault.delay)
        elif fault is not None:
            self._record(request.method, request.path, fault.status, True)
            await request.read()
            return web.Response(
                status=fault.status,
                text=fault.body,
                content_type=fault.content_type,
                headers=fault.headers,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        # The body is relayed as it comes (no decompression): ask for what the client accepts.
        headers.setdefault("Accept-Encoding", request.headers.get("Accept-Encoding", "identity"))
        body = await request.read()
        try:
            upstream = await self._session.request(
                request.method,
                self.upstream + request.rel_url.raw_path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except aiohttp.ClientError as e:  # the API server itself is down: what a proxy says
            self._record(request.method, request.path, 502, False)
            return web.Response(
                status=502, text=HTML_502 + f"<!-- {e} -->\n", content_type="text/html"
            )
        self._record(request.method, request.path, upstream.status, False)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in _HOP:
                response.headers[k] = v
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, ConnectionResetError):
            pass  # a watch cut off upstream or by the client
        finally:
            upstream.release()
        return response
