"""``gft.Client``: fine-tunes from Python, with the user's kubeconfig.

Every method reads or writes the GemmaFineTune through the API server as the user (what
``kubectl`` may do, it may do). Files on the run's output claim (the adapter, the merged model,
the TensorBoard events) are read through a short-lived helper pod (``gft.files``); a local
dataset is uploaded to a claim the same way, or to an S3-compatible bucket.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from gft_api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from gft_api.v1alpha1 import (
    TERMINAL_PHASES,
    GemmaFineTuneSpec,
    GemmaFineTuneStatus,
    Phase,
)

from gft import files, specs, tables
from gft.errors import ApiRefusal, GftError, RunFailed
from gft.files import Placement
from gft.kube import Kube
from gft.progress import ProgressBar, duration
from gft.specs import Claim, DataStore, LocalFile, S3Bucket

ARTIFACTS = ("adapter", "merged", "model")
RUN_PATH = re.compile(r"^[-._A-Za-z0-9]+(/[-._A-Za-z0-9]+)*$")


@dataclass(frozen=True)
class FineTune:
    """A GemmaFineTune as read from the API server: its typed spec and status."""

    name: str
    namespace: str
    uid: str
    created: str
    spec: GemmaFineTuneSpec
    status: GemmaFineTuneStatus

    @classmethod
    def from_body(cls, body: dict) -> FineTune:
        meta = body.get("metadata") or {}
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            uid=meta.get("uid", ""),
            created=meta.get("creationTimestamp", ""),
            spec=specs.parse_spec(body),
            status=specs.parse_status(body),
        )

    @property
    def phase(self) -> Phase | None:
        return self.status.phase

    @property
    def done(self) -> bool:
        return self.status.phase in TERMINAL_PHASES

    def __str__(self) -> str:
        st = self.status
        parts = [f"{self.name}: {st.phase.value if st.phase else 'Pending'}"]
        if st.reason:
            parts[0] += f"/{st.reason}"
        p = st.progress
        if st.result is not None:
            parts.append(f"step {st.result.global_step}/{st.result.total_steps}")
        elif p is not None and p.step is not None:
            parts.append(f"step {p.step}/{p.total_steps}")
        loss = st.result.train_loss if st.result else (st.metrics.loss if st.metrics else None)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        return ", ".join(parts)


class Client:
    """Fine-tunes in one namespace of the cluster your kubeconfig names.

    ``data_store`` is where local datasets go (``gft.Claim("datasets")`` or
    ``gft.S3Bucket(...)``) when ``create`` is given a file of this machine. ``image`` and
    ``placement`` are for the helper pods that move files (the trainer's image, placed where
    the run's pods may run, by default)."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        kubeconfig: str | os.PathLike | None = None,
        context: str | None = None,
        data_store: DataStore | None = None,
        image: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.kube = Kube.connect(namespace, kubeconfig, context)
        self.data_store = data_store
        self.image = image or os.environ.get("GFT_TRAINER_IMAGE")
        self.placement = placement

    @property
    def namespace(self) -> str:
        return self.kube.namespace

    # -- create ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        model: Any,
        data: Any,
        method: Any = "lora",
        training: Any = None,
        dataset: dict | None = None,
        upload_to: DataStore | None = None,
        progress: bool = True,
        labels: dict[str, str] | None = None,
        **spec: Any,
    ) -> FineTune:
        """Create a fine-tune of ``model`` (a hub id, ``pvc://CLAIM/PATH`` or a path in the
        image) on ``data`` (a local file, ``s3://BUCKET/KEY``, ``hf://ORG/NAME``,
        ``pvc://CLAIM/PATH``). A local file is uploaded first to ``upload_to`` (else the
        client's ``data_store``). ``dataset`` shapes the records (``format``,
        ``maxSeqLength``...); other spec fields (``resources``, ``output``...) by name."""
        store = upload_to or self.data_store
        source = specs.data_source(data, store)
        # Checked before anything is uploaded: a typo costs nothing.
        probe = source if not isinstance(source, LocalFile) else {"path": "/probe.jsonl"}
        specs.finetune_spec(model, probe, method, training, dataset, **spec)
        if isinstance(source, LocalFile):
            source = self.upload(source.path, store, progress=progress)
        typed = specs.finetune_spec(model, source, method, training, dataset, **spec)
        return self.submit(specs.manifest(name, typed, labels))

    def submit(self, manifest: dict | str | os.PathLike) -> FineTune:
        """Create a fine-tune from a GemmaFineTune manifest (a mapping, YAML text or a file),
        checked against the API's types first."""
        if isinstance(manifest, os.PathLike) or (
            isinstance(manifest, str) and "\n" not in manifest and Path(manifest).is_file()
        ):
            manifest = Path(manifest).read_text()
        if isinstance(manifest, str):
            manifest = yaml.safe_load(manifest)
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise GftError(f"not a {KIND} manifest (kind: {KIND}, apiVersion: {API_VERSION})")
        name = (manifest.get("metadata") or {}).get("name")
        if not name:
            raise GftError("the manifest has no metadata.name")
        given = (manifest.get("metadata") or {}).get("namespace")
        if given and given != self.namespace:
            raise GftError(
                f'the namespace from the manifest ("{given}") does not match the namespace '
                f'"{self.namespace}": pass -n {given} (namespace="{given}"), or remove it'
            )
        typed = specs.checked_spec(manifest)
        body = {**manifest, "apiVersion": API_VERSION, "spec": typed.to_wire()}
        body["metadata"] = {**manifest["metadata"], "namespace": self.namespace}
        return FineTune.from_body(self.kube.create_finetune(body))

    # -- read ----------------------------------------------------------------------------------

    def get(self, name: str) -> FineTune:
        return FineTune.from_body(self.kube.get_finetune(name))

    def list(self) -> list[FineTune]:
        return [FineTune.from_body(b) for b in self.kube.list_finetunes()]

    def wait(
        self,
        name: str,
        *,
        timeout: float | None = None,
        progress: bool = True,
        file: IO[str] | None = None,
    ) -> FineTune:
        """Follow the fine-tune (a watch on it) until it succeeds or fails, with a progress
        bar of steps, loss and ETA. Raises ``RunFailed`` when it fails."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        bar = ProgressBar(name, file=file, disable=not progress)
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while True:
                body = self.kube.get_finetune(name)
                ft = FineTune.from_body(body)
                bar.update(ft.status)
                if ft.done:
                    break
                left = 60.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name} is still {ft} after {timeout:.0f}s")
                stream = watch.Watch().stream(
                    self.kube.custom.list_namespaced_custom_object,
                    GROUP, VERSION, self.namespace, PLURAL,
                    field_selector=f"metadata.name={name}",
                    resource_version=body["metadata"]["resourceVersion"],
                    timeout_seconds=max(1, int(min(left, 60))),
                )  # fmt: skip
                try:
                    for event in stream:
                        if event["type"] == "DELETED":
                            raise GftError(f"{name} was deleted while it was followed")
                        ft = FineTune.from_body(event["object"])
                        bar.update(ft.status)
                        if ft.done:
                            break
                except (ApiException, HTTPError, OSError):
                    pass  # an expired resourceVersion or a dropped watch: read and watch again
                if ft.done:
                    break
        finally:
            bar.close()
        if ft.phase == Phase.FAILED:
            st = ft.status
            raise RunFailed(
                f"{name} failed: {st.reason}: {st.message}\nThe trainer's log: "
                f"kubectl gft logs {name} -n {self.namespace}",
                ft,
            )
        return ft

    def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None, timeout: float = 600
    ) -> Iterator[str]:
        """The trainer's log lines (of the newest training pod); ``follow`` until it ends."""
        deadline = time.monotonic() + timeout
        while True:
            ft = self.get(name)
            pod = ft.status.pod_name
            if pod is not None:
                try:
                    response = self.kube.call(
                        self.kube.core.read_namespaced_pod_log, pod, self.namespace,
                        container="trainer", follow=follow, tail_lines=tail,
                        _preload_content=False, what=f"pods/{pod}",
                    )  # fmt: skip
                    break
                except ApiRefusal as e:
                    if e.code == 404:
                        raise GftError(
                            f"{name}'s training pod {pod} is gone (ttlSecondsAfterFinished, or "
                            "deleted); its outcome stays in the status: kubectl gft compare "
                            f"{name}"
                        ) from None
                    if not follow or e.code != 400:  # 400: the container has not started
                        raise
            elif not follow or ft.done:
                raise GftError(f"{name} has no training pod yet ({ft})")
            if time.monotonic() > deadline:
                raise GftError(f"{name}'s trainer did not start within {timeout:.0f}s ({ft})")
            time.sleep(1)
        try:
            for line in response:
                yield line.decode(errors="replace").rstrip("\n")
        finally:
            response.release_conn()

    def metrics(self, name: str) -> Any:
        """The run's metrics history as a pandas DataFrame: one row per step, one column per
        TensorBoard tag (``train/loss``, ``eval/loss``, ``train/learning_rate``...), read from
        the run's event files on its output claim."""
        ft = self.get(name)
        with tempfile.TemporaryDirectory(prefix="gft-events-") as tmp:
            self._fetch_folder(ft, "tensorboard", Path(tmp), progress=False)
            return tables.metrics_frame(tables.read_events(Path(tmp)))

    def compare(self, *names: str) -> Any:
        """The runs side by side (settings and results) as a pandas DataFrame."""
        if len(names) < 2:
            raise GftError("compare needs two runs or more")
        return tables.compare_frame([self.get(n) for n in names])

    # -- act -------------------------------------------------------------------------------------

    def suspend(self, name: str) -> FineTune:
        """Pause: the trainer saves a checkpoint and stops; ``resume`` continues from it."""
        return FineTune.from_body(self.kube.patch_finetune(name, {"spec": {"suspend": True}}))

    def resume(self, name: str) -> FineTune:
        return FineTune.from_body(self.kube.patch_finetune(name, {"spec": {"suspend": False}}))

    def stop(self, name: str) -> None:
        """Delete the fine-tune: the trainer checkpoints, its children go; its output claim
        (checkpoints, what it exported) stays."""
        self.kube.delete_finetune(name)

    # -- files -------------------------------------------------------------------------------

    def fetch(
        self, name: str, dest: str | os.PathLike, artifact: str = "adapter", progress: bool = True
    ) -> Path:
        """Copy the run's ``adapter`` (``merged``, or ``model`` for a full fine-tune) to
        ``dest``; it loads with ``PeftModel.from_pretrained(base, dest)`` (or
        ``AutoModelForCausalLM.from_pretrained(dest)``)."""
        if artifact not in ARTIFACTS:
            raise GftError(f"artifact must be one of {', '.join(ARTIFACTS)}")
        ft = self.get(name)
        saved = ft.status.result.artifacts if ft.status.result else {}
        if artifact not in saved:
            have = ", ".join(sorted(k for k in saved if k in ARTIFACTS)) or "none yet"
            todo = "pick one it saved" if ft.done else "wait for it to succeed (client.wait)"
            raise GftError(f"{name} has no {artifact} ({ft}; saved: {have}); {todo}")
        target = Path(dest)
        self._fetch_folder(ft, artifact, target, progress=progress)
        return target

    def _fetch_folder(self, ft: FineTune, folder: str, dest: Path, progress: bool) -> None:
        st = ft.status
        if not st.output_claim or not st.output_path:
            raise GftError(f"{ft.name} has no output folder yet ({ft})")
        if not RUN_PATH.match(st.output_path) or ".." in st.output_path.split("/"):
            raise GftError(f"{ft.name}: refusing the output path {st.output_path[:200]!r}")
        owner = {"apiVersion": API_VERSION, "kind": KIND, "name": ft.name, "uid": ft.uid}
        with files.session(
            self.kube, st.output_claim, self._image_of(ft), sub_path=st.output_path,
            placement=self._placement_of(ft), base=ft.name, owner=owner,
        ) as remote:  # fmt: skip
            listed = remote.index(folder)
            if not listed:
                raise GftError(f"{ft.name}: nothing under {st.output_path}/{folder} on the claim")
            dest.mkdir(parents=True, exist_ok=True)
            total = sum(f.size for f in listed)
            with _bytes_bar(f"{ft.name}/{folder}", total, progress) as bar:
                for item in listed:
                    if not item.path.startswith(f"{folder}/"):
                        raise GftError(
                            f"pod {remote.pod} listed {item.path[:200]!r} under {folder}"
                        )
                    relative = item.path[len(folder) + 1 :]
                    remote.download(item, files.local_path(dest, relative), bar.update)

    def upload(
        self, path: str | os.PathLike, to: DataStore | None = None, progress: bool = True
    ) -> dict[str, Any]:
        """Put a local dataset where a run can read it (a claim, or a bucket), under a name
        made of its content; returns the ``spec.dataset`` source fields that name it."""
        source = Path(path)
        store = to or self.data_store
        if store is None:
            raise GftError(
                f"{source}: where should it go? Pass to=gft.Claim('datasets') or "
                "gft.S3Bucket('bucket', endpoint=...), or set the client's data_store"
            )
        if not source.is_file():
            raise GftError(f"{source}: no such file")
        digest = files.sha256_of(source)
        size = source.stat().st_size
        if isinstance(store, S3Bucket):
            from gft import s3

            with _bytes_bar(f"upload {source.name}", size, progress) as bar:
                key, _ = s3.upload(source, store, digest, bar.update)
            return specs.data_source(f"s3://{store.bucket}/{key}", store)  # type: ignore[return-value]
        relative = "/".join(p for p in (store.folder.strip("/"), digest[:16], source.name) if p)
        self._ensure_claim(store)
        image = self.image or files.DEFAULT_IMAGE
        placement = self.placement or Placement()
        with (
            files.session(self.kube, store.name, image, writable=True, placement=placement,
                          base=store.name) as remote,
            _bytes_bar(f"upload {source.name}", size, progress) as bar,
        ):  # fmt: skip
            if remote.exists(relative) == size:
                bar.update(size)
            else:
                remote.upload(source, relative, bar.update)
        return {"volume": {"claimName": store.name, "path": relative}}

    def _ensure_claim(self, store: Claim) -> None:
        try:
            self.kube.call(self.kube.core.read_namespaced_persistent_volume_claim, store.name,
                           self.namespace, what=f"persistentvolumeclaims/{store.name}")  # fmt: skip
            return
        except ApiRefusal as e:
            if e.code != 404:
                raise
        claim: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": store.name,
                "labels": {"app.kubernetes.io/managed-by": files.MANAGED_BY},
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": store.size}},
            },
        }
        if store.storage_class:
            claim["spec"]["storageClassName"] = store.storage_class
        self.kube.call(self.kube.core.create_namespaced_persistent_volume_claim, self.namespace,
                       claim, what=f"persistentvolumeclaims/{store.name}")  # fmt: skip

    def _image_of(self, ft: FineTune) -> str:
        """The image the helper runs: the client's, the run's own, its Job's, its TensorBoard
        Deployment's, else the operator's default."""
        if self.image:
            return self.image
        if ft.spec.image:
            return ft.spec.image
        for read in (self._job_image, self._tensorboard_image):
            try:
                image = read(ft.name)
            except Exception:  # not allowed to read it, or gone: the next source
                image = None
            if image:
                return image
        return files.DEFAULT_IMAGE

    def _job_image(self, name: str) -> str | None:
        job = self.kube.batch.read_namespaced_job(name, self.namespace)
        containers = job.spec.template.spec.containers
        return next((c.image for c in containers if c.name == "trainer"), None)

    def _tensorboard_image(self, name: str) -> str | None:
        deployment = self.kube.apps.read_namespaced_deployment(f"{name}-tb", self.namespace)
        return deployment.spec.template.spec.containers[0].image

    def _placement_of(self, ft: FineTune) -> Placement:
        """Where the run's pods may run: its volume can be mounted there."""
        if self.placement is not None:
            return self.placement
        res = ft.spec.resources
        return Placement(
            node_selector=dict(res.node_selector),
            tolerations=[t.to_wire() for t in res.tolerations],
        )


class _bytes_bar:
    """A tqdm bar in bytes (a context manager); a no-op one when ``progress`` is off."""

    def __init__(self, desc: str, total: int, progress: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=not progress, ncols=100)  # fmt: skip

    def update(self, n: int) -> None:
        self.bar.update(n)

    def __enter__(self) -> _bytes_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


__all__ = ["Client", "FineTune", "duration"]
