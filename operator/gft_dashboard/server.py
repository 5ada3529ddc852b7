"""The dashboard's HTTP server: pages, a JSON API, live updates (server-sent events) and
TensorBoard (sandboxed, see tensorboard.py). Handlers are thin: who is asking (``caller``,
before anything is read), may they (the API server decides, as them), then one call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from aiohttp import web
from gft_api.conventions import NAME_LABEL, running_pods

from gft_dashboard import auth, compare, live, logs, manifest, names, runpage, tensorboard, tryit
from gft_dashboard.apiserver import (
    GROUP,
    VERSION,
    ApiError,
    ApiServer,
    Identity,
    read_at_most,
)
from gft_dashboard.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, Settings
from gft_dashboard.context import (
    PROXY_STREAM_SECONDS,
    SIGN_INS_PER_MINUTE,
    Dashboard,
    event,
    ns_of,
    rights,
)
from gft_dashboard.hub import summarize
from gft_dashboard.limits import TooManyStreams
from gft_dashboard.sessions import MAX_AGE

__all__ = ["Settings", "make_app"]
log = logging.getLogger("gft_dashboard")
STATIC = Path(__file__).parent / "static"
KEEP_ALIVE_SECONDS = 15
SECURITY_HEADERS = {
    # Our own code only: no CDN; framed by nobody; TensorBoard framed from here (sandboxed).
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-ancestors 'none'; frame-src 'self'; "
        "base-uri 'self'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# -- middleware ------------------------------------------------------------------------------


@web.middleware
async def security(request: web.Request, handler):
    """The checks every request passes, and the security headers on every answer: errors
    (which a handler or a check raises) included, the framed ones on TensorBoard's paths."""
    dash: Dashboard = request.app["dashboard"]
    framed = request.path.startswith(f"{dash.settings.prefix}/tb/")
    headers = tensorboard.FRAME_HEADERS if framed else SECURITY_HEADERS
    try:
        response = await _checked(dash, request, handler)
    except web.HTTPException as e:  # a refusal echoes what was asked: it needs them most
        for key, value in headers.items():
            e.headers.setdefault(key, value)
        raise
    for key, value in headers.items():
        response.headers.setdefault(key, value)
    if not framed and CSRF_COOKIE not in request.cookies and not response.prepared:
        response.set_cookie(
            CSRF_COOKIE, secrets.token_urlsafe(24), samesite="Strict",
            secure=dash.settings.secure_cookies, path=dash.settings.cookie_path,
        )  # fmt: skip
    return response


async def _checked(dash: Dashboard, request: web.Request, handler) -> web.StreamResponse:
    if not auth.host_allowed(request.headers.get("Host"), dash.settings):
        raise web.HTTPForbidden(
            text=f"the Host {request.headers.get('Host')!r} is not this dashboard's address "
            f"({', '.join(sorted(dash.settings.allowed_hosts))}): a DNS-rebound name?"
        )
    # Route parameters are Kubernetes names before anything is built from them.
    try:
        for key in ("namespace", "name"):
            if key in request.match_info:
                check = names.namespace if key == "namespace" else names.name
                check(request.match_info[key], key)
    except names.BadName as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    twice = auth.duplicated_cookie(request.headers.get("Cookie"))
    if twice is not None:
        raise web.HTTPBadRequest(
            text=f"the cookie {twice} came twice: another site of your domain set one for this "
            "path; clear this site's cookies and sign in again"
        )
    framed = request.path.startswith(f"{dash.settings.prefix}/tb/")
    if request.method in ("POST", "PUT", "PATCH", "DELETE") and not framed:
        # Double-submit: the header must repeat the SameSite=Strict cookie, which another
        # site can neither read nor make the browser send. (TensorBoard's POSTs carry their
        # ticket instead; see tensorboard.py.)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not secrets.compare_digest(cookie, request.headers.get(CSRF_HEADER, "")):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
    try:
        return await handler(request)
    except ApiError as e:
        if e.status == 401 and request.cookies.get(SESSION_COOKIE):  # the token died
            dash.sessions.end(request.cookies[SESSION_COOKIE])
            dash.tickets.end_session(request.cookies[SESSION_COOKIE])
        return web.json_response({"error": str(e), "status": e.status}, status=e.status)
    except TooManyStreams as e:
        raise web.HTTPTooManyRequests(text=str(e)) from None


