"""The real runs the dashboard's workbench tests look at (one module, one operator, one set of
runs, shared by every test of tests/dashboard/test_dashboard_runs.py): in a namespace of their
own (PodSecurity ``restricted``, an editor and a viewer), an operator watching only it, and on
the runner node three tiny Gemma 3 fine-tunes that really train:

- ``calm`` and ``bold``: 12 steps each, evaluated every 4 with sample answers, differing in
  learning rate and LoRA rank (the pair the comparison compares); a stand-in NVML gives each a
  300 W GPU, so their results carry a cost;
- ``long``: 4000 steps, there to be watched live and stopped.

Plus, in the session dashboard's team namespace, ``chatty``: a fine-tune whose "trainer" pod
printed 30,000 lines at once and goes on at two a second (a long run's log, in seconds)."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import uuid
from pathlib import Path

from dashboard import pods

FAKE_NVML = Path(__file__).resolve().parents[1] / "operator" / "fake_nvml"
PROMPTS = ["Capital of Spain?", "What colour is sky?"]

# Prints 30,000 numbered steps at once (more than a megabyte), then one more every half second.
CHATTY = r"""
import itertools, sys, time
def line(i):
    return f"step {i}: loss {3.0 / (i + 1):.6f} and some more words to make the line longer"
print("\n".join(line(i) for i in range(30000)), flush=True)
for i in itertools.count(30000):
    print(line(i), flush=True)
    time.sleep(0.5)
"""


def runs(model_dir: Path) -> dict[str, dict]:
    from runner_runs import on_runner

    def tiny(name: str, steps: int, learning_rate: float, rank: int, **training) -> dict:
        ft = on_runner(name, model_dir, max_steps=steps)
        spec = ft["spec"]
        spec["dataset"]["evalFraction"] = 0.2
        spec["method"] = {"type": "lora", "lora": {"r": rank, "alpha": 2 * rank}}
        spec["training"].update(
            learningRate=learning_rate,
            loggingEverySteps=2,
            samples={"count": 2, "prompts": PROMPTS, "maxNewTokens": 16, "maxShare": 0.5},
            **training,
        )
        spec["env"].append({"name": "PYTHONPATH", "value": str(FAKE_NVML)})
        spec["tensorboard"] = {"keepAfterFinishSeconds": 3600}
        return ft

    long = tiny("long", 4000, 2e-3, 4, evalEverySteps=1000)
    long["spec"]["training"]["loggingEverySteps"] = 10
    found = {
        "calm": tiny("calm", 12, 2e-3, 4, evalEverySteps=4),
        "bold": tiny("bold", 12, 2e-2, 8, evalEverySteps=4),
        "long": long,
    }
    for name, ft in found.items():
        every = 50 if name == "long" else 5
        ft["spec"]["output"] = {"existingClaim": f"{name}-output", "checkpointEverySteps": every}
    return found


def runner_claims(cluster, ns: str, names: list[str]) -> None:
    """An output claim per run on a volume of the runner node (``<name>-output``).

    TensorBoard after a run keeps only the run's tolerations, not its node selector: the
    scheduler puts it where the claim's volume can be mounted. The proving ground's host-path
    provisioner makes volumes with no node affinity, so it would go to a simulated node and
    never answer; a node-local volume, as a real cluster's, keeps it on the runner."""
    for name in names:
        folder = tempfile.mkdtemp(prefix=f"gft-dash-{ns}-{name}-", dir="/var/tmp")
        os.chmod(folder, 0o777)  # the trainer runs as a user of its own
        volume = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{ns}-{name}-output", "labels": {"gft-test/lab": ns}},
            "spec": {
                "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                "hostPath": {"path": folder, "type": "Directory"},
                "claimRef": {"namespace": ns, "name": f"{name}-output"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "gft.dev/runner", "operator": "In", "values": ["true"]}]}]}},
            },
        }  # fmt: skip
        claim = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-output", "namespace": ns},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": f"{ns}-{name}-output",
                     "resources": {"requests": {"storage": "1Gi"}}},
        }  # fmt: skip
        both = json.dumps(volume) + "\n---\n" + json.dumps(claim)
        cluster.kubectl("apply", "-f", "-", input=both)


def lab_namespace(cluster) -> tuple[str, dict[str, str]]:
    """A namespace enforcing PodSecurity ``restricted``, with an ``editor`` (edit) and a
    ``viewer`` (view); their tokens."""
    ns = f"dash-runs-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    tokens = {}
    for user, role in (("editor", "edit"), ("viewer", "view")):
        cluster.kubectl("create", "serviceaccount", user, "-n", ns)
        cluster.kubectl("create", "rolebinding", user, f"--clusterrole={role}",
                        f"--serviceaccount={ns}:{user}", "-n", ns)  # fmt: skip
        tokens[user] = cluster.kubectl("create", "token", user, "-n", ns).stdout.strip()
    return ns, tokens


def chatty(cluster, team: str) -> None:
    """The long-log fine-tune ``chatty`` in the team namespace (no operator acts there)."""
    from dashboard.client import finetune

    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetune("chatty", team)))
    status = {"status": {"phase": "Running", "podName": "chatty-0", "jobName": "chatty"}}
    cluster.kubectl("patch", "gft", "chatty", "-n", team, "--subresource=status",
                    "--type=merge", "-p", json.dumps(status))  # fmt: skip
    pod = pods.pod("chatty-0", team, ["python", "-c", CHATTY], container_name="trainer",
                   labels={pods.NAME_LABEL: "chatty"})  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))


def greedy_answers(cluster, ns: str, name: str, run_folder: Path, prompt: str, n: int):
    """(the run's answer, the base model's) to ``prompt``, as gft-try computes them, from the
    run's own config (its ConfigMap) with the output folder where this machine sees it."""
    import torch
    import yaml
    from gft_api.contract import TrainerConfig
    from gft_trainer import tryit

    cm = cluster.kubectl_json("get", "configmap", f"{name}-config", "-n", ns)
    raw = yaml.safe_load(cm["data"]["config.yaml"])
    raw = copy.deepcopy(raw)
    raw["output"]["dir"] = str(run_folder)
    served = tryit.load(TrainerConfig.model_validate(raw))
    said = {}
    with torch.no_grad():
        for tuned in (True, False):
            pieces = [p for p in served.answer(prompt, tuned, n) if isinstance(p, str)]
            said["tuned" if tuned else "base"] = "".join(pieces)
    return said
