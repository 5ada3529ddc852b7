"""Files on a claim, from this machine: a short-lived pod in the namespace mounts the claim
(read-only to read a run's folder; read-write to upload), serves it with
``gft_trainer.fileserver`` (in the trainer's image), and is reached through the API server's
pod proxy with the user's own credentials (``pods/proxy``, as ``kubectl proxy`` uses). The pod
is deleted when the session ends; it also ends by itself when idle, and when its run's
GemmaFineTune is deleted (it is owned by it).

``file_server_pod`` builds the pod (pure); ``FileSession`` starts it, waits for it to be
ready, moves files and deletes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gft.errors import GftError
from gft.kube import Kube

DEFAULT_IMAGE = "ghcr.io/gemma-finetune/trainer:0.1.0"
"""The trainer image the operator uses by default (the helper runs from the same image)."""
PORT = 8080
MOUNT = "/data"
TOKEN_ENV = "GFT_FILES_TOKEN"  # gft_trainer.fileserver's
TOKEN_HEADER = "X-Gft-Token"
SHA256_HEADER = "X-Gft-Sha256"
RUN_AS = 10001
MANAGED_BY = "gft-client"
READY_TIMEOUT = 300.0  # seconds: scheduling, the claim's binding, an image pull, Python's start
CHUNK = 1 << 20
NEVER_STARTS = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "StartError",
    "ContainerCannotRun", "ImageEntrypointUnknown",
}  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Where the helper pod may run: node labels and tolerations, as in a pod spec."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int


def file_server_pod(
    name: str,
    claim: str,
    image: str,
    token: str,
    writable: bool = False,
    sub_path: str | None = None,
    placement: Placement = Placement(),
    instance: str = "",
    owner: dict[str, str] | None = None,
    idle_exit: int = 600,
    deadline: int = 6 * 3600,
) -> dict[str, Any]:
    """The helper pod: restricted PodSecurity, no service-account token, one container serving
    the claim (its ``sub_path`` folder) on ``PORT``, ready when it answers."""
    mount: dict[str, Any] = {"name": "data", "mountPath": MOUNT, "readOnly": not writable}
    if sub_path:
        mount["subPath"] = sub_path
    command = ["python", "-m", "gft_trainer.fileserver", "--root", MOUNT, "--port", str(PORT),
               "--idle-exit", str(idle_exit)]  # fmt: skip
    if writable:
        command.append("--writable")
    meta: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/name": "gemma-finetune",
            "app.kubernetes.io/component": "files",
            "app.kubernetes.io/instance": instance or claim,
            "app.kubernetes.io/managed-by": MANAGED_BY,
        },
    }
    if owner:
        meta["ownerReferences"] = [{**owner, "blockOwnerDeletion": False}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "activeDeadlineSeconds": deadline,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS,
                "runAsGroup": RUN_AS,
                "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "nodeSelector": dict(placement.node_selector),
            "tolerations": list(placement.tolerations),
            "containers": [
                {
                    "name": "files",
                    "image": image,
                    "command": command,
                    "env": [{"name": TOKEN_ENV, "value": token}],
                    "ports": [{"name": "files", "containerPort": PORT}],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "readinessProbe": {
                        "httpGet": {"path": "/healthz", "port": PORT},
                        "periodSeconds": 1,
                    },
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "64Mi"},
                        "limits": {"memory": "256Mi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [mount],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim,
                                                                   "readOnly": not writable}}],
        },
    }  # fmt: skip


def helper_name(base: str) -> str:
    """``<base>-files-<random>``, within 63 characters (a DNS label)."""
    return f"{base[:45].rstrip('-')}-files-{secrets.token_hex(3)}"


def local_path(dest: Path, relative: str) -> Path:
    """Where a served file goes under ``dest``; a path that would leave it is refused (what a
    pod serves is not trusted)."""
    parts = relative.split("/")
    if any(p in ("..", ".", "") for p in parts) or "\0" in relative or "\\" in relative:
        raise GftError(f"refusing the served path {relative[:200]!r}: it would leave {dest}")
    target = dest.joinpath(*parts)
    if dest.resolve() not in target.resolve().parents:
        raise GftError(f"refusing the served path {relative[:200]!r}: it would leave {dest}")
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Counted:
    """A file read in chunks by urllib3, reporting each chunk (a progress bar)."""

    def __init__(self, f: BinaryIO, report: Callable[[int], Any]) -> None:
        self.f, self.report = f, report

    def read(self, size: int = -1) -> bytes:
        chunk = self.f.read(CHUNK if size is None or size < 0 else min(size, CHUNK))
        if chunk:
            self.report(len(chunk))
        return chunk


@dataclass
class FileSession:
    """A running helper pod: ``index``, ``download`` and ``upload`` through its proxy."""

    kube: Kube
    pod: str
    token: str

    def _path(self, rest: str) -> str:
        ns = urllib.parse.quote(self.kube.namespace, safe="")
        return f"/api/v1/namespaces/{ns}/pods/{self.pod}:{PORT}/proxy/{rest}"

    def _request(self, method: str, rest: str, **kw: Any) -> Any:
        headers = {TOKEN_HEADER: self.token, **kw.pop("headers", {})}
        response = self.kube.request(method, self._path(rest), headers=headers, **kw)
        if response.status >= 300:
            text = response.read(4096).decode(errors="replace")
            response.release_conn()
            with contextlib.suppress(ValueError, AttributeError):
                text = json.loads(text).get("error", text)
            raise GftError(f"{method} {rest} on pod {self.pod}: HTTP {response.status}: {text}")
        return response

    def index(self, prefix: str = "") -> list[RemoteFile]:
        query = urllib.parse.urlencode({"prefix": prefix})
        response = self._request("GET", f"index?{query}")
        try:
            raw = json.loads(response.read(64 << 20))
            return [RemoteFile(str(f["path"]), int(f["size"])) for f in raw["files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise GftError(f"pod {self.pod} sent an index this client cannot read: {e}") from None
        finally:
            response.release_conn()

    def exists(self, relative: str) -> int | None:
        """The size of the file at ``relative``; None when there is none."""
        quoted = urllib.parse.quote(relative)
        response = self.kube.request("HEAD", self._path(f"files/{quoted}"),
                                     headers={TOKEN_HEADER: self.token})  # fmt: skip
        response.release_conn()
        if response.status == 404:
            return None
        if response.status >= 300:
            raise GftError(f"HEAD files/{relative} on pod {self.pod}: HTTP {response.status}")
        return int(response.headers.get("Content-Length", "0"))

    def download(self, remote: RemoteFile, target: Path, report: Callable[[int], Any]) -> None:
        """One file, written beside and renamed into place, its size checked."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        response = self._request("GET", f"files/{urllib.parse.quote(remote.path)}")
        got = 0
        try:
            with partial.open("wb") as f:
                for chunk in response.stream(CHUNK):
                    got += len(chunk)
                    if got > remote.size:
                        raise GftError(f"{remote.path}: pod {self.pod} sent more than its size")
                    f.write(chunk)
                    report(len(chunk))
            if got != remote.size:
                raise GftError(f"{remote.path}: {got} of {remote.size} bytes arrived; try again")
            partial.replace(target)
        finally:
            response.release_conn()
            partial.unlink(missing_ok=True)

    def upload(self, source: Path, relative: str, report: Callable[[int], Any]) -> dict:
        size = source.stat().st_size
        headers = {
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
            SHA256_HEADER: sha256_of(source),
        }
        with source.open("rb") as f:
            response = self._request(
                "PUT", f"files/{urllib.parse.quote(relative)}", body=_Counted(f, report),
                headers=headers, timeout=(15, 600),
            )  # fmt: skip
        try:
            return json.loads(response.read(65536))
        finally:
            response.release_conn()