# -- pages and session -----------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    dash: Dashboard = request.app["dashboard"]
    page = (STATIC / "index.html").read_text().replace("{{PREFIX}}", dash.settings.prefix)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


async def login(request: web.Request) -> web.Response:
    """Token mode: the token is checked by the API server (a SelfSubjectReview made with it)
    and kept here; the browser gets an opaque session id."""
    dash: Dashboard = request.app["dashboard"]
    if dash.settings.auth != "token":
        raise web.HTTPNotFound(text=f"no sign-in form with --auth {dash.settings.auth}")
    if (request.content_length or 0) > 64 << 10:
        raise web.HTTPRequestEntityTooLarge(max_size=64 << 10, actual_size=request.content_length)
    body = await request.json()
    token = str(body.get("token", "")).strip() if isinstance(body, dict) else ""
    if not token:
        raise web.HTTPBadRequest(text="paste a bearer token")
    user = await dash.api.whoami(Identity(token=token))  # 401 if the token is not good
    if not dash.sign_ins.take(user):
        raise web.HTTPTooManyRequests(
            text=f"{user} signed in {SIGN_INS_PER_MINUTE} times in the last minute: wait a minute"
        )
    session = dash.sessions.start(Identity(token=token, name=user), user)
    response = web.json_response({"user": user})
    response.set_cookie(
        SESSION_COOKIE, session.id, httponly=True, samesite="Strict",
        secure=dash.settings.secure_cookies, path=dash.settings.cookie_path,
        max_age=max(0, int(session.expires - time.time())),
    )  # fmt: skip
    return response


