"""Try it: ask a finished run's model questions, its answer beside the base model's.

The dashboard starts, **as the user** (their ``create pods`` right in the run's namespace), a
short-lived pod made from the run's own Job template: the trainer's image, volumes (the output
volume read-only), environment (the hub token's Secret reference), node selector, tolerations
and GPUs, on the run's kind of node, running ``gft-try`` over the run's config file (see
``gft_trainer.tryit``). The pod serves on its pod IP; the dashboard asks it for the user, once
they may (``create pods/proxy``, what the API server's pod proxy would need), and passes the
answer on as newline-delimited JSON of strings the page shows as text. The pod ends itself
after ``idleSeconds`` without a question (and by ``activeDeadlineSeconds`` at the latest);
*Stop* deletes it, as the user.

The pod carries ``finetune.gemma.dev/try-of: NAME`` and none of the operator's labels (the
operator never mistakes it for a trainer of the run), and an owner reference to the
GemmaFineTune, so that it goes with it.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from typing import Any

import aiohttp
from aiohttp import web

from gft_dashboard import names
from gft_dashboard.apiserver import GROUP, VERSION, ApiError, ApiServer, Identity, Manifest
from gft_dashboard.context import dash_of
from gft_dashboard.runpage import TRY_LABEL, newest_first, pod_row
from gft_dashboard.tensorboard import host_port

PORT = 8000
TOKEN = "GFT_TRY_TOKEN"  # what gft-try answers to (an env var of the pod, sent as a bearer)
CONFIG = "/etc/gft/config.yaml"  # where the operator mounts the run's trainer config
MAX_PROMPT_CHARS = 8000
MAX_ANSWER_BYTES = 1 << 20
ANSWER_TIMEOUT = 300.0  # seconds an answer (both models) may take
# Fields of the Job's pod spec a Try-it pod keeps: where it runs and what it mounts.
POD_FIELDS = (
    "volumes", "nodeSelector", "tolerations", "affinity", "securityContext", "imagePullSecrets",
    "runtimeClassName", "priorityClassName",
)  # fmt: skip


class CannotTry(ValueError):
    """The run cannot be tried (not finished, no Job template); the message says why."""


def pod(finetune: Manifest, job: Manifest, idle_seconds: int, deadline_seconds: int) -> Manifest:
    """The Try-it pod of a finished run, from its Job's pod template, with a token of its own
    (GFT_TRY_TOKEN: gft-try answers only whoever sends it; another team's pod can reach the
    port but cannot read this pod's spec)."""
    meta = finetune["metadata"]
    owners = (job.get("metadata") or {}).get("ownerReferences") or []
    if not any(o.get("uid") == meta.get("uid") and o.get("controller") for o in owners):
        # Someone who may write Jobs here replaced it: its template is theirs, not the run's.
        raise CannotTry(
            f"the Job {(job.get('metadata') or {}).get('name')} is not this run's (its owner is "
            "not the fine-tune): Try it starts only from the run's own Job"
        )
    template = (job.get("spec") or {}).get("template") or {}
    spec = template.get("spec") or {}
    trainer = next((c for c in spec.get("containers") or [] if c.get("name") == "trainer"), None)
    if trainer is None:
        raise CannotTry(f"the Job {job['metadata']['name']} has no trainer container")
    command = [*(trainer.get("command") or []), *(trainer.get("args") or [])]
    config = command[command.index("--config") + 1] if "--config" in command[:-1] else CONFIG
    mounts = []
    for m in trainer.get("volumeMounts") or []:
        m = dict(m)
        if m.get("mountPath") != "/tmp":
            m["readOnly"] = True  # it reads the run; it writes nothing but scratch
        mounts.append(m)
    env = [e for e in trainer.get("env") or [] if e.get("name") not in ("HF_HUB_OFFLINE", TOKEN)]
    env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # the run's cache has the base model
    env.append({"name": TOKEN, "value": secrets.token_urlsafe(32)})
    container: Manifest = {
        "name": "try",
        "image": trainer["image"],
        "imagePullPolicy": trainer.get("imagePullPolicy", "IfNotPresent"),
        "command": ["gft-try", "--config", config, "--port", str(PORT),
                    "--idle-seconds", str(idle_seconds)],
        "env": env,
        "volumeMounts": mounts,
        "ports": [{"name": "try", "containerPort": PORT}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": PORT}, "periodSeconds": 2},
    }  # fmt: skip
    for key in ("resources", "securityContext", "workingDir"):
        if key in trainer:
            container[key] = copy.deepcopy(trainer[key])
    pod_spec: Manifest = {key: copy.deepcopy(spec[key]) for key in POD_FIELDS if key in spec}
    pod_spec.update(
        containers=[container],
        restartPolicy="Never",
        automountServiceAccountToken=False,
        enableServiceLinks=False,
        terminationGracePeriodSeconds=10,
        activeDeadlineSeconds=deadline_seconds,
    )
    name = meta["name"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{name}-try-",
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/name": "gemma-finetune-try",
                "app.kubernetes.io/managed-by": "gft-dashboard",
                TRY_LABEL: name,
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "GemmaFineTune",
                    "name": name,
                    "uid": meta["uid"],
                }
            ],
        },
        "spec": pod_spec,
    }


