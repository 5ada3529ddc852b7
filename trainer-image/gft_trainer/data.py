"""The dataset: read records, detect their format, render and tokenize them, mask, pack, batch.

Records come from JSONL, JSON or Parquet files (or a hub dataset). Each keeps where it came from
(``file:line``) so that every data error names it. Tokenized examples carry ``labels`` equal to
``input_ids`` on the tokens the model learns and -100 elsewhere (prompts, user turns).

Packing puts several examples into one row with ``position_ids`` restarting at 0 for each example
and no ``attention_mask``; the collator flattens a micro-batch's rows into one, so that
transformers builds a block-diagonal causal mask (eager, SDPA) or runs varlen FlashAttention, and
attention never crosses examples. The first token of each packed
example gets label -100, because its prediction would come from the previous example.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from gft_api.contract import DatasetFormat, DataShaping, DataSource

from gft_trainer.errors import DataError

DEFAULT_CHAT_TEMPLATE = files("gft_trainer").joinpath("gemma_chat_template.jinja").read_text()
GEMMA4_CHAT_TEMPLATE = files("gft_trainer").joinpath("gemma4_chat_template.jinja").read_text()
IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLE_ALIASES = {"model": "assistant", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Record:
    where: str  # "file:line", for error messages
    data: dict[str, Any]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- reading


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given, folders expanded to the data files inside them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in DATA_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder holds no {', '.join(DATA_SUFFIXES)} files")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such dataset file; check dataset.trainFiles/evalFiles")
    return out


def read_file(path: Path) -> list[Record]:
    """The records of one file; malformed content raises ``DataError`` naming file and line."""
    suffix = path.suffix.lower()
    records: list[Record] = []
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw_line in enumerate(f, start=1):
                line = _utf8(raw_line, f"{path}:{n}")
                if not line.strip():
                    continue
                records.append(Record(f"{path}:{n}", _parse_object(line, f"{path}:{n}")))
    elif suffix == ".json":
        raw_bytes = path.read_bytes()
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw_bytes[: e.start].count(b"\n") + 1
            raise DataError(_not_utf8(f"{path}:{line}", raw_bytes, e)) from e
        if not text.strip():
            raise DataError(f"{path}: the file is empty; it must hold a JSON list of records")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if isinstance(raw, dict) and isinstance(raw.get("data"), list):
            raw = raw["data"]
        if not isinstance(raw, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise DataError(
                    f"{path}: record {i}: expected an object, got {type(item).__name__}"
                )
            records.append(Record(f"{path}: record {i}", item))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
        records = [Record(f"{path}: row {i}", row) for i, row in enumerate(rows)]
    else:
        raise DataError(f"{path}: unknown file type; use one of {', '.join(DATA_SUFFIXES)}")
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(where, raw, e)) from e


def _not_utf8(where: str, raw: bytes, e: UnicodeDecodeError) -> str:
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return (
        f"{where}: byte 0x{raw[e.start]:02x} at column {column} is not UTF-8; "
        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _parse_object(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_hub(source: DataSource, split: str) -> list[Record]:
    """Records of a hub dataset split (needs the optional ``datasets`` library)."""
    try:
        import datasets
    except ImportError as e:
        from gft_api.contract import ConfigError

        raise ConfigError(
            "dataset.hubId needs the `datasets` library, which this image lacks; "
            "install gemma-finetune-operator[hub-datasets] or give dataset.trainFiles"
        ) from e
    ds = datasets.load_dataset(source.hub_id, source.hub_config, split=split)
    return [Record(f"{source.hub_id}[{split}]: row {i}", dict(r)) for i, r in enumerate(ds)]


def load_records(source: DataSource, shaping: DataShaping, seed: int) -> tuple[list, list]:
    """Train and eval records: a separate eval source, or ``evalFraction`` held out (seeded)."""
    if source.hub_id:
        train = read_hub(source, source.hub_train_split)
        evals = read_hub(source, source.hub_eval_split) if source.hub_eval_split else None
    elif source.train_files:
        train = [r for p in expand_paths(source.train_files) for r in read_file(p)]
        evals = (
            [r for p in expand_paths(source.eval_files) for r in read_file(p)]
            if source.eval_files
            else None
        )
    else:
        from gft_api.contract import ConfigError

        raise ConfigError("dataset: give trainFiles or hubId")
    if evals is None:
        train, evals = split_eval(train, shaping.eval_fraction, seed)
    return train, evals


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(records) < 2:
        return records, []
    n_eval = min(len(records) - 1, max(1, math.ceil(len(records) * fraction)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


# ---------------------------------------------------------------- formats


def detect_format(record: Record) -> DatasetFormat:
    keys = set(record.data)
    if "messages" in keys:
        return DatasetFormat.CHAT
    if {"prompt", "completion"} <= keys:
        return DatasetFormat.PROMPT_COMPLETION
    if {"instruction", "output"} <= keys:
        return DatasetFormat.ALPACA
    if "text" in keys:
        return DatasetFormat.TEXT
    raise DataError(
        f"{record.where}: cannot tell the format from the fields {sorted(keys)}; expected "
        "`messages` (chat), `prompt`+`completion`, `instruction`+`output` (alpaca) or `text`; "
        "or set data.format"
    )


def _field(record: Record, name: str, fmt: str, optional: bool = False) -> str:
    value = record.data.get(name)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{record.where}: field `{name}` is missing ({fmt} format)")
    if not isinstance(value, str):
        raise DataError(
            f"{record.where}: field `{name}` must be a string, got {type(value).__name__}"
        )
    return value


def to_messages(
    record: Record, fmt: DatasetFormat, keep_system: bool = False
) -> list[dict[str, str]]:
    """A chat or alpaca record as alternating user/assistant messages. A leading system message
    is kept as its own turn where the model has that role (Gemma 4), else folded into the
    first user turn (Gemma 1-3 know only user and model)."""
    if fmt == DatasetFormat.ALPACA:
        instruction = _field(record, "instruction", "alpaca")
        extra = _field(record, "input", "alpaca", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _field(record, "output", "alpaca")},
        ]
    raw = record.data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{record.where}: field `messages` must be a non-empty list (chat format)")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{record.where}: messages[{i}] needs `role` and `content`")
        if not isinstance(m["content"], str):
            raise DataError(f"{record.where}: messages[{i}].content must be a string")
        role = ROLE_ALIASES.get(m["role"], m["role"])
        messages.append({"role": role, "content": m["content"]})
    system: list[dict[str, str]] = []
    if messages[0]["role"] == "system":
        first = messages.pop(0)
        if not messages or messages[0]["role"] != "user":
            raise DataError(f"{record.where}: a system message must be followed by a user message")
        if keep_system:
            system = [first]
        else:
            messages[0] = {
                "role": "user",
                "content": f"{first['content']}\n\n{messages[0]['content']}",
            }
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(
                f"{record.where}: roles out of order at message {i} (after folding a system "
                f"message): expected `{expected}`, got `{m['role']}`; a chat alternates "
                "user/assistant, starting with user (one optional system message first)"
            )
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{record.where}: the chat ends with a user turn; it has nothing to learn")
    return system + messages


# ---------------------------------------------------------------- tokenizing


def end_of_turn(generation: int) -> str:
    """The token that ends a model turn: generation must stop there."""
    return "<turn|>" if generation >= 4 else "<end_of_turn>"


class Tokenizer:
    """What the data pipeline needs from a Hugging Face tokenizer, with the chat template set."""

    def __init__(self, hf_tokenizer: Any, generation: int = 3) -> None:
        self.hf = hf_tokenizer
        if not getattr(hf_tokenizer, "chat_template", None):
            hf_tokenizer.chat_template = (
                GEMMA4_CHAT_TEMPLATE if generation >= 4 else DEFAULT_CHAT_TEMPLATE
            )
        self.system_role = generation >= 4
        if hf_tokenizer.pad_token_id is None:
            hf_tokenizer.pad_token = hf_tokenizer.eos_token
        self.bos_id: int | None = hf_tokenizer.bos_token_id
        self.eos_id: int = hf_tokenizer.eos_token_id
        self.pad_id: int = hf_tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )


def tokenize_chat(tok: Tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render with the chat template turn by turn; label only the model's turns."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tok.render(messages[:k], generation_prompt=True)
            full = tok.render(messages[: k + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template does not render turns as prefixes")
            context, answer = tok.encode(prompt[len(done) :]), tok.encode(full[len(prompt) :])
            ids += context + answer
            labels += [IGNORE_INDEX] * len(context) + answer
            done = full
    if tok.bos_id is not None and ids[:2] == [tok.bos_id, tok.bos_id]:
        raise ValueError("doubled BOS: the chat template and the tokenizer both add one")
    return Example(ids, labels)


def tokenize_record(tok: Tokenizer, record: Record, fmt: DatasetFormat, text_field: str) -> Example:
    if fmt in (DatasetFormat.CHAT, DatasetFormat.ALPACA):
        return tokenize_chat(tok, to_messages(record, fmt, keep_system=tok.system_role))
    bos = [tok.bos_id] if tok.bos_id is not None else []
    if fmt == DatasetFormat.TEXT:
        body = [*tok.encode(_field(record, text_field, "text")), tok.eos_id]
        return Example(bos + body, bos + body)
    prompt = bos + tok.encode(_field(record, "prompt", "prompt-completion"))
    completion = [*tok.encode(_field(record, "completion", "prompt-completion")), tok.eos_id]
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


@dataclass
class Truncation:
    """Examples longer than ``data.maxSeqLength``: all of them, and those whose answer (learned
    tokens) was cut too."""

    examples: int = 0
    answers_cut: int = 0


def tokenize_records(
    tok: Tokenizer, records: Sequence[Record], shaping: DataShaping, cut: Truncation | None = None
) -> list[Example]:
    """Tokenize and truncate; examples left with nothing to learn are dropped."""
    if not records:
        return []
    fmt = shaping.format
    if fmt == DatasetFormat.AUTO:
        fmt = detect_format(records[0])  # read_and_check made sure all records agree
    cut = cut if cut is not None else Truncation()
    limit = shaping.max_seq_length
    out = []
    for r in records:
        ex = _tokenize_one(tok, r, fmt, shaping.text_field)
        if len(ex.input_ids) > limit:
            cut.examples += 1
            cut.answers_cut += any(label != IGNORE_INDEX for label in ex.labels[limit:])
            ex = Example(ex.input_ids[:limit], ex.labels[:limit])
        if any(label != IGNORE_INDEX for label in ex.labels[1:]):
            out.append(ex)
    return out


def _tokenize_one(tok: Tokenizer, record: Record, fmt: DatasetFormat, text_field: str) -> Example:
    """One record; a chat template that cannot render it is the record's fault (exit 65)."""
    from jinja2 import TemplateError

    try:
        return tokenize_record(tok, record, fmt, text_field)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise DataError(
            f"{record.where}: the chat template cannot render this record: {e}; fix the record, "
            "or the chat_template of the model's tokenizer"
        ) from e


