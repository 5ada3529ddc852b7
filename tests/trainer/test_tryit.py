"""``gft-try`` (issue 27, item 10): a finished run's adapter answers questions over HTTP, the
base model's answer beside it, each the greedy answer peft and transformers give for the same
prompt; bad questions are refused with what to send; with no question for a while it exits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import wait_for
from dashboard.client import free_port
from gft_api.contract import TrainerConfig
from gft_trainer import data, tryit
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.conftest import REPO, child_env, write_config
from trainer.test_cli import run_cli

pytestmark = pytest.mark.slow  # a run trains, then gft-try loads it in a process of its own


def greedy(model, tok: data.Tokenizer, ids: list[int], stops: list[int], n: int) -> str:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_id,
        )
    row = out[0, len(ids) :].tolist()
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    return tok.hf.decode(row[:end], skip_special_tokens=True)


def test_a_finished_runs_adapter_answers_beside_the_base(tmp_path: Path, tiny_gemma3: Path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        training={"maxSteps": 6, "learningRate": 0.05},
        data={"evalFraction": 0},
    )
    assert run_cli(cfg)[0] == 0
    port = free_port()
    token = "t0ken-only-the-dashboard-knows"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gft_trainer.tryit", "--config", str(cfg), "--address",
         "127.0.0.1", "--port", str(port), "--idle-seconds", "6", "--max-new-tokens", "12"],
        cwd=REPO, env={**child_env(), "GFT_TRY_TOKEN": token}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    key = {"Authorization": f"Bearer {token}"}
    try:

        def up():
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            try:
                return requests.get(f"{base_url}/healthz", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for("gft-try to load the run", up, timeout=120)
        # Any pod of the cluster reaches this port: without the pod's token, nothing is
        # answered (before: another team's pod asked this run's adapter whatever it liked).
        for path in ("/info", "/generate"):
            stranger = requests.request("GET" if path == "/info" else "POST", base_url + path,
                                        json={"prompt": "Capital of Spain?"}, timeout=10,
                                        headers={"Authorization": "Bearer guess"})  # fmt: skip
            assert stranger.status_code == 401, (path, stranger.text)
        info = requests.get(f"{base_url}/info", headers=key, timeout=5).json()
        assert info["artifact"] == str(out / "adapter") and info["chat"] is True
        with requests.post(f"{base_url}/generate", json={"prompt": "Capital of Spain?"},
                           headers=key, stream=True, timeout=60) as r:  # fmt: skip
            lines = [json.loads(line) for line in r.iter_lines() if line]
        said = {m: "".join(x.get("text", "") for x in lines if x.get("model") == m)
                for m in ("tuned", "base")}  # fmt: skip
        ends = {x["model"]: x for x in lines if x.get("done")}
        assert set(ends) == {"tuned", "base"} and ends["tuned"]["tokens"] <= 12, lines
        # The same answers as peft and transformers give for the same prompt, greedily.
        config = TrainerConfig.load(cfg)
        served = tryit.load(config)
        tok = data.Tokenizer(AutoTokenizer.from_pretrained(out / "adapter"), 3)
        ids = served.prompt_ids("Capital of Spain?")
        assert said["tuned"] == greedy(served.model, tok, ids, served.stops, 12)
        # An answer nobody reads any more (the asker went away) stops generating before the
        # next question may use the model (before: its thread went on beside the next one).
        threads = threading.active_count()
        pieces = served.answer("Capital of Spain?", True, 4000)
        next(pieces)
        pieces.close()
        assert threading.active_count() == threads
        plain = AutoModelForCausalLM.from_pretrained(tiny_gemma3)
        assert said["base"] == greedy(plain, tok, ids, served.stops, 12)
        assert said["tuned"] != said["base"], said  # the adapter changed what it says
        refused = requests.post(f"{base_url}/generate", json={"prompt": ""}, headers=key,
                                timeout=10)  # fmt: skip
        assert refused.status_code == 400 and "prompt" in refused.json()["error"]
        # Quiet for --idle-seconds: it ends by itself, with 0.
        started = time.monotonic()
        code = proc.wait(timeout=60)
        said_on_exit = proc.stdout.read()
        assert code == 0, said_on_exit[-3000:]
        assert time.monotonic() - started < 30
        assert "no question for" in said_on_exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