def triable(finetune: Manifest) -> None:
    """CannotTry unless the run has ended with something saved."""
    status = finetune.get("status") or {}
    if status.get("phase") != "Succeeded":
        raise CannotTry(
            f"the run is {status.get('phase') or 'Pending'}: Try it is for a run that has "
            "finished (Succeeded, or ended by Stop)"
        )
    if not status.get("jobName"):
        raise CannotTry("the run has no Job any more (ttlSecondsAfterFinished removed it): "
                        "Try it starts its pod from the Job's pod template")  # fmt: skip


def live_pods(pods: list[Manifest]) -> list[Manifest]:
    return [
        p
        for p in newest_first(pods)
        if not p["metadata"].get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") in (None, "Pending", "Running")
    ]


def state(pods: list[Manifest]) -> Manifest:
    """What the panel says: the newest Try-it pod's row, and whether it answers."""
    if not pods:
        return {"pod": None, "ready": False, "phase": None}
    newest = newest_first(pods)[0]
    row = pod_row(newest)
    return {"pod": row, "ready": row["ready"] and row["phase"] == "Running",
            "phase": row["phase"]}  # fmt: skip


async def _pods(api: ApiServer, who: Identity, ns: str, name: str) -> list[Manifest]:
    got = await api.request(
        "GET", f"/api/v1/namespaces/{ns}/pods", who, params={"labelSelector": f"{TRY_LABEL}={name}"}
    )
    return got.get("items") or []


# -- handlers ---------------------------------------------------------------------------------


async def start(request: web.Request) -> web.Response:
    """``POST .../try``: the run's Try-it pod, started as the user (or the one already up)."""
    dash = dash_of(request)
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    api = dash.api
    finetune = await api.request("GET", api.finetunes_path(ns, name), who)
    try:
        triable(finetune)
        job_name = names.name(finetune["status"]["jobName"], "status.jobName")
    except (CannotTry, names.BadName) as e:
        raise web.HTTPConflict(text=str(e)) from None
    running = live_pods(await _pods(api, who, ns, name))
    if running:
        return web.json_response(state(running))
    try:
        job = await api.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{job_name}", who)
    except ApiError as e:
        if e.status == 404:
            raise web.HTTPConflict(text=f"the run's Job {job_name} is gone: Try it starts its "
                                   "pod from the Job's pod template") from None  # fmt: skip
        raise
    settings = dash.settings
    try:
        wanted = pod(finetune, job, settings.try_idle_seconds, settings.try_deadline_seconds)
    except CannotTry as e:
        raise web.HTTPConflict(text=str(e)) from None
    created = await api.request("POST", f"/api/v1/namespaces/{ns}/pods", who, body=wanted)
    return web.json_response(state([created]), status=201)


async def status(request: web.Request) -> web.Response:
    """``GET .../try``: the newest Try-it pod of the run, as the user sees it."""
    dash = dash_of(request)
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    return web.json_response(state(await _pods(dash.api, who, ns, name)))


async def stop(request: web.Request) -> web.Response:
    """``DELETE .../try``: every Try-it pod of the run, deleted as the user."""
    dash = dash_of(request)
    who = dash.caller(request).identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    for found in live_pods(await _pods(dash.api, who, ns, name)):
        meta = found["metadata"]
        await dash.api.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{meta['name']}", who,
                               body={"preconditions": {"uid": meta["uid"]}})  # fmt: skip
    return web.json_response({"ok": True})


