"""The README's commands work: every ``make`` target it names exists, and the block marked
``readme-test`` runs line by line, as written, against a fresh proving ground (a new control
plane with KWOK nodes: what a user's empty cluster is to the chart and the example).
``make demo`` and ``make test`` themselves are covered by tests/e2e/test_demo_flow.py (the
demo's path) and by CI (which runs ``make test``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- readme-test:"


def readme_block(text: str) -> list[str]:
    """The shell lines of the fenced block after the marker, comments and blanks dropped."""
    after = text.split(MARKER, 1)[1]
    body = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert body, "the readme-test marker is not followed by a ```sh block"
    lines = []
    for line in body.group(1).splitlines():
        # A comment starts at "  # " (two spaces): a '#' inside a command (none today) stays.
        command = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
        if command:
            lines.append(command)
    return lines


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"`make ([a-z-]+)`|^make ([a-z-]+)", README.read_text(), re.MULTILINE))
    targets = {a or b for a, b in named}
    makefile = (REPO / "Makefile").read_text()
    missing = [t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.MULTILINE)]
    assert {"demo", "test"} <= targets and not missing, missing


@pytest.mark.cluster
@pytest.mark.slow
def test_the_use_it_on_your_cluster_block_runs_as_written(tmp_path: Path) -> None:
    from devcluster import build
    from devcluster import cluster as pg

    lines = readme_block(README.read_text())
    assert lines[0].startswith("helm install") and any("kubectl apply" in x for x in lines)
    state = tmp_path / "pg"
    fresh = pg.start(state, say=lambda *_: None, runner=False)
    try:
        env = dict(fresh.env)
        env["PATH"] = f"{build.tool('helm').parent}:{env['PATH']}"
        env["HF_TOKEN"] = "hf_not_a_real_token"
        for line in lines:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", line],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"README line failed: {line}\n{result.stderr}"
        # The block did what it says: the fine-tune was created, then deleted.
        gone = fresh.kubectl("get", "gft", "pip", check=False)
        assert "NotFound" in gone.stderr, gone.stdout
    finally:
        pg.stop(state, say=lambda *_: None)
