"""A run's logs, read as the user from the Kubernetes log API.

The page opens at the tail (the last ``tailLines``, then what comes: a long run shows where it
is now, not its first minutes), loads earlier lines on demand (``earlier``: the lines before a
timestamp), and offers the whole log as a download. Any pod of the run may be read (each
attempt, each rank of a multi-node run, TensorBoard's, the Try-it pod's), and the previous
container of a pod after a crash or an OOM kill. Lines carry the kubelet's timestamps
(``timestamps=true``), by which earlier lines and a reconnect find their place; the page shows
the text only, as text.

A followed log holds one of the user's stream slots. It ends when the user may no longer read
it (asked again every ``recheck_seconds``), when their session is over, after ``IDLE_SECONDS``
of silence or ``LOG_CAP_BYTES`` sent (a reload follows again from the present), and says
which; and within ``CLIENT_GONE_SECONDS`` of its reader closing the tab, however quiet the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from gft_api.conventions import NAME_LABEL

from gft_dashboard import names
from gft_dashboard.apiserver import ApiError, ApiServer, Identity
from gft_dashboard.context import Caller, Dashboard, client_gone, dash_of, rights
from gft_dashboard.runpage import TRY_LABEL

IDLE_SECONDS = 1800  # a followed log that says nothing for this long is ended
LOG_CAP_BYTES = 4 << 20  # what one followed log sends at most (its tail included), not a download
TAIL_LINES = 500  # what the page opens with
MAX_TAIL_LINES = 10_000
MAX_EARLIER_LINES = 5_000
EARLIER_SCAN_LIMIT = 400_000  # lines of the log's end read to find what lies before a time
CONTAINERS = ("trainer", "tensorboard", "try")

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")
Line = tuple[str, str]  # (the kubelet's RFC 3339 timestamp, the text)


class BadQuery(ValueError):
    """A query parameter that is not what it must be; the message names it."""


def options(query: Any) -> dict[str, Any]:
    """The log query parameters, checked: ``pod`` (a name), ``container`` (one of the run's),
    ``previous`` (0/1), ``tailLines`` (a count)."""
    pod = query.get("pod") or None
    if pod is not None:
        try:
            names.name(pod, "pod")
        except names.BadName as e:
            raise BadQuery(str(e)) from None
    container = query.get("container") or "trainer"
    if container not in CONTAINERS:
        raise BadQuery(f"container {container[:40]!r}: one of {', '.join(CONTAINERS)}")
    tail = query.get("tailLines") or str(TAIL_LINES)
    if not tail.isdigit() or not 0 < int(tail) <= MAX_TAIL_LINES:
        raise BadQuery(f"tailLines {tail[:20]!r}: a whole number from 1 to {MAX_TAIL_LINES}")
    return {
        "pod": pod,
        "container": container,
        "previous": query.get("previous") in ("1", "true"),
        "tail": int(tail),
    }


def params(
    container: str,
    previous: bool,
    follow: bool,
    tail: int | None = None,
    since_time: str | None = None,
    timestamps: bool = True,
) -> dict[str, str]:
    """The log API's query: never ``limitBytes`` from the start (that showed a long run's first
    megabyte forever), the tail instead."""
    out = {"container": container, "follow": str(follow).lower()}
    if previous:
        out["previous"] = "true"
    if tail is not None:
        out["tailLines"] = str(tail)
    if since_time is not None:
        out["sinceTime"] = since_time
    if timestamps:
        out["timestamps"] = "true"
    return out


def split(buffer: bytes, chunk: bytes) -> tuple[list[Line], bytes]:
    """Whole lines of ``buffer + chunk`` as (timestamp, text), and the rest (a line not ended
    yet). Bytes that are not UTF-8 are shown replaced, never dropped."""
    *whole, rest = (buffer + chunk).split(b"\n")
    return [stamped(line.decode("utf-8", errors="replace")) for line in whole], rest


def stamped(line: str) -> Line:
    stamp, sep, text = line.partition(" ")
    if sep and TIMESTAMP.fullmatch(stamp):
        return stamp, text.rstrip("\r")
    return "", line.rstrip("\r")


def order(stamp: str) -> str:
    """A key that sorts the kubelet's timestamps in time (UTC, RFC 3339 with 0 to 9 digits of
    fraction: ``...:05Z`` comes before ``...:05.1Z``, which plain text order gets wrong)."""
    match = TIMESTAMP.fullmatch(stamp)
    if match is None:
        return ""
    return stamp[:19] + (match.group(1) or ".")[1:].ljust(9, "0")


def before(lines: list[Line], stamp: str, count: int) -> list[Line]:
    """The last ``count`` lines older than ``stamp``."""
    limit = order(stamp)
    older = [x for x in lines if x[0] and order(x[0]) < limit]
    return older[-count:]


async def pod_of_run(api: ApiServer, who: Identity, ns: str, name: str, pod: str | None) -> str:
    """The pod whose log is wanted: the one asked for, which must be one of this run's (or its
    Try-it pod), else the run's newest trainer (``status.podName``)."""
    if pod is None:
        obj = await api.request("GET", api.finetunes_path(ns, name), who)
        pod = (obj.get("status") or {}).get("podName")
        if not pod:
            raise web.HTTPNotFound(text="no trainer pod yet")
        try:
            return names.name(pod, "status.podName")
        except names.BadName as e:
            raise web.HTTPBadGateway(text=str(e)) from None
    found = await api.request("GET", f"/api/v1/namespaces/{ns}/pods/{pod}", who)
    labels = (found.get("metadata") or {}).get("labels") or {}
    if name not in (labels.get(NAME_LABEL), labels.get(TRY_LABEL)):
        raise web.HTTPNotFound(text=f"pod {pod} is not one of {ns}/{name}'s")
    return pod


