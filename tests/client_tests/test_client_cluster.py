# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""The Python client and ``kubectl gft`` against the proving ground, as a user drives them: a
local JSONL over 1 MiB (more than a ConfigMap holds) goes to a bucket (SeaweedFS) and onto a
claim (a helper pod), each run trains for real on the runner node and is followed to
Succeeded with the progress bar; its metrics come back as a DataFrame, its adapter is fetched
and loaded with peft; two runs are compared; the API server's refusals reach the user."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from operator_process import TENSORBOARD_ON_RUNNER, installed, start_operator  # noqa: F401
from runner_runs import DATA, model_dir, output_dir  # noqa: F401 (model_dir is a fixture)
from trainer.s3_server import S3, seaweedfs

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
RUNNER = {
    "nodeSelector": {"gft.dev/runner": "true"},
    "tolerations": [{"key": "gft.dev/runner", "operator": "Exists", "effect": "NoSchedule"}],
}
PLACEMENT_FLAGS = ["--node-selector", "gft.dev/runner=true", "--toleration",
                   "gft.dev/runner:NoSchedule"]  # fmt: skip
TRAINING = {"maxSteps": 4, "batchSize": 2, "gradientAccumulationSteps": 1, "loggingEverySteps": 1}
SHAPING = {"format": "chat", "maxSeqLength": 64, "evalFraction": 0.001}
BUCKET = "datasets"
FINISHED = 300  # seconds: a trainer starts (torch, the tiny model), reads 1 MiB, trains 4 steps


