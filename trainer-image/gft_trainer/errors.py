"""What can go wrong, and which exit code each failure maps to (``gft_api.contract.ExitCode``).

Every error raised on purpose says what to do next and names the file and line, or the config
field, it is about. ``exit_code_for`` is the one place that maps an exception to an exit code.
"""

from __future__ import annotations

from gft_api.contract import ConfigError, ExitCode


class TrainerError(Exception):
    """A failure the trainer understood; its message is for the user."""

    exit_code: ExitCode = ExitCode.RETRYABLE
    reason: str | None = None
    """CamelCase reason for the summary; the exit code's when unset."""


class DataError(TrainerError):
    """The dataset is malformed. The message starts with ``file:line``."""

    exit_code = ExitCode.DATA_ERROR


class ModelNotFoundError(TrainerError):
    exit_code = ExitCode.MODEL_NOT_FOUND


class NotPermittedError(TrainerError):
    exit_code = ExitCode.NOT_PERMITTED


class UnsupportedError(TrainerError):
    """Asked for something this machine cannot do (QLoRA without CUDA, fp16 on CPU)."""

    exit_code = ExitCode.UNSUPPORTED


class DivergedError(TrainerError):
    """The loss went NaN, infinite or far past its start. Retrying from the last checkpoint
    with the same settings would diverge again, so it is not retried."""

    exit_code = ExitCode.DIVERGED


class StopRequested(Exception):
    """A stop signal arrived; raised where training cannot simply finish its step."""


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code for an exception that ended the run."""
    if isinstance(error, TrainerError):
        return error.exit_code
    if isinstance(error, ConfigError):
        return ExitCode.CONFIG_ERROR
    if isinstance(error, StopRequested | KeyboardInterrupt):
        return ExitCode.STOPPED
    return ExitCode.RETRYABLE


def reason_for(error: BaseException) -> str:
    """CamelCase reason for the summary, from the exit code."""
    from gft_api.contract import describe_exit_code

    return describe_exit_code(exit_code_for(error))