def log_path(ns: str, pod: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods/{pod}/log"


async def lines_of(
    api: ApiServer, who: Identity, ns: str, pod: str, query: dict[str, str]
) -> AsyncIterator[list[Line]]:
    """The log's lines as they come, batch by batch (one batch per chunk the API server sends)."""
    buffer = b""
    async for chunk in api.stream(log_path(ns, pod), who, query, idle_timeout=IDLE_SECONDS):
        lines, buffer = split(buffer, chunk)
        if lines:
            yield lines
    if buffer:
        yield [stamped(buffer.decode("utf-8", errors="replace"))]


# -- handlers ---------------------------------------------------------------------------------


async def follow(request: web.Request) -> web.StreamResponse:
    """``GET .../log``: the log as text, from its tail (``tailLines``) and followed (unless
    ``follow=0``); ``download=1``: the whole log as a file."""
    dash = dash_of(request)
    caller = dash.caller(request)
    who = caller.identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    try:
        opts = options(request.query)
    except BadQuery as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    download = request.query.get("download") == "1"
    following = request.query.get("follow") != "0" and not download
    query = params(
        opts["container"], opts["previous"], following, None if download else opts["tail"],
        timestamps=False,
    )  # fmt: skip
    with dash.stream_slot(caller):
        pod = await pod_of_run(dash.api, who, ns, name, opts["pod"])
        chunks = dash.api.stream(log_path(ns, pod), who, query, idle_timeout=IDLE_SECONDS)
        first = await anext(chunks, b"")  # a refusal (403, 404) raises here, before the reply
        headers = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
        if download:
            suffix = "-previous" if opts["previous"] else ""
            headers["Content-Disposition"] = (
                f'attachment; filename="{pod}-{opts["container"]}{suffix}.log"'
            )
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)

        async def pump() -> str:
            sent = 0
            async for chunk in _chained(first, chunks):
                await response.write(chunk)
                sent += len(chunk)
                if following and sent >= LOG_CAP_BYTES:
                    return (f"{LOG_CAP_BYTES >> 20} MiB shown: reload to follow from the present, "
                            "or download the whole log")  # fmt: skip
            return ""

        ending = await _while_allowed(dash, caller, request, ns, pod, pump())
        await chunks.aclose()
        if ending and not download:
            with contextlib.suppress(ConnectionResetError):
                await response.write(f"\n[{ending}]\n".encode())
        return response


