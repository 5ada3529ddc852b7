"""The final word: ``summary.json`` in the output folder and the termination message."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from gft_api.contract import SUMMARY_FILE_NAME, Outcome, TrainerSummary, describe_exit_code

from gft_trainer.errors import exit_code_for

log = logging.getLogger("gft")


def failure(error: BaseException, global_step: int = 0) -> TrainerSummary:
    """A summary for a run that ended in an exception; the message says what to do next."""
    code = exit_code_for(error)
    stopped = code == 75
    message = str(error) or type(error).__name__
    if code == 1:  # an unexpected error: keep the end of the trace for whoever reads the status
        message = f"{type(error).__name__}: {message}\n" + "".join(
            traceback.format_exception(error)[-3:]
        )
    return TrainerSummary(
        outcome=Outcome.STOPPED if stopped else Outcome.FAILED,
        exit_code=int(code),
        reason=getattr(error, "reason", None) or describe_exit_code(code),
        message=message[:2000],
        global_step=global_step,
    )


def write(summary: TrainerSummary, output_dir: str | None, termination_path: str | None) -> None:
    """Write both files; a path that cannot be written (outside Kubernetes) is only logged."""
    if output_dir:
        try:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{SUMMARY_FILE_NAME}.tmp"
            tmp.write_text(summary.model_dump_json(by_alias=True, exclude_none=True, indent=2))
            tmp.replace(out / SUMMARY_FILE_NAME)
        except OSError as e:
            log.warning("could not write %s: %s", SUMMARY_FILE_NAME, e)
    if termination_path:
        try:
            Path(termination_path).write_text(summary.to_termination_message())
        except OSError as e:
            log.info("no termination message written (%s: %s)", termination_path, e)
