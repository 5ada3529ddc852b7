"""What the run page shows of one fine-tune, every part read as the user: the object, the pods
of the run (each attempt, each rank of a multi-node run, TensorBoard after the run, the Try-it
pod), the events of the fine-tune, its Job and those pods (why a pod waits: FailedScheduling
for want of ``nvidia.com/gpu``, an image that cannot be pulled, an OOM kill), the ``kubectl``
command that shows the same, what the user may do, and where Grafana shows the run.

``gather`` does the reads; the rest are pure functions of what they return."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

from gft_api.conventions import COMPLETION_INDEX_LABEL, NAME_LABEL

from gft_dashboard.apiserver import ApiError, ApiServer, Identity, Manifest
from gft_dashboard.hub import summarize

TRY_LABEL = "finetune.gemma.dev/try-of"  # on the Try-it pods the dashboard starts
MAX_PODS = 12  # the newest pods of a run whose events are asked for
MAX_EVENTS = 100
GRAFANA_DASHBOARD = "d/gft-finetuning/gemma-fine-tuning"  # the chart's dashboard (its uid)


async def gather(
    api: ApiServer,
    who: Identity,
    ns: str,
    name: str,
    grafana: str = "",
    known: dict[str, bool] | None = None,
) -> Manifest:
    """Everything the run page shows, as ``who`` sees it (``known``: their rights, when they
    were just asked). A 403 or 404 on the fine-tune itself raises (the page says so); the pods
    and events are left out, saying why, for a user who may read the fine-tune but not them."""
    obj = await api.request("GET", api.finetunes_path(ns, name), who)
    pods_path = f"/api/v1/namespaces/{ns}/pods"
    notes: list[str] = []

    async def listed(selector: str) -> list[Manifest]:
        try:
            got = await api.request("GET", pods_path, who, params={"labelSelector": selector})
        except ApiError as e:
            if e.status != 403:
                raise
            notes.append(f"you may not list pods in {ns}: the run's pods and their events are "
                         "not shown")  # fmt: skip
            return []
        return got.get("items") or []

    async def allowed() -> dict[str, bool]:
        return known if known is not None else await rights(api, who, ns, name)

    run_pods, try_pods, can = await asyncio.gather(
        listed(f"{NAME_LABEL}={name}"), listed(f"{TRY_LABEL}={name}"), allowed()
    )
    pods = newest_first([*run_pods, *try_pods])
    involved = [name, *(p["metadata"]["name"] for p in pods[:MAX_PODS])]

    async def events_of(involved_name: str) -> list[Manifest]:
        try:
            got = await api.request(
                "GET", f"/api/v1/namespaces/{ns}/events", who,
                params={"fieldSelector": f"involvedObject.name={involved_name}"},
            )  # fmt: skip
        except ApiError as e:
            if e.status != 403:
                raise
            return []
        return got.get("items") or []

    events = [e for found in await asyncio.gather(*map(events_of, involved)) for e in found]
    status = obj.get("status") or {}
    return {
        "object": obj,
        "summary": summarize(obj),
        "pods": [pod_row(p) for p in pods],
        "events": event_rows(ns, events),
        "can": can,
        "kubectl": kubectl_hints(ns, name, status.get("jobName"), pods),
        "grafana": grafana_link(grafana, ns, name),
        "notes": notes,
    }


async def rights(api: ApiServer, who: Identity, ns: str, name: str) -> dict[str, bool]:
    """What the run page may offer ``who`` (SelfSubjectAccessReviews made as them)."""
    checks = {
        "delete": api.may(who, "delete", ns, name=name),
        "patch": api.may(who, "patch", ns, name=name),
        "create": api.may(who, "create", ns),
        # Try it: start a pod in the namespace, then talk to it (what `kubectl port-forward`
        # or the API server's pod proxy would need).
        "tryStart": api.may(who, "create", ns, resource="pods", group=""),
        "tryAsk": api.may(who, "create", ns, resource="pods", group="", subresource="proxy"),
    }
    answers = await asyncio.gather(*checks.values())
    return dict(zip(checks, answers, strict=True))


def newest_first(pods: list[Manifest]) -> list[Manifest]:
    return sorted(
        pods,
        key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]),
        reverse=True,
    )


def role(pod: Manifest) -> str:
    labels = pod["metadata"].get("labels") or {}
    if TRY_LABEL in labels:
        return "try"
    component = labels.get("app.kubernetes.io/component")
    if component == "tensorboard":
        return "tensorboard"
    return f"rank group {labels.get(COMPLETION_INDEX_LABEL, '0')}"


def pod_row(pod: Manifest) -> dict[str, Any]:
    """A pod as the page lists it (and offers its log): phase, readiness, restarts, and each
    container's state with the kubelet's reason (OOMKilled, ImagePullBackOff...)."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    statuses = [*(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or [])]  # fmt: skip
    containers = []
    for cs in statuses:
        state = cs.get("state") or {}
        kind = next(iter(state), "waiting")
        detail = state.get(kind) or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        containers.append({
            "name": cs.get("name"),
            "state": kind,
            "reason": detail.get("reason"),
            "exitCode": detail.get("exitCode"),
            "restarts": cs.get("restartCount", 0),
            "lastReason": last.get("reason"),
            "lastExitCode": last.get("exitCode"),
        })  # fmt: skip
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return {
        "name": meta["name"],
        "role": role(pod),
        "phase": status.get("phase") or "Pending",
        "ready": ready,
        "deleting": bool(meta.get("deletionTimestamp")),
        "node": spec.get("nodeName"),
        "created": meta.get("creationTimestamp"),
        "reason": status.get("reason"),
        "containers": containers,
        "containerNames": [c["name"] for c in spec.get("containers") or []],
    }


