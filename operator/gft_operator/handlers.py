"""The kopf side: the watches that fill the caches (observe), the triggers that queue a
reconcile, the periodic resync, leadership changes, startup and shutdown. Thin: every
trigger only queues ``reconcile.reconcile`` for one fine-tune; the queue's workers run it, one
at a time per fine-tune, and only once the caches are synced.

Readiness: ``/readyz`` answers 503 until every watch has delivered its initial list (kopf holds
its own handlers until then; the resync and the queue wait for the same moment).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import kopf
from gft_api import GROUP, KIND, PLURAL, VERSION
from gft_api.v1alpha1 import TERMINAL_PHASES

from gft_operator import children, monitoring, reconcile
from gft_operator.apply import Refused, Writer
from gft_operator.cache import CACHE, INDEX_OF_KIND, PODS_INDEX, WORKLOADS_INDEX, slim
from gft_operator.kube import ApiError, ApiUnavailable, NamespaceTerminating, NotLeader
from gft_operator.live import LIVE
from gft_operator.requeue import Requeue
from gft_operator.runtime import RUNTIME, drop_lock, lock

log = logging.getLogger("gft_operator")

MANAGED = {"app.kubernetes.io/managed-by": children.MANAGED_BY}
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={children.MANAGED_BY}"
CRD_NAME = f"{PLURAL}.{GROUP}"

__all__ = [
    "RUNTIME",
    "cleanup",
    "configure",
    "readiness",
    "started_leading",
    "stopped_leading",
    "watch_workloads",
]


# ---------------------------------------------------------------------------------------------
# Running reconciles: errors back off per object
# ---------------------------------------------------------------------------------------------
def _safely(namespace: str, name: str) -> None:
    if not RUNTIME.leading():
        return  # a standby: the leader reconciles; everything is looked at again on takeover
    monitoring.RECONCILES.inc()
    key = (namespace, name)
    requeue = RUNTIME.requeue
    try:
        with monitoring.RECONCILE_SECONDS.time():
            reconcile.reconcile(namespace, name)
    except NotLeader:
        log.info("%s/%s: no longer the leader; stopped reconciling", namespace, name)
    except NamespaceTerminating:
        # Its fine-tunes go with the namespace: nothing to create, nothing wrong.
        log.info("%s/%s: the namespace is being deleted; not reconciling", namespace, name)
    except (reconcile.Retry, Refused) as e:
        monitoring.RECONCILE_ERRORS.inc()
        delay = requeue.failed(key) if requeue else RUNTIME.resync_seconds
        log.warning("%s/%s: %s; trying again in %.0fs", namespace, name, e, delay)
    except ApiUnavailable as e:
        monitoring.API_UNAVAILABLE.inc()
        delay = requeue.failed(key, e.retry_after) if requeue else RUNTIME.resync_seconds
        log.warning(
            "%s/%s: the API server is unavailable (%s); trying again in %.0fs",
            namespace,
            name,
            e.message,
            delay,
        )
    except ApiError as e:
        monitoring.RECONCILE_ERRORS.inc()
        delay = requeue.failed(key) if requeue else RUNTIME.resync_seconds
        log.error(
            "%s/%s: reconcile failed: the API server said %s; trying again in %.0fs",
            namespace,
            name,
            e,
            delay,
        )
    except Exception:
        monitoring.RECONCILE_ERRORS.inc()
        delay = requeue.failed(key) if requeue else RUNTIME.resync_seconds
        log.exception("%s/%s: reconcile failed; trying again in %.0fs", namespace, name, delay)
    else:
        if requeue is not None:
            requeue.succeeded(key)


def _queue(namespace: str, name: str) -> None:
    """The watch handlers only queue a reconcile: a burst of events for one fine-tune (its pod
    going through its states, its Job and its own status changing) becomes one reconcile."""
    if RUNTIME.requeue is not None:
        RUNTIME.requeue.after((namespace, name), 0)


# ---------------------------------------------------------------------------------------------
# Observe: the caches. kopf keeps what these return, per object, until the object is deleted.
# ---------------------------------------------------------------------------------------------
WATCHED_CHILDREN = {
    "Job": ("batch", "v1", "jobs"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "Ingress": ("networking.k8s.io", "v1", "ingresses"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "Deployment": ("apps", "v1", "deployments"),
}


def _by_name(kind: str, group: str, version_: str, plural: str) -> None:
    labels = None if kind == KIND else MANAGED  # (also filtered by the API server)

    @kopf.index(group, version_, plural, labels=labels, id=INDEX_OF_KIND[kind])
    async def index(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
        CACHE.seen(kind, body)
        return {(namespace, name): slim(kind, body)}


for _kind, _resource in WATCHED_CHILDREN.items():
    _by_name(_kind, *_resource)
_by_name(KIND, GROUP, VERSION, PLURAL)


@kopf.index("", "v1", "pods", labels=MANAGED, id=PODS_INDEX)
async def _pods(namespace: str, labels: Any, body: kopf.Body, **_: Any) -> Any:
    CACHE.seen("Pod", body)
    owner = labels.get(children.NAME_LABEL)
    return {(namespace, owner): slim("Pod", body)} if owner else None


@kopf.on.event("", "v1", "events")
async def on_warning(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    """Warning events (filtered by the API server) kept only when about one of the operator's
    Jobs or pods. An event handler, not an index: kopf runs it once every index is filled, so
    "is it ours" is answered from complete caches."""
    CACHE.event(dict(body), deleted=event.get("type") == "DELETED")


@kopf.on.event(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", field="metadata.name", value=CRD_NAME
)
async def on_crd(**_: Any) -> None:
    """kopf runs no handler before every index has its initial list; the first event of the
    operator's own CRD (which exists wherever the operator runs) marks that moment."""
    if not CACHE.synced.is_set():
        CACHE.synced.set()
        log.info("caches synced: every watch has delivered its initial list")


