"""Several ranks in one pod (one per GPU), and pods of a multi-node run, launched by the
trainer itself rather than torchrun.

torchrun's agent reports any worker failure as exit 1 and kills workers 30 s after a signal;
this launcher instead forwards SIGTERM to every rank and waits as long as they need (the pod's
grace period is the only deadline), and combines the ranks' exit codes so that the contract
holds: a non-retryable code wins, then "stopped", then success only if every rank succeeded.
DDP for LoRA/QLoRA, FSDP for full training (see ``train.training_arguments``).

Across pods (``GFT_NODES`` > 1, an Indexed Job): pod ``JOB_COMPLETION_INDEX`` runs ranks
``index * nproc ...``, and every rank meets rank 0's store at ``GFT_MASTER_ADDR`` (pod 0, by
name through the run's headless Service), as torchrun's static rendezvous does. When a peer pod
is lost, this pod's ranks fail in their next collective; they are started again here (up to
``MAX_ROUNDS`` times) to meet the replacement pod in a new round, resuming from the last
checkpoint: the whole group restarts, and only the lost pod counts as a failed attempt.
Pods other than pod 0 serve their own GPUs' readings on the metrics port from here, for the
pod's whole life (rank 0 serves pod 0's beside the training metrics), so every pod of the run
is a live metrics target.
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gft_api.contract import NON_RETRYABLE_EXIT_CODES, ExitCode, TrainerConfig

log = logging.getLogger("gft")
CRASH_GRACE_SECONDS = 30  # after one rank crashes, how long the others get to exit on SIGTERM
MAX_ROUNDS = 5  # a multi-node pod's ranks are started again at most this many times


class GroupError(ValueError):
    """The environment does not say where this pod sits in a multi-node run."""


@dataclass(frozen=True)
class Group:
    """Where this pod's ranks sit in the run: ``nproc`` ranks here, on pod ``node`` of
    ``nodes``, meeting at ``master_addr:master_port`` (a free local port for one pod)."""

    nproc: int
    nodes: int = 1
    node: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes

    @classmethod
    def from_env(cls, nproc: int, env: Mapping[str, str] = os.environ) -> Group:
        nodes = int(env.get("GFT_NODES") or "1")
        if nodes <= 1:
            return cls(nproc)
        index, addr = env.get("JOB_COMPLETION_INDEX"), env.get("GFT_MASTER_ADDR")
        if index is None or not addr:
            raise GroupError(
                f"GFT_NODES={nodes} needs JOB_COMPLETION_INDEX (set by an Indexed Job) and "
                "GFT_MASTER_ADDR (pod 0's name): run multi-node through the operator"
            )
        node = int(index)
        if not 0 <= node < nodes:
            raise GroupError(f"JOB_COMPLETION_INDEX={node} is outside 0..{nodes - 1}")
        return cls(nproc, nodes, node, addr, int(env.get("GFT_MASTER_PORT") or "29500"))

    def rank_env(self, local: int, port: int) -> dict[str, str]:
        return {
            "RANK": str(self.node * self.nproc + local),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_RANK": str(self.node),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(port),
        }


def again(code: int, group: Group, stopping: bool, rounds: int) -> bool:
    """Start this pod's ranks again? Only in a multi-node run, after a retryable failure (a
    lost peer makes the ranks fail in their next collective), not once asked to stop."""
    retryable = code not in (ExitCode.SUCCESS, ExitCode.STOPPED, *NON_RETRYABLE_EXIT_CODES)
    return group.nodes > 1 and retryable and not stopping and rounds < MAX_ROUNDS


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


def serve_pod_gpus(config_path: Path) -> Any | None:
    """This pod's GPU readings on the run's metrics port (pods 1.. of a multi-node run); the
    server, or None when the config has no metrics port or cannot be read (the ranks then
    report the config error with its exit code)."""
    try:
        config = TrainerConfig.load(config_path)
    except Exception:
        return None
    obs = config.observability
    if not obs.metrics_port:
        return None
    from gft_trainer.gpu import serve

    try:
        server = serve(config.run_name, obs.metrics_bind_address, obs.metrics_port)
    except OSError as e:
        log.warning("this pod's GPU metrics are not served on port %d: %s", obs.metrics_port, e)
        return None
    log.info(
        "this pod's GPU metrics on http://%s:%d/metrics",
        obs.metrics_bind_address,
        server.server_address[1],
    )
    return server


def launch(args: argparse.Namespace, group: Group) -> int:
    gpu_metrics = serve_pod_gpus(args.config) if group.node > 0 else None
    try:
        return _launch(args, group)
    finally:
        if gpu_metrics is not None:
            gpu_metrics.shutdown()
            gpu_metrics.server_close()


def _launch(args: argparse.Namespace, group: Group) -> int:
    port = group.master_port or free_port()
    argv = [sys.executable, "-m", "gft_trainer.cli", "--config", str(args.config)]
    if args.termination_message_path:
        argv += ["--termination-message-path", args.termination_message_path]
    if args.metrics_port_file:
        argv += ["--metrics-port-file", str(args.metrics_port_file)]
    procs: list[subprocess.Popen] = []
    stopping = False

    def forward(signum: int) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True  # the pod is being stopped: its ranks checkpoint, none start again
        forward(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rounds = 0
    while True:
        procs[:] = [
            subprocess.Popen(argv, env=dict(os.environ, **group.rank_env(local, port)))
            for local in range(group.nproc)
        ]
        where = f" (pod {group.node} of {group.nodes}, rendezvous {group.master_addr}:{port})"
        log.info(
            "launched %d ranks%s: pids %s",
            group.nproc,
            where if group.nodes > 1 else "",
            [p.pid for p in procs],
        )
        code = _wait(procs, forward)
        if not again(code, group, stopping, rounds):
            return code
        rounds += 1
        log.warning(
            "ranks failed (exit %d): a peer pod was lost or failed; starting them again to "
            "meet the group's next round, from the last checkpoint (round %d of %d)",
            code,
            rounds,
            MAX_ROUNDS,
        )


def _wait(procs: list[subprocess.Popen], forward) -> int:
    """Wait for every rank; one crashing stops the others. The pod's exit code."""
    crashed_at: float | None = None
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        failed = [p for p in procs if p.returncode not in (None, 0, ExitCode.STOPPED)]
        if failed and crashed_at is None:
            # A rank died: the others would wait forever in a collective. Stop them.
            crashed_at = time.monotonic()
            forward(signal.SIGTERM)
        if crashed_at and time.monotonic() - crashed_at > CRASH_GRACE_SECONDS:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    code = combine_exit_codes(codes)
    log.info("ranks exited with %s -> %d", codes, code)
    return code
