"""The runner plays the kubelet for node ``gft-runner``: pods bound there really run here.

Each test drives the real control plane with kubectl, the way a user would, and checks what a
kubelet would have done: a process serving HTTP on its pod IP (reachable directly and through
the API server's pod proxy), ``kubectl logs -f``, termination messages, a Job retried by the
real Job controller, SIGTERM on deletion, env from ConfigMaps/Secrets/the downward API, native
sidecars and PVC data that outlives its pod.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import pod_that_cannot_start, wait_for

from devcluster import cluster as pg
from devcluster.forwarding import port_forward

pytestmark = pytest.mark.cluster

RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
NAME = "test.gft.dev/pod"  # a label on every pod of these tests: its name, to select it by


def container(name: str, script: str, **extra) -> dict:
    """A container running a Python script (the image is not used by the runner)."""
    return {
        "name": name,
        "image": "python:3.11-slim",
        "command": ["python", "-u", "-c", textwrap.dedent(script)],
        "securityContext": RESTRICTED_CONTAINER,
        **extra,
    }


def runner_pod(name: str, containers: list[dict], **spec) -> dict:
    spec.setdefault("restartPolicy", "Never")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {NAME: name}},
        "spec": {
            "nodeSelector": {"gft.dev/runner": "true"},
            "tolerations": [
                {"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "securityContext": RESTRICTED_POD,
            "terminationGracePeriodSeconds": 10,
            "containers": containers,
            **spec,
        },
    }


def apply(cluster, namespace: str, *objs: dict) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs)
    )


def get_pod(cluster, namespace: str, name: str) -> dict | None:
    r = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait_phase(cluster, namespace: str, name: str, phases: tuple[str, ...], timeout=60) -> dict:
    def check():
        pod = get_pod(cluster, namespace, name)
        return pod if pod and pod.get("status", {}).get("phase") in phases else None

    def give_up():
        return pod_that_cannot_start(cluster, namespace, f"{NAME}={name}")

    return wait_for(
        f"pod {name} in phase {phases}",
        check,
        timeout=timeout,
        give_up=None if "Failed" in phases else give_up,
    )


def wait_running(cluster, namespace: str, name: str, timeout=60) -> dict:
    def check():
        pod = get_pod(cluster, namespace, name)
        st = (pod or {}).get("status", {})
        statuses = st.get("containerStatuses") or []
        if st.get("phase") == "Running" and statuses and all(s["ready"] for s in statuses):
            return pod
        return None

    return wait_for(
        f"pod {name} Running and ready",
        check,
        timeout=timeout,
        give_up=lambda: pod_that_cannot_start(cluster, namespace, f"{NAME}={name}"),
    )


def terminated(pod: dict, name: str, init: bool = False) -> dict:
    key = "initContainerStatuses" if init else "containerStatuses"
    cs = next(c for c in pod["status"][key] if c["name"] == name)
    assert "terminated" in cs["state"], json.dumps(pod["status"], indent=1)
    return cs["state"]["terminated"]


def http_get(url: str, timeout: float = 2) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------


def test_runner_node_is_ready_and_tainted(cluster):
    node = cluster.kubectl_json("get", "node", cluster.runner_node)
    labels = node["metadata"]["labels"]
    assert labels["gft.dev/runner"] == "true"
    assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})
    assert {"key": "gft.dev/runner", "value": "true", "effect": "NoSchedule"} in node["spec"][
        "taints"
    ]
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.35.4"
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    lease = cluster.kubectl_json("get", "lease", cluster.runner_node, "-n", "kube-node-lease")
    assert lease["spec"]["holderIdentity"] == cluster.runner_node


def test_pod_serves_http_on_its_ip_directly_and_through_the_api_server(cluster, namespace):
    apply(
        cluster,
        namespace,
        runner_pod(
            "web",
            [
                {
                    "name": "web",
                    "image": "python:3.11-slim",
                    "command": ["python", "-u", "-m", "http.server", "8080", "--bind", "0.0.0.0"],
                    "ports": [{"containerPort": 8080}],
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
        ),
    )
    pod = wait_running(cluster, namespace, "web")
    ip = pod["status"]["podIP"]
    assert ip and not ip.startswith("127."), ip
    assert pod["status"]["hostIP"] == cluster.node_ip
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("runner://")
    # Straight from this machine to the pod's own network namespace...
    body = wait_for("HTTP from the pod IP", lambda: http_get(f"http://{ip}:8080/"), timeout=30)
    assert "Directory listing" in body
    # ... and through the API server's pod proxy, which refuses loopback addresses.
    proxied = cluster.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{namespace}/pods/web:8080/proxy/"
    ).stdout
    assert "Directory listing" in proxied
    # ... and through `kubectl port-forward`: the kubelet's port-forward API on the runner.
    forward, port = port_forward(cluster, namespace, "pod/web", 8080)
    try:
        for _ in range(2):  # each request is its own forwarded stream
            assert "Directory listing" in (http_get(f"http://127.0.0.1:{port}/", timeout=10) or "")
    finally:
        forward.kill()
    logs = wait_for(
        "the request in the log",
        lambda: "GET / HTTP" in cluster.kubectl("logs", "web", "-n", namespace).stdout,
        timeout=10,
    )
    assert logs


def test_readiness_probe_gates_ready(cluster, namespace):
    """A running container is not Ready until its readinessProbe passes (as `kubectl rollout
    status` and Services rely on): this one listens only after a pause."""
    server = container(
        "web",
        """
        import http.server, time
        time.sleep(4)
        handler = http.server.SimpleHTTPRequestHandler
        http.server.HTTPServer(("0.0.0.0", 8080), handler).serve_forever()
        """,
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    )
    apply(cluster, namespace, runner_pod("slow", [server]))
    pod = wait_for(
        "the container running",
        lambda: (
            (p := get_pod(cluster, namespace, "slow"))
            and "running" in (p["status"].get("containerStatuses") or [{}])[0].get("state", {})
            and p
        ),
    )
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "False", pod["status"]
    wait_for(
        "Ready once the probe passes",
        lambda: cluster.kubectl(
            "get", "pod", "slow", "-n", namespace,
            "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ).stdout == "True",
        timeout=30,
    )  # fmt: skip
    assert http_get(f"http://{pod['status']['podIP']}:8080/")


def test_kubectl_logs_follow_streams_output(cluster, namespace):
    apply(
        cluster,
        namespace,
        runner_pod(
            "ticker",
            [
                container(
                    "ticker",
                    """
        import time
        for i in range(600):
            print(f"tick {i}", flush=True)
            time.sleep(0.3)
    """,
                )
            ],
        ),
    )
    wait_running(cluster, namespace, "ticker")
    proc = subprocess.Popen(
        [
            str(cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "logs",
            "-f",
            "ticker",
            "-n",
            namespace,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []

    def read():
        for line in proc.stdout:
            seen.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # Lines printed after `logs -f` started arrive while the process still runs.
        wait_for("streamed lines", lambda: len(seen) >= 12, timeout=30, interval=0.2)
        first = int(seen[0].split()[1])
        count = len(seen)
        wait_for("more streamed lines", lambda: len(seen) >= count + 5, timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert seen[0] == f"tick {first}"
    assert seen[:count] == [f"tick {first + i}" for i in range(count)]
    assert proc.returncode is not None
    tail = cluster.kubectl(
        "logs", "ticker", "-n", namespace, "--tail=2", "--timestamps"
    ).stdout.splitlines()
    assert len(tail) == 2 and tail[0].split()[1] == "tick"
    assert tail[0].split()[0].endswith("Z")
    limited = cluster.kubectl("logs", "ticker", "-n", namespace, "--limit-bytes=6").stdout
    assert limited == "tick 0"


def test_termination_message_exit_code_and_terminal_phase(cluster, namespace):
    apply(
        cluster,
        namespace,
        runner_pod(
            "fails",
            [
                container(
                    "main",
                    """
              import sys
              open("/dev/termination-log", "w").write('{"result": "bad data"}')
              print("about to fail")
              sys.exit(3)
          """,
                )
            ],
        ),
        runner_pod(
            "custom",
            [
                container(
                    "main",
                    """
              open("/tmp/gft-msg/summary.json", "w").write('{"result": "ok"}')
          """,
                    terminationMessagePath="/tmp/gft-msg/summary.json",
                )
            ],
        ),
        runner_pod(
            "fallback",
            [
                container(
                    "main",
                    """
              print("the last words")
              raise SystemExit(7)
          """,
                    terminationMessagePolicy="FallbackToLogsOnError",
                )
            ],
        ),
    )
    pod = wait_phase(cluster, namespace, "fails", ("Failed",))
    t = terminated(pod, "main")
    assert t["exitCode"] == 3 and t["reason"] == "Error"
    assert t["message"] == '{"result": "bad data"}'
    assert t["startedAt"] and t["finishedAt"]
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert "about to fail" in cluster.kubectl("logs", "fails", "-n", namespace).stdout

    pod = wait_phase(cluster, namespace, "custom", ("Succeeded",))
    t = terminated(pod, "main")
    assert t["exitCode"] == 0 and t["reason"] == "Completed"
    assert t["message"] == '{"result": "ok"}'
    # The runner made the missing mount point on this machine's file system (documented).
    shutil.rmtree("/tmp/gft-msg", ignore_errors=True)

    pod = wait_phase(cluster, namespace, "fallback", ("Failed",))
    t = terminated(pod, "main")
    assert t["exitCode"] == 7 and "the last words" in t["message"]


def test_job_pod_failure_is_retried_by_the_job_controller(cluster, namespace):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "flaky"},
        "spec": {
            "backoffLimit": 1,
            "template": runner_pod(
                "x",
                [
                    container(
                        "main",
                        """
            import sys
            print("failing on purpose")
            sys.exit(2)
        """,
                    )
                ],
            ),
        },
    }
    del job["spec"]["template"]["apiVersion"], job["spec"]["template"]["kind"]
    job["spec"]["template"]["metadata"] = {}
    apply(cluster, namespace, job)

    def failed():
        j = cluster.kubectl_json("get", "job", "flaky", "-n", namespace)
        conds = {c["type"]: c for c in j.get("status", {}).get("conditions") or []}
        return j if conds.get("Failed", {}).get("status") == "True" else None

    j = wait_for("the Job to fail after its retry", failed, timeout=90)
    assert j["status"]["failed"] == 2
    reason = next(c for c in j["status"]["conditions"] if c["type"] == "Failed")["reason"]
    assert reason == "BackoffLimitExceeded"
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=flaky")["items"]
    assert len(pods) == 2
    for p in pods:
        assert p["spec"]["nodeName"] == cluster.runner_node
        assert p["status"]["phase"] == "Failed"
        assert terminated(p, "main")["exitCode"] == 2
    assert "failing on purpose" in cluster.kubectl("logs", "job/flaky", "-n", namespace).stdout


def pvc(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def with_pvc(pod: dict, claim: str, path: str = "/data") -> dict:
    pod["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    for c in pod["spec"]["containers"]:
        c["volumeMounts"] = [{"name": "data", "mountPath": path}]
    return pod


def test_deleting_a_pod_sends_sigterm_before_it_is_gone(cluster, namespace):
    apply(
        cluster,
        namespace,
        pvc("state"),
        with_pvc(
            runner_pod(
                "graceful",
                [
                    container(
                        "main",
                        """
        import signal, sys, time
        def on_term(signum, frame):
            open("/data/signal", "w").write(f"got {signal.Signals(signum).name}")
            time.sleep(2)  # still cleaning up: the pod must not be gone yet
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open("/data/started", "w").write("yes")
        while True:
            time.sleep(0.1)
    """,
                    )
                ],
            ),
            "state",
        ),
    )
    wait_running(cluster, namespace, "graceful")
    claim = cluster.kubectl_json("get", "pvc", "state", "-n", namespace)
    pv = cluster.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    folder = pv["spec"]["hostPath"]["path"]
    wait_for("the process to start", lambda: _read(f"{folder}/started") == "yes", timeout=20)
    cluster.kubectl("delete", "pod", "graceful", "-n", namespace, "--wait=false")
    # The signal is recorded while the pod still exists (the handler takes 2 s to finish)...
    wait_for("SIGTERM recorded", lambda: _read(f"{folder}/signal"), timeout=15, interval=0.1)
    assert _read(f"{folder}/signal") == "got SIGTERM"
    assert get_pod(cluster, namespace, "graceful") is not None
    # ... and then the pod goes away.
    wait_for(
        "the pod to be gone", lambda: get_pod(cluster, namespace, "graceful") is None, timeout=30
    )


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def test_pvc_data_outlives_its_pod(cluster, namespace):
    apply(
        cluster,
        namespace,
        pvc("keep"),
        with_pvc(
            runner_pod(
                "writer",
                [
                    container(
                        "main",
                        """
              open("/data/checkpoint.txt", "w").write("step 42")
          """,
                    )
                ],
            ),
            "keep",
        ),
    )
    wait_phase(cluster, namespace, "writer", ("Succeeded",))
    cluster.kubectl("delete", "pod", "writer", "-n", namespace, "--wait=true", timeout=60)
    apply(
        cluster,
        namespace,
        with_pvc(
            runner_pod(
                "reader",
                [
                    container(
                        "main",
                        """
        data = open("/data/checkpoint.txt").read()
        open("/dev/termination-log", "w").write(data)
    """,
                    )
                ],
            ),
            "keep",
        ),
    )
    pod = wait_phase(cluster, namespace, "reader", ("Succeeded", "Failed"))
    assert terminated(pod, "main")["message"] == "step 42"


def test_env_from_configmap_secret_and_downward_api(cluster, namespace):
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"token": "s3cret", "user": "gemma"},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "files"},
            "data": {"model": "gemma-3-270m", "epochs": "2"},
        },
    )
    pod = runner_pod(
        "envy",
        [
            container(
                "main",
                """
        import json, os, pathlib
        keys = ["MODEL", "TOKEN", "POD_NAME", "POD_NS", "POD_UID", "NODE", "POD_IP", "HOST_IP",
                "SA", "TEAM", "MEM_MI", "CFG_epochs", "SEC_user", "COMBINED", "MISSING_OK",
                "HOME", "HOSTNAME"]
        out = {k: os.environ.get(k) for k in keys}
        cfg = pathlib.Path("/tmp/gft-runner-test/cfg")
        out["files"] = {p.name: p.read_text() for p in cfg.iterdir() if p.is_file()}
        out["labels"] = open("/tmp/gft-runner-test/info/labels").read()
        out["secret_file"] = open("/tmp/gft-runner-test/secret/token").read()
        out["sa_token"] = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
        out["env_keys"] = sorted(os.environ)
        open("/dev/termination-log", "w").write(json.dumps(out))
    """,
                env=[
                    {
                        "name": "MODEL",
                        "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "model"}},
                    },
                    {
                        "name": "TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                    },
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {
                        "name": "POD_NS",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                    },
                    {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {
                        "name": "SA",
                        "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
                    },
                    {
                        "name": "TEAM",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}},
                    },
                    {
                        "name": "MEM_MI",
                        "valueFrom": {
                            "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}
                        },
                    },
                    {"name": "COMBINED", "value": "$(MODEL)@$(POD_NAME) $$(MODEL)"},
                    {
                        "name": "MISSING_OK",
                        "valueFrom": {
                            "configMapKeyRef": {"name": "absent", "key": "x", "optional": True}
                        },
                    },
                ],
                envFrom=[
                    {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
                    {"secretRef": {"name": "creds"}, "prefix": "SEC_"},
                ],
                resources={"limits": {"memory": "256Mi", "cpu": "1"}},
                volumeMounts=[
                    {"name": "cfg", "mountPath": "/tmp/gft-runner-test/cfg"},
                    {"name": "info", "mountPath": "/tmp/gft-runner-test/info"},
                    {"name": "sec", "mountPath": "/tmp/gft-runner-test/secret", "readOnly": True},
                ],
            )
        ],
        volumes=[
            {"name": "cfg", "configMap": {"name": "files"}},
            {
                "name": "sec",
                "secret": {"secretName": "creds", "items": [{"key": "token", "path": "token"}]},
            },
            {
                "name": "info",
                "downwardAPI": {
                    "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                },
            },
        ],
    )
    pod["metadata"]["labels"] = {"team": "ml"}
    apply(cluster, namespace, pod)

    # The ConfigMap does not exist yet: the kubelet's CreateContainerConfigError, naming it.
    def config_error():
        p = get_pod(cluster, namespace, "envy") or {}
        for cs in p.get("status", {}).get("containerStatuses") or []:
            w = cs["state"].get("waiting") or {}
            if w.get("reason") == "CreateContainerConfigError":
                return w
        return None

    waiting = wait_for("CreateContainerConfigError", config_error, timeout=30)
    assert "settings" in waiting["message"]
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"model": "gemma-3-270m", "epochs": "2"},
        },
    )
    pod = wait_phase(cluster, namespace, "envy", ("Succeeded", "Failed"), timeout=60)
    t = terminated(pod, "main")
    assert t["exitCode"] == 0, t
    out = json.loads(t["message"])
    assert out["MODEL"] == "gemma-3-270m"
    assert out["TOKEN"] == "s3cret"
    assert out["POD_NAME"] == "envy" and out["POD_NS"] == namespace
    assert out["POD_UID"] == pod["metadata"]["uid"]
    assert out["NODE"] == cluster.runner_node
    assert out["POD_IP"] == pod["status"]["podIP"]
    assert out["HOST_IP"] == cluster.node_ip
    assert out["SA"] == "default" and out["TEAM"] == "ml"
    assert out["MEM_MI"] == "256"
    assert out["CFG_epochs"] == "2" and out["SEC_user"] == "gemma"
    assert out["COMBINED"] == "gemma-3-270m@envy $(MODEL)"
    assert out["MISSING_OK"] is None
    assert out["HOSTNAME"] == "envy"
    assert out["files"] == {"model": "gemma-3-270m", "epochs": "2"}
    assert out["labels"] == 'team="ml"'
    assert out["secret_file"] == "s3cret"
    assert out["sa_token"] is True
    # Nothing of the runner's own environment leaks in but PATH (and LANG).
    assert not {"KUBECONFIG", "PYTHONPATH"} & set(out["env_keys"])
    # The runner made the missing mount points on this machine's file system (documented).
    shutil.rmtree("/tmp/gft-runner-test", ignore_errors=True)


def test_native_sidecar_starts_before_and_stops_after_the_main_container(cluster, namespace):
    sidecar = container(
        "sidecar",
        """
        import signal, sys, time
        log = "/shared/events"
        def on_term(signum, frame):
            with open(log, "a") as f:
                f.write("sidecar-stop\\n")
            open("/dev/termination-log", "w").write(open(log).read())
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        with open(log, "a") as f:
            f.write("sidecar-start\\n")
        while True:
            time.sleep(0.1)
    """,
        restartPolicy="Always",
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
    )
    main = container(
        "main",
        """
        import time
        # A sidecar without a startup probe counts as started once its process runs (as with
        # the kubelet), so give its first line a moment.
        for _ in range(100):
            try:
                events = open("/shared/events").read()
            except FileNotFoundError:
                events = ""
            if "sidecar-start" in events:
                break
            time.sleep(0.1)
        assert "sidecar-start" in events, events
        with open("/shared/events", "a") as f:
            f.write("main-start\\n")
        time.sleep(1)
        with open("/shared/events", "a") as f:
            f.write("main-done\\n")
    """,
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
    )
    init = container(
        "init",
        """
        with open("/shared/events", "a") as f:
            f.write("init-done\\n")
    """,
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
    )
    apply(
        cluster,
        namespace,
        runner_pod(
            "withsidecar",
            [main],
            initContainers=[init, sidecar],
            volumes=[{"name": "shared", "emptyDir": {}}],
        ),
    )
    pod = wait_phase(cluster, namespace, "withsidecar", ("Succeeded", "Failed"), timeout=60)
    assert terminated(pod, "main")["exitCode"] == 0
    side = terminated(pod, "sidecar", init=True)
    assert terminated(pod, "init", init=True)["exitCode"] == 0
    assert side["startedAt"] <= terminated(pod, "main")["startedAt"]
    assert side["message"].split() == [
        "init-done",
        "sidecar-start",
        "main-start",
        "main-done",
        "sidecar-stop",
    ]
    assert pod["status"]["phase"] == "Succeeded"


def test_container_without_a_usable_command_fails_clearly(cluster, namespace):
    apply(
        cluster,
        namespace,
        runner_pod(
            "noentry",
            [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
        ),
    )
    pod = wait_phase(cluster, namespace, "noentry", ("Failed",))
    t = terminated(pod, "main")
    assert t["reason"] == "ImageEntrypointUnknown" and "command" in t["message"]
    apply(
        cluster,
        namespace,
        runner_pod(
            "notfound",
            [
                {
                    "name": "main",
                    "image": "x",
                    "command": ["no-such-program-gft"],
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
        ),
    )
    pod = wait_phase(cluster, namespace, "notfound", ("Failed",))
    t = terminated(pod, "main")
    assert t["reason"] == "StartError" and "no-such-program-gft" in t["message"]

    # A test waiting for such a pod to run gives up at once, saying why, instead of waiting
    # out its timeout.
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as gave_up:
        wait_running(cluster, namespace, "notfound", timeout=120)
    assert time.monotonic() - started < 15
    message = str(gave_up.value)
    assert f"pod {namespace}/notfound, container main: StartError" in message, message
    assert "no-such-program-gft" in message, message


def test_on_failure_restarts_the_container_and_keeps_the_previous_log(cluster, namespace):
    apply(
        cluster,
        namespace,
        runner_pod(
            "retry",
            [
                container(
                    "main",
                    """
        import os, sys
        if not os.path.exists("/scratch/tried"):
            open("/scratch/tried", "w").write("1")
            print("first attempt fails")
            sys.exit(1)
        print("second attempt succeeds")
    """,
                    volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
                )
            ],
            restartPolicy="OnFailure",
            volumes=[{"name": "scratch", "emptyDir": {}}],
        ),
    )
    pod = wait_phase(cluster, namespace, "retry", ("Succeeded", "Failed"), timeout=60)
    cs = pod["status"]["containerStatuses"][0]
    assert pod["status"]["phase"] == "Succeeded"
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert cluster.kubectl("logs", "retry", "-n", namespace).stdout == "second attempt succeeds\n"
    assert (
        cluster.kubectl("logs", "retry", "-n", namespace, "--previous").stdout
        == "first attempt fails\n"
    )


def test_active_deadline_fails_the_pod_and_events_are_recorded(cluster, namespace):
    apply(
        cluster,
        namespace,
        runner_pod(
            "deadline",
            [
                container(
                    "main",
                    """
        import time
        time.sleep(300)
    """,
                )
            ],
            activeDeadlineSeconds=3,
        ),
    )
    pod = wait_phase(cluster, namespace, "deadline", ("Failed",), timeout=30)
    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert terminated(pod, "main")["exitCode"] == 143  # SIGTERM

    def reasons():
        events = cluster.kubectl_json(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=deadline"
        )["items"]
        got = {e["reason"] for e in events if e["source"].get("component") == "kubelet"}
        return got if {"Started", "DeadlineExceeded", "Killing"} <= got else None

    wait_for("the kubelet's events", reasons, timeout=10)


# ---------------------------------------------------------------------------------------------
# The runner's own lifecycle: a second runner, for a node of its own, in the same cluster.


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_runner_cleans_up_on_sigterm_and_after_a_crash(cluster, namespace, tmp_path):
    # Until this runner's bridge is up, no proving ground starting meanwhile may take its range.
    choosing = contextlib.ExitStack()
    choosing.enter_context(pg.starting_alone())
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    cidr = pg.choose_pod_cidr(routes, taken=[cluster.pod_cidr])
    node_ip = str(next(ipaddress.ip_network(cidr).hosts()))
    node, bridge = "gft-runner-lifecycle", "gftbrlifecycle"
    state = tmp_path / "runner"
    env = {**os.environ, "PYTHONPATH": str(Path(pg.__file__).resolve().parent.parent)}
    env.pop("KUBECONFIG", None)
    cmd = [
        sys.executable,
        "-m",
        "devcluster.runner",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--node-name",
        node,
        "--node-ip",
        node_ip,
        "--pod-cidr",
        str(cidr),
        "--bridge",
        bridge,
        "--state-dir",
        str(state),
    ]
    log = (tmp_path / "runner.log").open("ab")
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        (state / "runner.ready").unlink(missing_ok=True)  # a crashed runner leaves it behind
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        procs.append(p)
        wait_for(
            "runner.ready",
            lambda: (state / "runner.ready").exists() or p.poll() is not None,
            timeout=30,
            interval=0.1,
        )
        assert p.poll() is None, (tmp_path / "runner.log").read_text()
        return p

    def sleeper(name: str) -> tuple[dict, int]:
        pod = runner_pod(name, [container("main", "import time; time.sleep(300)")])
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
        apply(cluster, namespace, pod)
        pod = wait_running(cluster, namespace, name)
        pid = int(pod["status"]["containerStatuses"][0]["containerID"].split("://")[1])
        assert _pid_alive(pid)
        return pod, pid

    try:
        try:
            runner = start()
        finally:
            choosing.close()
        assert _link_exists(bridge)
        pod, pid = sleeper("before-crash")
        ns_name = "gft-" + pod["metadata"]["uid"].replace("-", "")[:10]
        assert ns_name in _netns_names()

        # A crash leaves the namespace behind; the next start removes it and fails the pod,
        # as a kubelet would after a reboot.
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        runner = start()
        assert ns_name not in _netns_names()
        wait_for("the old process gone", lambda: not _pid_alive(pid), timeout=10)
        failed = wait_phase(cluster, namespace, "before-crash", ("Failed",))
        assert terminated(failed, "main")["reason"] == "ContainerStatusUnknown"

        # SIGTERM stops the pods and removes the namespaces and the bridge.
        pod, pid = sleeper("before-stop")
        ns_name = "gft-" + pod["metadata"]["uid"].replace("-", "")[:10]
        assert ns_name in _netns_names()
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 0
        assert not _pid_alive(pid)
        assert ns_name not in _netns_names()
        assert not _link_exists(bridge)
        assert not (state / "runner.ready").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        log.close()
        cluster.kubectl(
            "delete", "pods", "--all", "-n", namespace, "--force", "--grace-period=0", check=False
        )
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_a_pod_reaches_the_api_server_with_its_service_account(cluster, namespace):
    """As on a real node: KUBERNETES_SERVICE_HOST/PORT point at the API server (the runner
    relays its node address to it, as kube-proxy does for the `kubernetes` Service), and the
    service account's token, CA and namespace are mounted where in-cluster clients look. The
    pod may do what its RBAC allows, and no more."""
    cluster.kubectl(
        "create", "role", "pod-reader", "-n", namespace, "--verb=get", "--resource=pods"
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "pod-reader",
        "-n",
        namespace,
        "--role=pod-reader",
        f"--serviceaccount={namespace}:default",
    )
    script = """
        import json, os
        import kubernetes
        kubernetes.config.load_incluster_config()
        api = kubernetes.client.CoreV1Api()
        ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
        me = api.read_namespaced_pod(os.environ["HOSTNAME"], ns)
        try:
            api.list_namespaced_secret(ns)
            refused = "no"
        except kubernetes.client.ApiException as e:
            refused = str(e.status)
        print(json.dumps({"host": os.environ["KUBERNETES_SERVICE_HOST"], "uid": me.metadata.uid,
                          "secrets": refused}))
    """
    apply(cluster, namespace, runner_pod("incluster", [container("c", script)]))
    pod = wait_phase(cluster, namespace, "incluster", ("Succeeded", "Failed"), timeout=90)
    out = cluster.kubectl("logs", "incluster", "-n", namespace).stdout
    assert pod["status"]["phase"] == "Succeeded", out
    said = json.loads(out.strip().splitlines()[-1])
    assert said == {"host": cluster.node_ip, "uid": pod["metadata"]["uid"], "secrets": "403"}


def test_a_container_tmp_is_its_own_and_its_volumes_still_mount(cluster, namespace):
    """An emptyDir at /tmp hides this machine's /tmp from the container (as a container's /tmp
    is its own), while its other volumes, whose files the runner keeps under /tmp, mount."""
    marker = Path("/tmp") / f"gft-host-only-{namespace}"
    marker.write_text("host")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"k": "v"}}
    script = f"""
        import os
        print("host-file-visible", os.path.exists({str(marker)!r}))
        print("config", open("/etc/cfg/k").read())
        open("/tmp/scratch", "w").write("x")
        print("scratch", open("/tmp/scratch").read())
    """
    pod = runner_pod(
        "owntmp",
        [
            container(
                "c",
                script,
                volumeMounts=[
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "cfg", "mountPath": "/etc/cfg"},
                ],
            )
        ],
        volumes=[{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}}],
    )
    try:
        apply(cluster, namespace, cm, pod)
        done = wait_phase(cluster, namespace, "owntmp", ("Succeeded", "Failed"), timeout=60)
        out = cluster.kubectl("logs", "owntmp", "-n", namespace).stdout
        assert done["status"]["phase"] == "Succeeded", out
        assert out.split() == ["host-file-visible", "False", "config", "v", "scratch", "x"], out
    finally:
        marker.unlink()


def test_pods_find_each_other_by_name_through_cluster_dns(cluster, namespace):
    """CoreDNS serves cluster.local from the API server: a pod reaches another by its
    ``hostname.subdomain`` (a headless Service, as an Indexed Job's workers find rank 0), and a
    Service by its name; a name outside the cluster is refused at once, never forwarded."""
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "workers"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app": "dns-test"},
            "ports": [{"name": "rdzv", "port": 8080}],
        },
    }
    serve = "import http.server as h; h.test(h.SimpleHTTPRequestHandler, port=8080, bind='0.0.0.0')"
    web = {**container("web", serve), "ports": [{"containerPort": 8080}]}
    server = runner_pod("rank0", [web], hostname="worker-0", subdomain="workers")
    server["metadata"]["labels"] = {"app": "dns-test"}
    names = ["worker-0.workers", f"workers.{namespace}.svc.cluster.local"]
    script = f"""
        import socket, time, urllib.request
        for name in {names!r}:
            for _ in range(60):
                try:
                    print(name, "->", socket.gethostbyname(name), flush=True)
                    break
                except OSError as e:
                    print(name, "not yet:", e, flush=True)
                    time.sleep(1)
        body = urllib.request.urlopen("http://worker-0.workers:8080/", timeout=10).read()
        print("fetched", len(body), "bytes", flush=True)
        t = time.monotonic()
        try:
            socket.gethostbyname("huggingface.co")
            print("outside name answered", flush=True)
        except OSError as e:
            print(f"outside name refused in {{time.monotonic() - t:.1f}} s: {{e}}", flush=True)
        """
    client = runner_pod("rank1", [container("client", script)])
    apply(cluster, namespace, headless, server)
    ip = wait_running(cluster, namespace, "rank0")["status"]["podIP"]
    apply(cluster, namespace, client)
    pod = wait_phase(cluster, namespace, "rank1", ("Succeeded", "Failed"), timeout=120)
    log = cluster.kubectl("logs", "rank1", "-n", namespace).stdout
    assert pod["status"]["phase"] == "Succeeded", log
    for name in names:
        assert f"{name} -> {ip}" in log, log
    assert "fetched" in log, log
    refused = [line.split() for line in log.splitlines() if line.startswith("outside name")]
    assert refused and refused[0][2] == "refused" and float(refused[0][4]) < 3, log
