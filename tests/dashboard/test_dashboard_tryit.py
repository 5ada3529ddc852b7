"""The Try-it pod as the dashboard builds it from a finished run's Job (pure)."""

from __future__ import annotations

import pytest
from gft_dashboard import tryit

FINETUNE = {"metadata": {"name": "calm", "namespace": "team-a", "uid": "u-1"}}


def job(owner_uid: str = "u-1") -> dict:
    return {
        "metadata": {
            "name": "calm",
            "ownerReferences": [{"kind": "GemmaFineTune", "uid": owner_uid, "controller": True}],
        },
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "ghcr.io/gemma-finetune/trainer:0.1.0",
                            "command": ["gft-train", "--config", "/etc/gft/config.yaml"],
                            "env": [{"name": "GFT_TRY_TOKEN", "value": "from-the-template"}],
                        }
                    ]
                }
            }
        },
    }


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


def test_each_try_pod_gets_a_token_of_its_own():
    """Before: gft-try answered any pod of the cluster; now it answers only the holder of the
    token the dashboard put in the pod (another team cannot read the pod's spec)."""
    first, second = (tryit.pod(FINETUNE, job(), 600, 7200) for _ in range(2))
    token = env_of(first)[tryit.TOKEN]
    assert len(token) >= 32 and token != "from-the-template"
    assert token != env_of(second)[tryit.TOKEN]
    assert tryit.pod_token(first) == token


def test_a_job_the_run_does_not_own_is_not_copied():
    """Before: whatever Job bore the name in status.jobName was copied (its image, volumes and
    securityContext), so whoever may write Jobs in the namespace chose the next user's pod."""
    with pytest.raises(tryit.CannotTry, match="not this run's"):
        tryit.pod(FINETUNE, job(owner_uid="someone-else"), 600, 7200)