async def ask(request: web.Request) -> web.StreamResponse:
    """``POST .../try/ask`` with ``{"prompt": "..."}``: the run's answer, then the base
    model's, as they come (newline-delimited JSON; only strings and numbers of the pod's
    answer are passed on, and at most MAX_ANSWER_BYTES of it)."""
    dash = dash_of(request)
    caller = dash.caller(request)
    who = caller.identity
    ns, name = request.match_info["namespace"], request.match_info["name"]
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise web.HTTPBadRequest(text='send JSON: {"prompt": "..."}') from None
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise web.HTTPBadRequest(text=f"ask a question (1 to {MAX_PROMPT_CHARS} characters)")
    api = dash.api
    running = [p for p in live_pods(await _pods(api, who, ns, name))
               if p.get("status", {}).get("phase") == "Running"]  # fmt: skip
    ready = [p for p in running if pod_row(p)["ready"] and (p.get("status") or {}).get("podIP")]
    if not ready:
        raise web.HTTPConflict(text="no Try-it pod answers yet: start it, and wait until it "
                               "says it is ready")  # fmt: skip
    target = ready[0]
    pod_name = target["metadata"]["name"]
    if not await api.may(who, "create", ns, resource="pods", group="", name=pod_name,
                         subresource="proxy"):  # fmt: skip
        raise web.HTTPForbidden(text=f"you may not talk to pod {pod_name} (create pods/proxy "
                                f"in {ns})")  # fmt: skip
    token = pod_token(target)
    address = host_port(target["status"]["podIP"], PORT)
    if token is None or address is None:
        raise web.HTTPConflict(
            text=f"pod {pod_name} is not a Try-it pod this dashboard started (no token, or no "
            "usable address): stop it and start again"
        )
    with dash.stream_slot(caller):
        return await _relay(request, dash, address, token, prompt)


def pod_token(found: Manifest) -> str | None:
    """The token in the Try-it container's environment (read as the user, with the pod)."""
    for container in (found.get("spec") or {}).get("containers") or []:
        if container.get("name") == "try":
            for e in container.get("env") or []:
                if e.get("name") == TOKEN and isinstance(e.get("value"), str):
                    return e["value"]
    return None


async def _relay(
    request: web.Request, dash, address: str, token: str, prompt: str
) -> web.StreamResponse:
    assert dash.plain is not None
    response = web.StreamResponse(
        headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"}
    )
    sent = 0
    started = time.monotonic()
    try:
        async with dash.plain.post(
            f"http://{address}/generate", json={"prompt": prompt}, allow_redirects=False,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT, sock_connect=10),
        ) as r:  # fmt: skip
            if r.status != 200:
                raise web.HTTPBadGateway(text=f"the Try-it pod answered HTTP {r.status}")
            await response.prepare(request)
            buffer = b""
            async for chunk in r.content.iter_any():
                sent += len(chunk)
                if sent > MAX_ANSWER_BYTES:
                    await response.write(_line({"error": "the answer is too long: cut here"}))
                    break
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        await response.write(_line(_checked(line)))
    except (aiohttp.ClientError, TimeoutError) as e:
        if not response.prepared:
            raise web.HTTPBadGateway(
                text=f"the Try-it pod did not answer ({type(e).__name__})"
            ) from None
        await response.write(_line({"error": f"the answer stopped ({type(e).__name__})"}))
    await response.write(_line({"end": True, "seconds": round(time.monotonic() - started, 2)}))
    return response


def _checked(line: bytes) -> dict[str, Any]:
    """One line of the pod's answer, keeping only the fields the page knows, with their types;
    anything else becomes an error line (the pod's text is its author's)."""
    try:
        got = json.loads(line)
    except ValueError:
        return {"error": "the Try-it pod sent a line that is not JSON"}
    if not isinstance(got, dict):
        return {"error": "the Try-it pod sent something unexpected"}
    out: dict[str, Any] = {}
    if got.get("model") in ("tuned", "base"):
        out["model"] = got["model"]
    for key in ("text", "error"):
        if isinstance(got.get(key), str):
            out[key] = got[key]
    if got.get("done") is True:
        out["done"] = True
        if got.get("truncated") in ("maxNewTokens", "timeBudget"):
            out["truncated"] = got["truncated"]
        if isinstance(got.get("tokens"), int):
            out["tokens"] = got["tokens"]
    return out


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
