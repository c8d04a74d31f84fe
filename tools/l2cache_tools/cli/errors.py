"""How the CLI reports failures: one line, never a traceback for a user's mistake.

User errors (exit 2): a bad or missing dataset map, an unknown dataset or run, a
malformed argument, a missing table or file, a permanent input error. Anything else is
unexpected (exit 1): still one line, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import sys
import traceback

USER_ERROR = 2
UNEXPECTED = 1


def _user_error_types() -> tuple[type[BaseException], ...]:
    from google.api_core.exceptions import NotFound

    from l2cache.config import ConfigError, UnknownDatasetError
    from l2cache.domain.failures import PermanentError

    return (
        ConfigError,
        UnknownDatasetError,
        PermanentError,
        LookupError,
        ValueError,
        OSError,
        NotFound,
    )


def message(exc: BaseException) -> str:
    """The error's own words (a KeyError's repr quotes are dropped)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


def report(exc: BaseException, debug: bool = False) -> int:
    """Print ``error: ...`` to stderr; returns the exit code."""
    if isinstance(exc, _user_error_types()):
        print(f"error: {message(exc)}", file=sys.stderr)
        return USER_ERROR
    if debug:
        traceback.print_exception(exc)
    print(
        f"error: unexpected {type(exc).__name__}: {message(exc)}"
        + ("" if debug else " (run with --debug for the traceback)"),
        file=sys.stderr,
    )
    return UNEXPECTED
