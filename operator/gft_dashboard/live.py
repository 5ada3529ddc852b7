"""The run page's one live connection: a tab holds no other (a browser opens at most six per
host, and over a port-forward a fourth tab stalled when each held two).

``GET .../live`` answers with server-sent events that carry all the page shows, read as the
user:

- ``run``: the page's content (``runpage.gather``) at the start and whenever it changed: the
  fine-tune changed (a watch of it made as the user), or, while the run is not over, its pods
  or events did (looked at every ``REFRESH_SECONDS``; a finished run costs nothing more).
- ``log-start`` ``{pod, container, previous, pinned}``: the log lines after it are this pod's
  (again: a new attempt's pod, or the first pod once there is one).
- ``log`` ``{lines: [[timestamp, text], ...]}``, from the tail (``tailLines``) on.
- ``log-end`` ``{reason}``: the log stopped (the container ended, the pod is gone, the user
  may no longer read it).
- ``gone`` ``{reason}``: the user may no longer read the run, or it was deleted.
- ``expired``: the session is over.

Every ``recheck_seconds`` the user's rights are asked again, as on the list's stream; behind
oauth2-proxy the stream also ends after ``PROXY_STREAM_SECONDS`` (the page reconnects at once,
through the proxy, which checks its session again). It holds one of the user's stream slots;
a closed tab is noticed at the next keep-alive at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from gft_dashboard import logs, runpage
from gft_dashboard.apiserver import ApiError, Manifest
from gft_dashboard.context import PROXY_STREAM_SECONDS, Caller, Dashboard, dash_of, event, rights

log = logging.getLogger("gft_dashboard.live")
REFRESH_SECONDS = 5.0
KEEP_ALIVE_SECONDS = 15.0
LOG_RETRY_SECONDS = 5.0
TERMINAL = ("Succeeded", "Failed")


class Live:
    """One page's stream: what it sent last, and the tasks feeding it."""

    def __init__(self, dash: Dashboard, caller: Caller, ns: str, name: str, opts: dict) -> None:
        self.dash, self.caller, self.ns, self.name = dash, caller, ns, name
        self.opts = opts
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=512)
        self.page: Manifest = {}
        self.sent = ""
        self.log_pod: str | None = None
        self.log_task: asyncio.Task | None = None
        self.log_ended: tuple[float, bool] | None = None  # (when, whether to try again)
        self.can: dict[str, bool] | None = None

    @property
    def who(self):
        return self.caller.identity

    async def gather(self) -> Manifest:
        """The page as the user sees it now; their rights (``can``) as last asked."""
        page = await runpage.gather(self.dash.api, self.who, self.ns, self.name,
                                    self.dash.settings.grafana_url, self.can)  # fmt: skip
        self.can = page["can"]
        return page

    def changed(self, page: Manifest) -> bool:
        text = json.dumps(page, sort_keys=True)
        if text == self.sent:
            return False
        self.page, self.sent = page, text
        return True

    def finished(self) -> bool:
        return ((self.page.get("object") or {}).get("status") or {}).get("phase") in TERMINAL

    # -- the fine-tune, watched as the user -------------------------------------------------

    async def watch(self) -> None:
        """Put "changed" on the queue at every change of the fine-tune. A user who may not
        watch (or a watch that fails) gets the page looked at every REFRESH_SECONDS instead."""
        api = self.dash.api
        version = (self.page.get("object") or {}).get("metadata", {}).get("resourceVersion", "")
        while True:
            query = {
                "watch": "true",
                "fieldSelector": f"metadata.name={self.name}",
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "300",
            }
            if version:
                query["resourceVersion"] = version
            buffer = b""
            try:
                async for chunk in api.stream(api.finetunes_path(self.ns), self.who, query):
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        change = json.loads(line)
                        obj = change.get("object") or {}
                        if change.get("type") == "ERROR":
                            version = ""  # too old: start from now
                            continue
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if change.get("type") != "BOOKMARK":
                            await self.queue.put(("changed", change.get("type")))
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as e:
                log.info("watch of %s/%s as the user ended (%s): looking every %ss",
                         self.ns, self.name, e, REFRESH_SECONDS)  # fmt: skip
                while True:
                    await asyncio.sleep(REFRESH_SECONDS)
                    await self.queue.put(("changed", "poll"))

    # -- the log ----------------------------------------------------------------------------

    def wanted_pod(self) -> str | None:
        if self.opts["pod"]:
            return self.opts["pod"]
        return ((self.page.get("object") or {}).get("status") or {}).get("podName")

    def follow_log(self, pod: str) -> None:
        if self.log_task is not None:
            self.log_task.cancel()
        self.log_pod, self.log_ended = pod, None
        self.log_task = asyncio.create_task(self._log(pod))

    async def _log(self, pod: str) -> None:
        o = self.opts
        query = logs.params(o["container"], o["previous"], not o["previous"], o["tail"])
        start = {"pod": pod, "container": o["container"], "previous": o["previous"],
                 "pinned": bool(o["pod"])}  # fmt: skip
        await self.queue.put(("log-start", start))
        again, reason = False, "the log ends here (the container ended)"
        try:
            async for lines in logs.lines_of(self.dash.api, self.who, self.ns, pod, query):
                await self.queue.put(("log", {"lines": lines}))
        except aiohttp.ServerTimeoutError:
            reason = f"no new lines for {logs.IDLE_SECONDS // 60} minutes"
        except ApiError as e:
            # Not started yet (the container is waiting), gone, or not the user's to read.
            again, reason = e.status in (400, 404), str(e)
        except (aiohttp.ClientError, TimeoutError) as e:
            again, reason = True, f"the log could not be read ({type(e).__name__})"
        await self.queue.put(("log-end", {"reason": reason, "again": again}))

    async def log_allowed(self) -> bool:
        pod = self.log_pod
        if pod is None:
            return True
        return await self.dash.api.may(self.who, "get", self.ns, resource="pods", group="",
                                       name=pod, subresource="log")  # fmt: skip

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, response: web.StreamResponse) -> None:
        settings = self.dash.settings
        watcher = asyncio.create_task(self.watch())
        started = time.monotonic()
        refresh = started + REFRESH_SECONDS
        recheck = started + settings.recheck_seconds
        try:
            await response.write(event("run", self.page))
            if self.opts["log"] and self.wanted_pod():
                self.follow_log(self.wanted_pod())
            while True:
                now = time.monotonic()
                wait = max(0.0, min(KEEP_ALIVE_SECONDS, refresh - now, recheck - now))
                try:
                    kind, data = await asyncio.wait_for(self.queue.get(), timeout=wait)
                except TimeoutError:
                    kind, data = "tick", None
                now = time.monotonic()
                if settings.auth == "proxy" and now - started >= PROXY_STREAM_SECONDS:
                    return
                if now >= recheck:
                    recheck = now + settings.recheck_seconds
                    ending = await self.recheck()
                    if ending is not None:
                        await response.write(ending)
                        return
                if kind in ("log-start", "log"):
                    await response.write(event(kind, data))
                    continue
                if kind == "log-end":
                    self.log_ended = (now, bool(data.pop("again")))
                    await response.write(event(kind, data))
                    continue
                if kind == "changed" or (now >= refresh and not self.finished()):
                    refresh = now + REFRESH_SECONDS
                    try:
                        page = await self.gather()
                    except ApiError as e:
                        if e.status in (403, 404):
                            gone = "it was deleted" if e.status == 404 else str(e)
                            await response.write(event("gone", {"reason": gone}))
                            return
                        raise
                    if self.changed(page):
                        await response.write(event("run", page))
                    self.keep_log_current(now)
                elif kind == "tick" and now >= refresh:
                    refresh = now + REFRESH_SECONDS
                    self.keep_log_current(now)
                if kind == "tick":
                    await response.write(b": keep-alive\n\n")
        finally:
            watcher.cancel()
            if self.log_task is not None:
                self.log_task.cancel()
            for task in (watcher, self.log_task):
                if task is not None:
                    with contextlib.suppress(BaseException):
                        await task

    def keep_log_current(self, now: float) -> None:
        """Follow the run's newest trainer (unless the page chose a pod), and try again a log
        that could not be read yet (its container was still starting)."""
        if not self.opts["log"]:
            return
        pod = self.wanted_pod()
        if pod is None:
            return
        if pod != self.log_pod:
            self.follow_log(pod)
        elif self.log_ended is not None:
            when, again = self.log_ended
            if again and now - when >= LOG_RETRY_SECONDS and not self.finished():
                self.follow_log(pod)

    async def recheck(self) -> bytes | None:
        """The user's rights, asked again: the event that ends the stream, or None."""
        verdict = await rights(
            self.dash, self.caller, runpage.rights, self.dash.api, self.who, self.ns, self.name
        )
        if isinstance(verdict, dict):
            self.can, verdict = verdict, True
        if verdict == "expired":
            return event("expired", {"reason": "session expired"})
        try:
            await self.dash.api.request(
                "GET", self.dash.api.finetunes_path(self.ns, self.name), self.who
            )
        except ApiError as e:
            if e.status in (403, 404):
                return event("gone", {"reason": f"you may no longer read {self.ns}/{self.name}"})
            raise
        following = self.log_task is not None and not self.log_task.done()
        if following and not await self.log_allowed():
            assert self.log_task is not None
            self.log_task.cancel()
            self.log_ended = (time.monotonic(), False)
            self.opts["log"] = False
            ended = {"reason": "you may no longer read this log", "again": False}
            await self.queue.put(("log-end", ended))
        return None


async def live(request: web.Request) -> web.StreamResponse:
    dash = dash_of(request)
    caller = dash.caller(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    try:
        opts = logs.options(request.query)
    except logs.BadQuery as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    opts["log"] = request.query.get("log") != "0"
    with dash.stream_slot(caller):
        stream = Live(dash, caller, ns, name, opts)
        stream.changed(await stream.gather())  # a 403 or 404 is the answer, before the stream
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        try:
            await stream.run(response)
        except ConnectionResetError:
            pass
        except (ApiError, TimeoutError, aiohttp.ClientError) as e:
            # Rights that cannot be asked are not assumed: end it; the page reconnects.
            log.warning("a run page's stream ended: %s", e)
        return response