@contextmanager
def session(
    kube: Kube,
    claim: str,
    image: str,
    *,
    writable: bool = False,
    sub_path: str | None = None,
    placement: Placement = Placement(),
    base: str = "gft",
    owner: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[FileSession]:
    """A helper pod for the time of the ``with`` block; deleted after it, whatever happened."""
    token = secrets.token_urlsafe(24)
    name = helper_name(base)
    pod = file_server_pod(
        name, claim, image, token, writable=writable, sub_path=sub_path, placement=placement,
        instance=base, owner=owner,
    )  # fmt: skip
    kube.call(kube.core.create_namespaced_pod, kube.namespace, pod, what=f"pods/{name}")
    try:
        _wait_ready(kube, name, ready_timeout)
        yield FileSession(kube, name, token)
    finally:
        from kubernetes.client.exceptions import ApiException

        # On failure, it ends by itself when idle, and with its run.
        with contextlib.suppress(ApiException, OSError):
            kube.core.delete_namespaced_pod(name, kube.namespace, grace_period_seconds=0)


def _wait_ready(kube: Kube, name: str, timeout: float) -> None:
    """Until the pod is Ready; at once with the kubelet's words when it can never be."""
    deadline = time.monotonic() + timeout
    last = "not scheduled yet"
    while time.monotonic() < deadline:
        pod = kube.call(kube.core.read_namespaced_pod, name, kube.namespace, what=f"pods/{name}")
        status = pod.status
        if any(c.type == "Ready" and c.status == "True" for c in status.conditions or []):
            return
        if status.phase in ("Failed", "Succeeded"):
            raise GftError(f"helper pod {name} ended ({status.phase}): {_why(kube, pod)}")
        for cs in status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting is not None and waiting.reason in NEVER_STARTS:
                raise GftError(
                    f"helper pod {name} cannot start: {waiting.reason}: {waiting.message or ''}"
                    "; its image must hold gft_trainer (pass image=/--image)"
                )
        last = _why(kube, pod)
        time.sleep(0.5)
    raise GftError(
        f"helper pod {name} was not ready within {timeout:.0f}s ({last}); "
        f"`kubectl describe pod {name} -n {kube.namespace}` says why"
    )


def _why(kube: Kube, pod: Any) -> str:
    status = pod.status
    for c in status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False":
            return f"unschedulable: {c.message}"
    for cs in status.container_statuses or []:
        if cs.state and cs.state.terminated:
            t = cs.state.terminated
            return f"exited {t.exit_code}: {t.message or t.reason or ''}".strip()
        if cs.state and cs.state.waiting:
            return f"{cs.state.waiting.reason}: {cs.state.waiting.message or ''}"
    return status.phase or "pending"
