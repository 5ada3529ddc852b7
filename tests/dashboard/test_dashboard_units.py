"""The dashboard's pure parts: the row a fine-tune becomes, GPU readings from a trainer's
/metrics, and how credentials are put on requests."""

from __future__ import annotations

import ssl

from gft_dashboard.apiserver import ApiServer, Identity, _bare
from gft_dashboard.hub import gpu_series, summarize
from gft_dashboard.server import running_pods


def gft(phase: str | None = None, **status) -> dict:
    obj = {
        "metadata": {"namespace": "team", "name": "run", "uid": "u1"},
        "spec": {"model": {"name": "google/gemma-3-1b-it"}, "method": {"type": "qlora"}},
    }
    if phase:
        obj["status"] = {"phase": phase, **status}
    return obj


def test_a_row_says_what_kubectl_get_says_and_lights_trouble():
    fresh = summarize(gft())
    assert (fresh["phase"], fresh["light"], fresh["method"]) == ("Pending", "waiting", "qlora")
    running = summarize(gft("Running", progress={"percent": 40.0, "etaSeconds": 30},
                            metrics={"loss": 1.5}))  # fmt: skip
    assert (running["light"], running["percent"], running["loss"]) == ("running", 40.0, 1.5)
    unreachable = summarize(
        gft("Running", conditions=[{"type": "MetricsAvailable", "status": "False",
                                    "reason": "MetricsUnreachable", "message": "no route"}])
    )  # fmt: skip
    assert unreachable["light"] == "warning" and unreachable["reason"] == "MetricsUnreachable"
    assert unreachable["message"] == "no route"
    stuck = summarize(gft("Pending", reason="Unschedulable", message="0/4 nodes have GPUs"))
    assert stuck["light"] == "warning" and "GPUs" in stuck["message"]
    assert summarize(gft("Failed", reason="OOMKilled"))["light"] == "failed"
    done = summarize(gft("Succeeded"))
    assert done["light"] == "done" and done["percent"] == 100.0


def test_gpu_readings_per_gpu():
    text = "\n".join([
        "# TYPE gft_gpu_utilization_ratio gauge",
        'gft_gpu_utilization_ratio{run="t/r",gpu="1"} 0.5',
        'gft_gpu_utilization_ratio{run="t/r",gpu="0"} 0.9',
        "# TYPE gft_gpu_temperature_celsius gauge",
        'gft_gpu_temperature_celsius{run="t/r",gpu="0"} 61',
        "# TYPE gft_train_loss gauge",
        'gft_train_loss{run="t/r"} 1.2',
    ]) + "\n"  # fmt: skip
    assert gpu_series(text) == [
        {"gpu": "0", "utilization": 0.9, "temperatureCelsius": 61.0},
        {"gpu": "1", "utilization": 0.5},
    ]
    assert gpu_series("") == []


def test_credentials_a_users_token_never_rides_with_ours():
    api = ApiServer(
        host="https://api",
        ssl_context=ssl.create_default_context(),
        user_ssl_context=ssl.create_default_context(),
        own_headers={"Authorization": "Bearer ours"},
    )
    assert api.headers(None) == {"Authorization": "Bearer ours"}
    assert api.headers(Identity(token="theirs")) == {"Authorization": "Bearer theirs"}
    proxied = Identity(user="ada", groups=("ml", "dev"))
    assert api.headers(proxied)["Impersonate-User"] == "ada"
    assert api._impersonated_groups(proxied) == [("Impersonate-Group", "ml"),
                                                 ("Impersonate-Group", "dev")]  # fmt: skip
    assert "theirs" not in Identity(token="theirs").key
    # The in-cluster loader stores "bearer <token>": sent once as "Bearer <token>".
    assert _bare("bearer abc") == "abc" and _bare("Bearer abc\n") == "abc" and _bare("abc") == "abc"


def test_each_running_pod_of_a_run_is_read_once_newest_per_index():
    def pod(name, index=None, phase="Running", ip="10.0.0.1", created="2026-01-01T00:00:00Z"):
        labels = {} if index is None else {"batch.kubernetes.io/job-completion-index": index}
        meta = {"name": name, "labels": labels, "creationTimestamp": created}
        return {"metadata": meta, "status": {"phase": phase, "podIP": ip}}

    pods = [
        pod("mn-1-new", "1", ip="10.0.0.3", created="2026-01-01T00:05:00Z"),
        pod("mn-1-old", "1", ip="10.0.0.2"),
        pod("mn-0-a", "0"),
        pod("mn-2-a", "2", phase="Pending", ip=""),
    ]
    assert running_pods(pods) == [("mn-0-a", "0", "10.0.0.1"), ("mn-1-new", "1", "10.0.0.3")]
    assert running_pods([pod("single")]) == [("single", "0", "10.0.0.1")]
    assert running_pods([pod("done", phase="Succeeded")]) == []
