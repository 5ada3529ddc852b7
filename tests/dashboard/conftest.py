"""The dashboard under test (one for the session, shared by the API and browser modules): a
``gft-dashboard`` process under the path prefix ``/gft`` against the proving ground, two users
(service accounts bound to the built-in ``view`` and ``edit`` roles in one namespace), a
fine-tune they may see and one in a namespace they may not, and pods on the runner node: a
trainer stand-in whose log never stops, a real TensorBoard for the ``seen`` fine-tune and a
hostile one for the ``hostile`` fine-tune."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from dashboard import pods
from dashboard.client import finetune, start_dashboard

PREFIX = "/gft"


@pytest.fixture(scope="package")
def chromium():
    """One headless Chromium for the browser tests of this folder. Package-scoped: Playwright's
    sync API runs its own event loop in this thread while it is open, so a later test's
    browser (the demo's) could not start while this one lived on to the session's end."""
    import browser

    with browser.chromium() as launched:
        yield launched


@pytest.fixture(scope="session")
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
    for ns, name in ((team, "seen"), (other, "hidden"), (team, "hostile")):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(finetune(name, ns)))
    # The trainer of `seen` (as the operator would write it): its log is the talker's.
    status = {"status": {"podName": "talker", "jobName": "seen"}}
    cluster.kubectl("patch", "gft", "seen", "-n", team, "--subresource=status",
                    "--type=merge", "-p", json.dumps(status))  # fmt: skip
    events = Path(tempfile.mkdtemp(prefix="gft-dash-tb-", dir="/var/tmp"))  # not under a /tmp
    pods.write_events(events / team / "seen")
    objects = [
        pods.pod("talker", team, ["python", "-c", pods.TALKER], container_name="trainer"),
        pods.pod(
            "tensorboard",
            team,
            ["tensorboard", "--logdir", str(events), "--bind_all", "--port", "6006"],
            labels={pods.NAME_LABEL: "seen"},
            port=6006,
        ),
        pods.pod(
            "evil",
            team,
            ["python", "-c", pods.HOSTILE, PREFIX, f"{team}/hostile"],
            labels={pods.NAME_LABEL: "hostile"},
            port=6006,
        ),
        pods.tensorboard_service("seen", team),
        pods.tensorboard_service("hostile", team),
    ]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objects))
    log = tmp_path_factory.mktemp("dash") / "dashboard.log"
    # Streams ask again every 2 s whether their user may (60 s by default), so that the tests
    # see a right taken away end its stream quickly.
    proc, root = start_dashboard(cluster, log, "--auth", "token", "--path-prefix", PREFIX,
                                 "--recheck-seconds", "2",
                                 "--try-idle-seconds", "30")  # fmt: skip
    yield {
        "base": root + PREFIX,
        "root": root,
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
    shutil.rmtree(events, ignore_errors=True)
