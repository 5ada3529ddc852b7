"""The control plane behaves like a real cluster: driven with kubectl, the way users do."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import wait_for

from devcluster import cluster as pg

pytestmark = pytest.mark.cluster


def apply(cluster, *objects: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))


RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def job(name: str, namespace: str, **pod_extra) -> dict:
    """A Job whose pod meets the ``restricted`` PodSecurity level."""
    pod_spec = {
        "restartPolicy": "Never",
        "securityContext": RESTRICTED_POD,
        "containers": [
            {
                "name": "main",
                "image": "busybox",
                "command": ["true"],
                "securityContext": RESTRICTED_CONTAINER,
            }
        ],
    }
    template: dict = {"spec": pod_spec}
    if "annotations" in pod_extra:
        template["metadata"] = {"annotations": pod_extra.pop("annotations")}
    pod_spec.update(pod_extra)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"backoffLimit": 1, "template": template},
    }


def test_this_machines_dns_resolvers_stay_reachable_while_it_runs(cluster) -> None:
    """The proving ground routes KWOK's pod range as unreachable (and the runner's pod range to
    its bridge): neither may swallow a resolver, or every lookup on the machine fails while the
    suite runs (CI saw package installs fail so; the resolver here was 10.255.255.53)."""
    for ns in pg.nameservers():
        route = subprocess.run(["ip", "route", "get", ns], capture_output=True, text=True)
        assert route.returncode == 0 and "unreachable" not in route.stdout, (ns, route)
        assert cluster.bridge not in route.stdout, (ns, route.stdout)


def test_server_reports_the_pinned_release(cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.35.4"
    assert version["clientVersion"]["gitVersion"] == "v1.35.4"


def test_crd_and_an_object_of_it_apply_and_read_back(cluster, namespace) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.pg.test.gft.dev"},
        "spec": {
            "group": "pg.test.gft.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    apply(cluster, crd)
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.pg.test.gft.dev")
    apply(
        cluster,
        {
            "apiVersion": "pg.test.gft.dev/v1",
            "kind": "Widget",
            "metadata": {"name": "w", "namespace": namespace},
            "spec": {"size": 3},
        },
    )
    got = cluster.kubectl_json("get", "widget", "w", "-n", namespace)
    assert got["spec"] == {"size": 3}
    bad = cluster.kubectl(
        "apply",
        "-f",
        "-",
        check=False,
        input=yaml.safe_dump(
            {
                "apiVersion": "pg.test.gft.dev/v1",
                "kind": "Widget",
                "metadata": {"name": "z", "namespace": namespace},
                "spec": {"size": 0},
            }
        ),
    )
    assert bad.returncode != 0 and "spec.size" in bad.stderr


def test_job_runs_to_succeeded_through_kwok(cluster, namespace) -> None:
    apply(cluster, job("ok", namespace))
    cluster.kubectl(
        "wait", "--for=condition=Complete", "job/ok", "-n", namespace, "--timeout=60s", timeout=90
    )
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=ok")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    assert pods[0]["spec"]["nodeName"].startswith("kwok-")


def test_kwok_fails_a_pod_on_purpose_and_the_job_controller_retries(cluster, namespace) -> None:
    apply(
        cluster,
        job(
            "bad",
            namespace,
            annotations={"gft.dev/kwok-exit-code": "42", "gft.dev/kwok-reason": "OOMKilled"},
        ),
    )
    cluster.kubectl(
        "wait", "--for=condition=Failed", "job/bad", "-n", namespace, "--timeout=90s", timeout=120
    )
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=bad")["items"]
    # backoffLimit 1: the first failure is retried once by the real Job controller.
    assert len(pods) == 2
    for pod in pods:
        state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (state["exitCode"], state["reason"]) == (42, "OOMKilled")
        assert pod["status"]["phase"] == "Failed"


def test_deleting_an_owner_garbage_collects_what_it_owns(cluster, namespace) -> None:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "owner", "namespace": namespace},
        },
    )
    uid = cluster.kubectl_json("get", "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "owned",
                "namespace": namespace,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
                ],
            },
        },
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(
        "the garbage collector to delete the owned ConfigMap",
        lambda: (
            cluster.kubectl("get", "configmap", "owned", "-n", namespace, check=False).returncode
            != 0
        ),
        timeout=60,
    )


def test_rbac_refuses_a_service_account_without_permissions(cluster, namespace, tmp_path) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    # TokenRequest: the API server signs a short-lived token for the ServiceAccount.
    token = cluster.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    assert token.count(".") == 2
    refused = subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            "--server",
            cluster.server,
            "--certificate-authority",
            str(cluster.pki_dir / "ca.crt"),
            "--token",
            token,
            "get",
            "pods",
            "-n",
            namespace,
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr and f"system:serviceaccount:{namespace}:nobody" in (
        refused.stderr
    )
    # Grant it, and the same token works: the refusal was RBAC, not a broken token.
    cluster.kubectl(
        "create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", namespace
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "nobody-reads",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:nobody",
        "-n",
        namespace,
    )
    wait_for(
        "the RoleBinding to take effect",
        lambda: (
            subprocess.run(
                [
                    str(cluster.bin_dir / "kubectl"),
                    "--server",
                    cluster.server,
                    "--certificate-authority",
                    str(cluster.pki_dir / "ca.crt"),
                    "--token",
                    token,
                    "get",
                    "pods",
                    "-n",
                    namespace,
                ],
                capture_output=True,
                text=True,
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            ).returncode
            == 0
        ),
        timeout=20,
    )


def test_restricted_pod_security_rejects_a_privileged_pod(cluster, namespace) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root", "namespace": namespace},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["true"],
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    refused = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr
    assert "privileged" in refused.stderr
    # The same pod written to the restricted profile is admitted.
    pod["spec"] = {
        "securityContext": RESTRICTED_POD,
        "containers": [
            {
                "name": "c",
                "image": "busybox",
                "command": ["true"],
                "securityContext": RESTRICTED_CONTAINER,
            }
        ],
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))


def test_a_gpu_pod_lands_on_a_fake_gpu_node(cluster, namespace) -> None:
    spec_job = job("gpu", namespace)
    spec_job["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"nvidia.com/gpu": "2"}
    }
    apply(cluster, spec_job)
    cluster.kubectl(
        "wait", "--for=condition=Complete", "job/gpu", "-n", namespace, "--timeout=60s", timeout=90
    )
    pod = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=gpu")["items"][0]
    node = cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    # Asking for more GPUs than any node has leaves the pod Pending, and the scheduler says why.
    too_many = job("greedy", namespace)
    too_many["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"nvidia.com/gpu": "64"}
    }
    apply(cluster, too_many)

    def unschedulable():
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=greedy")
        for p in pods["items"]:
            for cond in p["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return cond["message"]
        return None

    message = wait_for("the scheduler to report Unschedulable", unschedulable, timeout=30)
    assert "Insufficient nvidia.com/gpu" in message


def test_a_pvc_binds_and_survives_its_pod(cluster, namespace) -> None:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    wait_for(
        "the PVC to bind",
        lambda: (
            cluster.kubectl_json("get", "pvc", "data", "-n", namespace)["status"].get("phase")
            == "Bound"
        ),
    )
    pvc = cluster.kubectl_json("get", "pvc", "data", "-n", namespace)
    assert pvc["spec"]["storageClassName"] == "standard"  # the default StorageClass
    pv = cluster.kubectl_json("get", "pv", pvc["spec"]["volumeName"])
    assert pv["spec"]["hostPath"]["path"].startswith("/tmp/hostpath_pv/")
    pod_job = job("uses-pvc", namespace)
    spec = pod_job["spec"]["template"]["spec"]
    spec["containers"][0]["volumeMounts"] = [{"name": "d", "mountPath": "/data"}]
    spec["volumes"] = [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]
    apply(cluster, pod_job)
    cluster.kubectl(
        "wait",
        "--for=condition=Complete",
        "job/uses-pvc",
        "-n",
        namespace,
        "--timeout=60s",
        timeout=90,
    )
    cluster.kubectl("delete", "job", "uses-pvc", "-n", namespace, "--cascade=foreground")
    wait_for(
        "the Job's pod to go",
        lambda: not cluster.kubectl_json("get", "pods", "-n", namespace)["items"],
        timeout=60,
    )
    after = cluster.kubectl_json("get", "pvc", "data", "-n", namespace)
    assert after["status"]["phase"] == "Bound"
    assert after["spec"]["volumeName"] == pvc["spec"]["volumeName"]


def test_component_ports_are_never_ones_the_kernel_gives_to_clients() -> None:
    # A port from the ephemeral range can be taken, between choosing and binding, by one of the
    # session's many client connections (seen: a second control plane never got its default
    # ServiceAccount, its controller manager having died on "address already in use").
    low, high = pg._ephemeral_range()
    ports = [pg.component_port() for _ in range(50)]
    assert not [p for p in ports if low <= p <= high], ports
