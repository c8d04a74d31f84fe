"""The ``l2cache`` command.

Each subcommand lives in its own module under ``l2cache.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the
parsed namespace, returning an exit code). Adding a command = adding a module and
its name to ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: tuple[str, ...] = (
    "features_cmd",
    "dataset_cmd",
    "ingest_cmd",
    "local_cmd",
    "demo_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2cache", description="Per-L2-node feature cache for PyChunkedGraph datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"l2cache.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
