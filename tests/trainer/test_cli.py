"""``gft-train`` from the user's side: exit codes, termination message, artifacts, resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from gft_api.contract import NON_RETRYABLE_EXIT_CODES, ExitCode, TrainerSummary
from gft_trainer import checkpoints, cli
from transformers import AutoTokenizer

from trainer.conftest import CHAT, run_gft_train, write_config
from trainer.tiny import make_model_dir


def run_cli(config: Path) -> tuple[int, TrainerSummary]:
    cfg = yaml.safe_load(config.read_text())
    code = cli.main(["--config", str(config)])
    text = Path(cfg["observability"]["terminationMessagePath"]).read_text()
    summary = TrainerSummary.from_termination_message(text)
    assert summary is not None and summary.exit_code == code
    return code, summary


def test_help_explains_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "75 stopped by SIGTERM" in out


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {nameOrPath: x}\ndataset: {}\ntraining: {maxSteps: 0}\noutput: {dir: /tmp/x}\n"
    )
    term = tmp_path / "term"
    assert cli.main(["--config", str(cfg), "--termination-message-path", str(term)]) == 78
    summary = TrainerSummary.from_termination_message(term.read_text())
    assert summary.reason == "InvalidConfig" and "training.maxSteps" in summary.message


BAD_CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"'


@pytest.mark.parametrize(
    ("case", "expected", "pattern"),
    [
        ("malformed-line", ExitCode.DATA_ERROR, r"bad\.jsonl:3: not valid JSON"),
        ("missing-field", ExitCode.DATA_ERROR, r"bad\.jsonl:2: field `output` is missing"),
        ("empty-file", ExitCode.DATA_ERROR, r"bad\.jsonl: the file holds no records"),
        ("roles-out-of-order", ExitCode.DATA_ERROR, r"bad\.jsonl:2: roles out of order"),
        ("not-utf8", ExitCode.DATA_ERROR, r"bad\.jsonl:3: byte 0xe9 at column 41 is not UTF-8"),
        ("no-model", ExitCode.MODEL_NOT_FOUND, r"model\.nameOrPath: .*does-not-exist"),
        ("fp16-gemma3", ExitCode.CONFIG_ERROR, r"training\.precision: fp16"),
    ],
)
def test_bad_input_fails_fast_and_non_retryable(
    tmp_path: Path, tiny_gemma3: Path, case: str, expected: ExitCode, pattern: str
) -> None:
    good = CHAT.read_text().splitlines()
    lines = {
        "malformed-line": [*good[:2], BAD_CHAT],
        "missing-field": [
            '{"instruction": "a", "output": "b"}',
            '{"instruction": "a", "input": ""}',
        ],
        "empty-file": [],
        "roles-out-of-order": [
            good[0],
            '{"messages": [{"role": "assistant", "content": "a"}, '
            '{"role": "user", "content": "b"}]}',
        ],
    }.get(case, good)
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    if case == "not-utf8":  # a Latin-1 "é" inside the third record
        bad = '{"text": "fine"}\n{"text": "fine"}\n{"text": "a record saved as Latin-1: caf\xe9"}\n'
        data.write_bytes(bad.encode("latin-1"))
    model = tmp_path / "does-not-exist" if case == "no-model" else tiny_gemma3
    extra = {"training": {"precision": "fp16"}} if case == "fp16-gemma3" else {}
    cfg = write_config(
        tmp_path / "c.yaml", model, tmp_path / "out", dataset={"trainFiles": [str(data)]}, **extra
    )
    code, summary = run_cli(cfg)
    assert code == expected and code in NON_RETRYABLE_EXIT_CODES
    assert re.search(pattern, summary.message), summary.message


def test_lora_run_saves_adapter_and_resumes_past_truncated_checkpoint(
    tmp_path: Path, tiny_gemma3: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        method={"type": "lora", "mergeAdapter": True, "lora": {"r": 4}},
        training={"maxSteps": 6, "evalEverySteps": 3},
        output={"dir": str(out), "checkpointEverySteps": 2, "keepCheckpoints": 2},
    )
    code, summary = run_cli(cfg)
    assert code == 0 and summary.outcome == "Succeeded" and summary.global_step == 6
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "chat_template.jinja").exists()
    assert (out / "merged" / "config.json").exists() and "merged" in summary.artifacts
    # Trained on chats: generation stops at <end_of_turn> (the tiny base stops only at EOS).
    end_of_turn = AutoTokenizer.from_pretrained(tiny_gemma3).convert_tokens_to_ids("<end_of_turn>")
    for folder in ("adapter", "merged"):
        gen = json.loads((out / folder / "generation_config.json").read_text())
        assert end_of_turn in gen["eos_token_id"] and 1 in gen["eos_token_id"], (folder, gen)
    assert json.loads((out / "summary.json").read_text())["globalStep"] == 6
    assert summary.eval_loss is not None and summary.eval_token_accuracy is not None
    ckpts = [p.name for p in checkpoints.all_checkpoints(out / "checkpoints")]
    assert ckpts == ["checkpoint-4", "checkpoint-6"]  # keep 2
    # Pretend the pod was killed while writing step 6: its marker is missing. A rerun with more
    # steps resumes from step 4 (the newest valid), not 0 and not 6.
    (out / "checkpoints" / "checkpoint-6" / checkpoints.MARKER).unlink()
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        out,
        training={"maxSteps": 8},
        output={"dir": str(out), "checkpointEverySteps": 2, "keepCheckpoints": 2},
    )
    capfd.readouterr()
    code, summary = run_cli(cfg)
    log = capfd.readouterr().out
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert code == 0 and summary.global_step == 8
    assert logged == [2, 4, 6, 8]  # history continues from the checkpoint of step 4
    # The resumed run read the tokenized data back instead of tokenizing again.
    assert "read from data-cache" in log, log
    assert len([p for p in (out / "data-cache").iterdir() if not p.name.startswith(".")]) == 1


def test_full_finetune_of_multimodal_gemma3(tmp_path: Path, tiny_models: Path) -> None:
    model = make_model_dir(tiny_models, "gemma3")
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        model,
        out,
        method={"type": "full"},
        training={"maxSteps": 2, "loggingEverySteps": 1},
        data={"packing": False, "evalFraction": 0.0},
        output={"dir": str(out), "checkpointEverySteps": 0},
    )
    code, summary = run_cli(cfg)
    assert code == 0 and summary.artifacts == {"model": str(out / "model")}
    assert (out / "model" / "config.json").exists()
    # fp32 master weights: the saved full model is fp32 whatever the compute precision.
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float32"
    shutil.rmtree(out)


def test_the_seed_decides_the_adapter_whatever_ran_before(
    tmp_path: Path, tiny_gemma3: Path
) -> None:
    """training.seed decides the adapter's initial weights: two runs in one process with the
    same seed train the same adapter (the second once started from the generator's state the
    first left behind)."""
    from safetensors.torch import load_file

    adapters = []
    for name in ("a", "b"):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_gemma3, out, training={"maxSteps": 2})
        assert run_cli(cfg)[0] == 0
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    first, second = adapters
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_a_gpu_pod_without_a_usable_gpu_stops_instead_of_training_on_the_cpu(
    tmp_path: Path, tiny_gemma3: Path
) -> None:
    # This machine has no GPU: as a pod given one whose driver torch cannot use would be.
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_gemma3, out, resources={"gpus": 1})
    done = run_gft_train(cfg)
    log = done.stdout + done.stderr
    assert done.returncode == ExitCode.UNSUPPORTED, log[-3000:]
    assert "resources.gpus: 1 GPU asked for, but CUDA is not usable" in log
    assert "needs 580.65.06 or newer" in log or "no NVIDIA driver is visible" in log, log[-2000:]
    assert not (out / "checkpoints").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exitCode"] == ExitCode.UNSUPPORTED and "resources.gpus" in summary["message"]
