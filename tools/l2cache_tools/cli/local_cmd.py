"""``l2cache local up|down``: the local stack in the background, for a shell session."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_DIR = "var/local"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``local up|down``: the stack the tests and the demo start, kept running for
    a shell session so commands can be tried against it by hand."""
    p = sub.add_parser("local", help="start/stop the local stack (emulators + functions)")
    s = p.add_subparsers(dest="local_command", required=True)
    up = s.add_parser(
        "up", help="start the emulators and functions in the background; print the endpoints"
    )
    up.add_argument(
        "--dir", default=DEFAULT_DIR, help="the stack's state: map, logs, emulator data"
    )
    up.add_argument("--workers", type=int, default=2, help="compute_chunk worker processes")
    up.set_defaults(func=run_up)
    down = s.add_parser("down", help="stop what `local up` started in --dir")
    down.add_argument("--dir", default=DEFAULT_DIR, help="the directory `local up` used")
    down.set_defaults(func=run_down)


def run_up(args: argparse.Namespace) -> int:
    """Start the stack and print its URLs and an ``export`` line: the processes outlive
    this command, so the shell needs the endpoints to reach them."""
    from l2cache_tools.local.stack import LocalStack

    stack = LocalStack(Path(args.dir), compute_workers=args.workers)
    stack.start()  # processes run in their own sessions and outlive this command
    print(json.dumps(stack.urls, indent=2))
    print("export " + " ".join(f"{k}={v}" for k, v in stack.env.items()))
    print(f"stop with: l2cache local down --dir {args.dir}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    """Stop what ``local up`` started, found through the state file it left in
    ``--dir`` (this process did not start them and holds no handle)."""
    from l2cache_tools.local.stack import stop_from_state

    print(f"stopped {stop_from_state(Path(args.dir))} process groups")
    return 0
