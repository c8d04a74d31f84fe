"""Argument formats and help shared by every subcommand.

A malformed argument is an argparse error naming the expected format (``usage: ...``,
``error: argument --bbox: expected 6 integers x0,y0,z0,x1,y1,z1 ...``, exit 2), never
an exception from deep inside (``--bbox 1,2,3`` was a numpy reshape error). Every
parser prints its options' defaults in ``--help`` (:class:`HelpFormatter`, set for the
whole command tree by :class:`Parser`).
"""

from __future__ import annotations

import argparse
from typing import NoReturn

# The words --help uses for each format, so every command describes it alike.
BOX_FORMAT = "X0,Y0,Z0,X1,Y1,Z1"
BBOX_HELP = (
    "voxel box x0,y0,z0,x1,y1,z1: 6 integers, start inclusive, end exclusive, x0<x1, y0<y1, z0<z1"
)
REGION_HELP = (
    "chunk-coordinate box x0,y0,z0,x1,y1,z1: 6 integers, end exclusive, x0<x1, y0<y1, z0<z1"
)
RUN_HELP = "run id, e.g. bulk-20260501T120000-1a2b3c (list them: l2cache runs list DATASET)"
DATASET_HELP = "dataset name in the map (the PCG graph table id)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (their line breaks are the layout), and
    ``(default: X)`` after each option's help when it has a default worth saying: not
    None (the help says what happens without it), not a flag's False, and not when the
    help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The CLI's parser: :class:`HelpFormatter` unless a command asks for another;
    sub-parsers are made of this class too, so the whole tree formats alike."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        """A usage error is one line, like every other user error of the CLI (exit 2):
        what is wrong and where the formats are, not a screen of usage."""
        self.exit(2, f"error: {self.prog}: {message} (formats: {self.prog} --help)\n")


def box(text: str) -> list[int]:
    """``x0,y0,z0,x1,y1,z1`` as six integers with each end beyond its start; an
    argparse ``type=``: a malformed box is a usage error that says the format."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 6 integers x0,y0,z0,x1,y1,z1, got {text!r}"
        ) from None
    if len(values) != 6:
        raise argparse.ArgumentTypeError(
            f"expected 6 integers x0,y0,z0,x1,y1,z1, got {len(values)} in {text!r}"
        )
    empty = [a for i, a in enumerate("xyz") if values[i + 3] <= values[i]]
    if empty:
        names = ", ".join(f"{a}0<{a}1" for a in empty)
        raise argparse.ArgumentTypeError(f"empty box {text!r}: needs {names} (end exclusive)")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of chunks, workers, rows)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