async def logout(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        dash.sessions.end(session_id)
        dash.tickets.end_session(session_id)
    browser = auth.proxy_session(request.headers.get("Cookie"))
    if dash.settings.auth == "proxy" and browser is not None:  # before oauth2-proxy's sign-out
        dash.tickets.end_session(browser)
    response = web.json_response({})
    response.del_cookie(SESSION_COOKIE, path=dash.settings.cookie_path)
    return response


async def whoami(request: web.Request) -> web.Response:
    """Who the user is, and where they may start a fine-tune: ``createIn`` is ``"*"``
    (anywhere), or the namespaces holding fine-tunes they see where they may (the page offers
    *New* and *Clone* only then)."""
    dash: Dashboard = request.app["dashboard"]
    caller = dash.caller(request)
    who = caller.identity
    user = caller.user or await dash.api.whoami(who)
    create_in: str | list[str] = "*"
    if not await dash.api.may(who, "create", None):
        seen = await dash.visible(who)
        candidates = sorted(seen if seen is not None else dash.hub.namespaces())
        allowed = await asyncio.gather(*(dash.api.may(who, "create", ns) for ns in candidates))
        create_in = [ns for ns, ok in zip(candidates, allowed, strict=True) if ok]
    return web.json_response({"user": user, "auth": dash.settings.auth, "createIn": create_in})


# -- reads -----------------------------------------------------------------------------------


async def finetunes(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    caller = dash.caller(request)
    allowed = await dash.visible(caller.identity)
    items = [summarize(o) for o in dash.hub.objects() if allowed is None or ns_of(o) in allowed]
    return web.json_response({"items": items})


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the visible fine-tunes now, then each change as it happens, every
    browser fed from the one watch the hub keeps. Every ``recheck_seconds`` the user's rights
    are asked again: what they may no longer see goes (a new snapshot), and a session that
    ended (logout, an expired or deleted token) ends the stream with an ``expired`` event.
    Behind the proxy a stream also ends after PROXY_STREAM_SECONDS: the browser reconnects at
    once, through oauth2-proxy, which checks its session again."""
    dash: Dashboard = request.app["dashboard"]
    caller = dash.caller(request)
    with dash.stream_slot(caller):
        allowed = await dash.visible(caller.identity)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        queue = dash.hub.subscribe()
        started = time.monotonic()
        try:
            await response.write(event("snapshot", _visible(dash, allowed)))
            recheck = started + dash.settings.recheck_seconds
            while (
                dash.settings.auth != "proxy" or time.monotonic() - started < PROXY_STREAM_SECONDS
            ):
                wait = min(KEEP_ALIVE_SECONDS, max(0.0, recheck - time.monotonic()))
                try:
                    kind, obj = await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    if time.monotonic() < recheck:
                        await response.write(b": keep-alive\n\n")
                        continue
                    recheck = time.monotonic() + dash.settings.recheck_seconds
                    now_allowed = await rights(dash, caller, dash.visible, caller.identity, True)
                    if now_allowed == "expired":
                        await response.write(event("expired", {"reason": "session expired"}))
                        break
                    if now_allowed != allowed:
                        allowed = now_allowed
                        await response.write(event("snapshot", _visible(dash, allowed)))
                    continue
                if kind is None:  # shutting down
                    break
                if kind == "resync":  # this page fell behind: what it may see, afresh
                    await response.write(event("snapshot", _visible(dash, allowed)))
                    continue
                if allowed is not None and ns_of(obj) not in allowed:
                    # A namespace with its first fine-tune: asked about once (then cached).
                    now_allowed = await rights(dash, caller, dash.visible, caller.identity)
                    if now_allowed == "expired":
                        await response.write(event("expired", {"reason": "session expired"}))
                        break
                    allowed = now_allowed
                if allowed is None or ns_of(obj) in allowed:
                    await response.write(event(kind, summarize(obj)))
        except ConnectionResetError:
            pass
        except (ApiError, TimeoutError, aiohttp.ClientError) as e:
            # Rights that cannot be asked are not assumed: end it; the browser reconnects.
            log.warning("a live list ended: its user's rights could not be checked (%s)", e)
        finally:
            dash.hub.unsubscribe(queue)
        return response


def _visible(dash: Dashboard, allowed: set[str] | None) -> list[dict[str, Any]]:
    return [summarize(o) for o in dash.hub.objects() if allowed is None or ns_of(o) in allowed]


async def detail(request: web.Request) -> web.Response:
    """The run page's content as the user sees it (the page itself follows ``.../live``)."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    return web.json_response(
        await runpage.gather(dash.api, who, ns, name, dash.settings.grafana_url)
    )


async def gpus(request: web.Request) -> web.Response:
    """The GPU series of every running pod of the run right now (per pod, per GPU), read from
    each pod's /metrics at its IP (pods listed as the user): pod 0's trainer, and the other
    pods of a multi-node run. Only numbers come back from what the pods answer."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    obj = await dash.api.request("GET", dash.api.finetunes_path(ns, name), who)
    job = (obj.get("status") or {}).get("jobName")
    if not job:
        return web.json_response({"gpus": []})
    try:
        names.namespace(job, "status.jobName")  # a label value: the selector stays one term
    except names.BadName as e:
        raise web.HTTPBadGateway(text=str(e)) from None
    listed = await dash.api.request(
        "GET", f"/api/v1/namespaces/{ns}/pods", who, params={"labelSelector": f"job-name={job}"}
    )
    spec = (obj.get("spec") or {}).get("resources") or {}
    nodes, per_pod = _bounded(spec.get("nodes"), 1, 64), _bounded(spec.get("gpus"), 1, 16)
    # The run's own pods only: its completion indexes, however many pods carry its label.
    running = [p for p in running_pods(listed.get("items") or []) if int(p[1]) < nodes]
    if not running:
        return web.json_response({"gpus": [], "error": "no trainer is running"})
    return web.json_response(await dash.gpus.readings((ns, name), running, per_pod))


def _bounded(value: Any, default: int, most: int) -> int:
    """A count from a fine-tune's spec, as its schema bounds it (the status writer is not us)."""
    return min(max(value, 0), most) if isinstance(value, int) else default


# -- TensorBoard -----------------------------------------------------------------------------


async def tensorboard_ticket(request: web.Request) -> web.Response:
    """Where the run page frames the fine-tune's TensorBoard: a path with a ticket for this
    user and fine-tune, once they may read it."""
    dash: Dashboard = request.app["dashboard"]
    caller = dash.caller(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    if not await dash.api.may(caller.identity, "get", ns, name=name):
        raise web.HTTPForbidden(text=f"you may not read gemmafinetune {ns}/{name}")
    expires = caller.expires or time.time() + MAX_AGE
    browser = None
    if dash.settings.auth == "proxy":  # the ticket ends with this browser's oauth2-proxy sign-in
        browser = auth.proxy_session(request.headers.get("Cookie")) or "p:none"
    ticket = dash.tickets.issue(caller.identity, caller.session_id, ns, name, expires, browser)
    return web.json_response({"url": f"{dash.settings.prefix}/tb/{ns}/{name}/{ticket.id}/"})


async def tensorboard_proxy(request: web.Request) -> web.StreamResponse:
    """TensorBoard's pages and data for the holder of a ticket (see tensorboard.py)."""
    dash: Dashboard = request.app["dashboard"]
    ns, name = request.match_info["namespace"], request.match_info["name"]
    ticket = dash.tickets.get(request.match_info["ticket"])
    if ticket is None or (ticket.namespace, ticket.name) != (ns, name):
        raise _framed(web.HTTPForbidden, "no such TensorBoard ticket: reload the run page")
    if ticket.session_id and dash.sessions.get(ticket.session_id) is None:
        dash.tickets.drop(ticket.id)
        raise _framed(web.HTTPForbidden, "session expired: sign in again")
    try:
        tail = names.tail(request.match_info["tail"])
    except names.BadName as e:
        raise _framed(web.HTTPBadRequest, str(e)) from None
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=tensorboard.PREFLIGHT)
    body = None
    if request.method == "POST":
        if not tensorboard.POSTS.fullmatch(tail):
            raise _framed(web.HTTPMethodNotAllowed, "only TensorBoard's data endpoints take a POST",
                          method="POST", allowed_methods=["GET"])  # fmt: skip
        if request.headers.get("X-XSRF-Protected") != "1":
            raise _framed(web.HTTPForbidden, "TensorBoard's POSTs carry X-XSRF-Protected: 1")
        if (request.content_length or 0) > tensorboard.MAX_POST_BYTES:
            raise _framed(web.HTTPRequestEntityTooLarge, "too large",
                          max_size=tensorboard.MAX_POST_BYTES,
                          actual_size=request.content_length)  # fmt: skip
        body = await read_at_most(request.content, tensorboard.MAX_POST_BYTES)
        if len(body) > tensorboard.MAX_POST_BYTES:
            raise _framed(web.HTTPRequestEntityTooLarge, "too large",
                          max_size=tensorboard.MAX_POST_BYTES, actual_size=len(body))  # fmt: skip
    async with dash.tensorboard_turns.turn(ticket.identity.owner):
        address, prefix = await _tensorboard_upstream(dash, ticket)
        headers = {"Accept-Encoding": "identity"}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        if body is not None:
            headers["X-XSRF-Protected"] = "1"
        assert dash.plain is not None
        url = _upstream_url(address, prefix, tail, request.rel_url.raw_query_string)
        try:
            async with dash.plain.request(
                request.method, url, data=body, headers=headers, allow_redirects=False,
                timeout=tensorboard.UPSTREAM_TIMEOUT,
            ) as r:  # fmt: skip
                if 300 <= r.status < 400:
                    raise _framed(
                        web.HTTPBadGateway,
                        f"TensorBoard answered with a redirect (HTTP {r.status}), which the "
                        "dashboard does not follow",
                    )
                cache = r.headers.get("Cache-Control")
                return await tensorboard.relay(
                    request, r, f"{dash.settings.prefix}/static/tb-frame.js",
                    {**({"Cache-Control": cache} if cache else {}), **tensorboard.FRAME_HEADERS},
                )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _framed(
                web.HTTPBadGateway, f"TensorBoard did not answer: {type(e).__name__}"
            ) from None


def _upstream_url(address: str, prefix: str, tail: str, query: str) -> yarl.URL:
    """TensorBoard's URL for ``tail`` (checked: it stays below the prefix), the query passed
    on exactly as the browser sent it."""
    path = f"{prefix.rstrip('/')}/{urllib.parse.quote(tail, safe='/-._~')}"
    return yarl.URL(f"http://{address}{path}" + (f"?{query}" if query else ""), encoded=True)


def _framed(error: type[web.HTTPException], text: str, **kw) -> web.HTTPException:
    return error(text=text, headers=tensorboard.FRAME_HEADERS, **kw)


async def _tensorboard_upstream(dash: Dashboard, ticket: tensorboard.Ticket) -> tuple[str, str]:
    """(ip:port, path prefix) of the fine-tune's TensorBoard, as the ticket's user sees it;
    asked again (their right to read it too) every ``recheck_seconds``."""
    fresh = time.monotonic() - ticket.checked_at < dash.settings.recheck_seconds
    if fresh and ticket.upstream is not None:
        return ticket.upstream
    who, ns, name = ticket.identity, ticket.namespace, ticket.name
    try:
        obj = await dash.api.request("GET", dash.api.finetunes_path(ns, name), who)
        selector = {"labelSelector": f"{NAME_LABEL}={name}"}
        listed = await dash.api.request(
            "GET", f"/api/v1/namespaces/{ns}/pods", who, params=selector
        )
    except ApiError as e:
        if e.status in (401, 403, 404):
            dash.tickets.drop(ticket.id)
            raise _framed(web.HTTPForbidden, f"you may no longer read {ns}/{name}: {e}") from None
        raise _framed(web.HTTPBadGateway, str(e)) from None
    prefix = ((obj.get("spec") or {}).get("tensorboard") or {}).get("pathPrefix", "/")
    try:
        prefix = names.path_prefix(prefix)
    except names.BadName as e:
        raise _framed(web.HTTPBadGateway, str(e)) from None
    address = tensorboard.upstream_address(listed.get("items") or [])
    if address is None:
        raise _framed(web.HTTPServiceUnavailable, "TensorBoard is not running for this fine-tune")
    ticket.checked_at, ticket.upstream = time.monotonic(), (address, prefix)
    return ticket.upstream


# -- actions ---------------------------------------------------------------------------------


async def create(request: web.Request) -> web.Response:
    """Create from YAML (the form writes YAML too). ``dryRun``: validate only, by the API
    server's own dry run with strict field validation, whose error names the field."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.caller(request).identity  # before a byte of the body is read
    limit = manifest.MAX_BYTES * 2 + 1024  # JSON escaping of the YAML, and the envelope
    if request.content_length is None or request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length or 0)
    try:
        body = json.loads(await read_at_most(request.content, limit))
    except ValueError as e:
        raise web.HTTPBadRequest(text=f"expected a JSON body with a yaml field: {e}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON body with a yaml field")
    try:
        obj = await dash.manifests.load(str(body.get("yaml", "")), who.owner)
    except manifest.BadManifest as e:
        raise (web.HTTPRequestEntityTooLarge(max_size=manifest.MAX_BYTES, actual_size=limit,
                                             text=str(e)) if "larger" in str(e)
               else web.HTTPBadRequest(text=str(e))) from None  # fmt: skip
    if not isinstance(obj, dict) or obj.get("kind") != "GemmaFineTune":
        raise web.HTTPBadRequest(text="expected one GemmaFineTune (kind: GemmaFineTune)")
    obj.setdefault("apiVersion", f"{GROUP}/{VERSION}")
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise web.HTTPBadRequest(text="metadata must be a mapping")
    ns = meta.get("namespace") or body.get("namespace") or "default"
    try:
        meta["namespace"] = names.namespace(str(ns), "metadata.namespace")
    except names.BadName as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    path = dash.api.finetunes_path(meta["namespace"])
    strict = {"fieldValidation": "Strict"}
    checked = await dash.api.request(
        "POST", path, who, body=obj, params={**strict, "dryRun": "All"}
    )
    if body.get("dryRun"):
        return web.json_response({"ok": True, "object": checked})
    created = await dash.api.request("POST", path, who, body=obj, params=strict)
    return web.json_response({"ok": True, "object": created}, status=201)


async def set_suspend(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    suspend = request.match_info["action"] == "suspend"
    patched = await dash.api.request(
        "PATCH", dash.api.finetunes_path(ns, name), who,
        body={"spec": {"suspend": suspend}}, content_type="application/merge-patch+json",
    )  # fmt: skip
    return web.json_response({"ok": True, "summary": summarize(patched)})


async def stop(request: web.Request) -> web.Response:
    """Stop: checkpoint, then end the run as finished (``spec.stop``), keeping its record and
    output. It cannot be undone."""
    dash: Dashboard = request.app["dashboard"]
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    patched = await dash.api.request(
        "PATCH", dash.api.finetunes_path(ns, name), who,
        body={"spec": {"stop": True}}, content_type="application/merge-patch+json",
    )  # fmt: skip
    return web.json_response({"ok": True, "summary": summarize(patched)})


async def delete(request: web.Request) -> web.Response:
    dash: Dashboard = request.app["dashboard"]
    who = dash.caller(request).identity
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
    app = web.Application(middlewares=[security], client_max_size=64 << 10)
    dash = Dashboard(api, settings)
    app["dashboard"] = dash
    p = settings.prefix
    ft = p + "/api/finetunes/{namespace}/{name}"
    tb = p + "/tb/{namespace}/{name}/{ticket}/{tail:.*}"
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
        web.get(p + "/api/compare", compare.compare),
        web.get(ft, detail),
        web.delete(ft, delete),
        web.get(ft + "/live", live.live),
        web.get(ft + "/log", logs.follow),
        web.get(ft + "/log/earlier", logs.earlier),
        web.get(ft + "/gpus", gpus),
        web.get(ft + "/tensorboard", tensorboard_ticket),
        web.post(ft + "/{action:suspend|resume}", set_suspend),
        web.post(ft + "/stop", stop),
        web.get(ft + "/try", tryit.status),
        web.post(ft + "/try", tryit.start),
        web.delete(ft + "/try", tryit.stop),
        web.post(ft + "/try/ask", tryit.ask),
        web.get(tb, tensorboard_proxy),
        web.post(tb, tensorboard_proxy),
        web.options(tb, tensorboard_proxy),
    ])  # fmt: skip
    if p:
        app.router.add_get(p, lambda r: web.HTTPFound(p + "/"))

    async def lifecycle(app: web.Application):
        await api.start()
        # TensorBoards' own pool, a few connections per TensorBoard; /gpus has another.
        dash.plain = aiohttp.ClientSession(connector=tensorboard.connector())
        await dash.gpus.start()
        task = asyncio.create_task(dash.hub.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await dash.plain.close()
        await dash.gpus.close()
        await api.close()

    async def end_streams(app: web.Application) -> None:
        dash.hub.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)
    return app
