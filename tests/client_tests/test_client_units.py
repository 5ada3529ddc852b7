"""The client's parts that need no cluster: what a user types becomes the API's typed spec (or a
refusal naming the field), the plugin's help reads like kubectl's, the helper pod's file server
keeps to its folder and its token, and the metrics table comes from real TensorBoard events."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from gft import cli, files, specs, tables
from gft.client import FineTune
from gft.errors import GftError, refusal
from gft_trainer import fileserver

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / "tests" / "data" / "chat_small.jsonl"


# ------------------------------------------------------------------------------- specs


def test_each_kind_of_data_becomes_its_dataset_source(tmp_path: Path) -> None:
    bucket = specs.S3Bucket("data", endpoint="http://s3.local:8333", credentials_secret="keys")
    assert specs.data_source("s3://data/team/train.jsonl", bucket) == {
        "s3": {
            "bucket": "data",
            "key": "team/train.jsonl",
            "endpoint": "http://s3.local:8333",
            "region": "us-east-1",
            "credentialsSecretRef": {"name": "keys"},
        }
    }
    assert specs.data_source("s3://data/team/", bucket)["s3"]["prefix"] == "team/"
    assert specs.data_source("hf://datasets/HuggingFaceH4/no_robots") == {
        "hub": {"id": "HuggingFaceH4/no_robots", "split": "train"}
    }
    assert specs.data_source("pvc://datasets/a/train.jsonl") == {
        "volume": {"claimName": "datasets", "path": "a/train.jsonl"}
    }
    local = tmp_path / "train.jsonl"
    local.write_text('{"text": "x"}\n')
    assert specs.data_source(str(local)) == specs.LocalFile(local)
    with pytest.raises(GftError, match=r"nope\.jsonl: no such file here; a bucket is s3://"):
        specs.data_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(GftError, match=r"write s3://BUCKET/KEY"):
        specs.data_source("s3://data")


def test_the_spec_is_the_apis_own_and_a_typo_is_refused_by_field() -> None:
    spec = specs.finetune_spec(
        "google/gemma-3-270m-it",
        {"hub": {"id": "org/set"}},
        method="lora",
        training={"maxSteps": 3},
        dataset={"format": "chat"},
        resources={"gpus": 0},
        termination_grace_period_seconds=60,
    )
    assert spec.training.max_steps == 3 and spec.resources.gpus == 0
    assert spec.termination_grace_period_seconds == 60 and spec.dataset.format.value == "chat"
    with pytest.raises(GftError, match=r"training\.maxStep: Extra inputs are not permitted"):
        specs.finetune_spec("m", {"hub": {"id": "org/set"}}, training={"maxStep": 3})
    with pytest.raises(GftError, match=r"method\.type: Input should be 'lora', 'qlora' or"):
        specs.finetune_spec("m", {"hub": {"id": "org/set"}}, method="lorra")
    with pytest.raises(
        GftError, match=r"training: Value error, give exactly one of epochs and maxSteps"
    ):
        specs.finetune_spec("m", {"hub": {"id": "org/set"}}, training={"epochs": 1, "maxSteps": 3})


def test_a_model_path_or_claim_becomes_spec_model() -> None:
    assert specs.model_source("/models/gemma3-270m") == {
        "name": "gemma3-270m",
        "path": "/models/gemma3-270m",
    }
    assert specs.model_source("pvc://models/gemma") == {
        "name": "gemma",
        "volume": {"claimName": "models", "path": "gemma"},
    }


def test_fields_of_a_newer_api_are_left_out_with_a_warning_not_an_error() -> None:
    body = {
        "metadata": {"name": "pip", "namespace": "ml", "uid": "u"},
        "spec": {
            "model": {"name": "m"},
            "dataset": {"hub": {"id": "org/set"}},
            "training": {"maxSteps": 3},
            "futureField": {"x": 1},
        },
        "status": {"phase": "Running", "progress": {"step": 2, "newThing": 7}},
    }
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ft = FineTune.from_body(body)
    assert ft.status.progress.step == 2
    said = " ".join(str(w.message) for w in seen)
    assert "futureField" in said and "progress.newThing" in said and "upgrade" in said


def test_an_api_refusal_is_passed_on_with_what_to_do() -> None:
    class Refused(Exception):
        status = 422
        reason = "Unprocessable Entity"
        body = json.dumps(
            {
                "kind": "Status",
                "reason": "Invalid",
                "message": 'GemmaFineTune.finetune.gemma.dev "x" is invalid: spec.training: '
                "Invalid value: give exactly one of training.epochs and training.maxSteps",
                "details": {
                    "causes": [
                        {
                            "field": "spec.training",
                            "message": "Invalid value: give exactly one of training.epochs "
                            "and training.maxSteps",
                        }
                    ]
                },
                "code": 422,
            }
        )

    text = str(refusal(Refused(), "x", "ml"))
    assert text.startswith('GemmaFineTune.finetune.gemma.dev "x" is invalid: spec.training:')
    assert "kubectl explain gft.spec.training" in text


# ------------------------------------------------------------------------------- the plugin


def test_help_reads_like_kubectls() -> None:
    out = io.StringIO()
    assert cli.main(["--help"], out) == 0
    text = out.getvalue()
    for name in ("run", "logs", "tb", "compare", "metrics", "suspend", "resume", "stop",
                 "get-adapter", "upload"):  # fmt: skip
        assert f"\n  {name} " in text, name
    assert "Usage:\n  kubectl gft [command] [options]" in text
    assert 'Use "kubectl gft <command> --help" for more information about a given command.' in text
    for name in cli.COMMANDS:
        out = io.StringIO()
        assert cli.main([name, "--help"], out) == 0
        text = out.getvalue()
        assert "\nExamples:\n  # " in text and "\nOptions:\n" in text, name
        assert f"\nUsage:\n  kubectl gft {name}" in text, name
        assert max(len(line) for line in text.splitlines()) <= cli.WIDTH, name
    out = io.StringIO()
    assert cli.main(["options"], out) == 0
    assert "-n, --namespace='':" in out.getvalue() and "--kubeconfig='':" in out.getvalue()


def test_usage_errors_say_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert 'unknown command "frobnicate" for "kubectl gft"' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["logs"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: the following arguments are required: NAME" in err
    assert "See 'kubectl gft logs --help' for usage." in err


def test_destinations_and_tolerations_parse_as_kubectl_writes_them() -> None:
    args = cli.COMMANDS  # built by main(); the flags' defaults are what a bare command gets
    assert args
    ns = type("A", (), {"s3_endpoint": "http://e", "s3_region": "r", "s3_secret": "k",
                        "s3_upload_endpoint": None})()  # fmt: skip
    assert cli.store_of("pvc://data", ns) == specs.Claim("data", "gft-datasets")
    assert cli.store_of("pvc://data/sets/", ns) == specs.Claim("data", "sets")
    assert cli.store_of("s3://bkt/team", ns) == specs.S3Bucket(
        "bkt", "team", endpoint="http://e", region="r", credentials_secret="k"
    )
    with pytest.raises(GftError):
        cli.store_of("ftp://x", ns)
    assert cli._toleration("gft.dev/runner:NoSchedule") == {
        "key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}  # fmt: skip
    assert cli._toleration("gpu=a100:NoExecute")["value"] == "a100"
    with pytest.raises(GftError, match="KEY"):
        cli._toleration("gpu")


# ------------------------------------------------------------------------------- the helper pod


def test_the_helper_image_is_the_operators_default_trainer_image() -> None:
    from gft_operator.children import Defaults

    assert Defaults().image == files.DEFAULT_IMAGE


def test_the_helper_pod_reads_only_what_it_is_given() -> None:
    pod = files.file_server_pod("p", "out", "img", "t" * 20, sub_path="runs/u1")
    spec = pod["spec"]
    (mount,) = spec["containers"][0]["volumeMounts"]
    assert mount == {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "runs/u1"}
    assert spec["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    assert spec["automountServiceAccountToken"] is False
    assert "--writable" not in spec["containers"][0]["command"]
    assert "gft-operator" not in json.dumps(pod)  # the operator's watches must not see it
    assert len(files.helper_name("x" * 80)) <= 63


def test_served_paths_never_leave_the_destination(tmp_path: Path) -> None:
    assert files.local_path(tmp_path, "a/b.json") == tmp_path / "a" / "b.json"
    for bad in ("../x", "/etc/passwd", "a/../../x", "", "a//b"):
        with pytest.raises(GftError, match="refusing the served path"):
            files.local_path(tmp_path, bad)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "root"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "w.bin").write_bytes(b"weights")
    (tmp_path / "secret").write_text("not yours")
    (root / "adapter" / "escape").symlink_to(tmp_path / "secret")
    token = "t" * 24
    handler = type("H", (fileserver.Handler,), {"root": root.resolve(), "token": token,
                                                "writable": True, "touched": [0.0]})  # fmt: skip
    httpd = fileserver.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", token, root
    httpd.shutdown()


def _call(url: str, method: str = "GET", token: str | None = None, data=None, headers=None):
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    if token:
        request.add_header(fileserver.TOKEN_HEADER, token)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_file_server_needs_its_token_and_keeps_to_its_folder(server) -> None:
    url, token, _ = server
    assert _call(f"{url}/healthz")[0] == 200
    assert _call(f"{url}/index")[0] == 401
    assert _call(f"{url}/index", token="wrong" * 5)[0] == 401
    status, body = _call(f"{url}/index", token=token)
    assert status == 200
    assert json.loads(body)["files"] == [{"path": "adapter/w.bin", "size": 7}]  # no link
    assert _call(f"{url}/files/adapter/w.bin", token=token) == (200, b"weights")
    assert _call(f"{url}/files/adapter/escape", token=token)[0] == 400  # leads outside
    assert _call(f"{url}/files/..%2Fsecret", token=token)[0] == 400
    assert _call(f"{url}/files/adapter/none", token=token)[0] == 404


def test_an_upload_lands_whole_or_not_at_all(server) -> None:
    url, token, root = server
    data = b'{"text": "hello"}\n' * 100
    good = hashlib.sha256(data).hexdigest()
    status, body = _call(f"{url}/files/sets/a.jsonl", "PUT", token, data,
                         {fileserver.SHA256_HEADER: good})  # fmt: skip
    assert status == 201 and json.loads(body)["sha256"] == good
    assert (root / "sets" / "a.jsonl").read_bytes() == data
    status, body = _call(f"{url}/files/sets/b.jsonl", "PUT", token, data,
                         {fileserver.SHA256_HEADER: "0" * 64})  # fmt: skip
    assert status == 400 and b"sha256" in body
    assert sorted(p.name for p in (root / "sets").iterdir()) == ["a.jsonl"]  # no partial left
    assert _call(f"{url}/files/../x.jsonl", "PUT", token, data)[0] == 400


def test_a_read_only_server_refuses_uploads(tmp_path: Path) -> None:
    handler = type("H", (fileserver.Handler,), {"root": tmp_path, "token": "t" * 24,
                                                "writable": False, "touched": [0.0]})  # fmt: skip
    httpd = fileserver.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/files/x"
        assert _call(url, "PUT", "t" * 24, b"x")[0] == 403
        assert not (tmp_path / "x").exists()
    finally:
        httpd.shutdown()


# ------------------------------------------------------------------------------- tables


def test_the_metrics_table_comes_from_tensorboard_events(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(log_dir=str(tmp_path / "ns" / "run"))
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.0)):
        first.add_scalar("train/loss", loss, step)
    first.add_scalar("eval/loss", 2.8, 2)
    first.add_text("samples/0", "an answer", 2)
    first.close()
    # A resumed attempt logs step 3 again: the newer value wins.
    second = SummaryWriter(log_dir=str(tmp_path / "ns" / "run"))
    second.add_scalar("train/loss", 1.9, 3)
    second.add_scalar("train/loss", 1.5, 4)
    second.close()
    frame = tables.metrics_frame(tables.read_events(tmp_path))
    assert list(frame.index) == [1, 2, 3, 4] and frame.index.name == "step"
    assert sorted(frame.columns) == ["eval/loss", "train/loss"]
    assert frame["train/loss"].tolist() == pytest.approx([3.0, 2.5, 1.9, 1.5])
    assert frame.loc[2, "eval/loss"] == pytest.approx(2.8)
    assert tables.metrics_frame([]).empty


def test_compare_puts_runs_side_by_side() -> None:
    def run(name: str, lr: float, loss: float) -> FineTune:
        return FineTune.from_body({
            "metadata": {"name": name},
            "spec": {"model": {"name": "m"}, "dataset": {"s3": {"bucket": "bkt", "key": "k.jsonl"}},
                     "training": {"maxSteps": 4, "learningRate": lr}},
            "status": {"phase": "Succeeded", "result": {
                "outcome": "Succeeded", "exitCode": 0, "reason": "Completed", "globalStep": 4,
                "totalSteps": 4, "trainLoss": loss}},
        })  # fmt: skip

    frame = tables.compare_frame([run("a", 1e-3, 1.5), run("b", 3e-4, 2.5)])
    assert list(frame.columns) == ["a", "b"]
    assert frame.loc["learning rate"].tolist() == [1e-3, 3e-4]
    assert frame.loc["train loss"].tolist() == [1.5, 2.5]
    assert frame.loc["dataset", "a"] == "s3://bkt/k.jsonl"


def test_fileserver_refuses_to_start_without_a_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(fileserver.TOKEN_ENV, "short")
    assert fileserver.main(["--root", str(tmp_path)]) == 2
    monkeypatch.setenv(fileserver.TOKEN_ENV, "x" * 20)
    assert fileserver.main(["--root", str(tmp_path / "missing")]) == 66
    assert os.environ[fileserver.TOKEN_ENV]


def test_a_manifest_for_another_namespace_is_refused_as_kubectl_does(tmp_path: Path) -> None:
    import yaml
    from gft.client import Client

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ml"}}],
    }))  # fmt: skip
    client = Client(kubeconfig=kubeconfig)
    assert client.namespace == "ml"  # the context's
    manifest = {"apiVersion": "finetune.gemma.dev/v1alpha1", "kind": "GemmaFineTune",
                "metadata": {"name": "x", "namespace": "other"}, "spec": {}}  # fmt: skip
    with pytest.raises(GftError, match=r'manifest \("other"\) does not match .* "ml": pass -n'):
        client.submit(manifest)