def event_rows(ns: str, events: list[Manifest]) -> list[dict[str, Any]]:
    """Newest first, at most MAX_EVENTS, each with the kubectl command that shows its object."""
    rows = []
    for e in events:
        involved = e.get("involvedObject") or {}
        kind, name = involved.get("kind") or "", involved.get("name") or ""
        rows.append({
            "kind": kind,
            "name": name,
            "type": e.get("type"),
            "reason": e.get("reason"),
            "message": e.get("message"),
            "count": e.get("count") or (e.get("series") or {}).get("count") or 1,
            "time": e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp"),
            "kubectl": f"kubectl describe {kubectl_kind(kind)} {name} -n {ns}",
        })  # fmt: skip
    rows.sort(key=lambda r: r["time"] or "", reverse=True)
    return rows[:MAX_EVENTS]


def kubectl_kind(kind: str) -> str:
    return {"GemmaFineTune": "gft"}.get(kind, kind.lower() or "pod")


def kubectl_hints(ns: str, name: str, job: str | None, pods: list[Manifest]) -> list[str]:
    """The commands that show what the page shows, for a terminal."""
    hints = [
        f"kubectl describe gft {name} -n {ns}",
        f"kubectl get events -n {ns} --field-selector involvedObject.name={name}",
    ]
    if job:
        hints.append(f"kubectl describe job {job} -n {ns}")
    trainers = [p for p in pods if TRY_LABEL not in (p["metadata"].get("labels") or {})]
    if trainers:
        newest = trainers[0]["metadata"]["name"]
        hints += [
            f"kubectl describe pod {newest} -n {ns}",
            f"kubectl logs {newest} -n {ns} -c trainer --previous",
        ]
    return hints


def grafana_link(grafana: str, ns: str, name: str) -> str | None:
    """The chart's Grafana dashboard for this run, when the dashboard was told where Grafana
    is (``--grafana-url``)."""
    if not grafana:
        return None
    query = urllib.parse.urlencode({"var-namespace": ns, "var-finetune": name})
    return f"{grafana.rstrip('/')}/{GRAFANA_DASHBOARD}?{query}"