@pytest.fixture(scope="module")
def operator(installed, tmp_path_factory):
    """The operator, reading the trainers' metrics every second (the progress bar moves)."""
    op = start_operator(
        installed, tmp_path_factory, "--metrics-interval", "1", *TENSORBOARD_ON_RUNNER
    )
    yield op
    op.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def ns(installed):
    """One namespace for the module's runs (compared at the end), restricted like a tenant's."""
    name = f"t-client-{uuid.uuid4().hex[:5]}"
    installed.kubectl("create", "namespace", name)
    installed.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    wait_for("the default ServiceAccount",
             lambda: installed.kubectl("get", "sa", "default", "-n", name,
                                       check=False).returncode == 0)  # fmt: skip
    yield name
    installed.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def s3(installed, ns, tmp_path_factory) -> S3:
    """SeaweedFS on the node's address, which both this machine and the runner's pods reach;
    the pods read it with the keys of the Secret s3-keys."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), host=installed.node_ip) as server:
        server.client().create_bucket(Bucket=BUCKET)
        installed.kubectl(
            "create", "secret", "generic", "s3-keys", "-n", ns,
            f"--from-literal=AWS_ACCESS_KEY_ID={server.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={server.secret_key}",
        )  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> Path:
    """Chats of the test data with longer answers, over 1 MiB: no ConfigMap can hold it."""
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("data") / "big.jsonl"
    with path.open("w") as f:
        n = 0
        while f.tell() <= 1.2 * 2**20:
            record = records[n % len(records)]
            messages = [dict(m) for m in record["messages"]]
            messages[-1]["content"] = " ".join([messages[-1]["content"]] * 8) + f" ({n})"
            f.write(json.dumps({"messages": messages}) + "\n")
            n += 1
    assert path.stat().st_size > 2**20
    return path


@pytest.fixture(scope="module")
def client(installed, ns):
    import gft

    placement = gft.Placement(RUNNER["nodeSelector"], RUNNER["tolerations"])
    return gft.Client(ns, kubeconfig=installed.kubeconfig, placement=placement)


def plugin(c, *args: str, check: bool = True, env: dict | None = None, timeout: float = 600):
    """``kubectl gft ...`` as a user runs it: the proving ground's kubectl finds the plugin
    (``kubectl-gft``, the venv's console script) on PATH."""
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    path = f"{c.bin_dir}:{venv_bin}:{os.environ['PATH']}"
    full_env = {**os.environ, **c.env, "KUBECONFIG": str(c.kubeconfig), "PATH": path, **(env or {})}
    result = subprocess.run(
        [str(c.bin_dir / "kubectl"), "gft", *args], capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl gft {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")  # fmt: skip
    return result


def loads_with_peft(model_dir: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in n for n, _ in tuned.named_parameters())


def same_files(local: Path, remote: Path) -> None:
    names = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    assert names and names == sorted(
        p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()
    )
    for name in names:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
def test_from_python_through_a_bucket(operator, installed, ns, s3, big_jsonl, client, model_dir,
                                      monkeypatch, tmp_path):  # fmt: skip
    import gft

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)  # the user's own keys, for uploads
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    bucket = gft.S3Bucket(BUCKET, endpoint=s3.endpoint, credentials_secret="s3-keys")
    run = client.create(
        "from-s3", model=str(model_dir), data=big_jsonl, upload_to=bucket, dataset=SHAPING,
        method={"type": "lora", "mergeAdapter": True}, training=TRAINING,
        resources={"gpus": 0, **RUNNER}, terminationGracePeriodSeconds=60,
        output={"checkpointEverySteps": 2, "pvc": {"size": "1Gi"}}, progress=False,
    )  # fmt: skip
    # The trainer's log, followed from before it starts to its end.
    followed: list[str] = []
    follower = threading.Thread(target=lambda: followed.extend(client.logs("from-s3", follow=True)))
    follower.start()
    key = run.spec.dataset.s3.key
    assert run.spec.dataset.s3.credentials_secret_ref.name == "s3-keys"
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == big_jsonl.read_bytes()

    bar = io.StringIO()
    done = client.wait("from-s3", timeout=FINISHED, file=bar)
    assert done.phase.value == "Succeeded" and done.status.result.global_step == 4
    shown = bar.getvalue()
    assert "from-s3:" in shown and "Running" in shown, shown
    final = shown.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final and "step 4/4" in final and "Succeeded" in final, final
    assert "loss=" in shown, shown
    follower.join(timeout=60)
    assert not follower.is_alive() and any("step 4/4" in line for line in followed), followed

    frame = client.metrics("from-s3")
    assert frame.index.name == "step" and frame["train/loss"].dropna().index.tolist() == [
        1,
        2,
        3,
        4,
    ]
    assert (frame["train/loss"].dropna() > 0).all()
    assert frame["train/learning_rate"].notna().any()

    adapter = client.fetch("from-s3", tmp_path / "adapter")
    st = done.status
    same_files(adapter, output_dir(installed, ns, st.output_claim) / st.output_path / "adapter")
    loads_with_peft(model_dir, adapter)
    from transformers import AutoModelForCausalLM

    merged = client.fetch("from-s3", tmp_path / "merged", artifact="merged", progress=False)
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "gemma3_text"
    # The helper pods are gone once the client is done with them.
    helpers = ["get", "pods", "-n", ns, "-l", "app.kubernetes.io/managed-by=gft-client"]
    wait_for("no helper pod left", lambda: not installed.kubectl_json(*helpers)["items"])


def test_from_the_terminal_through_a_claim(
    operator, installed, ns, s3, big_jsonl, model_dir, tmp_path
):
    c = installed
    keys = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    to_bucket = plugin(c, "upload", str(big_jsonl), "--to", f"s3://{BUCKET}/cli", "--s3-endpoint",
                       s3.endpoint, "--s3-secret", "s3-keys", "-n", ns, env=keys)  # fmt: skip
    in_bucket = yaml.safe_load(to_bucket.stdout)["spec"]["dataset"]["s3"]
    assert in_bucket["key"].startswith("cli/") and in_bucket["endpoint"] == s3.endpoint
    assert in_bucket["credentialsSecretRef"] == {"name": "s3-keys"}
    got = s3.client().get_object(Bucket=BUCKET, Key=in_bucket["key"])["Body"].read()
    assert got == big_jsonl.read_bytes()
    up = plugin(c, "upload", str(big_jsonl), "--to", "pvc://datasets", "--size", "1Gi",
                "-n", ns, *PLACEMENT_FLAGS)  # fmt: skip
    source = yaml.safe_load(up.stdout)["spec"]["dataset"]["volume"]
    assert source["claimName"] == "datasets" and source["path"].endswith("/big.jsonl")
    assert "100%" in up.stderr  # the progress bar
    stored = output_dir(c, ns, "datasets") / source["path"]
    assert stored.read_bytes() == big_jsonl.read_bytes()

    manifest = tmp_path / "finetune.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "finetune.gemma.dev/v1alpha1", "kind": "GemmaFineTune",
        "metadata": {"name": "from-claim"},
        "spec": {"model": {"name": "tiny-gemma3", "path": str(model_dir)},
                 "dataset": {"path": "/replaced/by/--data.jsonl", **SHAPING},
                 "training": {**TRAINING, "learningRate": 3e-4},
                 "resources": {"gpus": 0, **RUNNER}, "terminationGracePeriodSeconds": 60,
                 "output": {"checkpointEverySteps": 2, "pvc": {"size": "1Gi"}}},
    }))  # fmt: skip
    ran = plugin(c, "run", "-f", str(manifest), "--data", str(big_jsonl), "--upload-to",
                 "pvc://datasets", "--follow", "--timeout", str(FINISHED), "-n", ns,
                 *PLACEMENT_FLAGS)  # fmt: skip
    assert "gemmafinetune.finetune.gemma.dev/from-claim created" in ran.stdout
    assert "from-claim: Succeeded" in ran.stdout and "step 4/4" in ran.stdout
    assert "step 4/4" in ran.stderr  # the bar
    spec = c.kubectl_json("get", "gft", "from-claim", "-n", ns)["spec"]
    assert spec["dataset"]["volume"] == source  # the same content: uploaded once, read there

    logs = plugin(c, "logs", "from-claim", "-n", ns).stdout
    assert "step 4/4" in logs

    metrics = plugin(c, "metrics", "from-claim", "-o", "csv", "-n", ns).stdout
    header, *rows = metrics.strip().splitlines()
    assert header.startswith("step,") and "train/loss" in header and len(rows) >= 4

    got = plugin(c, "get-adapter", "from-claim", str(tmp_path / "adapter"), "-n", ns)
    assert f"adapter of from-claim in {tmp_path / 'adapter'}" in got.stdout
    loads_with_peft(model_dir, tmp_path / "adapter")


