"""The runner's pure decisions and its log server, without a cluster."""

from __future__ import annotations

import base64
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devcluster import logserver, podspec
from devcluster.podspec import ConfigError, ContainerRecord, IPAllocator


def test_expand_like_the_kubelet():
    env = {"A": "1", "B": "two"}
    assert podspec.expand("$(A)-$(B)", env) == "1-two"
    assert podspec.expand("$$(A)", env) == "$(A)"
    assert podspec.expand("$(MISSING)", env) == "$(MISSING)"
    assert podspec.expand("$(A", env) == "$(A"
    assert podspec.expand("cost $5 and $", env) == "cost $5 and $"
    assert podspec.expand("$$$(A)", env) == "$1"
    assert podspec.expand("", env) == ""


POD = {
    "metadata": {
        "name": "p",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"team": "ml"},
        "annotations": {"note": 'say "hi"'},
    },
    "spec": {
        "nodeName": "gft-runner",
        "serviceAccountName": "sa",
        "containers": [{"name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}],
    },
    "status": {"podIP": "10.244.0.2", "hostIP": "10.244.0.1", "podIPs": [{"ip": "10.244.0.2"}]},
}


def test_field_values():
    assert podspec.field_value(POD, "metadata.name") == "p"
    assert podspec.field_value(POD, "metadata.labels['team']") == "ml"
    assert podspec.field_value(POD, "metadata.annotations") == 'note="say \\"hi\\""'
    assert podspec.field_value(POD, "status.podIPs") == "10.244.0.2"
    assert podspec.field_value(POD, "spec.serviceAccountName") == "sa"
    with pytest.raises(ConfigError):
        podspec.field_value(POD, "spec.nope")


def test_resource_values_round_up_and_fall_back_to_the_node():
    assert podspec.resource_value(POD, "c", "limits.cpu") == "2"
    assert podspec.resource_value(POD, "c", "limits.cpu", "1m") == "1500"
    assert podspec.resource_value(POD, "c", "limits.memory", "1Mi") == "1024"
    # Unset limits are the node's allocatable; unset requests follow the limits.
    assert podspec.resource_value(POD, "c", "limits.ephemeral-storage", "1Gi") == "100"
    assert podspec.resource_value(POD, "c", "requests.cpu", "1m") == "1500"


def lookup_from(objects):
    return lambda kind, name: objects.get((kind, name))


def test_resolve_env_order_prefix_and_expansion():
    container = {
        "name": "c",
        "envFrom": [
            {"configMapRef": {"name": "cm"}, "prefix": "CM_"},
            {"secretRef": {"name": "sec"}},
        ],
        "env": [
            {"name": "X", "value": "$(CM_a)/$(user)"},
            {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "user"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "OPT",
                "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k", "optional": True}},
            },
            {
                "name": "OPTKEY",
                "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "zz", "optional": True}},
            },
            {"name": "CM_a", "value": "override"},
        ],
    }
    objects = {("configmap", "cm"): {"a": "1", "bad=key": "x"}, ("secret", "sec"): {"user": "u"}}
    env = podspec.resolve_env(container, POD, lookup_from(objects))
    assert env == {
        "CM_a": "override",
        "user": "u",
        "X": "1/u",
        "Y": "u",
        "IP": "10.244.0.2",
        "CPU": "2",
    }


def test_resolve_env_names_what_is_missing():
    c = {
        "name": "c",
        "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "k"}}}],
    }
    with pytest.raises(ConfigError, match='configmap "settings" not found'):
        podspec.resolve_env(c, POD, lookup_from({}))
    with pytest.raises(ConfigError, match="couldn't find key k in ConfigMap ns/settings"):
        podspec.resolve_env(c, POD, lookup_from({("configmap", "settings"): {}}))
    c = {"name": "c", "envFrom": [{"secretRef": {"name": "creds"}}]}
    with pytest.raises(ConfigError, match='secret "creds" not found'):
        podspec.resolve_env(c, POD, lookup_from({}))


def test_command_line_needs_a_command():
    assert podspec.command_line(
        {"command": ["echo", "$(A)"], "args": ["$(B)"]}, {"A": "1", "B": "2"}
    ) == ["echo", "1", "2"]
    with pytest.raises(ValueError, match="does not use images"):
        podspec.command_line({"args": ["x"]}, {})


