"""Several ranks in one pod (one per GPU), launched by the trainer itself rather than torchrun.

torchrun's agent reports any worker failure as exit 1 and kills workers 30 s after a signal;
this launcher instead forwards SIGTERM to every rank and waits as long as they need (the pod's
grace period is the only deadline), and combines the ranks' exit codes so that the contract
holds: a non-retryable code wins, then "stopped", then success only if every rank succeeded.
DDP for LoRA/QLoRA, FSDP for full training (see ``train.training_arguments``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from gft_api.contract import NON_RETRYABLE_EXIT_CODES, ExitCode

log = logging.getLogger("gft")
CRASH_GRACE_SECONDS = 30  # after one rank crashes, how long the others get to exit on SIGTERM


def combine_exit_codes(codes: list[int]) -> int:
    """The pod's exit code from its ranks' codes (rank 0 first)."""
    for code in codes:
        if code in NON_RETRYABLE_EXIT_CODES:
            return code
    if all(c == ExitCode.SUCCESS for c in codes):
        return int(ExitCode.SUCCESS)
    if all(c in (ExitCode.STOPPED, ExitCode.SUCCESS) for c in codes):
        return int(ExitCode.STOPPED)
    return next((c for c in codes if c not in (0, ExitCode.STOPPED) and c > 0), 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace, nproc: int) -> int:
    port = free_port()
    argv = [sys.executable, "-m", "gft_trainer.cli", "--config", str(args.config)]
    if args.termination_message_path:
        argv += ["--termination-message-path", args.termination_message_path]
    if args.metrics_port_file:
        argv += ["--metrics-port-file", str(args.metrics_port_file)]
    procs = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen(argv, env=env))
    log.info("launched %d ranks: pids %s", nproc, [p.pid for p in procs])

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    crashed_at: float | None = None
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        failed = [p for p in procs if p.returncode not in (None, 0, ExitCode.STOPPED)]
        if failed and crashed_at is None:
            # A rank died: the others would wait forever in a collective. Stop them.
            crashed_at = time.monotonic()
            forward(signal.SIGTERM, None)
        if crashed_at and time.monotonic() - crashed_at > CRASH_GRACE_SECONDS:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    code = combine_exit_codes(codes)
    log.info("ranks exited with %s -> %d", codes, code)
    return code
