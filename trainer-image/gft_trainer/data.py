"""The dataset: read records, detect their format, render and tokenize them, mask, pack, batch.

Records come from JSONL, JSON or Parquet files (or a hub dataset). Each keeps where it came from
(``file:line``) so that every data error names it. Tokenized examples carry ``labels`` equal to
``input_ids`` on the tokens the model learns and -100 elsewhere (prompts, user turns).

Packing puts several examples into one row with ``position_ids`` restarting at 0 for each example
and no ``attention_mask``; transformers reads the restarts and keeps the examples of a row apart
(a block-diagonal causal mask per row for eager, SDPA and FlexAttention), so attention never
crosses examples and costs rows x length^2. Only FlashAttention-2's varlen path gets the
micro-batch flattened into one row (it reads packing from the positions of a one-row batch
alone, and is linear in length). The first token of each packed example gets label -100,
because its prediction would come from the previous example.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gft_api.contract import DatasetFormat, DataShaping, DataSource

from gft_trainer.errors import DataError

DEFAULT_CHAT_TEMPLATE = files("gft_trainer").joinpath("gemma_chat_template.jinja").read_text()
GEMMA4_CHAT_TEMPLATE = files("gft_trainer").joinpath("gemma4_chat_template.jinja").read_text()
IGNORE_INDEX = -100
log = logging.getLogger("gft")
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
    return list(iter_file(path))


def iter_file(path: Path) -> Iterator[Record]:
    """The records of one file, one at a time (a JSONL file is never held in memory whole)."""
    suffix = path.suffix.lower()
    count = 0
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw_line in enumerate(f, start=1):
                line = _utf8(raw_line, f"{path}:{n}")
                if not line.strip():
                    continue
                count += 1
                yield Record(f"{path}:{n}", _parse_object(line, f"{path}:{n}"))
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
            count += 1
            yield Record(f"{path}: record {i}", item)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches()
            for batch in batches:
                for row in batch.to_pylist():
                    yield Record(f"{path}: row {count}", row)
                    count += 1
        except DataError:
            raise
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    else:
        raise DataError(f"{path}: unknown file type; use one of {', '.join(DATA_SUFFIXES)}")
    if not count:
        raise DataError(f"{path}: the file holds no records")


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


def stream(source: DataSource, split: str) -> Iterator[Record]:
    """The records of the ``train`` or ``eval`` source, read afresh each time."""
    if source.s3 is not None:
        from gft_trainer import s3_data

        yield from s3_data.stream(source.s3, split)
        return
    if source.hub_id:
        hub_split = source.hub_train_split if split == "train" else source.hub_eval_split
        yield from read_hub(source, hub_split or source.hub_train_split)
        return
    for path in expand_paths(source.train_files if split == "train" else source.eval_files):
        yield from iter_file(path)


def has_eval_source(source: DataSource) -> bool:
    if source.s3 is not None:
        return source.s3.eval_key is not None
    return bool(source.eval_files) if not source.hub_id else bool(source.hub_eval_split)


def held_out(count: int, fraction: float, seed: int) -> frozenset[int]:
    """Indices of the train records kept for evaluation: ``fraction`` of them, seeded."""
    if fraction <= 0 or count < 2:
        return frozenset()
    n_eval = min(count - 1, max(1, math.ceil(count * fraction)))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return frozenset(order[:n_eval])


@dataclass(frozen=True)
class Records:
    """Checked records. They are streamed from their source again when tokenized, never all
    held in memory: a million-line JSONL costs its tokens, not its parsed JSON."""

    source: DataSource
    format: DatasetFormat
    train_count: int
    held: frozenset[int]  # train records held out for evaluation (data.evalFraction)

    def train(self) -> Iterator[Record]:
        return (r for i, r in enumerate(stream(self.source, "train")) if i not in self.held)

    def eval(self) -> Iterator[Record]:
        if has_eval_source(self.source):
            return stream(self.source, "eval")
        return (r for i, r in enumerate(stream(self.source, "train")) if i in self.held)


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
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer itself: a third of the time of the wrapper
            return backend.encode(text, add_special_tokens=False).ids
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
    tok: Tokenizer,
    records: Iterable[Record],
    fmt: DatasetFormat,
    shaping: DataShaping,
    cut: Truncation,
    workers: int = 1,
) -> Tokens:
    """Tokenize and truncate into flat arrays; examples left with nothing to learn are dropped.
    With ``workers`` > 1, chunks of records are tokenized in that many processes, in order."""
    ids, learn, offsets = array("i"), array("b"), array("q", [0])
    if workers > 1:
        import multiprocessing

        # spawn, not fork: this process already runs torch's threads and holds the model.
        context = multiprocessing.get_context("spawn")
        job = (fmt, shaping.text_field, shaping.max_seq_length)
        with context.Pool(workers, _init_worker, (tok, job)) as pool:
            parts = pool.imap(_tokenize_chunk, _chunks(records, 1000))
            for part_ids, part_learn, lengths, part_cut in parts:
                ids.frombytes(part_ids)
                learn.frombytes(part_learn)
                offsets.extend(np.cumsum(lengths, dtype=np.int64) + offsets[-1])
                cut.examples += part_cut[0]
                cut.answers_cut += part_cut[1]
    else:
        tokenize_into(
            tok, records, fmt, shaping.text_field, shaping.max_seq_length, ids, learn, offsets, cut
        )
    return Tokens(
        np.frombuffer(ids, dtype=np.int32),
        np.frombuffer(learn, dtype=np.int8),
        np.frombuffer(offsets, dtype=np.int64),
    )


def tokenize_into(
    tok: Tokenizer,
    records: Iterable[Record],
    fmt: DatasetFormat,
    text_field: str,
    limit: int,
    ids: array,
    learn: array,
    offsets: array,
    cut: Truncation,
) -> None:
    for r in records:
        ex = _tokenize_one(tok, r, fmt, text_field)
        if len(ex.input_ids) > limit:
            cut.examples += 1
            cut.answers_cut += any(label != IGNORE_INDEX for label in ex.labels[limit:])
            ex = Example(ex.input_ids[:limit], ex.labels[:limit])
        if any(label != IGNORE_INDEX for label in ex.labels[1:]):
            ids.extend(ex.input_ids)
            learn.extend(label != IGNORE_INDEX for label in ex.labels)
            offsets.append(len(ids))


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER: dict[str, Any] = {}


def _init_worker(tok: Tokenizer, job: tuple[DatasetFormat, str, int]) -> None:
    _WORKER.update(tok=tok, job=job)


def _tokenize_chunk(chunk: list[Record]) -> tuple[bytes, bytes, list[int], tuple[int, int]]:
    fmt, text_field, limit = _WORKER["job"]
    ids, learn, offsets, cut = array("i"), array("b"), array("q", [0]), Truncation()
    tokenize_into(_WORKER["tok"], chunk, fmt, text_field, limit, ids, learn, offsets, cut)
    lengths = np.diff(np.frombuffer(offsets, dtype=np.int64)).tolist()
    return ids.tobytes(), learn.tobytes(), lengths, (cut.examples, cut.answers_cut)


def data_workers(records: int) -> int:
    """Processes to tokenize with: the CPUs this container may use (its cgroup quota, else its
    affinity), at most 8, and one for small datasets (starting workers costs seconds)."""
    if records < 20_000:
        return 1
    return max(1, min(cpu_count(), 8))


def cpu_count() -> int:
    """The CPUs this container may use: its cgroup quota, else its affinity."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    return cpus


