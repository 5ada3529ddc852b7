"""Sample answers at each evaluation: what the model now says to a few fixed prompts.

The prompts are the ones the user gave, then the first evaluation records (their last model
turn, or their completion, is the reference). Answers are greedy, so two evaluations differ
only because the weights did. A time budget bounds the answers (``maxSeconds`` per evaluation,
``maxShare`` of the run's wall time in all), so samples never make a run slow: prompts left when
it runs out are skipped and counted, and an answer it cuts short says so (``truncated:
timeBudget``) and is not scored. An answer is never cut silently: one that reached
``maxNewTokens`` says that too, and the run's final answers (``whole``) get no time budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from gft_api.contract import Sample, trim
from gft_api.training import DatasetFormat, Samples

from gft_trainer import data

log = logging.getLogger("gft")

BATCH = 8
"""Prompts answered in one ``generate`` call."""


@dataclass(frozen=True)
class Prompt:
    shown: str
    """What a reader sees as the prompt: the last user turn, or the raw prompt."""
    ids: list[int]
    reference: str | None = None


@dataclass
class Answers:
    samples: list[Sample] = field(default_factory=list)
    """The shown ones (the first ``count`` prompts)."""
    exact_match: float | None = None
    scored: int = 0
    """Evaluation records answered and compared for exact match."""
    skipped: int = 0
    """Prompts left unanswered when the time budget ran out."""
    seconds: float = 0.0


def chat_format(fmt: DatasetFormat) -> bool:
    return fmt in (DatasetFormat.CHAT, DatasetFormat.ALPACA)


def fixed_prompt(tok: data.Tokenizer, text: str, fmt: DatasetFormat) -> Prompt:
    """A prompt from ``training.samples.prompts``: a user turn for chat-trained models."""
    if chat_format(fmt):
        rendered = tok.render([{"role": "user", "content": text}], generation_prompt=True)
        return Prompt(text, tok.encode(rendered))
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return Prompt(text, bos + tok.encode(text))


def record_prompt(tok: data.Tokenizer, record: data.Record, fmt: DatasetFormat) -> Prompt | None:
    """A prompt from an evaluation record, its answer the reference; ``None`` for plain text,
    which has no question to ask."""
    if chat_format(fmt):
        messages = data.to_messages(record, fmt, keep_system=tok.system_role)
        rendered = tok.render(messages[:-1], generation_prompt=True)
        return Prompt(messages[-2]["content"], tok.encode(rendered), messages[-1]["content"])
    if fmt == DatasetFormat.PROMPT_COMPLETION:
        text = record.data["prompt"]
        bos = [tok.bos_id] if tok.bos_id is not None else []
        return Prompt(text, bos + tok.encode(text), record.data["completion"])
    return None


def collect(
    tok: data.Tokenizer,
    settings: Samples,
    fmt: DatasetFormat,
    eval_records: Iterable[data.Record],
) -> list[Prompt]:
    """The fixed prompts, then as many evaluation records as samples and exact match need."""
    fixed = [fixed_prompt(tok, p, fmt) for p in settings.prompts[: settings.count]]
    wanted = max(settings.count - len(fixed), settings.exact_match_examples)
    from_records: list[Prompt] = []
    if wanted:
        for record in eval_records:
            prompt = record_prompt(tok, record, fmt)
            if prompt is None:
                break
            from_records.append(prompt)
            if len(from_records) >= wanted:
                break
    return fixed + from_records


def exact(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


class Sampler:
    """Answers the prompts with the model as it is now, within the time budget."""

    def __init__(
        self,
        tok: data.Tokenizer,
        prompts: list[Prompt],
        settings: Samples,
        stops: list[int],
        max_len: int,
        on_answers: Callable[[int, list[Sample]], None] | None = None,
        started: float | None = None,
    ) -> None:
        """``started``: when the run began (``time.monotonic()``), for ``maxShare``."""
        self.tok = tok
        self.settings = settings
        self.stops = stops or [tok.eos_id]
        self.fixed = min(len(settings.prompts), settings.count)
        keep = max(1, max_len - settings.max_new_tokens)
        # The end of a long prompt matters most: it holds the question being asked.
        self.prompts = [Prompt(p.shown, p.ids[-keep:], p.reference) for p in prompts]
        self.on_answers = on_answers
        self.started = time.monotonic() if started is None else started
        self.spent = 0.0

    def budget(self) -> float:
        """Seconds this evaluation's answers may take: ``maxSeconds``, and no more than keeps
        all answers so far within ``maxShare`` of the run's wall time."""
        elapsed = time.monotonic() - self.started
        return min(self.settings.max_seconds, self.settings.max_share * elapsed - self.spent)

    def answer(
        self, model: Any, prompts: list[list[int]], seconds: float | None
    ) -> list[tuple[str, str | None]]:
        """Greedy answers to a batch of prompts, left-padded into one ``generate`` call (a
        batch costs about what one prompt does, where decoding is bound by reading the
        weights), each with what cut it short (see ``cut_by``); ``seconds`` None: no time
        limit."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stops,
            pad_token_id=self.tok.pad_id,
            use_cache=True,
            max_time=seconds,
        )
        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        ids = torch.tensor([[self.tok.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        answers = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.stops), len(row))
            text = self.tok.hf.decode(row[:end], skip_special_tokens=True)
            answers.append((text, cut_by(row, self.stops, self.settings.max_new_tokens)))
        return answers

    def run(self, model: Any, step: int, whole: bool = False) -> Answers:
        """Answer the prompts within the budget. ``whole``: only the shown ones, each in full
        (up to ``maxNewTokens``) whatever the budget: the run's last answers, after training,
        cost the run nothing it could have trained with."""
        start = time.monotonic()
        deadline = None if whole else start + self.budget()
        prompts = self.prompts[: self.settings.count] if whole else self.prompts
        result = Answers()
        texts: list[tuple[str, str | None]] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for first in range(0, len(prompts), BATCH):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        result.skipped = len(prompts) - first
                        break
                    batch = prompts[first : first + BATCH]
                    texts += self.answer(model, [p.ids for p in batch], left)
        finally:
            model.train(was_training)
        hits = 0
        for i, (prompt, (text, cut)) in enumerate(zip(prompts, texts, strict=False)):
            if i < self.settings.count:
                result.samples.append(
                    Sample(
                        prompt=trim(prompt.shown),
                        answer=trim(text),
                        reference=trim(prompt.reference) if prompt.reference else None,
                        truncated=cut,
                    )
                )
            scored = 0 <= i - self.fixed < self.settings.exact_match_examples
            if scored and prompt.reference is not None and cut != TIME_BUDGET:
                result.scored += 1
                hits += exact(text, prompt.reference)
            elif scored and prompt.reference is not None:
                result.skipped += 1
        if self.settings.exact_match_examples and result.scored:
            result.exact_match = hits / result.scored
        result.seconds = time.monotonic() - start
        self.spent += result.seconds
        self._report(step, result)
        return result

    def _report(self, step: int, result: Answers) -> None:
        for i, s in enumerate(result.samples, 1):
            note = f" (cut: {CUT_NOTES[s.truncated]})" if s.truncated else ""
            log.info(
                "sample %d at step %d: %r -> %r%s", i, step, trim(s.prompt, 80), s.answer, note
            )
        if result.skipped:
            log.warning(
                "samples: %d prompt(s) skipped at step %d: the time budget was spent "
                "(training.samples.maxSeconds %g, maxShare %g of the run's time)",
                result.skipped,
                step,
                self.settings.max_seconds,
                self.settings.max_share,
            )
        if self.on_answers is not None and result.samples:
            self.on_answers(step, result.samples)


MAX_NEW_TOKENS, TIME_BUDGET = "maxNewTokens", "timeBudget"
CUT_NOTES = {
    MAX_NEW_TOKENS: "cut at training.samples.maxNewTokens",
    TIME_BUDGET: "cut by the evaluation's time budget (training.samples.maxSeconds, maxShare)",
}


def cut_by(row: list[int], stops: list[int], max_new_tokens: int) -> str | None:
    """What ended a generated row before the model ended it: ``maxNewTokens`` when it is that
    long, ``timeBudget`` when it is shorter (``generate`` ran out of time), None when it holds
    a stop token. Rows of a batch are equally long; one that ended early is padded after its
    stop token."""
    if any(t in stops for t in row):
        return None
    return MAX_NEW_TOKENS if len(row) >= max_new_tokens else TIME_BUDGET


def markdown(sample: Sample) -> str:
    """One sample as TensorBoard's text tab shows it."""
    answer = f"**answer**\n\n{_quote(sample.answer)}"
    if sample.truncated:
        answer += f"\n\n*({CUT_NOTES[sample.truncated]})*"
    parts = [f"**prompt**\n\n{_quote(sample.prompt)}", answer]
    if sample.reference is not None:
        parts.append(f"**reference**\n\n{_quote(sample.reference)}")
    return "\n\n".join(parts)


def _quote(text: str) -> str:
    return "\n".join(f"    {line}" for line in (text or " ").splitlines() or [" "])
