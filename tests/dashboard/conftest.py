"""The dashboard under test (one per module): a ``gft-dashboard`` process against the proving
ground, two users (service accounts bound to the built-in ``view`` and ``edit`` roles in one
namespace), a fine-tune they may see and one in a namespace they may not."""

from __future__ import annotations

import json
import uuid

import pytest

from dashboard.client import finetune, start_dashboard


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory):
    from operator_process import install

    install(cluster)
    stamp = uuid.uuid4().hex[:6]
    team, other = f"dash-team-{stamp}", f"dash-other-{stamp}"
    for ns in (team, other):
        cluster.kubectl("create", "namespace", ns)
    tokens = {}
    for user, role in (("viewer", "view"), ("editor", "edit")):
        cluster.kubectl("create", "serviceaccount", user, "-n", team)
        cluster.kubectl("create", "rolebinding", user, f"--clusterrole={role}",
                        f"--serviceaccount={team}:{user}", "-n", team)  # fmt: skip
        tokens[user] = cluster.kubectl("create", "token", user, "-n", team).stdout.strip()
    for ns, name in ((team, "seen"), (other, "hidden")):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(finetune(name, ns)))
    log = tmp_path_factory.mktemp("dash") / "dashboard.log"
    proc, base = start_dashboard(cluster, log, "--auth", "token")
    yield {
        "base": base,
        "team": team,
        "other": other,
        "tokens": tokens,
        "log": log,
        "start": lambda *args: start_dashboard(cluster, log.with_name("other.log"), *args),
    }
    proc.terminate()
    proc.wait(timeout=10)
    for ns in (team, other):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
