"""The dashboard's HTTP server: pages, a JSON API, live updates (server-sent events) and a
same-origin TensorBoard proxy. Handlers are thin: who is asking (``identity``), may they
(the API server decides, as them), then one call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from gft_api.conventions import METRICS_PORT, TENSORBOARD_PORT, running_pods

from gft_dashboard.apiserver import GROUP, VERSION, ApiError, ApiServer, Identity, Manifest
from gft_dashboard.hub import FineTuneHub, summarize

log = logging.getLogger("gft_dashboard")
STATIC = Path(__file__).parent / "static"
CSRF_COOKIE, CSRF_HEADER, TOKEN_COOKIE = "gft_csrf", "X-CSRF-Token", "gft_token"
LOG_CAP_BYTES = 1 << 20  # a followed log stops after 1 MiB: the page is not an archive
SECURITY_HEADERS = {
    # Same-origin everything: no CDN, TensorBoard framed only from here.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-ancestors 'self'; "
        "base-uri 'self'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass
class Settings:
    auth: str  # token | proxy | kubeconfig
    prefix: str = ""  # the Ingress path prefix, without a trailing slash
    secure_cookies: bool = False


@dataclass
class Dashboard:
    api: ApiServer
    settings: Settings
    hub: FineTuneHub = field(init=False)
    _namespaces: dict[str, tuple[float, set[str] | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hub = FineTuneHub(self.api)

    # -- who is asking ----------------------------------------------------------------------

    def identity(self, request: web.Request) -> Identity:
        """The caller, per ``--auth``; 401 when the request names no one."""
        mode = self.settings.auth
        if mode == "kubeconfig":
            return Identity()
        if mode == "proxy":
            user = request.headers.get("X-Forwarded-User") or request.headers.get(
                "X-Auth-Request-User"
            )
            if not user:
                raise web.HTTPUnauthorized(text="no X-Forwarded-User from the proxy")
            groups = request.headers.get("X-Forwarded-Groups") or request.headers.get(
                "X-Auth-Request-Groups", ""
            )
            return Identity(user=user, groups=tuple(g for g in groups.split(",") if g))
        bearer = request.headers.get("Authorization", "")
        token = bearer[7:] if bearer.startswith("Bearer ") else request.cookies.get(TOKEN_COOKIE)
        if not token:
            raise web.HTTPUnauthorized(text="sign in with a Kubernetes bearer token")
        return Identity(token=token)

    async def visible_namespaces(self, who: Identity) -> set[str] | None:
        """Where the user may list fine-tunes: None for everywhere, else a set (cached 30 s)."""
        cached = self._namespaces.get(who.key)
        if cached and time.monotonic() - cached[0] < 30:
            return cached[1]
        if await self.api.may(who, "list", None):
            allowed: set[str] | None = None
        else:
            names = [
                ns["metadata"]["name"]
                for ns in (await self.api.request("GET", "/api/v1/namespaces", None))["items"]
            ]
            checks = await asyncio.gather(*(self.api.may(who, "list", ns) for ns in names))
            allowed = {ns for ns, ok in zip(names, checks, strict=True) if ok}
        self._namespaces[who.key] = (time.monotonic(), allowed)
        return allowed


# -- middleware ------------------------------------------------------------------------------


@web.middleware
async def security(request: web.Request, handler):
    dash: Dashboard = request.app["dashboard"]
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        # Double-submit: the header must repeat the SameSite=Strict cookie, which another
        # site can neither read nor make the browser send.
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not secrets.compare_digest(cookie, request.headers.get(CSRF_HEADER, "")):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
    try:
        response = await handler(request)
    except ApiError as e:
        response = web.json_response({"error": str(e), "status": e.status}, status=e.status)
    if not request.path.startswith(f"{dash.settings.prefix}/tb/"):
        response.headers.update(SECURITY_HEADERS)
    else:
        response.headers["X-Content-Type-Options"] = "nosniff"
    if CSRF_COOKIE not in request.cookies and not response.prepared:
        response.set_cookie(
            CSRF_COOKIE,
            secrets.token_urlsafe(24),
            samesite="Strict",
            secure=dash.settings.secure_cookies,
            path="/",
        )
    return response


# -- pages and session -----------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    dash: Dashboard = request.app["dashboard"]
    page = (STATIC / "index.html").read_text().replace("{{PREFIX}}", dash.settings.prefix)
    return web.Response(text=page, content_type="text/html")


async def login(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    body = await request.json()
    token = str(body.get("token", "")).strip()
    if not token:
        raise web.HTTPBadRequest(text="paste a bearer token")
    who = Identity(token=token)
    user = await dash.api.whoami(who)  # 401 from the API server if the token is not good
    response = web.json_response({"user": user})
    response.set_cookie(
        TOKEN_COOKIE, token, httponly=True, samesite="Strict",
        secure=dash.settings.secure_cookies, path="/",
    )  # fmt: skip
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.json_response({})
    response.del_cookie(TOKEN_COOKIE, path="/")
    return response


async def whoami(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    user = await dash.api.whoami(who)
    return web.json_response({"user": user, "auth": dash.settings.auth})


# -- reads -----------------------------------------------------------------------------------


async def finetunes(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    allowed = await dash.visible_namespaces(who)
    items = [summarize(o) for o in dash.hub.objects() if allowed is None or _ns(o) in allowed]
    return web.json_response({"items": items, "namespaces": sorted(allowed or [])})


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the visible fine-tunes now, then each change as it happens. Every
    browser is fed from the one watch the hub keeps."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    allowed = await dash.visible_namespaces(who)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    queue = dash.hub.subscribe()
    try:
        visible = [o for o in dash.hub.objects() if allowed is None or _ns(o) in allowed]
        snapshot = [summarize(o) for o in visible]
        await response.write(_event("snapshot", snapshot))
        while True:
            try:
                kind, obj = await asyncio.wait_for(queue.get(), timeout=15)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if kind is None:  # shutting down
                break
            if allowed is None or _ns(obj) in allowed:
                await response.write(_event(kind, summarize(obj)))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        dash.hub.unsubscribe(queue)
    return response


async def detail(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    obj = await dash.api.request("GET", dash.api.finetunes_path(ns, name), who)
    events = await dash.api.request(
        "GET", f"/api/v1/namespaces/{ns}/events", who,
        params={"fieldSelector": f"involvedObject.name={name},involvedObject.kind=GemmaFineTune"},
    )  # fmt: skip
    can = dict(
        zip(
            ("delete", "patch", "create"),
            await asyncio.gather(
                dash.api.may(who, "delete", ns, name=name),
                dash.api.may(who, "patch", ns, name=name),
                dash.api.may(who, "create", ns),
            ),
            strict=True,
        )
    )
    events_out = sorted(
        (
            {
                "type": e.get("type"),
                "reason": e.get("reason"),
                "message": e.get("message"),
                "count": e.get("count", 1),
                "time": e.get("lastTimestamp") or e.get("eventTime"),
            }
            for e in events.get("items", [])
        ),
        key=lambda e: e["time"] or "",
    )
    return web.json_response(
        {"object": obj, "summary": summarize(obj), "events": events_out, "can": can}
    )


async def trainer_log(request: web.Request) -> web.StreamResponse:
    """The trainer's log, followed, from the Kubernetes log API (as the user), at most
    LOG_CAP_BYTES."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    obj = await dash.api.request("GET", dash.api.finetunes_path(ns, name), who)
    pod = (obj.get("status") or {}).get("podName")
    if not pod:
        raise web.HTTPNotFound(text="no trainer pod yet")
    response = web.StreamResponse(
        headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
    )
    params = {
        "container": "trainer",
        "limitBytes": str(LOG_CAP_BYTES),
        "follow": "true" if request.query.get("follow") != "0" else "false",
    }
    chunks = dash.api.stream(f"/api/v1/namespaces/{ns}/pods/{pod}/log", who, params)
    first = await anext(chunks, b"")  # a refusal (403, 404) raises here, before the reply starts
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
    return response