def test_volume_files():
    data = podspec.configmap_bytes(
        {"data": {"a": "1"}, "binaryData": {"b": base64.b64encode(b"\0").decode()}}
    )
    assert podspec.key_files(data, None, None, "cm", False) == [
        ("a", b"1", 0o644),
        ("b", b"\0", 0o644),
    ]
    items = [{"key": "a", "path": "sub/a.txt", "mode": 0o600}]
    assert podspec.key_files(data, items, 0o444, "cm", False) == [("sub/a.txt", b"1", 0o600)]
    with pytest.raises(podspec.VolumeError):
        podspec.key_files(data, [{"key": "zz", "path": "z"}], None, "cm", False)
    assert podspec.key_files(data, [{"key": "zz", "path": "z"}], None, "cm", True) == []
    files = podspec.downward_files(
        POD, [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}], None
    )
    assert files == [("name", b"p", 0o644)]
    with pytest.raises(podspec.VolumeError):
        podspec.safe_relpath("../etc/passwd")


def test_ip_allocation_skips_network_node_and_broadcast():
    alloc = IPAllocator("10.244.0.0/30", "10.244.0.1")
    assert alloc.allocate("a") == "10.244.0.2"
    assert alloc.allocate("a") == "10.244.0.2"  # idempotent per owner
    with pytest.raises(RuntimeError, match="exhausted"):
        alloc.allocate("b")
    alloc.release("a")
    assert alloc.allocate("b") == "10.244.0.2"
    with pytest.raises(ValueError):
        IPAllocator("10.244.0.0/16", "10.245.0.1")


def test_overlapping_routes():
    routes = [
        "default via 192.0.2.1 dev eth0",
        "192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2",
        "10.244.0.0/16 dev gftbr0 proto kernel scope link src 10.244.0.1",
        "local 10.244.0.1 dev gftbr0 table local proto kernel scope host src 10.244.0.1",
        "broadcast 10.250.255.255 dev other table local",
    ]
    assert podspec.overlapping_routes(routes, "10.244.0.0/16", "gftbr0") == []
    assert podspec.overlapping_routes(routes, "192.0.2.128/25", "gftbr0") == [routes[1]]
    assert podspec.overlapping_routes(routes, "10.250.0.0/16", "gftbr0") == [routes[4]]


def test_exit_codes_and_phase():
    assert podspec.returncode_to_exit(-15) == (143, 15)
    assert podspec.returncode_to_exit(3) == (3, None)
    ok = ContainerRecord("m", "img", state="terminated", exit_code=0)
    bad = ContainerRecord("m2", "img", state="terminated", exit_code=1)
    side = ContainerRecord("s", "img", kind="sidecar", state="terminated", exit_code=143)
    assert podspec.terminal_phase([ok, side]) == "Succeeded"
    assert podspec.terminal_phase([ok, bad]) == "Failed"
    assert podspec.should_restart("OnFailure", 1) and not podspec.should_restart("OnFailure", 0)
    assert podspec.should_restart("Always", 0) and not podspec.should_restart("Never", 1)
    b = podspec.RestartBackoff()
    assert [b.next("c") for _ in range(7)] == [10, 20, 40, 80, 160, 300, 300]


