"""How a fine-tune's objects look to whoever reads them (the operator makes them; the dashboard
and other tools find and read them): the ports, labels and containers of a training pod, which
pods speak for a run, and which status reasons are trouble. One definition, so that the
operator and its readers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Manifest = dict[str, Any]

TRAINER = "trainer"
"""The training pod's main container."""
TENSORBOARD = "tensorboard"
"""TensorBoard's container, port name and component label."""
TENSORBOARD_PORT = 6006
METRICS_PORT = 9090
"""The trainer's Prometheus endpoint (``/metrics``), on every pod of a run."""

MANAGED_BY = "gft-operator"
"""The ``app.kubernetes.io/managed-by`` label of every object the operator makes."""
NAME_LABEL = "finetune.gemma.dev/name"
"""On every child: the name of its GemmaFineTune."""
UID_LABEL = "finetune.gemma.dev/uid"
"""On the Job and its pods: the uid of the GemmaFineTune (the run) they belong to."""
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
"""Set by an Indexed Job (a multi-node run): pod 0 speaks for the run."""

WARNING_REASONS = frozenset(
    {
        # Why a run cannot start or go on: the user has something to fix.
        "Unschedulable",
        "PersistentVolumeClaimNotBound",
        "ImagePullFailed",
        "SecretNotFound",
        "ConfigMapNotFound",
        "CreateContainerConfigError",
        "VolumeMountFailed",
        "PodSecurityViolation",
        "QuotaExceeded",
        "FailedCreate",
        "OOMKilled",
        "AttemptFailed",
        "JobConflict",
        "ChildConflict",
        "PolicyViolation",
        "InvalidSpec",
        "UnknownFields",
        "Inadmissible",
        "RecordingOutcome",
        # The API server refused a write (the Applied condition).
        "Invalid",
        "Forbidden",
        "Refused",
        # How a run failed.
        "BackoffLimitExceeded",
        "DeadlineExceeded",
        # The trainer's metrics cannot be read (the MetricsAvailable condition).
        "MetricsUnreachable",
        "MetricsTimeout",
        "MetricsInvalid",
    }
)
"""Status and condition reasons that are trouble: Warning events, a warning light."""


def _labels(pod: Manifest) -> dict[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}


def completion_index(pod: Manifest) -> int:
    """The pod's index in an Indexed Job (0 for a one-pod Job's pod)."""
    index = _labels(pod).get(COMPLETION_INDEX_LABEL, "0")
    return int(index) if index.isdigit() else 0


def newest_pod(pods: Iterable[Manifest]) -> Manifest | None:
    def created(p: Manifest) -> tuple[str, str]:
        meta = p.get("metadata") or {}
        return (meta.get("creationTimestamp") or "", meta.get("name") or "")

    return max(pods, key=created, default=None)


def leaders(pods: Iterable[Manifest]) -> list[Manifest]:
    """The pods that speak for the run: all of a one-pod Job's, pod 0 of an Indexed Job's
    (rank 0 writes the result and serves the training metrics)."""
    return [p for p in pods if _labels(p).get(COMPLETION_INDEX_LABEL, "0") == "0"]


def peers(pods: Iterable[Manifest]) -> list[Manifest]:
    """The newest pod of each index past 0 of an Indexed Job (each serves its own GPUs'
    readings), by index; none for a one-pod Job."""
    newest: dict[int, Manifest] = {}
    for p in pods:
        index = _labels(p).get(COMPLETION_INDEX_LABEL)
        if index is None or not index.isdigit() or index == "0":
            continue
        known = newest.get(int(index))
        if known is None or newest_pod([known, p]) is p:
            newest[int(index)] = p
    return [newest[i] for i in sorted(newest)]


def running_pods(pods: Iterable[Manifest]) -> list[tuple[str, str, str]]:
    """(name, completion index, IP) of a run's running pods, the newest of each index, by
    index (a one-pod Job's pod is index 0): where each pod's trainer metrics are read."""
    newest: dict[int, Manifest] = {}
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        if not status.get("podIP"):
            continue
        index = completion_index(pod)
        known = newest.get(index)
        if known is None or newest_pod([known, pod]) is pod:
            newest[index] = pod
    return [
        (newest[i]["metadata"]["name"], str(i), newest[i]["status"]["podIP"])
        for i in sorted(newest)
    ]