KUEUE_WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")


def watch_workloads() -> None:
    """With ``--kueue``: keep Kueue's Workloads in the cache and reconcile a queued fine-tune
    when its Workload changes (admitted, preempted, why it waits). Registered before kopf
    starts; without the flag the operator needs no access to Workloads at all."""

    @kopf.index(*KUEUE_WORKLOADS, id=WORKLOADS_INDEX)
    async def _workloads(namespace: str, body: kopf.Body, **_: Any) -> Any:
        CACHE.seen("Workload", body)
        job = _owning_job(body)
        return {(namespace, job["uid"]): slim("Workload", body)} if job else None

    @kopf.on.event(*KUEUE_WORKLOADS)
    async def on_workload(namespace: str, body: kopf.Body, **_: Any) -> None:
        job = _owning_job(body)
        # The Job has its fine-tune's name; other Jobs' Workloads are not ours to look at.
        if job and CACHE.has(KIND, namespace, job["name"]):
            _queue(namespace, job["name"])


def _owning_job(workload: Any) -> Any:
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1":
            return ref
    return None


# ---------------------------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------------------------
@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_finetune(event: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        if RUNTIME.requeue is not None:
            RUNTIME.requeue.forget((namespace, name))
        drop_lock(namespace, name)
    elif CACHE.own_write(
        namespace, name, ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")
    ):
        return  # the echo of this operator's own status write: nothing new
    _queue(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def on_job(labels: dict[str, str], namespace: str, **_: Any) -> None:
    owner = labels.get(children.NAME_LABEL)
    if owner:
        _queue(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def on_pod(labels: dict[str, str], namespace: str, **_: Any) -> None:
    owner = labels.get(children.NAME_LABEL)
    if owner:
        _queue(namespace, owner)


def resync_forever(stop: threading.Event) -> None:
    """Reconcile every unfinished GemmaFineTune periodically: catches what no watch event of
    a fine-tune, Job or pod announces (a Warning event on the Job, a child deleted). Finished
    runs cost nothing here: their deadlines (TTL, TensorBoard after the run) are queued."""
    CACHE.synced.wait()
    while not stop.wait(RUNTIME.resync_seconds):
        CACHE.expire()
        resync()
        monitoring.RESYNCS.inc()


def resync(everything: bool = False) -> None:
    """Queue a reconcile of every unfinished fine-tune in the cache (with ``everything``,
    finished ones too: a new leader looks at all of them once), spread over one resync period
    so that the workers see a steady trickle rather than a burst."""
    requeue = RUNTIME.requeue
    if requeue is None or not CACHE.synced.is_set() or not RUNTIME.leading():
        return
    keys = [
        (ns, name)
        for ns, name, st in CACHE.finetunes()
        if everything or st.get("phase") not in TERMINAL_PHASES
    ]
    spread = 0.0 if everything else RUNTIME.resync_seconds
    for i, key in enumerate(keys):
        requeue.resync(key, spread * i / max(1, len(keys)))


def took_over() -> None:
    """This replica leads now (or started without leader election): what happened meanwhile
    had no reconcile here, so once the caches are synced, release what belongs to fine-tunes
    deleted meanwhile and look at everything once (in its own thread: the Lease keeps being
    renewed)."""

    def look() -> None:
        CACHE.synced.wait()
        if not RUNTIME.leading():
            return
        try:
            reconcile.sweep()
        except NotLeader:
            return
        except ApiError as e:
            log.warning("the sweep of deleted fine-tunes' Jobs and pods failed: %s", e)
        resync(everything=True)

    threading.Thread(target=look, daemon=True, name="gft-takeover").start()


def started_leading() -> None:
    monitoring.LEADER.set(1)
    took_over()


def stopped_leading() -> None:
    """Another replica leads now: it reports the fine-tunes and reads their trainers."""
    monitoring.PHASES.clear()
    monitoring.LEADER.set(0)
    LIVE.forget_all()


_stop = threading.Event()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    # kopf's own bookkeeping in annotations: the structural schema would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # the operator records its own Events, one per transition
    settings.execution.max_workers = int(os.environ.get("GFT_OPERATOR_WORKERS", "8"))
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # Filtered by the API server: only what this operator made, only Warning events.
    for group, version_, plural in [*WATCHED_CHILDREN.values(), ("", "v1", "pods")]:
        settings.watching.label_selectors[group, version_, plural] = MANAGED_SELECTOR
    settings.watching.field_selectors["", "v1", "events"] = "type=Warning"
    CACHE.attach(kwargs)  # kopf hands its indexes to every handler
    assert RUNTIME.kube is not None, "main() sets the client"
    RUNTIME.writer = Writer(RUNTIME.kube, RUNTIME.component, RUNTIME.instance)
    LIVE.writer, LIVE.lock, LIVE.leading = RUNTIME.writer, lock, RUNTIME.leading
    monitoring.watch_cache(lambda: {**CACHE.counts(), "spec": reconcile.understood_count()})
    RUNTIME.requeue = Requeue(_safely, workers=settings.execution.max_workers, gate=CACHE.synced)
    threads = [(RUNTIME.requeue.run, "gft-requeue"), (resync_forever, "gft-resync")]
    if LIVE.scraper is not None:
        threads.append((LIVE.scraper.run, "gft-scraper"))
    if RUNTIME.leader is not None:
        threads.append((RUNTIME.leader.run, "gft-leader"))
    else:
        monitoring.LEADER.set(1)
        took_over()  # the one replica: sweep once the caches are in
    for target, name in threads:
        threading.Thread(target=target, args=(_stop,), daemon=True, name=name).start()


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    """Stop writing, let the writes in flight end, then give the Lease up: a standby takes
    over at once, and no write of this replica lands after it did."""
    _stop.set()
    if RUNTIME.kube is not None and not RUNTIME.kube.drain(timeout=20):
        log.warning("writes still in flight after 20 s; giving the Lease up anyway")
    if RUNTIME.leader is not None:
        RUNTIME.leader.release()


@kopf.on.probe(id="ready")
def ready(**_: Any) -> bool:
    """Reported in kopf's liveness answer: whether the caches are synced."""
    return CACHE.synced.is_set()


def readiness() -> tuple[bool, str]:
    """``/readyz``: ready once the caches are synced; a standby is ready too (it takes over
    the moment the leader's Lease lapses), and says so."""
    if not CACHE.synced.is_set():
        return False, "not ready: the caches are syncing (waiting for the initial lists)"
    if RUNTIME.leader is None:
        return True, "ready"
    return True, "ready: leader" if RUNTIME.leader.is_leader() else "ready: standby"
