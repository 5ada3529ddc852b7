# ruff: noqa: F811  (pytest fixtures imported from operator_process are parameters here)
"""The example notebook (examples/gemma3-270m-demo/finetune-from-python.ipynb), executed with
nbclient on the proving ground as a user runs it: the real Gemma 3 270M fine-tuned through the
client, its loss curve plotted, the adapter fetched and answering what the base model cannot.

``GFT_UPDATE_NOTEBOOK=1`` writes the executed notebook (its outputs) back to examples/, which is
how the outputs kept there were made."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest
from conftest import wait_for
from operator_process import TENSORBOARD_ON_RUNNER, installed, start_operator  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "gemma3-270m-demo"
NOTEBOOK = EXAMPLE / "finetune-from-python.ipynb"


def outputs_of(nb) -> list[str]:
    """Each code cell's outputs as one text (streams, results, errors; images by their type)."""
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type == "error":
                parts.append(f"ERROR {out.ename}: {out.evalue}")
            else:
                data = out.get("data", {})
                parts += [data.get("text/plain", ""), *(k for k in data if k.startswith("image/"))]
        texts.append("\n".join(parts))
    return texts


def check_outputs(nb) -> None:
    """What a reader of the notebook must see: the run followed to Succeeded, the curve, and
    the adapter answering about Pip where the base model does not know it."""
    texts = outputs_of(nb)
    joined = "\n".join(texts)
    assert "ERROR" not in joined, joined[-3000:]
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), counts  # all of it, in order
    follow = next(t for t in texts if "pip-notebook: Succeeded" in t)
    assert "step 20/20" in follow and "100%" in follow, follow[-2000:]
    assert "image/png" in joined  # the loss curve
    answers = next(t for t in texts if "with the adapter:" in t)
    before = answers.split("base Gemma 3 270M:")[1].split("with the adapter:")[0]
    after = answers.split("with the adapter:")[1]
    assert "Pip" in after and "Pip" not in before, answers


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.e2e
# Not in `make test` (make test-notebook runs it): it took 1237 s beside other suites and was cut
# off at 540 s in one full run here, the longest test of the suite by far.
@pytest.mark.notebook
# 20 LoRA steps of the real 270M (128-token rows) and two generations, like the demo's test;
# 1237 s were measured while other suites loaded the 2 cores to 5-12, which no CI run sees.
@pytest.mark.timeout(600)
def test_the_notebook_fine_tunes_gemma_through_the_client(installed, tmp_path_factory, tmp_path,
                                                          monkeypatch):  # fmt: skip
    import nbformat
    from nbclient import NotebookClient

    from devcluster.gemma270m import ensure_model

    model = ensure_model()
    op = start_operator(
        installed, tmp_path_factory, "--metrics-interval", "2", *TENSORBOARD_ON_RUNNER
    )
    ns = f"t-notebook-{uuid.uuid4().hex[:5]}"
    installed.kubectl("create", "namespace", ns)
    installed.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    wait_for("the default ServiceAccount", lambda: installed.kubectl(
        "get", "sa", "default", "-n", ns, check=False).returncode == 0)  # fmt: skip
    # The kernel runs where the notebook lies, beside its dataset; the adapter lands there too.
    work = tmp_path / "example"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("pip-adapter"))
    for name, value in {
        "KUBECONFIG": str(installed.kubeconfig),
        "GFT_NAMESPACE": ns,
        "GFT_MODEL": str(model),
        "GFT_PROVING_GROUND": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    try:
        NotebookClient(nb, timeout=540, kernel_name="python3",
                       resources={"metadata": {"path": str(work)}}).execute()  # fmt: skip
    finally:
        op.kill(signal.SIGTERM)
        installed.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        nbformat.write(nb, tmp_path / "executed.ipynb")
    check_outputs(nb)
    if os.environ.get("GFT_UPDATE_NOTEBOOK") == "1":
        nbformat.write(nb, NOTEBOOK)


def test_the_kept_outputs_are_a_whole_run_of_the_notebook_as_it_is() -> None:
    """The outputs in examples/ come from running every cell of the notebook, in order, and
    show what the notebook is for (the run, the curve, the answers)."""
    import nbformat

    check_outputs(nbformat.read(NOTEBOOK, as_version=4))
