"""The ``l2cache`` command.

Each subcommand lives in its own module under ``l2cache_tools.cli`` and exposes
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
    "qc_cmd",
    "release_cmd",
    "lineage_cmd",
    "dashboard_cmd",
    "prices_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, built from ``COMMAND_MODULES`` so a new command needs no
    edit here beyond its name (and ``--help`` lists every command)."""
    from .argformats import Parser

    parser = Parser(
        prog="l2cache", description="Per-L2-node feature cache for PyChunkedGraph datasets."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of unexpected errors"
    )
    # every sub-parser is a Parser too: defaults and formats in each command's --help
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"l2cache_tools.cli.{name}").register(sub)
    _describe_shared_positionals(parser)
    return parser


def _describe_shared_positionals(parser: argparse.ArgumentParser) -> None:
    """The ``dataset`` and ``run`` positionals most commands take, described once: each
    command that leaves them without help gets the same words and format."""
    from .argformats import DATASET_HELP, RUN_HELP

    words = {"dataset": DATASET_HELP, "run": RUN_HELP}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for child in action.choices.values():
                _describe_shared_positionals(child)
        elif not action.option_strings and action.help is None and action.dest in words:
            action.help = words[action.dest]


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A user error prints one ``error: ...`` line and exits 2; any
    other failure prints one line too (exit 1), with the traceback only under --debug."""
    from .errors import report

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, its one line printed)
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure gets a one-line verdict
        return report(exc, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