def loader_workers(cpus: int, ranks: int) -> int:
    """DataLoader worker processes per rank on a GPU: the CPUs left after one per rank, shared
    among the ranks, at most 4 (a batch is a few array copies; more workers only hold memory)."""
    return max(0, min(4, (cpus - ranks) // ranks))


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


@dataclass(frozen=True)
class Tokens:
    """Tokenized examples in flat arrays: 4 bytes a token and 1 for its label (a Python list of
    ints costs about 40). Example ``i`` is ``ids[offsets[i]:offsets[i + 1]]``; its label at a
    position is the token where ``learn`` is 1, else -100."""

    ids: np.ndarray  # int32
    learn: np.ndarray  # int8
    offsets: np.ndarray  # int64, one more than there are examples

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def of(cls, examples: Sequence[Example]) -> Tokens:
        ids = [t for e in examples for t in e.input_ids]
        learn = [label != IGNORE_INDEX for e in examples for label in e.labels]
        offsets = np.cumsum([0, *(len(e.input_ids) for e in examples)])
        return cls(np.array(ids, np.int32), np.array(learn, np.int8), offsets.astype(np.int64))


def pack_bounds(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Greedy, in order: fill each row up to ``max_len``. Row ``r`` holds examples
    ``bounds[r]:bounds[r + 1]``."""
    bounds, fill = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if fill and fill + n > max_len:
            bounds.append(i)
            fill = 0
        fill += n
    bounds.append(len(lengths))
    return np.array(bounds if len(lengths) else [0], dtype=np.int64)


class TokenDataset(torch.utils.data.Dataset):
    """Rows made on demand from the flat arrays: one example each, or several packed, with
    ``position_ids`` restarting at 0 per example and the first token of each example unlabelled
    (its prediction would come from the previous example). Rows are int64 arrays, which the
    collator turns into tensors without a Python list in between."""

    def __init__(self, tokens: Tokens, bounds: np.ndarray, packed: bool) -> None:
        self.tokens = tokens
        self.bounds = bounds
        self.packed = packed

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        first, last = int(self.bounds[i]), int(self.bounds[i + 1])
        starts = self.tokens.offsets[first : last + 1]
        lo, hi = int(starts[0]), int(starts[-1])
        ids = self.tokens.ids[lo:hi].astype(np.int64)
        labels = np.where(self.tokens.learn[lo:hi] == 1, ids, IGNORE_INDEX)
        if not self.packed:
            return {"input_ids": ids, "labels": labels}
        begins = starts[:-1] - lo
        labels[begins] = IGNORE_INDEX
        position = np.arange(hi - lo) - np.repeat(begins, np.diff(starts))
        return {"input_ids": ids, "labels": labels, "position_ids": position}


def rows(tokens: Tokens, packing: bool, max_len: int) -> TokenDataset:
    if packing:
        return TokenDataset(tokens, pack_bounds(np.diff(tokens.offsets), max_len), packed=True)
    return TokenDataset(tokens, np.arange(len(tokens) + 1, dtype=np.int64), packed=False)


def pack(examples: Sequence[Example], max_len: int) -> list[dict[str, list[int]]]:
    """The packed rows of ``examples`` (as the trainer makes them), as lists."""
    dataset = rows(Tokens.of(examples), True, max_len)
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]


def unpacked(examples: Sequence[Example]) -> list[dict[str, list[int]]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def flattens(attention: str) -> bool:
    """Whether a micro-batch of packed rows is flattened into one row for this attention kernel:
    only for FlashAttention-2, whose varlen path is linear in length but reads the packing from
    the positions of a one-row batch alone. For eager, SDPA and FlexAttention one long row would
    make attention cost (rows x length)^2 instead of rows x length^2."""
    return attention == "flash_attention_2"


class Collator:
    """Makes a batch (CPU tensors; with DataLoader workers, in the workers). Packed rows stay
    rows: each padded at its end to the micro-batch's longest, with positions running on
    through the padding and no attention mask. Causal attention keeps every real token from
    seeing the padding after it, and transformers keeps a row's examples apart by their
    restarting positions, so attention costs rows x length^2. With ``flatten`` (FlashAttention-2
    varlen) the rows are joined, padding-free, into one row instead. Unpacked rows are padded
    with an attention mask."""

    def __init__(self, pad_id: int, token_type_ids: bool = False, flatten: bool = False) -> None:
        self.pad_id = pad_id
        self.token_type_ids = token_type_ids
        self.flatten = flatten

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels", "position_ids")
        if "position_ids" not in rows[0]:
            out = self._padded(rows)
        elif self.flatten:
            out = {k: np.concatenate([np.asarray(r[k]) for r in rows])[None] for k in keys}
        else:
            width = max(len(r["input_ids"]) for r in rows)
            out = {
                "input_ids": np.full((len(rows), width), self.pad_id, dtype=np.int64),
                "labels": np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64),
                "position_ids": np.empty((len(rows), width), dtype=np.int64),
            }
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                out["input_ids"][i, :n] = r["input_ids"]
                out["labels"][i, :n] = r["labels"]
                out["position_ids"][i, :n] = r["position_ids"]
                # The padding continues the last example's positions: it starts no example.
                last = out["position_ids"][i, n - 1]
                out["position_ids"][i, n:] = np.arange(last + 1, last + 1 + width - n)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        if self.token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch

    def _padded(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {
            "input_ids": np.full((len(rows), width), self.pad_id, dtype=np.int64),
            "labels": np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64),
            "attention_mask": np.zeros((len(rows), width), dtype=np.int64),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = r["input_ids"]
            out["labels"][i, :n] = r["labels"]
            out["attention_mask"][i, :n] = 1
        return out


def examples_in(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """How many examples a collated batch holds: for packed rows a tensor on the batch's device
    (counting it there costs no wait for the GPU; read it when logging)."""
    if "position_ids" in batch:
        return (batch["position_ids"] == 0).sum()
    return int(batch["input_ids"].shape[0])


@dataclass
class PreparedData:
    train: TokenDataset
    eval: TokenDataset | None
    train_examples: int
    eval_examples: int
    truncated: Truncation
    format: DatasetFormat
    from_cache: bool = False


def read_and_check(source: DataSource, shaping: DataShaping, seed: int) -> Records:
    """Read and validate every record before any model is loaded: bad data fails in seconds,
    at the first bad record, named by file and line."""
    if not (source.hub_id or source.train_files or source.s3):
        from gft_api.contract import ConfigError

        raise ConfigError("dataset: give trainFiles, hubId or s3")
    fmt = shaping.format if shaping.format != DatasetFormat.AUTO else None
    count = 0
    for r in stream(source, "train"):
        fmt = fmt or detect_format(r)
        check_record(r, fmt, shaping.text_field)
        count += 1
    separate = has_eval_source(source)
    if separate:
        for r in stream(source, "eval"):
            check_record(r, fmt or detect_format(r), shaping.text_field)
    held = frozenset() if separate else held_out(count, shaping.eval_fraction, seed)
    return Records(source, fmt or DatasetFormat.TEXT, count, held)


def check_record(record: Record, fmt: DatasetFormat, text_field: str) -> None:
    if fmt in (DatasetFormat.CHAT, DatasetFormat.ALPACA):
        to_messages(record, fmt)
    elif fmt == DatasetFormat.TEXT:
        _field(record, text_field, "text")
    else:
        _field(record, "prompt", "prompt-completion")
        _field(record, "completion", "prompt-completion")


def prepare(
    tok: Tokenizer,
    records: Records,
    shaping: DataShaping,
    packing: bool,
    cache_dir: Path | None = None,
) -> PreparedData:
    """From checked records to datasets of rows ready for the collator. With ``cache_dir`` the
    tokenized arrays are kept there (built by rank 0, memory-mapped by every rank and by a
    resumed run), keyed by everything that decides them."""
    key = cache_key(tok, records, shaping)
    folder = cache_dir / key if cache_dir else None
    cached = folder is not None and _await_cache(folder)
    if cached:
        train, evals, cut = _read_cache(folder)
    else:
        cut = Truncation()
        workers = data_workers(records.train_count)
        train = tokenize_records(tok, records.train(), records.format, shaping, cut, workers)
        evals = tokenize_records(tok, records.eval(), records.format, shaping, cut)
        if folder is not None and _rank() == 0:
            _write_cache(folder, train, evals, cut)
    if not len(train):
        s3 = records.source.s3
        where = records.source.hub_id or (s3.uri() if s3 else ", ".join(records.source.train_files))
        raise DataError(
            f"{where}: no example has anything to learn after truncation to "
            f"{shaping.max_seq_length} tokens (data.maxSeqLength)"
        )
    return PreparedData(
        train=rows(train, packing, shaping.max_seq_length),
        eval=rows(evals, packing, shaping.max_seq_length) if len(evals) else None,
        train_examples=len(train),
        eval_examples=len(evals),
        truncated=cut,
        format=records.format,
        from_cache=cached,
    )


def load_prepared(
    tok: Tokenizer,
    source: DataSource,
    shaping: DataShaping,
    seed: int,
    packing: bool,
    cache_dir: Path | None = None,
) -> PreparedData:
    return prepare(tok, read_and_check(source, shaping, seed), shaping, packing, cache_dir)


# ---------------------------------------------------------------- the tokenization cache

CACHE_VERSION = 1
_ARRAYS = ("ids", "learn", "offsets")


def cache_key(tok: Tokenizer, records: Records, shaping: DataShaping) -> str:
    """Everything the tokenized arrays depend on: the data files as they are now (path, size,
    modification time), the split, the tokenizer's vocabulary and template, the shaping."""
    source = records.source
    files = [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
        for p in expand_paths([*source.train_files, *source.eval_files])
    ]
    if source.s3 is not None:  # the objects' versions, as the files' sizes and times above
        from gft_trainer import s3_data

        files += s3_data.fingerprint(source.s3)
    h = hashlib.sha256()
    for part in (
        CACHE_VERSION,
        source.model_dump_json(),
        files,
        records.format.value,
        sorted(records.held),
        shaping.model_dump_json(),
        tok.hf.chat_template,
        tok.system_role,
        (tok.bos_id, tok.eos_id, tok.pad_id),
        tok.hf.backend_tokenizer.to_str() if hasattr(tok.hf, "backend_tokenizer") else "",
    ):
        h.update(json.dumps(part, default=str).encode())
    return h.hexdigest()[:24]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _await_cache(folder: Path, timeout: float = 6 * 3600) -> bool:
    """Rank 0 builds the cache; the other ranks wait for it rather than tokenize again (if
    rank 0 fails, torchrun stops them). True when the cache is there to read."""
    failed = folder.with_name(folder.name + ".failed")
    deadline = time.monotonic() + timeout
    while True:
        if (folder / "meta.json").exists():
            return True
        if _rank() == 0 or failed.exists() or time.monotonic() > deadline:
            return False
        time.sleep(1)


def _read_cache(folder: Path) -> tuple[Tokens, Tokens, Truncation]:
    meta = json.loads((folder / "meta.json").read_text())
    splits = [
        Tokens(*(np.load(folder / f"{split}-{a}.npy", mmap_mode="r") for a in _ARRAYS))
        for split in ("train", "eval")
    ]
    return splits[0], splits[1], Truncation(**meta["truncated"])


def _write_cache(folder: Path, train: Tokens, evals: Tokens, cut: Truncation) -> None:
    """Written beside, then renamed into place: a reader sees the whole cache or none."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for split, tokens in (("train", train), ("eval", evals)):
            for a in _ARRAYS:
                np.save(tmp / f"{split}-{a}.npy", getattr(tokens, a))
        meta = {"version": CACHE_VERSION, "truncated": asdict(cut)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    except OSError as e:
        log.warning("could not keep the tokenized data in %s (%s); training on without", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.with_name(folder.name + ".failed").touch()
