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


def test_eval_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    assert data.held_out(20, 0.2, seed=1) == data.held_out(20, 0.2, seed=1)
    assert len(data.held_out(20, 0.2, seed=1)) == 4 and data.held_out(1, 0.5, seed=1) == set()
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(20)])
    source = DataSource(train_files=[str(path)])
    records = data.read_and_check(source, DataShaping(eval_fraction=0.2), seed=1)
    train = [r.data["text"] for r in records.train()]
    evals = [r.data["text"] for r in records.eval()]
    assert len(train) == 16 and len(evals) == 4 and not set(train) & set(evals)


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
    # One row per packed row, so that attention costs rows x length^2, never (rows x length)^2:
    # the shorter row is padded at its end, where causal attention keeps every real token from
    # seeing the padding; its positions run on, so the padding starts no example. No mask:
    # transformers keeps the examples of a row apart by their restarting positions.
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[2, 5, 6, 2, 7], [2, 8, 9, 10, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, 8, 9, 10, -100]]
    assert int(data.examples_in(batch)) == 3
    # FlashAttention-2's varlen path: the whole micro-batch as one row, padding-free.
    flat = data.Collator(pad_id=0, flatten=True)(rows)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert flat["labels"].tolist() == [[-100, 5, 6, -100, 7, -100, 8, 9, 10]]
    assert int(data.examples_in(flat)) == 3


def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path: Path) -> None:
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:3: byte 0xe9 at column 14 is not UTF-8"):
        data.read_file(jsonl)
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(b'[\n  {"text": "ok"},\n  {"text": "\xff"}\n]\n')
    with pytest.raises(DataError, match=r"latin1\.json:3: byte 0xff at column 13 is not UTF-8"):
        data.read_file(as_json)


def test_a_record_the_chat_template_refuses_is_a_data_error_naming_it(tmp_path: Path) -> None:
    hf = make_tokenizer()
    hf.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
        "{{ raise_exception('this template refuses the word forbidden') }}{% endif %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            chat(("user", "a"), ("assistant", "b")),
            chat(("user", "a forbidden word"), ("assistant", "b")),
        ],
    )
    records = data.read_and_check(
        DataSource(train_files=[str(path)]), DataShaping(eval_fraction=0.0), 0
    )
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the chat template cannot render") as e:
        data.prepare(data.Tokenizer(hf), records, DataShaping(eval_fraction=0.0), packing=True)
    assert "refuses the word forbidden" in str(e.value)


def test_truncation_is_counted_with_the_answers_it_cut(tok: data.Tokenizer, tmp_path: Path) -> None:
    long_prompt = {"prompt": "word " * 60, "completion": "yes"}  # answer falls past the limit
    long_answer = {"prompt": "q", "completion": "word " * 60}  # answer partly kept
    short = {"prompt": "q", "completion": "a"}
    path = write_jsonl(tmp_path / "pc.jsonl", [short, long_prompt, long_answer, short])
    shaping = DataShaping(eval_fraction=0.0, max_seq_length=32)
    records = data.read_and_check(DataSource(train_files=[str(path)]), shaping, 0)
    prepared = data.prepare(tok, records, shaping, packing=False)
    assert (prepared.truncated.examples, prepared.truncated.answers_cut) == (2, 2)
    # The long prompt lost all of its answer, so nothing is left to learn from it.
    assert prepared.train_examples == 3


SYSTEM_CHAT = chat(("system", "Answer like a pirate."), ("user", "Hi"), ("assistant", "Arr"))


def test_gemma4_keeps_its_system_turn_and_earlier_generations_fold_it() -> None:
    record = data.Record("chat.jsonl:1", SYSTEM_CHAT)
    gemma4 = data.Tokenizer(make_tokenizer("gemma4_text"), generation=4)
    ex = data.tokenize_record(gemma4, record, DatasetFormat.CHAT, "text")
    text = gemma4.hf.decode(ex.input_ids)
    assert text.startswith("<bos><|turn>system\nAnswer like a pirate.<turn|>\n<|turn>user\nHi")
    learned = gemma4.hf.decode(
        [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != -100]
    )
    assert learned == "Arr<turn|>\n"  # only the model's turn, up to its end-of-turn
    gemma3 = data.Tokenizer(make_tokenizer("gemma3_text"), generation=3)
    folded = gemma3.hf.decode(
        data.tokenize_record(gemma3, record, DatasetFormat.CHAT, "text").input_ids
    )
    assert "system" not in folded and "<start_of_turn>user\nAnswer like a pirate.\n\nHi" in folded


