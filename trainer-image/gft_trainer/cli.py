"""``gft-train``: the training pod's entry point, also usable on any machine.

    gft-train --config config.yaml

It reads the config the operator renders, fine-tunes, writes ``summary.json`` and the
termination message, and exits with a code from ``gft_api.contract.ExitCode``: 0 success,
75 stopped by a signal after a checkpoint, 65/66/69/77/78/79 non-retryable (bad data, no
model, unsupported hardware, not permitted, bad config, diverged), anything else retryable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from gft_api.contract import TERMINATION_MESSAGE_PATH, ExitCode, TrainerConfig

log = logging.getLogger("gft")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gft-train",
        description="Fine-tune a Gemma model (LoRA, QLoRA or full) from one config file.",
        epilog="Exit codes: 0 success; 75 stopped by SIGTERM after a checkpoint (rerun to "
        "resume); 65 bad data, 66 model not found, 69 unsupported hardware, 77 model not "
        "permitted, 78 bad config, 79 training diverged (fix, then rerun); any other code is "
        "retryable.",
    )
    p.add_argument("--config", required=True, type=Path, help="the config file (YAML or JSON)")
    p.add_argument(
        "--nproc",
        default=os.environ.get("GFT_NPROC", "auto"),
        help="training processes (ranks) in this pod: a number, or auto = one per visible GPU "
        "(1 without a GPU). Default: $GFT_NPROC or auto",
    )
    p.add_argument(
        "--termination-message-path",
        help="where to write the final summary (overrides observability.terminationMessagePath)",
    )
    p.add_argument(
        "--metrics-port-file",
        type=Path,
        help="write the port the metrics endpoint listens on to this file (for metricsPort 0 "
        "tests and tools)",
    )
    return p


def setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {prefix}%(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("transformers", "accelerate", "peft", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Liger warns about every optional backend it could not import (CuTe DSL, Ascend NPUs).
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def nproc(value: str) -> int:
    if value != "auto":
        return max(1, int(value))
    import torch

    return max(1, torch.cuda.device_count())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    if "RANK" not in os.environ:
        from gft_trainer.launcher import Group, GroupError, launch

        try:
            group = Group.from_env(nproc(args.nproc))
        except GroupError as e:
            log.error("%s", e)
            return int(ExitCode.CONFIG_ERROR)
        if group.world_size > 1:
            return launch(args, group)
    return run_one(args)


def run_one(args: argparse.Namespace) -> int:
    """One rank (or the only process): train, summarise, return the exit code."""
    from gft_trainer import summary as summaries
    from gft_trainer.signals import StopFlag

    stop = StopFlag().install()
    config = None
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = TrainerConfig.load(args.config)
        from gft_trainer.train import run

        result = run(config, stop, args.metrics_port_file)
    except BaseException as e:  # every way out gets an exit code and a summary
        if isinstance(e, SystemExit):
            raise
        result = summaries.failure(e)
        if result.exit_code in (ExitCode.RETRYABLE,):
            log.exception("training failed")
        else:
            log.error("%s: %s", result.reason, result.message)
    if rank == 0:
        termination = args.termination_message_path or (
            config.observability.termination_message_path if config else TERMINATION_MESSAGE_PATH
        )
        summaries.write(result, config.output.dir if config else None, termination)
    stop.uninstall()
    _leave_process_group()
    log.info("exit %d (%s)", result.exit_code, result.reason)
    return result.exit_code


def _leave_process_group() -> None:
    """Leave the ranks' process group before the interpreter exits: a group left to the exit
    can abort the process while its threads are torn down ("terminate called without an
    active exception", exit 134 instead of the code chosen here)."""
    if "torch.distributed" not in sys.modules:
        return  # never started one
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # the exit code is already decided; say it and go on
            log.warning("could not leave the process group: %s", e)


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
