"""``python -m devcluster up|down|status|build|demo`` — the proving ground by hand."""

from __future__ import annotations

import argparse
import sys

from devcluster import build as build_mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devcluster", description=__doc__)
    parser.add_argument("command", choices=["build", "up", "down", "status", "demo"])
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build_mod.build())
            return 0
        from devcluster import cluster

        return cluster.cli(args.command)
    except build_mod.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
