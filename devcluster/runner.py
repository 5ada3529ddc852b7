"""The runner: plays the kubelet for one node of the proving ground, so pods bound to that node
really run on this machine as local processes.

    python -m devcluster.runner --kubeconfig PATH --node-name gft-runner \\
        --node-ip 10.244.0.1 --pod-cidr 10.244.0.0/16 --bridge gftbr0 --state-dir DIR \\
        [--kubelet-port 0]

What it does
------------
- Registers the Node (labels ``gft.dev/runner=true``, ``nvidia.com/gpu.present=true``; taint
  ``gft.dev/runner=true:NoSchedule`` so only pods that tolerate it land here; a fake capacity of
  16 CPUs, 64 Gi, 110 pods and ``nvidia.com/gpu: 4`` — there is no GPU: processes run on the
  CPU), keeps it Ready and renews its Lease every 10 s. It never carries the KWOK annotation,
  so KWOK leaves the node alone.
- Creates a bridge carrying the node's address, and for each pod a network namespace
  (``gft-<uid>``) with a veth on that bridge and the next free address of the pod range; the
  range must not overlap any route of this machine (checked at start) and nothing from the pods
  is forwarded off this machine. Pod IPs are reachable from this machine and through the API
  server's pod proxy.
- Runs each container's command + args (with ``$(VAR)`` expansion) as a local process in the
  pod's network namespace and in a private mount namespace of its own, where each volume is
  bind-mounted at its mountPath (readOnly and subPath honoured) and a per-container file at the
  terminationMessagePath. The environment is the container's (values, ConfigMap/Secret keys,
  envFrom with prefix, downward API fieldRef and resourceFieldRef) plus HOME (a per-pod folder),
  HOSTNAME, and the runner's own PATH (with its Python's bin folder) and LANG; nothing else of the
  runner's environment leaks in; without ``workingDir`` a container starts in its HOME. A
  missing ConfigMap/Secret leaves the container waiting with ``CreateContainerConfigError``
  naming it, retried every few seconds. The folders the commands come from (this Python's
  environment and the checkout) stay visible at their own paths whatever volume the pod mounts
  above them, so a checkout under /tmp runs as well as one anywhere else.
- Volumes: configMap, secret, downwardAPI and projected (including serviceAccountToken through
  the TokenRequest API) are written out as files; emptyDir is a per-pod folder (a tmpfs for
  ``medium: Memory``) removed with the pod; persistentVolumeClaim waits until the claim is bound
  and uses the bound PV's hostPath (or local) folder, so data outlives the pod; hostPath is the
  host folder itself.
- Init containers run to completion in order; restartable init containers (native sidecars)
  start in order, are restarted if they exit while the pod runs, and get SIGTERM after every main
  container has ended. restartPolicy Never/OnFailure/Always are honoured (restarts back off
  10 s, doubling to 5 min, with restartCount counted).
- Enforces a pod's ``activeDeadlineSeconds`` (Failed, reason DeadlineExceeded) and records
  the kubelet's Events (Started, Killing, BackOff, Failed, FailedMount) on the pod.
- Reports status as a kubelet does (status subresource): pod IP before containers start,
  conditions, container states with exit codes (a signal N is 128+N), reasons, the termination
  message (FallbackToLogsOnError too) and a terminal phase Succeeded/Failed.
- On deletion: SIGTERM to every main container's process group, then sidecars, SIGKILL at the
  end of the grace period, terminal status, then deletes the pod (grace 0, uid precondition).
  A force-deleted pod's processes are killed at once. Its namespace and volumes are removed.
- Serves ``/containerLogs`` (follow, tailLines, limitBytes, timestamps, sinceSeconds, sinceTime,
  previous for the last restart) and ``/healthz`` over HTTPS on the node IP, so ``kubectl logs``
  and ``kubectl logs -f`` work.
- On restart, pods it was running before (their processes are gone) are reported Failed with
  ``ContainerStatusUnknown``, as after a node reboot.
- Writes ``<state-dir>/runner.ready`` once the node is registered and the log server listens;
  logs one line per decision on stderr. SIGTERM stops every pod, removes every namespace and
  veth and the bridge.

What it does not do
-------------------
- Images are not pulled or used: ``command`` must name a program of this machine (the project's
  console scripts, python, tensorboard); a container without ``command`` fails with
  ``ImageEntrypointUnknown``. ``image``/``imageID`` in the status merely echo the spec.
- No user switching: processes run as the runner's user (root), whatever ``runAsUser`` says (the
  virtual environment lives under /root); no seccomp, capabilities, cgroups, resource limits or
  OOM kills; ``nvidia.com/gpu`` is fake.
- Mount points missing on this machine are created on its file system (empty folders or files,
  e.g. ``/dev/termination-log``, ``/var/run/secrets/...``), since containers share the host's
  root file system; programs see the rest of this machine's files.
- Readiness probes (httpGet, tcpSocket) only: no liveness or startup probes, no lifecycle hooks, no
  ephemeral containers, no ``kubectl exec``/``attach`` (``port-forward`` works: the kubelet's own
  code in a helper, see ``portforward/``), no service environment
  variables, no in-place resize; ConfigMap/Secret volumes and tokens are written once, not
  refreshed. DNS is the cluster's (``--cluster-dns``: the proving ground's CoreDNS, see
  ``dns.py``), answering only cluster names; /etc/hosts maps the pod's hostname (and
  ``hostname.subdomain...``) to its IP.
- Networking is one flat bridge: pods reach each other and the node IP, not the API server
  (it listens on loopback), not Services (no kube-proxy) and nothing off this machine.
  ``hostNetwork: true`` pods run in this machine's network namespace with the node IP. No PID
  or IPC namespace: containers see this machine's processes.
- Unsupported volume types (anything but the ones above) leave the pod ContainerCreating with
  a message naming the volume.
- The log server does not authenticate or authorize its callers (the API server's client
  certificate is not checked); it listens only on the node's bridge address. Logs are kept for
  the current and the previous instance of each container while the pod exists and the runner
  runs (a restarted runner starts with no logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from devcluster import podspec
from devcluster.kubeapi import Api, ApiError
from devcluster.logserver import LogRequestError, LogSource, LogWriter, plain_text, serve
from devcluster.netns import Network, NetworkError
from devcluster.podspec import (
    ConfigError,
    ContainerRecord,
    IPAllocator,
    VolumeError,
    now_iso,
    now_micro,
)

log = logging.getLogger("runner")

KUBELET_VERSION = "v1.35.4"
LEASE_PERIOD = 10.0
NODE_STATUS_PERIOD = 20.0
CONFIG_RETRY = 3.0
TICK = 0.25
SHIM = str(Path(__file__).resolve().parent / "shim.py")


def command_sources() -> list[str]:
    """The host folders a pod's commands come from: this Python's environment (the venv and
    the interpreter it was made from) and the checkout (its packages are installed editable,
    the test data lives in it). A volume of the pod mounted above one of them must not hide
    it: a checkout made with ``mktemp -d`` lives under /tmp, where a training pod mounts a
    scratch emptyDir."""
    here = Path(__file__).resolve().parents[1]
    folders = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, here)}
    return sorted(f for f in folders if f != "/")


IP_BIN = shutil.which("ip") or "/usr/sbin/ip"
UNSHARE_BIN = shutil.which("unshare") or "/usr/bin/unshare"


def pod_key(pod: dict) -> str:
    return f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"


# =============================================================================================
# One pod


class ProcInfo:
    def __init__(
        self, popen: subprocess.Popen, writer: LogWriter, term_file: Path, fail_file: Path
    ):
        self.popen = popen
        self.writer = writer
        self.term_file = term_file
        self.fail_file = fail_file
        self.sigterm_sent = False
        self.sigkill_sent = False


class PodWorker(threading.Thread):
    def __init__(self, runner: Runner, pod: dict):
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.runner = runner
        self.pod = pod
        meta = pod["metadata"]
        self.uid, self.ns, self.name = meta["uid"], meta.get("namespace", ""), meta["name"]
        self.key = f"{self.ns}/{self.name}"
        self.dir = runner.state_dir / "pods" / self.uid
        self.home = self.dir / "home"
        self.gone = False
        self.shutdown = False
        self.wake = threading.Event()
        self.lock = threading.Lock()
        spec = pod["spec"]
        self.policy = spec.get("restartPolicy", "Always")
        self.inits = list(spec.get("initContainers") or [])
        self.mains = list(spec.get("containers") or [])
        self.specs = {c["name"]: c for c in [*self.inits, *self.mains]}
        self.records: dict[str, ContainerRecord] = {}
        for c in self.inits:
            kind = "sidecar" if c.get("restartPolicy") == "Always" else "init"
            self.records[c["name"]] = ContainerRecord(
                c["name"], c.get("image", ""), kind, reason="PodInitializing"
            )
        for c in self.mains:
            reason = "PodInitializing" if self.inits else "ContainerCreating"
            self.records[c["name"]] = ContainerRecord(
                c["name"], c.get("image", ""), "main", reason=reason
            )
        self.procs: dict[str, ProcInfo] = {}
        self.next_start: dict[str, float] = {}
        self.backoff = podspec.RestartBackoff()
        self.pod_ip: str | None = None
        self.netns: str | None = None
        self.start_time = now_iso()
        self.volumes: dict[str, tuple[str, bool]] = {}
        self.tmpfs: list[str] = []
        self.stage = "setup"  # setup | init | main | stopping | done
        self.init_index = 0
        self.terminal: str | None = None
        self.terminal_pending = "Failed"
        self.terminating = False
        self.kill_deadline = 0.0
        self.terminating_since = 0.0
        self.started_mono = time.monotonic()
        self.stop_deadline: float | None = None
        self.deleted_sent = False
        self.last_status: dict | None = None
        self.pod_message: tuple[str, str] | None = None
        self.logged: dict[str, str] = {}

    # -- events from the watch ------------------------------------------------------------------

    def update(self, pod: dict) -> None:
        self.pod = pod
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.wake.set()

    def stop_now(self) -> None:
        self.shutdown = True
        self.wake.set()

    def say(self, msg: str, *args) -> None:
        log.info("pod %s: " + msg, self.key, *args)

    def say_once(self, topic: str, msg: str) -> bool:
        if self.logged.get(topic) != msg:
            self.logged[topic] = msg
            self.say("%s", msg)
            return True
        return False

    def event(
        self, reason: str, message: str, container: str | None = None, warning: bool = False
    ) -> None:
        """An Event on the pod, as the kubelet records them (``kubectl describe pod``)."""
        self.runner.record_event(self.pod, reason, message, container, warning)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:
            log.exception("pod %s: the runner's worker failed", self.key)
            self._kill_all(signal.SIGKILL)
            # Say so in the pod rather than leave it hanging; its deletion is then handled
            # like any finished pod's.
            self.pod_message = ("RunnerError", f"the proving ground's runner failed: {e}")
            self.terminal, self.stage = "Failed", "done"
            with contextlib.suppress(Exception):
                self.push_status()
        finally:
            try:
                self._cleanup()
            except Exception:
                log.exception("pod %s: cleanup failed", self.key)
            self.runner.worker_done(self)

    def _run(self) -> None:
        self.say("bound here; setting up (uid %s)", self.uid)
        for sub in ("volumes", "logs", "term", "home", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if self.pod["spec"].get("hostNetwork"):
            self.pod_ip = self.runner.node_ip
        else:
            self.pod_ip = self.runner.allocator.allocate(self.uid)
            self.netns = self.runner.network.create_pod_netns(self.uid, self.pod_ip)
            self.say("network namespace %s, address %s", self.netns, self.pod_ip)
        self.push_status()
        while not self._should_leave():
            if self.pod["metadata"].get("deletionTimestamp"):
                break
            try:
                self.volumes = self.prepare_volumes()
                break
            except VolumeError as e:
                if self.say_once("volumes", f"waiting for volumes: {e}"):
                    self.event("FailedMount", f"MountVolume.SetUp failed: {e}", warning=True)
                for r in self.records.values():
                    r.waiting("ContainerCreating", str(e))
                self.push_status()
            except ApiError as e:
                self.say_once("volumes", f"API error preparing volumes: {e}")
            self.wake.wait(2.0)
            self.wake.clear()
        self.stage = "init"
        while True:
            if self.gone or self.shutdown:
                self._kill_all(
                    signal.SIGKILL if self.gone else signal.SIGTERM,
                    grace=0 if self.gone else self._grace(cap=10),
                )
                return
            self.tick()
            if self.stage == "done" and self.gone:
                return
            # A finished pod only waits for its deletion (events still wake it at once).
            self.wake.wait(TICK if self.stage != "done" else 2.0)
            self.wake.clear()

    def _should_leave(self) -> bool:
        return self.gone or self.shutdown

    def _grace(self, cap: float | None = None) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        g = meta.get("deletionGracePeriodSeconds")
        if g is None:
            g = spec.get("terminationGracePeriodSeconds", 30)
        g = float(g)
        return min(g, cap) if cap is not None else g

    # -- one step -------------------------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        for name in list(self.procs):
            self.poll(name)
        if (
            self.stage != "done"
            and self.pod["metadata"].get("deletionTimestamp")
            and not self.terminating
        ):
            self.terminating = True
            self.terminating_since = now
            self.kill_deadline = now + self._grace()
            self.say("deletion requested; stopping containers (grace %.0fs)", self._grace())
        limit = self.pod["spec"].get("activeDeadlineSeconds")
        if (
            limit
            and self.stage != "done"
            and not self.terminating
            and now - self.started_mono > float(limit)
        ):
            self.terminating = True
            self.terminating_since = now
            self.kill_deadline = now + self._grace()
            self.pod_message = (
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline",
            )
            self.say("activeDeadlineSeconds (%ss) exceeded; stopping containers", limit)
            self.event("DeadlineExceeded", self.pod_message[1], warning=True)
        if self.terminating and self.stage != "done":
            # A second delete may shorten the grace period, never lengthen it.
            self.kill_deadline = min(self.kill_deadline, self.terminating_since + self._grace())
            self._terminate_step(now)
        elif self.stage == "init":
            self._init_step(now)
            self._supervise_sidecars(now)
        elif self.stage == "main":
            self._main_step(now)
            self._supervise_sidecars(now)
        elif self.stage == "stopping":
            self._stopping_step(now)
        if self.stage == "done":
            self._after_done()
        self.push_status()

    def _init_step(self, now: float) -> None:
        while self.init_index < len(self.inits):
            c = self.inits[self.init_index]
            r = self.records[c["name"]]
            if r.kind == "sidecar":
                if r.state == "running":
                    self.init_index += 1
                    continue
                if now >= self.next_start.get(r.name, 0) and self.start_container(c):
                    self.init_index += 1
                    continue
                return
            if r.state == "running":
                return
            if r.state == "terminated":
                if r.exit_code == 0:
                    self.init_index += 1
                    continue
                if self.policy == "Never":
                    self.say(
                        "init container %s failed (exit %s); the pod fails", r.name, r.exit_code
                    )
                    self._finish("Failed")
                    return
                self._schedule_restart(r, now)
                return
            if now >= self.next_start.get(r.name, 0):
                self.start_container(c)
            return
        self.stage = "main"
        for r in self.records.values():
            if r.kind == "main" and r.state == "waiting" and r.reason == "PodInitializing":
                r.waiting("ContainerCreating")
        self.say("initialized")
        self._main_step(now)

    def _main_step(self, now: float) -> None:
        pending_restart = False
        for c in self.mains:
            r = self.records[c["name"]]
            if r.state == "terminated":
                if podspec.should_restart(self.policy, r.exit_code or 0):
                    self._schedule_restart(r, now)
                    pending_restart = True
                continue
            if r.state == "waiting":
                pending_restart = True
                if now >= self.next_start.get(r.name, 0):
                    self.start_container(c)
            if r.state == "running":
                pending_restart = True
        if not pending_restart:
            self._finish(podspec.terminal_phase(list(self.records.values())))

    def _schedule_restart(self, r: ContainerRecord, now: float) -> None:
        delay = self.backoff.next(r.name)
        r.last_state = r.terminated_dict()
        r.exit_code = None
        r.waiting(
            "CrashLoopBackOff",
            f"back-off {delay:.0f}s restarting failed container={r.name} "
            f"pod={self.name}_{self.ns}({self.uid})",
        )
        r.restart_count += 1
        self.next_start[r.name] = now + delay
        self.say("container %s will restart in %.0fs (restart %d)", r.name, delay, r.restart_count)
        self.event(
            "BackOff",
            f"Back-off restarting failed container {r.name} in pod "
            f"{self.name}_{self.ns}({self.uid})",
            r.name,
            warning=True,
        )

    def _supervise_sidecars(self, now: float) -> None:
        limit = self.init_index if self.stage == "init" else len(self.inits)
        for c in self.inits[:limit]:
            r = self.records[c["name"]]
            if r.kind != "sidecar":
                continue
            if r.state == "terminated":
                self._schedule_restart(r, now)
            elif r.state == "waiting" and now >= self.next_start.get(r.name, 0):
                self.start_container(c)

    def _finish(self, phase: str) -> None:
        """Every main container is done (or an init container failed): stop the sidecars."""
        self.terminal_pending = phase
        self.stage = "stopping"
        self.stop_deadline = None
        self.say("main containers done; phase will be %s", phase)
        self._stopping_step(time.monotonic())

    def _stopping_step(self, now: float) -> None:
        running = [n for n in reversed(list(self.procs)) if n in self.procs]
        if running and self.stop_deadline is None:
            self.stop_deadline = now + self._grace()
        for name in running:
            p = self.procs[name]
            if not p.sigterm_sent:
                self.signal(name, signal.SIGTERM)
            elif now >= (self.stop_deadline or now) and not p.sigkill_sent:
                self.signal(name, signal.SIGKILL)
        if not self.procs:
            self._set_terminal(self.terminal_pending)

    def _terminate_step(self, now: float) -> None:
        mains_running = [c["name"] for c in self.mains if c["name"] in self.procs]
        side_running = [c["name"] for c in reversed(self.inits) if c["name"] in self.procs]
        targets = mains_running or side_running
        for name in targets:
            if not self.procs[name].sigterm_sent:
                self.signal(name, signal.SIGTERM)
        if now >= self.kill_deadline:
            for name in list(self.procs):
                if not self.procs[name].sigkill_sent:
                    self.signal(name, signal.SIGKILL)
        if not self.procs:
            phase = podspec.terminal_phase(list(self.records.values()))
            if self.pod_message and self.pod_message[0] == "DeadlineExceeded":
                phase = "Failed"
            self._set_terminal(phase)

    def _set_terminal(self, phase: str) -> None:
        self.terminal = phase
        self.stage = "done"
        self.say(
            "finished: phase %s (%s)",
            phase,
            ", ".join(
                f"{r.name}={r.exit_code}" for r in self.records.values() if r.state == "terminated"
            ),
        )
        self.push_status()
        if self.netns:
            self.runner.network.delete_pod_netns(self.netns)
            self.runner.allocator.release(self.uid)
            self.netns = None

    def _after_done(self) -> None:
        if self.pod["metadata"].get("deletionTimestamp") and not self.deleted_sent:
            self.deleted_sent = True
            self.runner.delete_pod(self.pod)

    # -- containers -----------------------------------------------------------------------------

    def lookup(self, kind: str, name: str) -> dict | None:
        path = (
            f"/api/v1/namespaces/{self.ns}/"
            f"{'configmaps' if kind == 'configmap' else 'secrets'}/{name}"
        )
        obj = self.runner.api.get_or_none(path)
        if obj is None:
            return None
        return podspec.configmap_data(obj) if kind == "configmap" else podspec.decode_secret(obj)

    def _pod_for_env(self) -> dict:
        pod = json.loads(json.dumps(self.pod))
        st = pod.setdefault("status", {})
        st["podIP"] = self.pod_ip or ""
        st["podIPs"] = [{"ip": self.pod_ip}] if self.pod_ip else []
        st["hostIP"] = self.runner.node_ip
        st["hostIPs"] = [{"ip": self.runner.node_ip}]
        return pod

    def start_container(self, c: dict) -> bool:
        name = c["name"]
        r = self.records[name]
        pod = self._pod_for_env()
        try:
            cenv = podspec.resolve_env(c, pod, self.lookup)
        except ConfigError as e:
            r.waiting("CreateContainerConfigError", str(e))
            self.next_start[name] = time.monotonic() + CONFIG_RETRY
            if self.say_once(f"cfg-{name}", f"container {name}: CreateContainerConfigError: {e}"):
                self.event("Failed", f"Error: {e}", name, warning=True)
            return False
        except ApiError as e:
            r.waiting("CreateContainerConfigError", f"API error: {e}")
            self.next_start[name] = time.monotonic() + CONFIG_RETRY
            return False
        self.logged.pop(f"cfg-{name}", None)
        try:
            argv = podspec.command_line(c, cenv)
        except ValueError as e:
            self._start_failed(r, "ImageEntrypointUnknown", str(e))
            return True
        hostname = (self.pod["spec"].get("hostname") or self.name)[:63]
        env = {"PATH": self.runner.path, "HOME": str(self.home), "HOSTNAME": hostname}
        # As the kubelet does for every container (enableServiceLinks or not): where the API
        # server is. Without kube-proxy, that is the runner's forwarder on the node address.
        if self.runner.api_port:
            env["KUBERNETES_SERVICE_HOST"] = self.runner.node_ip
            env["KUBERNETES_SERVICE_PORT"] = str(self.runner.api_port)
            env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(self.runner.api_port)
        if os.environ.get("LANG"):
            env["LANG"] = os.environ["LANG"]
        env.update(cenv)
        try:
            mounts = self.container_mounts(c, cenv)
        except VolumeError as e:
            r.waiting("CreateContainerConfigError", str(e))
            self.next_start[name] = time.monotonic() + CONFIG_RETRY
            if self.say_once(f"cfg-{name}", f"container {name}: {e}"):
                self.event("Failed", f"Error: {e}", name, warning=True)
            return False
        if self.netns:
            mounts = self._etc_mounts(hostname, mounts)
        mounts += [{"kind": "keep", "source": f, "target": f} for f in self.runner.keep_visible]
        n = r.restart_count
        term = self.dir / "term" / f"{name}-{n}"
        term.write_bytes(b"")
        fail = self.dir / "run" / f"{name}-{n}.startfail"
        fail.unlink(missing_ok=True)
        spec_file = self.dir / "run" / f"{name}-{n}.json"
        tpath = c.get("terminationMessagePath") or "/dev/termination-log"
        spec = {
            "hostname": hostname,
            "mounts": mounts,
            "termination": {"source": str(term), "target": tpath},
            "workingDir": c.get("workingDir") or "",
            "home": str(self.home),
            "argv": argv,
            "env": env,
            "startFailFile": str(fail),
        }
        spec_file.write_text(json.dumps(spec))
        cmd = [
            UNSHARE_BIN,
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-I",
            SHIM,
            str(spec_file),
        ]
        if self.netns:
            cmd = [IP_BIN, "netns", "exec", self.netns, *cmd]
        log_path = self.log_path(name, n)
        writer = LogWriter(log_path)
        try:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=env,
                cwd=str(self.home),
                close_fds=True,
            )
        except OSError as e:
            writer.close()
            self._start_failed(r, "StartError", f"cannot start the container: {e}")
            return True
        writer.attach(popen.stdout, "stdout")
        writer.attach(popen.stderr, "stderr")
        self.procs[name] = ProcInfo(popen, writer, term, fail)
        r.state, r.reason, r.message = "running", "", ""
        r.exit_code = r.signal = None
        r.started_at, r.finished_at = now_iso(), None
        r.container_id = f"runner://{popen.pid}"
        r.ever_started = True
        r.probe_ready = self._start_readiness_probe(c, popen)
        self.say("started container %s (pid %d): %s", name, popen.pid, " ".join(argv)[:200])
        self.event("Started", f"Started container {name} (pid {popen.pid})", name)
        self.push_status()
        return True

    def _start_readiness_probe(self, c: dict, popen: subprocess.Popen) -> bool:
        """Probe the container's readinessProbe (httpGet, tcpSocket) from the node, as the
        kubelet does, until the process ends; return whether it starts out ready."""
        probe = c.get("readinessProbe") or {}
        target = podspec.probe_target(probe, c) if probe else None
        if target is None or not self.pod_ip:
            return True
        kind, port, path = target
        url = f"http://{self.pod_ip}:{port}{path}"
        period = float(probe.get("periodSeconds", 10))
        timeout = float(probe.get("timeoutSeconds", 1))
        first = float(probe.get("initialDelaySeconds", 0))
        record = self.records[c["name"]]

        def passes() -> bool:
            try:
                if kind == "tcp":
                    import socket

                    socket.create_connection((self.pod_ip, port), timeout=timeout).close()
                    return True
                import urllib.request

                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= r.status < 400
            except OSError:
                return False

        def loop() -> None:
            # Until ready, probe every half second (a kubelet probes every period; the quicker
            # first success only makes the runner's pods ready sooner, never wrongly).
            time.sleep(first)
            while popen.poll() is None and not self.gone:
                ok = passes()
                if ok != record.probe_ready and popen.poll() is None:
                    record.probe_ready = ok
                    self.push_status()
                time.sleep(period if ok else 0.5)

        threading.Thread(target=loop, daemon=True, name=f"probe-{c['name']}").start()
        return False

    def _etc_mounts(self, hostname: str, mounts: list[dict]) -> list[dict]:
        """A pod-managed /etc/hosts and /etc/resolv.conf, as the kubelet writes them: the
        hostname (and, with a subdomain, its fully qualified name) on the pod's IP; the cluster
        DNS with the pod's search domains. Without cluster DNS the only name server is the
        pod's own loopback: names other than these fail at once instead of timing out, and no
        query leaves this machine (the cluster DNS forwards nothing either)."""
        spec = self.pod["spec"]
        namespace = self.pod["metadata"]["namespace"]
        names = hostname
        if spec.get("subdomain"):
            names = f"{hostname}.{spec['subdomain']}.{namespace}.svc.{self.runner.cluster_domain}"
            names += f"\t{hostname}"
        hosts = self.dir / "run" / "hosts"
        hosts.write_text(
            "# Kubernetes-managed hosts file (the proving ground's runner).\n"
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{self.pod_ip}\t{names}\n"
        )
        resolv = self.dir / "run" / "resolv.conf"
        domain = self.runner.cluster_domain
        if self.runner.cluster_dns and not spec.get("hostNetwork"):
            resolv.write_text(
                f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
                f"nameserver {self.runner.cluster_dns}\noptions ndots:5 timeout:1 attempts:2\n"
            )
        else:
            resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        taken = {m["target"] for m in mounts}
        extra = [
            {"kind": "bind", "source": str(f), "target": t, "readOnly": False}
            for f, t in ((hosts, "/etc/hosts"), (resolv, "/etc/resolv.conf"))
            if t not in taken
        ]
        return extra + mounts

    def _start_failed(self, r: ContainerRecord, reason: str, message: str) -> None:
        r.state, r.reason, r.message = "terminated", reason, message
        r.exit_code, r.signal = 128, None
        r.started_at = r.finished_at = now_iso()
        r.ever_started = True
        self.say("container %s could not start: %s: %s", r.name, reason, message)
        self.event("Failed", f"Error: {reason}: {message}", r.name, warning=True)

    def log_path(self, name: str, n: int) -> Path:
        return self.dir / "logs" / name / f"{n}.log"

    def poll(self, name: str) -> None:
        p = self.procs[name]
        rc = p.popen.poll()
        if rc is None:
            return
        del self.procs[name]
        p.writer.close()
        r = self.records[name]
        code, sig = podspec.returncode_to_exit(rc)
        r.state, r.exit_code, r.signal = "terminated", code, sig
        r.finished_at = now_iso()
        r.reason = podspec.exit_reason(code)
        message = ""
        if p.fail_file.exists() and p.fail_file.stat().st_size:
            r.reason = "StartError"
            message = p.fail_file.read_text(errors="replace")
        else:
            with contextlib.suppress(OSError):
                message = p.term_file.read_bytes()[: podspec.TERMINATION_MESSAGE_LIMIT].decode(
                    "utf-8", "replace"
                )
            policy = self.specs[name].get("terminationMessagePolicy", "File")
            if not message.strip() and code != 0 and policy == "FallbackToLogsOnError":
                message = podspec.fallback_message(plain_text(self.log_path(name, r.restart_count)))
        r.message = message
        self.say(
            "container %s exited with code %d%s (%s)",
            name,
            code,
            f" (signal {sig})" if sig else "",
            r.reason,
        )

    def signal(self, name: str, sig: int) -> None:
        p = self.procs[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, sig)
        if sig == signal.SIGTERM:
            p.sigterm_sent = True
        if sig == signal.SIGKILL:
            p.sigkill_sent = True
        self.say("sent %s to container %s (pid %d)", signal.Signals(sig).name, name, p.popen.pid)
        if sig == signal.SIGTERM and not self.shutdown:
            self.event("Killing", f"Stopping container {name}", name)

    def _kill_all(self, sig: int, grace: float = 0) -> None:
        if sig == signal.SIGTERM and self.procs:
            for name in list(self.procs):
                self.signal(name, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.procs and time.monotonic() < deadline:
                for name in list(self.procs):
                    self.poll(name)
                time.sleep(0.1)
        for name in list(self.procs):
            self.signal(name, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.procs and time.monotonic() < deadline:
            for name in list(self.procs):
                self.poll(name)
            time.sleep(0.05)

    # -- volumes --------------------------------------------------------------------------------

    def prepare_volumes(self) -> dict[str, tuple[str, bool]]:
        """name -> (host folder or file, read-only by the volume itself)."""
        out: dict[str, tuple[str, bool]] = {}
        pod = self._pod_for_env()
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            vdir = self.dir / "volumes" / name
            if "emptyDir" in vol:
                vdir.mkdir(parents=True, exist_ok=True)
                ed = vol["emptyDir"] or {}
                if ed.get("medium") == "Memory" and str(vdir) not in self.tmpfs:
                    opts = "mode=1777"
                    if ed.get("sizeLimit"):
                        opts += f",size={int(podspec.parse_quantity(ed['sizeLimit']))}"
                    subprocess.run(
                        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(vdir)],
                        check=True,
                        capture_output=True,
                    )
                    self.tmpfs.append(str(vdir))
                out[name] = (str(vdir), False)
            elif "hostPath" in vol:
                hp = vol["hostPath"]
                path, htype = hp["path"], hp.get("type", "")
                if htype == "DirectoryOrCreate":
                    os.makedirs(path, exist_ok=True)
                elif htype == "FileOrCreate" and not os.path.exists(path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "a").close()
                elif htype in ("Directory", "File") and not os.path.exists(path):
                    raise VolumeError(f'volume "{name}": hostPath {path} does not exist')
                elif not htype and not os.path.exists(path):
                    os.makedirs(path, exist_ok=True)
                out[name] = (path, False)
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]
                out[name] = (self._pvc_path(name, claim["claimName"]), bool(claim.get("readOnly")))
            elif any(k in vol for k in ("configMap", "secret", "downwardAPI", "projected")):
                files = self._volume_files(name, vol, pod)
                if vdir.exists():
                    shutil.rmtree(vdir)
                vdir.mkdir(parents=True)
                for rel, data, mode in files:
                    target = vdir / podspec.safe_relpath(rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    os.chmod(target, mode & 0o777)
                out[name] = (str(vdir), True)
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise VolumeError(
                    f'volume "{name}": type {kinds} is not supported by the '
                    "runner (it supports emptyDir, hostPath, "
                    "persistentVolumeClaim, configMap, secret, downwardAPI, "
                    "projected)"
                )
        return out

    def _pvc_path(self, name: str, claim: str) -> str:
        pvc = self.runner.api.get_or_none(
            f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}"
        )
        if pvc is None:
            raise VolumeError(f'volume "{name}": persistentvolumeclaim "{claim}" not found')
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if (pvc.get("status") or {}).get("phase") != "Bound" or not pv_name:
            raise VolumeError(f'volume "{name}": persistentvolumeclaim "{claim}" is not bound yet')
        pv = self.runner.api.get_or_none(f"/api/v1/persistentvolumes/{pv_name}")
        if pv is None:
            raise VolumeError(f'volume "{name}": persistentvolume "{pv_name}" not found')
        spec = pv.get("spec") or {}
        path = (spec.get("hostPath") or {}).get("path") or (spec.get("local") or {}).get("path")
        if not path:
            raise VolumeError(
                f'volume "{name}": persistentvolume "{pv_name}" is neither '
                "hostPath nor local; the runner cannot mount it"
            )
        os.makedirs(path, exist_ok=True)
        return path

    def _volume_files(self, name: str, vol: dict, pod: dict) -> list[tuple[str, bytes, int]]:
        if "configMap" in vol:
            return self._object_files(
                name, "configmap", vol["configMap"], vol["configMap"].get("defaultMode")
            )
        if "secret" in vol:
            src = dict(vol["secret"], name=vol["secret"].get("secretName"))
            return self._object_files(name, "secret", src, src.get("defaultMode"))
        if "downwardAPI" in vol:
            d = vol["downwardAPI"]
            return podspec.downward_files(pod, d.get("items"), d.get("defaultMode"))
        proj = vol["projected"]
        mode = proj.get("defaultMode")
        files: list[tuple[str, bytes, int]] = []
        for src in proj.get("sources") or []:
            if "configMap" in src:
                files += self._object_files(name, "configmap", src["configMap"], mode)
            elif "secret" in src:
                files += self._object_files(name, "secret", src["secret"], mode)
            elif "downwardAPI" in src:
                files += podspec.downward_files(pod, src["downwardAPI"].get("items"), mode)
            elif "serviceAccountToken" in src:
                sat = src["serviceAccountToken"]
                files.append(
                    (sat["path"], self._token(sat).encode(), 0o600 if mode is None else mode)
                )
            else:
                raise VolumeError(
                    f'volume "{name}": projected source {sorted(src)} is not '
                    "supported by the runner"
                )
        return files

    def _object_files(self, vname: str, kind: str, src: dict, mode: int | None):
        plural = "configmaps" if kind == "configmap" else "secrets"
        obj = self.runner.api.get_or_none(f"/api/v1/namespaces/{self.ns}/{plural}/{src['name']}")
        what = f'volume "{vname}": {kind} "{src["name"]}"'
        if obj is None:
            if src.get("optional"):
                return []
            raise VolumeError(f"{what} not found")
        data = podspec.configmap_bytes(obj) if kind == "configmap" else podspec.secret_bytes(obj)
        return podspec.key_files(data, src.get("items"), mode, what, bool(src.get("optional")))

    def _token(self, sat: dict) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [sat["audience"]] if sat.get("audience") else [],
                "expirationSeconds": sat.get("expirationSeconds", 3607),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.name,
                    "uid": self.uid,
                },
            },
        }
        try:
            resp = self.runner.api.call(
                "POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body
            )
        except ApiError as e:
            raise VolumeError(f"service account token for {sa}: {e.message}") from e
        return resp["status"]["token"]

    def container_mounts(self, c: dict, env: dict[str, str]) -> list[dict]:
        mounts = []
        for vm in c.get("volumeMounts") or []:
            if vm["name"] not in self.volumes:
                raise VolumeError(f'volumeMount "{vm["name"]}" names no volume of the pod')
            src, vol_ro = self.volumes[vm["name"]]
            sub = vm.get("subPath") or podspec.expand(vm.get("subPathExpr") or "", env)
            if sub:
                src = os.path.join(src, podspec.safe_relpath(sub))
                if not os.path.exists(src):
                    os.makedirs(src, exist_ok=True)
            read_only = bool(vm.get("readOnly")) or (vol_ro and self._is_config_volume(vm))
            mounts.append(
                {"kind": "bind", "source": src, "target": vm["mountPath"], "readOnly": read_only}
            )
        return mounts

    def _is_config_volume(self, vm: dict) -> bool:
        vol = next(v for v in self.pod["spec"].get("volumes") or [] if v["name"] == vm["name"])
        return any(k in vol for k in ("configMap", "secret", "downwardAPI", "projected"))

    # -- status ---------------------------------------------------------------------------------

    def push_status(self) -> None:
        if self.gone:
            return
        pod = self.pod
        if self.last_status:
            pod = dict(
                pod, status=dict(pod.get("status") or {}, conditions=self.last_status["conditions"])
            )
        status = podspec.build_pod_status(
            pod,
            list(self.records.values()),
            pod_ip=self.pod_ip,
            host_ip=self.runner.node_ip,
            initialized=self.stage in ("main",)
            or (self.stage in ("stopping", "done") and self.init_index >= len(self.inits)),
            sandbox_ready=self.pod_ip is not None and self.stage != "done",
            terminal=self.terminal,
            start_time=self.start_time,
            reason=self.pod_message[0] if self.pod_message else None,
            message=self.pod_message[1] if self.pod_message else None,
        )
        if status == self.last_status:
            return
        try:
            self.runner.api.merge_patch(
                f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                {"metadata": {"uid": self.uid}, "status": status},
            )
            self.last_status = status
        except ApiError as e:
            if e.status in (404, 409):
                self.say_once("status", f"pod is gone ({e.message})")
                self.gone = True
            else:
                log.warning("pod %s: status update failed: %s", self.key, e)
        except Exception as e:
            log.warning("pod %s: status update failed: %s", self.key, e)

    # -- cleanup --------------------------------------------------------------------------------

    def _cleanup(self) -> None:
        if self.procs:
            self._kill_all(signal.SIGKILL)
        if self.netns:
            self.runner.network.delete_pod_netns(self.netns)
            self.netns = None
        self.runner.allocator.release(self.uid)
        for mnt in self.tmpfs:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        if self.gone:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.say("cleaned up")

    # -- logs -----------------------------------------------------------------------------------

    def log_source(self, container: str, previous: bool) -> LogSource:
        r = self.records.get(container)
        if r is None:
            raise LogRequestError(400, f"container {container} is not valid for pod {self.name}")
        if previous:
            if r.restart_count == 0:
                raise LogRequestError(
                    400,
                    f'previous terminated container "{container}" in pod "{self.name}" not found',
                )
            return LogSource(self.log_path(container, r.restart_count - 1), lambda: False)
        n = r.restart_count
        path = self.log_path(container, n)
        if not path.exists():
            if r.state == "waiting" and r.last_state and n > 0:
                path = self.log_path(container, n - 1)
            else:
                raise LogRequestError(
                    400,
                    f'container "{container}" in pod "{self.name}" is waiting to start: {r.reason}',
                )

        def running() -> bool:
            return container in self.procs and r.restart_count == n and not self.gone

        return LogSource(path, running)


# =============================================================================================
# The node


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.node_name = args.node_name
        self.node_ip = args.node_ip
        self.pod_cidr = args.pod_cidr
        self.state_dir = Path(args.state_dir).resolve()
        self.kubelet_port = args.kubelet_port
        self.port_forward = args.port_forward
        self.cluster_dns = args.cluster_dns
        self.cluster_domain = args.cluster_domain
        self.api = Api(args.kubeconfig)
        self.network = Network(
            args.bridge, args.node_ip, args.pod_cidr, str(self.state_dir / "netns.txt")
        )
        self.allocator = IPAllocator(args.pod_cidr, args.node_ip)
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.stop = threading.Event()
        self.deleting: set[str] = set()
        self.node_uid = ""
        self.port = 0
        self.api_port = 0  # the API server forwarder on the node address
        bindir = os.path.dirname(sys.executable)
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        self.path = path if bindir in path.split(os.pathsep) else f"{bindir}{os.pathsep}{path}"
        self.keep_visible = command_sources()
        self.boot_id = str(uuid.uuid4())
        self.events: queue.Queue[dict] = queue.Queue(maxsize=1000)

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ready = self.state_dir / "runner.ready"
        ready.unlink(missing_ok=True)
        if os.geteuid() != 0:
            log.error("the runner needs root (network namespaces, mounts)")
            return 2
        stale = self.state_dir / "pods"
        if stale.exists():
            for d in stale.iterdir():
                for line in _mounts_under(str(d)):
                    subprocess.run(["umount", "-l", line], capture_output=True)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.network.setup()
        except NetworkError as e:
            log.error("%s", e)
            self.network.teardown()
            return 2
        try:
            socket_path = self._start_port_forward()
            server = serve(
                self.node_ip,
                self.kubelet_port,
                self.state_dir / "pki",
                self.node_name,
                self.log_lookup,
                self.pod_ip_lookup,
                socket_path,
            )
            self.port = server.server_address[1]
            log.info("log server listening on https://%s:%d", self.node_ip, self.port)
            self.api_port = forward_api_server(self.node_ip, self.api.host)
            log.info(
                "API server forwarded at %s:%d for in-cluster clients", self.node_ip, self.api_port
            )
            self.register_node()
            threading.Thread(target=self._lease_loop, daemon=True, name="lease").start()
            threading.Thread(target=self._node_status_loop, daemon=True, name="node").start()
            threading.Thread(target=self._watch_loop, daemon=True, name="watch").start()
            threading.Thread(target=self._event_loop, daemon=True, name="events").start()
            ready.write_text(f"{self.port}\n")
            log.info("node %s registered and Ready; watching its pods", self.node_name)
            while not self.stop.wait(1.0):
                pass
            log.info("stopping: terminating every pod's containers")
            with self.workers_lock:
                workers = list(self.workers.values())
            for w in workers:
                w.stop_now()
            deadline = time.monotonic() + 25
            for w in workers:
                if w.is_alive():
                    w.join(max(0.1, deadline - time.monotonic()))
            server.shutdown()
        finally:
            ready.unlink(missing_ok=True)
            self.network.teardown()
            log.info("runner stopped; bridge and namespaces removed")
        return 0

    # -- the node -------------------------------------------------------------------------------

    def node_object(self) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/os": "linux",
                    "beta.kubernetes.io/arch": "amd64",
                    "gft.dev/runner": "true",
                    "nvidia.com/gpu.present": "true",
                },
            },
            "spec": {
                "taints": [{"key": "gft.dev/runner", "value": "true", "effect": "NoSchedule"}]
            },
        }

    def register_node(self) -> None:
        want = self.node_object()
        existing = self.api.get_or_none(f"/api/v1/nodes/{self.node_name}")
        if existing is None:
            try:
                existing = self.api.call("POST", "/api/v1/nodes", want)
                log.info("node %s created", self.node_name)
            except ApiError as e:
                if e.status != 409:
                    raise
                existing = self.api.get(f"/api/v1/nodes/{self.node_name}")
        if existing is not None and existing["metadata"].get("resourceVersion"):
            annotations = existing["metadata"].get("annotations") or {}
            patch: dict = {"metadata": {"labels": want["metadata"]["labels"]}}
            if "kwok.x-k8s.io/node" in annotations:
                patch["metadata"]["annotations"] = {"kwok.x-k8s.io/node": None}
            taints = [
                t
                for t in (existing.get("spec") or {}).get("taints") or []
                if t["key"] != "gft.dev/runner"
            ] + want["spec"]["taints"]
            patch["spec"] = {"taints": taints, "unschedulable": False}
            existing = self.api.merge_patch(f"/api/v1/nodes/{self.node_name}", patch)
        self.node_uid = existing["metadata"]["uid"]
        self.update_node_status()

    def update_node_status(self) -> None:
        node = self.api.get(f"/api/v1/nodes/{self.node_name}")
        prev = {c["type"]: c for c in (node.get("status") or {}).get("conditions") or []}
        now = now_iso()

        def cond(ctype: str, status: str, reason: str, message: str) -> dict:
            old = prev.get(ctype) or {}
            ltt = old.get("lastTransitionTime") if old.get("status") == status else None
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": ltt or now,
            }

        status = {
            "capacity": podspec.NODE_CAPACITY,
            "allocatable": podspec.NODE_CAPACITY,
            "addresses": [
                {"type": "InternalIP", "address": self.node_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                cond(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure",
                ),
                cond(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available",
                ),
                cond(
                    "Ready",
                    "True",
                    "KubeletReady",
                    "the proving ground's runner is posting ready status",
                ),
            ],
            "nodeInfo": {
                "machineID": "gft-runner",
                "systemUUID": self.boot_id,
                "bootID": self.boot_id,
                "kernelVersion": os.uname().release,
                "osImage": "proving ground runner",
                "containerRuntimeVersion": "runner://0.1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})

    def _node_status_loop(self) -> None:
        while not self.stop.wait(NODE_STATUS_PERIOD):
            try:
                self.update_node_status()
            except Exception as e:
                log.warning("node status update failed: %s", e)

    def _lease_loop(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        while not self.stop.is_set():
            try:
                spec = {
                    "holderIdentity": self.node_name,
                    "leaseDurationSeconds": 40,
                    "renewTime": now_micro(),
                }
                if self.api.get_or_none(path) is None:
                    self.api.call(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        {
                            "apiVersion": "coordination.k8s.io/v1",
                            "kind": "Lease",
                            "metadata": {
                                "name": self.node_name,
                                "ownerReferences": [
                                    {
                                        "apiVersion": "v1",
                                        "kind": "Node",
                                        "name": self.node_name,
                                        "uid": self.node_uid,
                                    }
                                ],
                            },
                            "spec": spec,
                        },
                    )
                else:
                    self.api.merge_patch(path, {"spec": spec})
            except Exception as e:
                log.warning("lease renewal failed: %s", e)
            self.stop.wait(LEASE_PERIOD)

    # -- events -------------------------------------------------------------------------------

    def record_event(
        self, pod: dict, reason: str, message: str, container: str | None, warning: bool
    ) -> None:
        meta = pod["metadata"]
        ref = {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
        }
        if container:
            kind = "containers"
            if any(c["name"] == container for c in pod["spec"].get("initContainers") or []):
                kind = "initContainers"
            ref["fieldPath"] = f"spec.{kind}{{{container}}}"
        now = now_iso()
        ev = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": ref,
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        with contextlib.suppress(queue.Full):
            self.events.put_nowait(ev)

    def _event_loop(self) -> None:
        """Events go out from one thread, best effort, so a slow API server delays no pod."""
        while True:
            ev = self.events.get()
            try:
                self.api.request(
                    "POST", f"/api/v1/namespaces/{ev['metadata']['namespace']}/events", ev
                )
            except Exception as e:
                log.debug("event not recorded: %s", e)

    # -- pods -----------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    lst = self.api.get("/api/v1/pods", fieldSelector=selector)
                    rv = lst["metadata"]["resourceVersion"]
                    seen = set()
                    for pod in lst["items"]:
                        seen.add(pod["metadata"]["uid"])
                        self.on_pod(pod, deleted=False)
                    with self.workers_lock:
                        missing = [w for uid, w in self.workers.items() if uid not in seen]
                    for w in missing:
                        w.mark_gone()
                for ev in self.api.watch(
                    "/api/v1/pods",
                    fieldSelector=selector,
                    resourceVersion=rv,
                    allowWatchBookmarks="true",
                    timeoutSeconds=240,
                ):
                    obj = ev["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] == "BOOKMARK":
                        continue
                    self.on_pod(obj, deleted=ev["type"] == "DELETED")
            except ApiError as e:
                if e.status == 410:
                    log.info("watch expired (410); listing pods again")
                    rv = None
                    continue
                log.warning("pod watch failed: %s; retrying", e)
                self.stop.wait(1.0)
            except Exception as e:
                log.warning("pod watch failed: %s; retrying", e)
                self.stop.wait(1.0)

    def on_pod(self, pod: dict, deleted: bool) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.workers_lock:
            w = self.workers.get(uid)
            if deleted:
                if w:
                    log.info("pod %s: removed from the API", pod_key(pod))
                    w.mark_gone()
                self.deleting.discard(uid)
                return
            if w:
                w.update(pod)
                return
            status = pod.get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed"):
                if meta.get("deletionTimestamp"):
                    self.delete_pod(pod)
                return
            started_before = bool(status.get("podIP")) or any(
                "running" in (cs.get("state") or {}) or "terminated" in (cs.get("state") or {})
                for cs in [
                    *(status.get("containerStatuses") or []),
                    *(status.get("initContainerStatuses") or []),
                ]
            )
            if started_before:
                threading.Thread(target=self.fail_orphan, args=(pod,), daemon=True).start()
                return
            if meta.get("deletionTimestamp"):
                self.delete_pod(pod)
                return
            if self.stop.is_set():
                return
            w = PodWorker(self, pod)
            self.workers[uid] = w
        w.start()

    def worker_done(self, w: PodWorker) -> None:
        with self.workers_lock:
            if self.workers.get(w.uid) is w:
                del self.workers[w.uid]

    def fail_orphan(self, pod: dict) -> None:
        """A pod this node ran before the runner restarted: its processes are gone."""
        key = pod_key(pod)
        with self.workers_lock:
            if pod["metadata"]["uid"] in self.deleting:
                return
            self.deleting.add(pod["metadata"]["uid"])
        log.info(
            "pod %s: was running before this runner started; its containers are gone, "
            "so it fails (ContainerStatusUnknown)",
            key,
        )
        status = dict(pod.get("status") or {})
        now = now_iso()

        def lost(cs: dict) -> dict:
            cs = dict(cs)
            cs["lastState"] = {}
            cs["state"] = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "finishedAt": now,
                    "message": "The container could not be located when the pod was terminated "
                    "(the runner restarted)",
                }
            }
            cs["ready"] = False
            cs["started"] = False
            return cs

        status["phase"] = "Failed"
        for k in ("containerStatuses", "initContainerStatuses"):
            if status.get(k):
                status[k] = [
                    lost(cs) if "terminated" not in (cs.get("state") or {}) else cs
                    for cs in status[k]
                ]
        conds = []
        for c in status.get("conditions") or []:
            c = dict(c)
            if (
                c["type"] in ("Ready", "ContainersReady", "PodReadyToStartContainers")
                and c.get("status") == "True"
            ):
                c.update(status="False", lastTransitionTime=now)
            conds.append(c)
        status["conditions"] = conds
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            self.api.merge_patch(
                f"/api/v1/namespaces/{ns}/pods/{name}/status",
                {"metadata": {"uid": pod["metadata"]["uid"]}, "status": status},
            )
        except ApiError as e:
            log.warning("pod %s: could not mark it failed: %s", key, e)
        finally:
            with self.workers_lock:
                self.deleting.discard(pod["metadata"]["uid"])

    def delete_pod(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.deleting and pod["metadata"].get("deletionGracePeriodSeconds") == 0:
            return
        self.deleting.add(uid)
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            self.api.call(
                "DELETE",
                f"/api/v1/namespaces/{ns}/pods/{name}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": uid},
                },
            )
            log.info("pod %s: deleted (grace 0) after its containers stopped", pod_key(pod))
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("pod %s: delete failed: %s", pod_key(pod), e)

    # -- logs and port-forward ------------------------------------------------------------------

    def _start_port_forward(self) -> Path | None:
        """Start the port-forward helper (ended with the runner: it dies with its parent)."""
        if not self.port_forward:
            log.info("no port-forward helper: kubectl port-forward will be refused")
            return None
        socket_path = self.state_dir / "portforward.sock"
        helper = subprocess.Popen(
            [self.port_forward, "--socket", str(socket_path)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.state_dir / "portforward.log", "ab"),  # noqa: SIM115
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 10
        while not socket_path.exists() and helper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("port-forward helper (pid %d) on %s", helper.pid, socket_path)
        return socket_path

    def _worker(self, ns: str, pod: str) -> PodWorker | None:
        with self.workers_lock:
            found = [w for w in self.workers.values() if w.ns == ns and w.name == pod]
        return found[-1] if found else None  # the newest, should a name have been reused

    def pod_ip_lookup(self, ns: str, pod: str) -> str:
        w = self._worker(ns, pod)
        ip = w.pod_ip if w is not None else None
        if not ip:
            raise LogRequestError(
                404, f'pod "{pod}" in namespace "{ns}" has no address on node {self.node_name}'
            )
        return ip

    def log_lookup(self, ns: str, pod: str, container: str, previous: bool) -> LogSource:
        w = self._worker(ns, pod)
        if w is None:
            raise LogRequestError(
                404, f'pod "{pod}" in namespace "{ns}" is not running on node {self.node_name}'
            )
        return w.log_source(container, previous)


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the runner dies, however the runner dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def forward_api_server(node_ip: str, upstream: str, port: int = 6443) -> int:
    """Relay TCP from ``node_ip:port`` (on the runner's bridge, reachable from pods only) to
    the API server on loopback: what kube-proxy does for the ``kubernetes`` Service. TLS goes
    through untouched (the API server's certificate names the node address)."""
    import socket
    import urllib.parse

    target = urllib.parse.urlparse(upstream)
    listener = socket.create_server((node_ip, port))

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            try:
                server = socket.create_connection((target.hostname, target.port), timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True, name="api-forward").start()
    return listener.getsockname()[1]


def _mounts_under(prefix: str) -> list[str]:
    try:
        with open("/proc/self/mounts") as f:
            targets = [line.split()[1] for line in f]
    except OSError:
        return []
    return sorted((t for t in targets if t.startswith(prefix + "/")), key=len, reverse=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="devcluster.runner",
        description="Play the kubelet for one node of the proving ground.",
    )
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node-name", required=True)
    p.add_argument("--node-ip", required=True)
    p.add_argument("--pod-cidr", required=True)
    p.add_argument("--bridge", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--kubelet-port", type=int, default=0)
    p.add_argument("--port-forward", default="", help="the gft-portforward helper binary")
    p.add_argument("--cluster-dns", default="", help="the pods' name server (the kubelet's)")
    p.add_argument("--cluster-domain", default="cluster.local")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    runner = Runner(args)

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        runner.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