async def gpus(request: web.Request) -> web.Response:
    """The GPU series of every running pod of the run right now (per pod, per GPU), read from
    each pod's /metrics at its IP: pod 0's trainer, and the other pods of a multi-node run."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    obj = await dash.api.request("GET", dash.api.finetunes_path(ns, name), who)
    job = (obj.get("status") or {}).get("jobName")
    if not job:
        return web.json_response({"gpus": []})
    listed = await dash.api.request(
        "GET", f"/api/v1/namespaces/{ns}/pods", None, params={"labelSelector": f"job-name={job}"}
    )
    running = running_pods(listed.get("items") or [])
    if not running:
        return web.json_response({"gpus": [], "error": "no trainer is running"})
    from gft_dashboard.hub import gpu_series

    async def read(session: aiohttp.ClientSession, ip: str) -> str | None:
        try:
            async with session.get(
                f"http://{ip}:{METRICS_PORT}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                return await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async with aiohttp.ClientSession() as plain:
        texts = await asyncio.gather(*(read(plain, ip) for _, _, ip in running))
    series = [
        {"pod": pod, "index": index, **gpu}
        for (pod, index, _), text in zip(running, texts, strict=True)
        if text is not None
        for gpu in gpu_series(text)
    ]
    silent = [pod for (pod, _, _), text in zip(running, texts, strict=True) if text is None]
    answer: dict[str, Any] = {"gpus": series, "pods": len(running)}
    if silent:
        answer["error"] = f"the metrics of {', '.join(silent)} did not answer"
    return web.json_response(answer)


# -- TensorBoard -----------------------------------------------------------------------------


async def tensorboard(request: web.Request) -> web.StreamResponse:
    """TensorBoard of one fine-tune, same-origin, once the user may read the fine-tune: the
    dashboard fetches it from a ready endpoint of the fine-tune's Service."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    if not await dash.api.may(who, "get", ns, name=name):
        raise web.HTTPForbidden(text=f"you may not read gemmafinetune {ns}/{name}")
    obj = await dash.api.request("GET", dash.api.finetunes_path(ns, name), None)
    prefix = ((obj.get("spec") or {}).get("tensorboard") or {}).get("pathPrefix", "/")
    address = await _tensorboard_address(dash.api, ns, name)
    if address is None:
        raise web.HTTPServiceUnavailable(text="TensorBoard is not running for this fine-tune")
    upstream = f"http://{address}{prefix.rstrip('/')}/{request.match_info['tail']}"
    async with (
        aiohttp.ClientSession(auto_decompress=False) as plain,
        plain.get(upstream, params=request.query, timeout=aiohttp.ClientTimeout(total=30)) as r,
    ):
        body = await r.read()
        headers = {
            k: v
            for k, v in r.headers.items()
            if k.lower() in ("content-type", "content-encoding", "cache-control")
        }
        return web.Response(body=body, status=r.status, headers=headers)