def test_pod_status_like_a_kubelet():
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "T0"}]
        },
    }
    init = ContainerRecord(
        "init", "img", kind="init", state="terminated", exit_code=0, reason="Completed"
    )
    side = ContainerRecord("side", "img", kind="sidecar", state="running", started_at="T1")
    main = ContainerRecord(
        "main", "img", state="running", started_at="T2", container_id="runner://42"
    )
    st = podspec.build_pod_status(
        pod,
        [init, side, main],
        pod_ip="10.244.0.2",
        host_ip="10.244.0.1",
        initialized=True,
        sandbox_ready=True,
    )
    assert st["phase"] == "Running"
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Initialized"]["status"] == "True"
    assert conds["PodScheduled"]["lastTransitionTime"] == "T0"
    assert st["podIPs"] == [{"ip": "10.244.0.2"}] and st["hostIP"] == "10.244.0.1"
    cs = st["containerStatuses"][0]
    assert cs["state"] == {"running": {"startedAt": "T2"}} and cs["ready"] and cs["started"]
    assert cs["containerID"] == "runner://42" and cs["imageID"] == "img"
    inits = {s["name"]: s for s in st["initContainerStatuses"]}
    assert inits["init"]["ready"] and not inits["init"]["started"]
    assert inits["side"]["ready"] and inits["side"]["started"]

    main.state, main.exit_code, main.reason, main.message = "terminated", 3, "Error", "msg"
    st = podspec.build_pod_status(
        pod,
        [init, side, main],
        pod_ip="10.244.0.2",
        host_ip="10.244.0.1",
        initialized=True,
        sandbox_ready=False,
        terminal="Failed",
    )
    assert st["phase"] == "Failed"
    t = st["containerStatuses"][0]["state"]["terminated"]
    assert t["exitCode"] == 3 and t["reason"] == "Error" and t["message"] == "msg"
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodCompleted"

    waiting = ContainerRecord(
        "main", "img", reason="CreateContainerConfigError", message='configmap "x" not found'
    )
    st = podspec.build_pod_status(
        pod, [waiting], pod_ip="10.244.0.2", host_ip="h", initialized=True, sandbox_ready=True
    )
    assert st["phase"] == "Pending"
    assert st["containerStatuses"][0]["state"]["waiting"]["reason"] == "CreateContainerConfigError"


def test_fallback_message_keeps_the_end_of_the_log():
    text = "\n".join(f"line {i}" for i in range(200))
    msg = podspec.fallback_message(text)
    assert msg.endswith("line 199") and "line 119" not in msg
    assert len(podspec.fallback_message("x" * 5000)) == 2048


# ---------------------------------------------------------------------------------------------
# The log server, on loopback


def test_log_server_serves_tail_timestamps_limits_and_follow(tmp_path: Path):
    log = tmp_path / "c.log"
    t0 = "2026-01-01T00:00:00.000000001Z"
    log.write_bytes(f"{t0} stdout one\n{t0} stderr two\n".encode())
    state = {"running": True}

    def lookup(ns, pod, container, previous):
        if (ns, pod, container) != ("ns", "p", "c"):
            raise logserver.LogRequestError(404, "no such pod")
        if previous:
            raise logserver.LogRequestError(400, "previous terminated container not found")
        return logserver.LogSource(log, lambda: state["running"])

    server = logserver.serve("127.0.0.1", 0, tmp_path / "pki", "node", lookup)
    port = server.server_address[1]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def get(query: str, timeout: float = 5) -> str:
        url = f"https://127.0.0.1:{port}/containerLogs/ns/p/c{query}"
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return r.read().decode()

    try:
        assert get("") == "one\ntwo\n"
        assert get("?tailLines=1") == "two\n"
        assert get("?timestamps=true&tailLines=1") == f"{t0} two\n"
        assert get("?limitBytes=5") == "one\nt"
        assert get("?sinceSeconds=60") == ""
        with pytest.raises(urllib.error.HTTPError) as e:
            get("?previous=true")
        assert e.value.code == 400
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx) as r:
            assert r.read() == b"ok"

        def later():
            time.sleep(0.5)
            with log.open("ab") as f:
                f.write(f"{logserver.timestamp()} stdout three\n".encode())
            time.sleep(0.5)
            state["running"] = False

        threading.Thread(target=later, daemon=True).start()
        assert get("?follow=true", timeout=10) == "one\ntwo\nthree\n"
    finally:
        server.shutdown()


