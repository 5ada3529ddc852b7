"""Data: formats, chat template and masking, packing, and bad input named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gft_api.contract import DatasetFormat, DataShaping, DataSource
from gft_trainer import data
from gft_trainer.errors import DataError

from trainer.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tok() -> data.Tokenizer:
    return data.Tokenizer(make_tokenizer())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_formats_are_detected_from_keys() -> None:
    cases = {
        DatasetFormat.CHAT: {"messages": []},
        DatasetFormat.PROMPT_COMPLETION: {"prompt": "a", "completion": "b"},
        DatasetFormat.ALPACA: {"instruction": "a", "input": "", "output": "b"},
        DatasetFormat.TEXT: {"text": "a"},
    }
    for fmt, rec in cases.items():
        assert data.detect_format(data.Record("f:1", rec)) == fmt
    with pytest.raises(DataError, match=r"f:3: cannot tell the format"):
        data.detect_format(data.Record("f:3", {"foo": 1}))


def test_chat_loss_only_on_model_turns_and_one_bos(tok: data.Tokenizer) -> None:
    rec = data.Record(
        "f:1",
        chat(
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Bye"),
            ("assistant", "Goodbye"),
        ),
    )
    ex = data.tokenize_chat(tok, data.to_messages(rec, DatasetFormat.CHAT))
    # Same tokens as the template renders for the whole chat, with a single BOS.
    full = tok.render(data.to_messages(rec, DatasetFormat.CHAT))
    assert tok.hf.decode(ex.input_ids) == full
    assert ex.input_ids.count(tok.bos_id) == 1 and ex.input_ids[0] == tok.bos_id
    # The system message is folded into the first user turn.
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>" in full
    trained = tok.hf.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != data.IGNORE_INDEX]
    )
    assert trained == "Hello<end_of_turn>\nGoodbye<end_of_turn>\n"


def test_prompt_completion_and_text_masks(tok: data.Tokenizer) -> None:
    pc = data.tokenize_record(
        tok,
        data.Record("f:1", {"prompt": "Q?", "completion": " A."}),
        DatasetFormat.PROMPT_COMPLETION,
        "text",
    )
    learned = [t for t, lab in zip(pc.input_ids, pc.labels, strict=True) if lab != -100]
    assert tok.hf.decode(learned) == " A.<eos>"
    text = data.tokenize_record(
        tok, data.Record("f:1", {"body": "hello"}), DatasetFormat.TEXT, "body"
    )
    assert text.labels == text.input_ids and text.input_ids[-1] == tok.eos_id


def test_alpaca_becomes_a_chat(tok: data.Tokenizer) -> None:
    rec = data.Record("f:1", {"instruction": "Add", "input": "2 and 3", "output": "5"})
    msgs = data.to_messages(rec, DatasetFormat.ALPACA)
    assert msgs == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_read_json_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    pq.write_table(pa.Table.from_pylist([{"text": "z"}]), tmp_path / "b.parquet")
    recs = [r for p in data.expand_paths([str(tmp_path)]) for r in data.read_file(p)]
    assert [r.data["text"] for r in recs] == ["x", "y", "z"]
    assert recs[2].where.endswith("b.parquet: row 0")


def test_eval_split_is_seeded_and_disjoint() -> None:
    recs = [data.Record(f"f:{i}", {"text": str(i)}) for i in range(20)]
    a = data.split_eval(recs, 0.2, seed=1)
    b = data.split_eval(recs, 0.2, seed=1)
    assert a == b and len(a[1]) == 4 and not set(map(id, a[0])) & set(map(id, a[1]))


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (
            [chat(("user", "a"), ("assistant", "b")), '{"messages": [oops'],
            r"bad\.jsonl:2: not valid JSON",
        ),
        (
            [{"instruction": "a", "output": "b"}, {"instruction": "c"}],
            r"bad\.jsonl:2: field `output` is missing",
        ),
        ([], r"bad\.jsonl: the file holds no records"),
        (
            [chat(("user", "a"), ("assistant", "b")), chat(("assistant", "b"), ("user", "a"))],
            r"bad\.jsonl:2: roles out of order at message 0",
        ),
        (
            [chat(("user", "a"), ("user", "b"), ("assistant", "c"))],
            r"bad\.jsonl:1: roles out of order at message 1",
        ),
    ],
    ids=["malformed-line", "missing-field", "empty-file", "roles-reversed", "two-user-turns"],
)
def test_bad_input_names_file_and_line(tmp_path: Path, rows: list, pattern: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows) if rows else tmp_path / "bad.jsonl"
    if not rows:
        path.write_text("")
    source = DataSource(train_files=[str(path)])
    with pytest.raises(DataError, match=pattern):
        data.read_and_check(source, DataShaping(eval_fraction=0.0), seed=0)


def test_packing_restarts_positions_and_masks_boundaries() -> None:
    exs = [
        data.Example([2, 5, 6], [2, 5, 6]),
        data.Example([2, 7], [-100, 7]),
        data.Example([2, 8, 9, 10], [2, 8, 9, 10]),
    ]
    rows = data.pack(exs, max_len=6)
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    assert rows[0]["labels"] == [-100, 5, 6, -100, 7]
    batch = data.Collator(pad_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]
    assert batch["labels"][1].tolist()[-1] == -100