# ---------------------------------------------------------------- packing and batching


def pack(examples: Sequence[Example], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy, in order: fill each row up to ``max_len``; positions restart per example."""
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        if row["input_ids"] and len(row["input_ids"]) + len(ex.input_ids) > max_len:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += ex.input_ids
        row["labels"] += [IGNORE_INDEX, *ex.labels[1:]]
        row["position_ids"] += list(range(len(ex.input_ids)))
    if row["input_ids"]:
        rows.append(row)
    return rows


def unpacked(examples: Sequence[Example]) -> list[dict[str, list[int]]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


class Collator:
    """Makes a batch. Packed rows are flattened, padding-free, into one row of the whole
    micro-batch with ``position_ids`` restarting per example and no attention mask: every kernel
    then keeps examples apart (eager and SDPA through the block-diagonal mask transformers builds
    from the positions, FlashAttention-2 through varlen ``cu_seq_lens``, which transformers
    derives from the positions only when the batch holds one row). Unpacked rows are padded."""

    def __init__(self, pad_id: int, token_type_ids: bool = False) -> None:
        self.pad_id = pad_id
        self.token_type_ids = token_type_ids

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if "position_ids" in rows[0]:
            batch = {
                key: [[token for r in rows for token in r[key]]]
                for key in ("input_ids", "labels", "position_ids")
            }
        else:
            batch = self._padded(rows)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.token_type_ids:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out

    def _padded(self, rows: list[dict[str, list[int]]]) -> dict[str, list[list[int]]]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            n = len(r["input_ids"])
            pad = width - n
            batch["input_ids"].append(r["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * n + [0] * pad)
        return batch


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """How many examples a collated batch holds (a flattened packed row holds several)."""
    if "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


@dataclass
class PreparedData:
    train: ListDataset
    eval: ListDataset | None
    train_examples: int
    eval_examples: int
    truncated: Truncation
    format: DatasetFormat


def read_and_check(source: DataSource, shaping: DataShaping, seed: int) -> tuple[list, list]:
    """Read and validate every record before any model is loaded: bad data fails in seconds."""
    train, evals = load_records(source, shaping, seed)
    all_records = sorted([*train, *evals], key=lambda r: _order(r.where))
    fmt = shaping.format if shaping.format != DatasetFormat.AUTO else detect_format(all_records[0])
    for r in all_records:
        check_record(r, fmt, shaping.text_field)
    return train, evals


def _order(where: str) -> tuple[str, int]:
    """Sort key: file order, then line number, so the first bad line is the one reported."""
    head, _, tail = where.rpartition(":")
    digits = "".join(c for c in tail if c.isdigit())
    return (head, int(digits)) if digits else (where, 0)


def check_record(record: Record, fmt: DatasetFormat, text_field: str) -> None:
    if fmt in (DatasetFormat.CHAT, DatasetFormat.ALPACA):
        to_messages(record, fmt)
    elif fmt == DatasetFormat.TEXT:
        _field(record, text_field, "text")
    else:
        _field(record, "prompt", "prompt-completion")
        _field(record, "completion", "prompt-completion")


def prepare(
    tok: Tokenizer, records: tuple[list, list], shaping: DataShaping, packing: bool
) -> PreparedData:
    """From checked records to datasets of rows ready for the collator."""
    train_records, eval_records = records
    truncated = Truncation()
    train = tokenize_records(tok, train_records, shaping, truncated)
    evals = tokenize_records(tok, eval_records, shaping, truncated)
    if not train:
        raise DataError(
            f"{train_records[0].where.rsplit(':', 1)[0]}: no example has anything to learn after "
            f"truncation to {shaping.max_seq_length} tokens (data.maxSeqLength)"
        )
    shape = (lambda ex: pack(ex, shaping.max_seq_length)) if packing else unpacked
    return PreparedData(
        train=ListDataset(shape(train)),
        eval=ListDataset(shape(evals)) if evals else None,
        train_examples=len(train),
        eval_examples=len(evals),
        truncated=truncated,
        format=_format_of(train_records, shaping),
    )


def _format_of(records: Sequence[Record], shaping: DataShaping) -> DatasetFormat:
    if shaping.format != DatasetFormat.AUTO:
        return shaping.format
    return detect_format(records[0])