def test_gemma4_without_a_template_gets_its_own_turn_format() -> None:
    hf = make_tokenizer("gemma4_text")
    hf.chat_template = None
    tok = data.Tokenizer(hf, generation=4)
    rendered = tok.render(SYSTEM_CHAT["messages"][:2], generation_prompt=True)
    assert rendered.endswith("<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert data.end_of_turn(4) == "<turn|>" and data.end_of_turn(3) == "<end_of_turn>"


def test_tokenized_data_is_cached_and_rebuilt_when_the_file_changes(
    tok: data.Tokenizer, tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(9)]
    )
    shaping = DataShaping(eval_fraction=0.2, max_seq_length=64)
    source = DataSource(train_files=[str(path)])
    cache = tmp_path / "cache"
    first = data.load_prepared(tok, source, shaping, 0, packing=True, cache_dir=cache)
    again = data.load_prepared(tok, source, shaping, 0, packing=True, cache_dir=cache)
    assert (first.from_cache, again.from_cache) == (False, True)
    assert as_lists(again.train) == as_lists(first.train)
    assert again.eval is not None and as_lists(again.eval) == as_lists(first.eval)
    assert (again.train_examples, again.eval_examples) == (7, 2)
    write_jsonl(path, [{"prompt": f"q{i}", "completion": "a"} for i in range(12)])
    changed = data.load_prepared(tok, source, shaping, 0, packing=True, cache_dir=cache)
    assert not changed.from_cache and changed.train_examples + changed.eval_examples == 12
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def as_lists(rows: data.TokenDataset | None) -> list[dict[str, list[int]]]:
    assert rows is not None
    return [{k: v.tolist() for k, v in rows[i].items()} for i in range(len(rows))]


def test_other_ranks_wait_for_rank_zeros_cache(tmp_path: Path, monkeypatch) -> None:
    import threading

    monkeypatch.setenv("RANK", "1")
    folder = tmp_path / "key"
    found: list[bool] = []
    waiter = threading.Thread(target=lambda: found.append(data._await_cache(folder, timeout=30)))
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive()  # still waiting: rank 0 has not written it yet
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    waiter.join(10)
    assert found == [True]
    # Rank 0 could not write it (volume full): the others tokenize for themselves.
    failed = tmp_path / "other"
    failed.with_name("other.failed").touch()
    assert data._await_cache(failed, timeout=30) is False


def test_tokenizing_in_worker_processes_gives_the_same_arrays(
    tok: data.Tokenizer, tmp_path: Path
) -> None:
    rows = [
        chat(("user", f"question {i}" * (i % 7 + 1)), ("assistant", f"answer {i}"))
        for i in range(2500)
    ]
    rows[2100] = chat(("user", "q"), ("assistant", "word " * 80))  # truncated, answer cut
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    shaping = DataShaping(eval_fraction=0.0, max_seq_length=48)
    records = data.read_and_check(DataSource(train_files=[str(path)]), shaping, 0)
    cuts = data.Truncation(), data.Truncation()
    serial = data.tokenize_records(tok, records.train(), records.format, shaping, cuts[0])
    parallel = data.tokenize_records(tok, records.train(), records.format, shaping, cuts[1], 2)
    for name in ("ids", "learn", "offsets"):
        assert (getattr(serial, name) == getattr(parallel, name)).all(), name
    assert cuts[0] == cuts[1] and cuts[0].answers_cut >= 1
    # A record a worker cannot render is still reported by file and line.
    tok.hf.chat_template, template = "{{ raise_exception('no') }}", tok.hf.chat_template
    try:
        with pytest.raises(DataError, match=r"chat\.jsonl:1: the chat template cannot render"):
            data.tokenize_records(tok, records.train(), records.format, shaping, cuts[1], 2)
    finally:
        tok.hf.chat_template = template
