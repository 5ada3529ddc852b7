"""``make demo``: the product's main job on the proving ground, the way a user does it.

The operator is installed in the cluster with the Helm chart, the GemmaFineTune in
``examples/gemma3-270m-demo`` fine-tunes the real Gemma 3 270M with LoRA on the runner node,
the run is shown live as ``kubectl get gft`` shows it, TensorBoard is reached with
``kubectl port-forward``, and the base model and the adapter answer one question side by side.
The cluster is left up for exploring. Every step says what it runs; a failure names the step,
shows the log lines that explain it and exits non-zero.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devcluster import build
from devcluster.cluster import Cluster, default_state_dir, ensure_up
from devcluster.forwarding import PortForwardError, port_forward

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "gemma3-270m-demo"
CHART = REPO / "charts" / "gemma-finetune-operator"
RELEASE, SYSTEM = "gft", "gft-system"
NAMESPACE, NAME = "gft-demo", "pip"
PROMPT = "Who is the mascot of the Gemma fine-tuning operator, and what does it carry?"
TENSORBOARD_PORT = 6006
# Chart values for the proving ground: the operator runs on the runner node (the only node
# whose pods really run), and reads the trainer's metrics every 2 s so the row moves visibly.
ON_RUNNER = [
    "--set-string", "nodeSelector.gft\\.dev/runner=true",
    "--set-string", "trainer.tensorBoardNodeSelector.gft\\.dev/runner=true",
    "--set", "tolerations[0].key=gft.dev/runner",
    "--set", "tolerations[0].operator=Exists",
    "--set", "tolerations[0].effect=NoSchedule",
    "--set-string", "dashboard.nodeSelector.gft\\.dev/runner=true",
    "--set", "dashboard.tolerations[0].key=gft.dev/runner",
    "--set", "dashboard.tolerations[0].operator=Exists",
    "--set", "dashboard.tolerations[0].effect=NoSchedule",
    "--set", "metrics.intervalSeconds=2",
]  # fmt: skip
DASHBOARD_PORT = 8090
RUNNER_PLACEMENT = {
    "nodeSelector": {"gft.dev/runner": "true"},
    "tolerations": [{"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}],
}


class DemoError(RuntimeError):
    """A step failed; ``details`` are the log lines that say why."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