def test_two_runs_compared(operator, installed, ns):
    table = plugin(installed, "compare", "from-s3", "from-claim", "-n", ns).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["from-s3", "from-claim"]
    rows = {line.split("  ")[0].strip(): line for line in lines[1:]}
    assert "Succeeded" in rows["phase"] and "s3://datasets/" in rows["dataset"]
    assert "pvc://datasets/" in rows["dataset"]
    assert "0.0002" in rows["learning rate"] and "0.0003" in rows["learning rate"]
    assert rows["train loss"].split()[-2:] and all(
        float(v) > 0 for v in rows["train loss"].split()[-2:]
    )
    print(table)


def test_tensorboard_through_port_forward(operator, installed, ns):
    c = installed
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    env = {**os.environ, **c.env, "KUBECONFIG": str(c.kubeconfig),
           "PATH": f"{c.bin_dir}:{venv_bin}:{os.environ['PATH']}"}  # fmt: skip
    # After the run, TensorBoard answers from its own Deployment, once it is ready.
    c.kubectl("rollout", "status", "deploy/from-s3-tb", "-n", ns, "--timeout", "180s")
    proc = subprocess.Popen([str(c.bin_dir / "kubectl"), "gft", "tb", "from-s3", "--port", "0",
                             "-n", ns], stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard of from-s3: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].split()[0]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def runs():
            try:
                with opener.open(f"{url}data/runs", timeout=10) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        assert f"{ns}/from-s3" in wait_for("TensorBoard's runs", runs, timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_refusals_reach_the_user_with_what_to_do(operator, installed, ns, tmp_path):
    c = installed
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "finetune.gemma.dev/v1alpha1", "kind": "GemmaFineTune",
        "metadata": {"name": "from-s3"},
        "spec": {"model": {"name": "m"}, "dataset": {"hub": {"id": "org/set"}},
                 "training": {"maxSteps": 2}},
    }))  # fmt: skip
    # The API server's own words, passed on, then what to do next.
    taken = plugin(c, "run", "-f", str(manifest), "-n", ns, check=False)
    assert taken.returncode == 1
    assert 'gemmafinetunes.finetune.gemma.dev "from-s3" already exists' in taken.stderr
    assert "Pick another name" in taken.stderr
    bad_name = plugin(c, "run", "-f", str(manifest), "--name", "Not_A_Name", "-n", ns,
                      check=False)  # fmt: skip
    assert bad_name.returncode == 1 and "metadata.name: Invalid value" in bad_name.stderr
    assert "Fix what the API server names and try again." in bad_name.stderr
    # What the client can check itself, it checks before anything is sent or uploaded.
    manifest.write_text(manifest.read_text().replace("maxSteps", "maxStep"))
    typo = plugin(c, "run", "-f", str(manifest), "--name", "typo", "-n", ns, check=False)
    assert (
        typo.returncode == 1 and "training.maxStep: Extra inputs are not permitted" in typo.stderr
    )
    missing = plugin(c, "logs", "nope", "-n", ns, check=False)
    assert missing.returncode == 1 and '"nope" not found' in missing.stderr
    assert f"kubectl get gft -n {ns}" in missing.stderr


def test_suspend_resume_and_stop(operator, installed, ns, client):
    assert plugin(installed, "suspend", "from-claim", "-n", ns).stdout.endswith("suspended\n")
    assert client.get("from-claim").spec.suspend is True
    assert plugin(installed, "resume", "from-claim", "-n", ns).stdout.endswith("resumed\n")
    assert client.get("from-claim").spec.suspend is False
    plugin(installed, "stop", "from-claim", "-n", ns)
    get = ["get", "gft", "from-claim", "-n", ns]
    wait_for("from-claim deleted", lambda: installed.kubectl(*get, check=False).returncode,
             timeout=120)  # fmt: skip