def test_log_writer_stamps_every_line(tmp_path: Path):
    import subprocess

    path = tmp_path / "logs" / "0.log"
    writer = logserver.LogWriter(path)
    p = subprocess.Popen(
        ["sh", "-c", "echo out; echo err >&2; printf partial"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    writer.attach(p.stdout, "stdout")
    writer.attach(p.stderr, "stderr")
    p.wait()
    writer.close()
    entries = logserver.read_entries(path)
    assert sorted(t for _, t in entries) == [b"err\n", b"out\n", b"partial\n"]
    for ts, _ in entries:
        assert abs(logserver.parse_ts(ts) - time.time()) < 60
    assert "out\n" in logserver.plain_text(path)


def test_addresses_and_the_namespace_record_are_safe_across_pod_threads(tmp_path: Path):
    from devcluster.netns import Network

    alloc = IPAllocator("10.244.0.0/24", "10.244.0.1")
    net = Network("gftbrunit", "10.244.0.1", "10.244.0.0/24", str(tmp_path / "netns.txt"))
    got: list[str] = []

    def one(i: int) -> None:
        got.append(alloc.allocate(f"pod-{i}"))
        net._record(f"gft-{i:04d}", True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 40
    assert sorted(net._recorded()) == [f"gft-{i:04d}" for i in range(40)]


def _run_shim(tmp_path: Path, mounts: list[dict], argv: list[str]):
    """The runner's container shim in a private mount namespace, as the runner starts it."""
    import json
    import subprocess
    import sys

    from devcluster.runner import SHIM, UNSHARE_BIN

    spec = tmp_path / "spec.json"
    fail = tmp_path / "startfail"
    spec.write_text(
        json.dumps(
            {
                "mounts": mounts,
                "home": str(tmp_path),
                "argv": argv,
                "env": {"PATH": "/usr/bin:/bin"},
                "startFailFile": str(fail),
            }
        )
    )
    cmd = [UNSHARE_BIN, "--mount", "--propagation", "private", "--", sys.executable, "-I"]
    done = subprocess.run([*cmd, SHIM, str(spec)], capture_output=True, text=True, timeout=30)
    return done, fail.read_text() if fail.exists() else ""


def test_a_volume_over_the_checkout_does_not_hide_the_command(tmp_path: Path):
    """A checkout made with ``mktemp -d`` lives under /tmp, where a training pod mounts its own
    emptyDir: the folder the command comes from is bound back at its own path, while the rest
    of the volume stays the pod's and a volume inside the kept folder still mounts."""
    scratch = tmp_path / "tmp"  # stands for /tmp: the pod mounts a volume over it
    checkout = scratch / "clone-x1"
    (checkout / "bin").mkdir(parents=True)
    (checkout / "data").mkdir()
    (scratch / "host-only").write_text("the host's")
    volume = tmp_path / "volume"  # what the pod mounts inside the checkout
    volume.mkdir()
    (volume / "f").write_text("from the volume")
    tool = checkout / "bin" / "tool"
    tool.write_text(
        "#!/bin/sh\n"
        f'test -e {scratch}/host-only && echo "host file visible"\n'
        f"cat {checkout}/data/f; echo; echo inside > {scratch}/written\n"
    )
    tool.chmod(0o755)
    mounts = [
        {"kind": "tmpfs", "target": str(scratch)},
        {"kind": "bind", "source": str(volume), "target": str(checkout / "data")},
        {"kind": "keep", "source": str(checkout), "target": str(checkout)},
    ]
    done, failed = _run_shim(tmp_path, mounts, [str(tool)])
    assert (done.returncode, failed) == (0, ""), (done.stdout, done.stderr, failed)
    assert done.stdout == "from the volume\n"  # the host's other files stay hidden
    assert not (scratch / "written").exists()  # the pod wrote into its own volume

    # Without the kept folder the command is hidden, as it was for a checkout under /tmp.
    done, failed = _run_shim(tmp_path, mounts[:2], [str(tool)])
    assert done.returncode == 128 and "No such file or directory" in failed, failed


def test_a_kept_folder_that_no_volume_covers_is_left_alone(tmp_path: Path):
    from devcluster.shim import shadowed

    assert not shadowed("/home/u/repo", [("/tmp", "tmpfs"), ("/etc/hosts", "bind")])
    assert shadowed("/tmp/x/repo", [("/tmp", "tmpfs")])
    assert shadowed("/tmp", [("/tmp", "bind")])
    assert not shadowed("/tmp/x/repo/.venv", [("/tmp", "tmpfs"), ("/tmp/x/repo", "keep")])
    assert shadowed("/tmp/x/repo/.venv", [("/tmp/x/repo", "keep"), ("/tmp/x/repo/.venv", "bind")])
    assert not shadowed("/tmpfoo/repo", [("/tmp", "tmpfs")])