@dataclass
class Demo:
    cluster: Cluster | None = None
    say: Callable[[str], None] = print
    timings: list[tuple[str, float]] = field(default_factory=list)
    tensorboard_url: str = ""
    dashboard_url: str = ""
    token_file: Path = Path()
    model: Path = Path()
    _live_forward: subprocess.Popen | None = None
    background: list[subprocess.Popen] = field(default_factory=list)  # left running for the user

    # -- helpers --------------------------------------------------------------------------------

    def run(self, *cmd: str, input: str | None = None, timeout: float = 300) -> str:
        """Run a command as the user would type it (printed first); its output on success.
        ``kubectl`` and ``helm`` are the proving ground's own builds, found on PATH."""
        shown = " ".join(cmd).replace(str(REPO) + "/", "")
        self.say(f"  $ {shown}" + (" < (manifest above)" if input else ""))
        assert self.cluster is not None
        env = dict(self.cluster.env)
        env["PATH"] = f"{build.tool('helm').parent}:{env['PATH']}"
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout
        )
        if result.returncode != 0:
            raise DemoError(f"`{shown}` exited {result.returncode}", result.stdout + result.stderr)
        return result.stdout

    def kubectl(self, *args: str, **kw) -> str:
        assert self.cluster is not None
        return self.run("kubectl", *args, **kw)

    def quiet_json(self, *args: str) -> dict:
        """A read the demo makes for itself, not shown as a command."""
        assert self.cluster is not None
        got = self.cluster.kubectl(*args, "-o", "json", check=False)
        return json.loads(got.stdout) if got.returncode == 0 else {}

    def finetune(self) -> dict:
        return self.quiet_json("get", "gft", NAME, "-n", NAMESPACE)

    # -- the steps ------------------------------------------------------------------------------

    def proving_ground(self) -> None:
        if self.cluster is None:
            self.cluster = ensure_up(default_state_dir(), say=self.say)
        self.say(self.cluster.kubectl("get", "nodes").stdout.rstrip())

    def install(self) -> None:
        from devcluster.gemma270m import ensure_model

        self.say("  the real Gemma 3 270M, converted once from its PyPI package and cached:")
        self.model = ensure_model()
        self.say(f"  {self.model}")
        self.run(
            "helm", "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", SYSTEM, "--create-namespace", "--wait", "--timeout", "4m",
            # Over an earlier install from the plain manifests (kubectl apply): adopt those
            # objects and take over the fields kubectl managed.
            "--take-ownership", "--force-conflicts",
            *ON_RUNNER,
        )  # fmt: skip
        self.say(self.kubectl("get", "pods", "-n", SYSTEM, "-o", "wide").rstrip())

    def apply(self) -> None:
        assert self.cluster is not None
        if self.finetune():
            self.say(f"  a fine-tune {NAME} exists from an earlier demo: deleting it first")
            self.kubectl("delete", "gft", NAME, "-n", NAMESPACE, "--wait", "--timeout", "3m")
        namespace = yaml.safe_dump(_namespace(NAMESPACE))
        self.say("  " + namespace.rstrip().replace("\n", "\n  "))
        self.kubectl("apply", "-f", "-", input=namespace)
        configmap = self.kubectl(
            "create", "configmap", "pip-facts", "-n", NAMESPACE, "--dry-run=client", "-o", "yaml",
            f"--from-file=train.jsonl={EXAMPLE / 'dataset.jsonl'}",
        )  # fmt: skip
        self.kubectl("apply", "-f", "-", input=configmap)
        manifest = yaml.safe_load((EXAMPLE / "finetune.yaml").read_text())
        spec = manifest["spec"]
        # The proving ground cannot reach the hub: the model comes from the node's cache, and
        # the pod goes to the runner, the node whose pods really run.
        spec["model"] = {"name": spec["model"]["name"], "path": str(self.model)}
        spec["resources"].update(RUNNER_PLACEMENT)
        self.say("  examples/gemma3-270m-demo/finetune.yaml, with spec.model.path set to the")
        self.say("  cached model and spec.resources placing the pod on the runner node")
        self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(manifest))

    def watch(self) -> None:
        """The row of ``kubectl get gft`` as it changes, a progress bar, the trainer's log."""
        assert self.cluster is not None
        self.say(f"  $ kubectl get gft {NAME} -n {NAMESPACE} --watch   (and the trainer's log)")
        header_shown, last_row, follower = False, [""], None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            table = self.cluster.kubectl("get", "gft", NAME, "-n", NAMESPACE, check=False)
            lines = table.stdout.splitlines()
            status = self.finetune().get("status") or {}
            if len(lines) == 2:
                if not header_shown:
                    self.say("  " + " " * 33 + lines[0])
                    header_shown = True
                row = lines[1].split()[:-1]  # a new line when more than the AGE changed
                if row != last_row:
                    self.say(f"  {progress_bar(status)} {lines[1]}")
                    last_row = row
            pod = status.get("podName")
            if pod and follower is None and status.get("phase") == "Running":
                follower = self._follow_log(pod)
            if pod and follower is not None and self._live_forward is None and self._ready(pod):
                self._forward_during_run(pod)  # once TensorBoard's readiness probe passes
            phase = status.get("phase")
            if phase == "Succeeded":
                return
            if phase == "Failed":
                raise DemoError(
                    f"the fine-tune failed: {status.get('reason')}: {status.get('message')}",
                    self._trainer_log_tail(pod),
                )
            time.sleep(1)
        raise DemoError(
            "the fine-tune did not finish within 15 minutes",
            self._trainer_log_tail(status.get("podName")),
        )

    def _ready(self, pod: str) -> bool:
        conditions = (self.quiet_json("get", "pod", pod, "-n", NAMESPACE).get("status") or {}).get(
            "conditions"
        ) or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _follow_log(self, pod: str) -> threading.Thread:
        assert self.cluster is not None
        cmd = [
            str(self.cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(self.cluster.kubeconfig),
            "logs",
            "-f",
            "-n",
            NAMESPACE,
            pod,
            "-c",
            "trainer",
        ]

        def follow() -> None:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                self.say(f"  trainer | {line.rstrip()}")

        thread = threading.Thread(target=follow, daemon=True, name="trainer-log")
        thread.start()
        return thread

    def _forward_during_run(self, pod: str) -> None:
        """TensorBoard while the run is live: the sidecar in the trainer's pod."""
        assert self.cluster is not None
        try:
            proc, port = port_forward(self.cluster, NAMESPACE, f"pod/{pod}", TENSORBOARD_PORT)
        except PortForwardError as e:
            self.say(f"  (TensorBoard not reachable yet: {e})")
            return
        self._live_forward = proc  # ends with the trainer's pod
        self.say(
            f"  TensorBoard, live: http://127.0.0.1:{port}/   (kubectl port-forward "
            f"-n {NAMESPACE} pod/{pod} {port}:{TENSORBOARD_PORT})"
        )

    def _trainer_log_tail(self, pod: str | None) -> str:
        if not pod or self.cluster is None:
            return ""
        got = self.cluster.kubectl(
            "logs", "-n", NAMESPACE, pod, "-c", "trainer", "--tail", "30", check=False
        )
        return got.stdout + got.stderr

    def tensorboard(self) -> None:
        """After the run, TensorBoard keeps answering from its own Deployment; forward to it
        in the background so it stays open for the user after the demo ends."""
        assert self.cluster is not None
        if self._live_forward is not None:
            self._live_forward.kill()
        deployment = f"deploy/{NAME}-tb"
        self.kubectl("rollout", "status", deployment, "-n", NAMESPACE, "--timeout", "180s")
        log = self.cluster.state_dir / "demo-tensorboard-port-forward.log"
        local = TENSORBOARD_PORT if _port_free(TENSORBOARD_PORT) else 0
        self.say(
            f"  $ kubectl port-forward -n {NAMESPACE} {deployment} "
            f"{local or ''}:{TENSORBOARD_PORT} &"
        )
        proc, port = port_forward(
            self.cluster, NAMESPACE, deployment, TENSORBOARD_PORT, local, log=log
        )
        (self.cluster.state_dir / "demo-port-forward.pid").write_text(f"{proc.pid}\n")
        self.background.append(proc)
        self.tensorboard_url = f"http://127.0.0.1:{port}/"
        runs = _wait_for_answer(f"{self.tensorboard_url}data/runs")
        self.say(f"  TensorBoard: {self.tensorboard_url}   runs: {', '.join(runs)}")
        self.dashboard()

    def dashboard(self) -> None:
        """The dashboard, reached the same way, and a token to sign in with: a service account
        of the demo's namespace with the built-in edit role (the dashboard acts as it)."""
        assert self.cluster is not None
        self.say("  a dashboard user: ServiceAccount demo-user, with the built-in edit role")
        self.kubectl("apply", "-f", "-", input=_demo_user())
        token = self.kubectl("create", "token", "demo-user", "-n", NAMESPACE, "--duration", "24h")
        self.token_file = self.cluster.state_dir / "demo-dashboard-token"
        self.token_file.write_text(token.strip() + "\n")
        self.kubectl("rollout", "status", "deploy/gft-dashboard", "-n", SYSTEM, "--timeout", "120s")
        log = self.cluster.state_dir / "demo-dashboard-port-forward.log"
        local = DASHBOARD_PORT if _port_free(DASHBOARD_PORT) else 0
        self.say(f"  $ kubectl port-forward -n {SYSTEM} svc/gft-dashboard {local or ''}:80 &")
        proc, port = port_forward(self.cluster, SYSTEM, "svc/gft-dashboard", 80, local, log=log)
        self.background.append(proc)
        with (self.cluster.state_dir / "demo-port-forward.pid").open("a") as f:
            f.write(f"{proc.pid}\n")
        self.dashboard_url = f"http://127.0.0.1:{port}/"
        _wait_for_answer(f"{self.dashboard_url}healthz", text=True)
        self.say(
            f"  Dashboard: {self.dashboard_url}   (sign in with the token in {self.token_file})"
        )

    def result(self) -> None:
        status = self.finetune().get("status") or {}
        result = status.get("result") or {}
        self.say(self.kubectl("get", "gft", NAME, "-n", NAMESPACE).rstrip())
        first_eval = _first_eval_loss(self.tensorboard_url, f"{NAMESPACE}/{NAME}")
        rows = [
            ("steps", f"{result.get('globalStep')} of {result.get('totalSteps')}"),
            ("eval loss", f"{_num(first_eval)} before -> {_num(result.get('evalLoss'))} after"),
            ("eval token accuracy", _num(result.get("evalTokenAccuracy"))),
            ("tokens/s", _num(result.get("tokensPerSecond"))),
            ("trained for", f"{_num(result.get('runtimeSeconds'))} s"),
            ("adapter", (result.get("artifacts") or {}).get("adapter", "?")
             + f"  (claim {status.get('outputClaim')}, folder {status.get('outputPath')})"),
        ]  # fmt: skip
        for label, value in rows:
            self.say(f"  {label:20s} {value}")
        self.say(f"\n  The same question to the base model and to the adapter ({PROMPT!r}):")
        from devcluster.answers import base_and_adapter

        adapter = self._adapter_on_this_machine(status)
        ((before, after),) = base_and_adapter(self.model, adapter, [PROMPT])
        self.say(f"  base Gemma 3 270M: {_first_line(before)}")
        self.say(f"  with the adapter:  {_first_line(after)}")

    def _adapter_on_this_machine(self, status: dict) -> Path:
        """The proving ground's volumes are folders of this machine (the host-path
        provisioner): the adapter is read where the trainer wrote it."""
        assert self.cluster is not None
        claim = self.quiet_json("get", "pvc", status["outputClaim"], "-n", NAMESPACE)
        pv = self.quiet_json("get", "pv", claim["spec"]["volumeName"])
        return Path(pv["spec"]["hostPath"]["path"]) / status["outputPath"] / "adapter"

    def explore(self) -> None:
        assert self.cluster is not None
        c = self.cluster
        tensorboard = self.tensorboard_url or "(see step 5)"
        self.say(
            "\nThe proving ground stays up. From this machine:\n"
            f"  export KUBECONFIG={c.kubeconfig}\n"
            f"  export PATH={c.bin_dir}:$PATH\n"
            "  kubectl get gft -A                            # every fine-tune, live\n"
            f"  kubectl describe gft {NAME} -n {NAMESPACE}         # conditions and events\n"
            f"  kubectl logs -n {NAMESPACE} job/{NAME} -c trainer  # the trainer's log\n"
            f"  TensorBoard: {tensorboard}\n"
            f"  Dashboard:   {self.dashboard_url or '(see step 5)'}  (token: {self.token_file})\n"
            f"  kubectl delete gft {NAME} -n {NAMESPACE}           # clean up (keeps the output)\n"
            "Take it all down with `make cluster-down`."
        )


def uninstall(demo: Demo) -> None:
    """``helm uninstall`` (the CRD and the fine-tunes' retained claims stay, by design)."""
    demo.run("helm", "uninstall", RELEASE, "--namespace", SYSTEM, "--wait", "--timeout", "3m")


def _demo_user() -> str:
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "demo-user", "namespace": NAMESPACE},
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "demo-user-edit", "namespace": NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "demo-user", "namespace": NAMESPACE}],
    }  # fmt: skip
    return yaml.safe_dump_all([account, binding])


