"""The one way l2cache writes to Bigtable: every row's status checked, failures raised.

``DirectRow.commit()`` and ``Table.mutate_rows()`` *return* per-row statuses instead of
raising, so a caller that forgets to look loses writes silently (a run enqueued with no
run row, a chunk computed but never marked done). Every write in the production code
goes through :func:`write_rows`, which bounds the client's own retries of failed rows
and raises :class:`WriteError` naming every row that still failed. A raised ``WriteError`` is transient by the failure contract: the
caller answers 5xx and the whole, idempotent, operation is retried.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.api_core import exceptions as api_exceptions
from google.cloud.bigtable.table import DEFAULT_RETRY

BATCH_ROWS = 2_000
DEADLINE_S = 60.0  # the client library retries failed rows with backoff up to this long


class WriteError(RuntimeError):
    """Rows that could not be written; ``failed`` maps row key -> reason."""

    def __init__(self, what: str, failed: dict[bytes, str], codes: set[int] | None = None) -> None:
        self.failed = failed
        self.codes = codes or set()  # gRPC codes of the failed rows (empty: the RPC failed)
        sample = ", ".join(
            f"{k.decode(errors='replace')}: {v}" for k, v in list(failed.items())[:3]
        )
        super().__init__(f"{len(failed)} {what} row(s) failed to write ({sample})")


def write_rows(
    table, rows: Sequence, what: str = "bigtable", deadline_s: float = DEADLINE_S
) -> int:
    """Apply ``rows`` (DirectRow mutations) and check every row's status.

    The client library already retries rows that failed with a retryable code, with
    backoff, until ``deadline_s``; a status still non-OK after that is final and
    raised. So is the RPC itself failing (Bigtable or the emulator unreachable).
    Returns the number of rows written.
    """
    rows = list(rows)
    failed: dict[bytes, str] = {}
    codes: set[int] = set()
    retry = DEFAULT_RETRY.with_deadline(deadline_s)
    for start in range(0, len(rows), BATCH_ROWS):
        batch = rows[start : start + BATCH_ROWS]
        try:
            statuses = table.mutate_rows(batch, retry=retry, timeout=deadline_s)
        except (api_exceptions.GoogleAPICallError, api_exceptions.RetryError) as exc:
            raise WriteError(
                what, {r.row_key: f"{type(exc).__name__}: {exc}" for r in batch}
            ) from exc
        for row, status in zip(batch, statuses, strict=True):
            if status.code != 0:
                failed[row.row_key] = status.message or f"code {status.code}"
                codes.add(status.code)
    if failed:
        raise WriteError(what, failed, codes)
    return len(rows)