async def _tensorboard_address(api: ApiServer, ns: str, name: str) -> str | None:
    """``ip:port`` of a ready TensorBoard behind the fine-tune's Service (its EndpointSlices:
    no cluster DNS or Service IP is needed, so it also works from a laptop on the pod network)."""
    slices = await api.request(
        "GET", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", None,
        params={"labelSelector": f"kubernetes.io/service-name={name}"},
    )  # fmt: skip
    for s in slices.get("items", []):
        port = next(
            (p["port"] for p in s.get("ports") or [] if p.get("name") == "tensorboard"),
            TENSORBOARD_PORT,
        )
        for endpoint in s.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") and endpoint.get("addresses"):
                return f"{endpoint['addresses'][0]}:{port}"
    return None


# -- actions ---------------------------------------------------------------------------------


async def create(request: web.Request) -> web.Response:
    """Create from YAML (the form writes YAML too). ``dryRun``: validate only, by the API
    server's own dry run, whose error names the field."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    body = await request.json()
    try:
        manifest = yaml.safe_load(str(body.get("yaml", "")))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise web.HTTPBadRequest(text=f"the YAML does not parse{where}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != "GemmaFineTune":
        raise web.HTTPBadRequest(text="expected one GemmaFineTune (kind: GemmaFineTune)")
    manifest.setdefault("apiVersion", f"{GROUP}/{VERSION}")
    ns = (manifest.get("metadata") or {}).get("namespace") or body.get("namespace") or "default"
    manifest.setdefault("metadata", {})["namespace"] = ns
    path = dash.api.finetunes_path(ns)
    checked = await dash.api.request("POST", path, who, body=manifest, params={"dryRun": "All"})
    if body.get("dryRun"):
        return web.json_response({"ok": True, "object": checked})
    created = await dash.api.request("POST", path, who, body=manifest)
    return web.json_response({"ok": True, "object": created}, status=201)


async def set_suspend(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    suspend = request.match_info["action"] == "suspend"
    patched = await dash.api.request(
        "PATCH", dash.api.finetunes_path(ns, name), who,
        body={"spec": {"suspend": suspend}}, content_type="application/merge-patch+json",
    )  # fmt: skip
    return web.json_response({"ok": True, "summary": summarize(patched)})


async def delete(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.identity(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    await dash.api.request("DELETE", dash.api.finetunes_path(ns, name), who)
    return web.json_response({"ok": True})


async def healthz(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    return web.Response(
        text="ok" if dash.hub.synced else "watch not synced yet",
        status=200 if dash.hub.synced else 503,
    )


# -- wiring ----------------------------------------------------------------------------------


def make_app(api: ApiServer, settings: Settings) -> web.Application:
    app = web.Application(middlewares=[security])
    dash = Dashboard(api, settings)
    app["dashboard"] = dash
    p = settings.prefix
    ft = p + "/api/finetunes/{namespace}/{name}"
    app.add_routes([
        web.get(p + "/", index),
        web.get(p + "/healthz", healthz),
        web.static(p + "/static", STATIC),
        web.post(p + "/api/login", login),
        web.post(p + "/api/logout", logout),
        web.get(p + "/api/whoami", whoami),
        web.get(p + "/api/finetunes", finetunes),
        web.post(p + "/api/finetunes", create),
        web.get(p + "/api/stream", stream),
        web.get(ft, detail),
        web.delete(ft, delete),
        web.get(ft + "/log", trainer_log),
        web.get(ft + "/gpus", gpus),
        web.post(ft + "/{action:suspend|resume}", set_suspend),
        web.get(p + "/tb/{namespace}/{name}/{tail:.*}", tensorboard),
    ])  # fmt: skip
    if p:
        app.router.add_get(p, lambda r: web.HTTPFound(p + "/"))

    async def lifecycle(app: web.Application):
        await api.start()
        task = asyncio.create_task(dash.hub.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()

    async def end_streams(app: web.Application) -> None:
        dash.hub.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)
    return app


def _ns(obj: Manifest) -> str:
    return obj.get("metadata", {}).get("namespace", "")


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