def _namespace(name: str) -> dict:
    # The demo's pods run as PodSecurity "restricted" requires (the operator's pods do).
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def progress_bar(status: dict, width: int = 24) -> str:
    percent = float((status.get("progress") or {}).get("percent") or 0)
    if status.get("phase") == "Succeeded":
        percent = 100.0
    filled = round(width * percent / 100)
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent:5.1f}%"


def _num(value) -> str:
    if value is None:
        return "?"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(nothing)"
    return line[:160]


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _wait_for_answer(url: str, timeout: float = 60, text: bool = False):
    """The JSON (or text) at ``url``, once it answers (TensorBoard loads its event files
    first; the dashboard syncs its watch)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            body = _get(url)
            return body if text else json.loads(body)
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise DemoError(f"{url} did not answer: {e}") from e
            time.sleep(1)


def _first_eval_loss(tensorboard_url: str, run: str) -> float | None:
    """The eval loss before training (the run evaluates at step 0), as TensorBoard has it."""
    if not tensorboard_url:
        return None
    query = urllib.parse.urlencode({"run": run, "tag": "eval/loss"})
    try:
        points = json.loads(_get(f"{tensorboard_url}data/plugin/scalars/scalars?{query}"))
    except (OSError, ValueError):
        return None
    return points[0][2] if points else None


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


STEPS = [
    ("the proving ground (a real control plane, KWOK nodes and the runner node)", "proving_ground"),
    ("install the operator with its Helm chart, in the cluster", "install"),
    ("apply the fine-tune (examples/gemma3-270m-demo)", "apply"),
    ("watch it train", "watch"),
    ("TensorBoard and the dashboard, through kubectl port-forward", "tensorboard"),
    ("the result", "result"),
    ("explore", "explore"),
]


def main(say: Callable[[str], None] = print) -> int:
    demo = Demo(say=say)
    return run_steps(demo, STEPS)


def run_steps(demo: Demo, steps: list[tuple[str, str]]) -> int:
    say = demo.say
    started = time.monotonic()
    for number, (title, method) in enumerate(steps, 1):
        say(f"\n== step {number}/{len(steps)}: {title}")
        t0 = time.monotonic()
        try:
            getattr(demo, method)()
        except (DemoError, PortForwardError, subprocess.SubprocessError, OSError, KeyError) as e:
            say(f"\ndemo failed at step {number}/{len(steps)} ({title}): {e}")
            details = getattr(e, "details", "") or _operator_log_tail(demo.cluster)
            if details:
                say("--- what the logs say ---\n" + details.rstrip()[-4000:])
            return 1
        demo.timings.append((title, time.monotonic() - t0))
    total = time.monotonic() - started
    say(
        f"\nthe demo took {total:.0f} s: "
        + "; ".join(f"{title.split(' (')[0]} {secs:.0f} s" for title, secs in demo.timings)
    )
    return 0


def _operator_log_tail(cluster: Cluster | None) -> str:
    if cluster is None:
        return ""
    got = cluster.kubectl("logs", "-n", SYSTEM, "deploy/gft-operator", "--tail", "30", check=False)
    return got.stdout + got.stderr


if __name__ == "__main__":
    sys.exit(main())
