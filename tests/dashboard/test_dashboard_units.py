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


def test_names_are_checked_before_they_become_urls():
    import pytest
    from gft_dashboard import names

    assert names.namespace("team-a") == "team-a" and names.name("run.v2") == "run.v2"
    for bad in ("kube-system/pods", "..", "Team", "", "a" * 64, "-a"):
        with pytest.raises(names.BadName, match="namespace"):
            names.namespace(bad)
    for bad in ("a/../b", "..", ".", "a..b", "x" * 254):
        with pytest.raises(names.BadName, match="name"):
            names.name(bad)
    assert names.tail("data/plugin/scalars/tags") == "data/plugin/scalars/tags"
    assert names.tail("") == ""
    for bad in ("../x", "a/../../b", "a//b", "a\\b"):
        with pytest.raises(names.BadName):
            names.tail(bad)
    assert names.path_prefix("/tb/") == "/tb/"
    with pytest.raises(names.BadName):
        names.path_prefix("/a/../b")


def test_yaml_is_read_as_kubernetes_reads_it_without_aliases():
    import pytest
    from gft_dashboard import manifest

    got = manifest.load("a: 2e-4\nb: 5e-7\nc: 10\nd: '2e-4'\ne: 1.5\nf: .5\ng: 1_000\nh: 0x10\n")
    assert got == {"a": 2e-4, "b": 5e-7, "c": 10, "d": "2e-4", "e": 1.5, "f": 0.5, "g": 1000,
                   "h": 16}  # fmt: skip
    with pytest.raises(manifest.BadManifest, match=r"aliases .* line 2"):
        manifest.load("a: &x [1]\nb: *x\n")
    with pytest.raises(manifest.BadManifest, match="larger than"):
        manifest.load("#" * (manifest.MAX_BYTES + 1))
    with pytest.raises(manifest.BadManifest, match="line 2"):
        manifest.load("a: 1\nb: c: d\n")


def test_a_session_ends_no_later_than_its_token_and_the_store_is_bounded():
    import base64
    import json as j

    from gft_dashboard.sessions import MAX_AGE, Sessions, token_expiry

    def jwt(exp: int) -> str:
        body = base64.urlsafe_b64encode(j.dumps({"exp": exp}).encode()).decode().rstrip("=")
        return f"e30.{body}.sig"

    assert token_expiry(jwt(1000)) == 1000 and token_expiry("opaque") is None
    store = Sessions(limit=2)
    short = store.start(Identity(token=jwt(1600)), "ada", now=1000)
    assert short.expires == 1600 and store.get(short.id, now=1500) == short
    assert store.get(short.id, now=1600) is None  # expired with its token
    long = store.start(Identity(token="opaque"), "bob", now=1000)
    assert long.expires == 1000 + MAX_AGE
    for i in range(3):
        store.start(Identity(token=f"x{i}"), f"x{i}", now=1000)
    assert len(store) == 2 and store.get(long.id, now=1000) is None  # least recently used first


def test_stream_limits_per_user_and_in_all():
    import pytest
    from gft_dashboard.limits import StreamLimits, TooManyStreams

    limits = StreamLimits(per_user=2, total=3)
    with limits.hold("ada"), limits.hold("ada"):
        with pytest.raises(TooManyStreams, match="at most 2 per user"):
            limits.hold("ada")
        with limits.hold("bob"), pytest.raises(TooManyStreams, match="at most 3"):
            limits.hold("cy")
    assert limits.held("ada") == 0 and limits.held("bob") == 0


def test_a_proxied_identity_is_never_a_system_name():
    import pytest
    from gft_dashboard import auth

    settings = auth.Settings(auth="proxy")
    who = auth.proxied_identity(
        {"X-Forwarded-User": "ada", "X-Forwarded-Groups": "ml, dev"}, settings
    )
    assert who == Identity(user="ada", groups=("ml", "dev"))
    prefixed = auth.Settings(auth="proxy", user_prefix="oidc:", group_prefix="oidc:")
    ada = {"X-Forwarded-User": "ada", "X-Forwarded-Groups": "ml"}
    assert auth.proxied_identity(ada, prefixed) == Identity(user="oidc:ada", groups=("oidc:ml",))
    with pytest.raises(auth.Refused, match="system:masters"):
        auth.proxied_identity({**ada, "X-Forwarded-Groups": "ml,system:masters"}, settings)
    with pytest.raises(auth.Refused):
        auth.proxied_identity({"X-Forwarded-User": "system:admin"}, settings)
    with pytest.raises(auth.NotSignedIn):
        auth.proxied_identity({"X-Auth-Request-User": "ada"}, settings)
    laptop = auth.Settings(auth="kubeconfig", allowed_hosts=auth.loopback_hosts("127.0.0.1", 8090))
    assert auth.host_allowed("localhost:8090", laptop) and auth.host_allowed(
        "127.0.0.1:8090", laptop
    )
    assert not auth.host_allowed("attacker.example:8090", laptop)
    assert not auth.host_allowed(None, laptop)


def test_tensorboard_is_found_at_a_ready_pod_and_gets_the_shim_first():
    from gft_dashboard import tensorboard

    def pod(ready: bool, ip: str = "10.0.0.5", sidecar: bool = True) -> dict:
        container = {
            "name": "tensorboard",
            "ports": [{"name": "tensorboard", "containerPort": 6007}],
        }
        spec = {"containers": [container]}
        if sidecar:
            spec = {"initContainers": [container], "containers": [{"name": "trainer"}]}
        conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
        return {"metadata": {}, "spec": spec, "status": {"podIP": ip, "conditions": conditions}}

    assert tensorboard.upstream_address([pod(False), pod(True, "10.0.0.6", sidecar=False)]) == (
        "10.0.0.6:6007"
    )
    assert tensorboard.upstream_address([pod(False)]) is None
    page = tensorboard.with_shim(b"<html><HEAD lang=x><script src=a.js></script>", "/s.js")
    assert page.index(b"/s.js") < page.index(b"a.js")
    assert tensorboard.with_shim(b"<p>no head</p>", "/s.js").startswith(b'<script src="/s.js">')
    assert tensorboard.POSTS.fullmatch(
        "experiment/defaultExperimentId/data/plugin/timeseries/timeSeries"
    )
    assert not tensorboard.POSTS.fullmatch("data/runs")