async def earlier(request: web.Request) -> web.Response:
    """``GET .../log/earlier?before=TIMESTAMP&lines=N``: the N lines before that time (the page
    asks when its reader scrolls above the first line it has)."""
    dash = dash_of(request)
    caller = dash.caller(request)
    who = caller.identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    try:
        opts = options(request.query)
        stamp = request.query.get("before", "")
        if not TIMESTAMP.fullmatch(stamp):
            raise BadQuery(f"before {stamp[:40]!r}: a timestamp of a log line (RFC 3339)")
        count = request.query.get("lines", "500")
        if not count.isdigit() or not 0 < int(count) <= MAX_EARLIER_LINES:
            raise BadQuery(f"lines {count[:20]!r}: a whole number from 1 to {MAX_EARLIER_LINES}")
    except BadQuery as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    wanted, scan = int(count), int(count) * 4
    limit = order(stamp)
    # A scan reads up to EARLIER_SCAN_LIMIT lines: one of the user's stream slots while it
    # does, and only the lines wanted are kept (not the whole scan).
    with dash.stream_slot(caller):
        pod = await pod_of_run(dash.api, who, ns, name, opts["pod"])
        while True:
            # The log API counts from the end only: read more of the end until enough is older.
            query = params(opts["container"], opts["previous"], False, scan)
            found: deque[Line] = deque(maxlen=wanted)
            read = older = 0
            async for batch in lines_of(dash.api, who, ns, pod, query):
                read += len(batch)
                for line in batch:
                    if line[0] and order(line[0]) < limit:
                        found.append(line)
                        older += 1
            complete = read < scan  # the whole log was read
            if len(found) >= wanted or complete or scan >= EARLIER_SCAN_LIMIT:
                more = not complete or older > len(found)
                return web.json_response({"pod": pod, "lines": list(found), "more": more})
            scan = min(scan * 4, EARLIER_SCAN_LIMIT)


async def _chained(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


async def _while_allowed(
    dash: Dashboard, caller: Caller, request: web.Request, ns: str, pod: str, work,
    what: str = "log",
) -> str:  # fmt: skip
    """Run ``work`` while the user may still read the pod's log (asked again every
    ``recheck_seconds``) and its reader is there; returns why it ended early (``work``'s own
    reason included), or "" when it ran to its end or the reader left."""
    who = caller.identity

    async def may_read() -> bool:
        return await dash.api.may(who, "get", ns, resource="pods", group="", name=pod,
                                  subresource="log")  # fmt: skip

    copying = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        while True:
            done, _ = await asyncio.wait(
                {copying, gone}, timeout=dash.settings.recheck_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            if gone in done:  # the tab closed on a quiet log: its slot is free now
                return ""
            if done:
                return copying.result() or ""
            verdict = await rights(dash, caller, may_read)
            if verdict is not True:
                return ("session expired: sign in again" if verdict == "expired"
                        else f"you may no longer read this {what}")  # fmt: skip
    except aiohttp.ServerTimeoutError:
        return f"no new lines for {IDLE_SECONDS // 60} minutes: reload to follow"
    except ApiError as e:
        if e.status == 404:
            return "the pod is gone"
        return f"your rights to this {what} could not be checked ({e}): reload"
    except TimeoutError as e:
        return f"your rights to this {what} could not be checked ({e!r}): reload"
    except (ConnectionResetError, aiohttp.ClientError):
        return ""
    finally:
        copying.cancel()
        gone.cancel()
        with contextlib.suppress(BaseException):
            await copying
