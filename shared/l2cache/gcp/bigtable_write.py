"""The one way l2cache writes to Bigtable: every row's status checked, failures raised.

``DirectRow.commit()`` and ``Table.mutate_rows()`` *return* per-row statuses instead of
raising, so a caller that forgets to look loses writes silently (a run enqueued with no
run row, a chunk computed but never marked done). Every write in the production code
goes through :func:`write_rows`, which bounds the client's own retries of failed rows
and raises :class:`WriteError` naming every row that still failed. A raised ``WriteError`` is transient by the failure contract: the
caller answers 5xx and the whole, idempotent, operation is retried.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime

import grpc
from google.api_core import exceptions as api_exceptions
from google.cloud._helpers import _microseconds_from_datetime
from google.cloud.bigtable.table import DEFAULT_RETRY
from google.cloud.bigtable_v2.types import bigtable as bt_types

BATCH_ROWS = 2_000
DEADLINE_S = 60.0  # the client library retries failed rows with backoff up to this long
_MUTATE_ROWS = "/google.bigtable.v2.Bigtable/MutateRows"
_MutateRowsResponse = bt_types.MutateRowsResponse.pb()
NO_STATUS = grpc.StatusCode.UNKNOWN.value[0]  # a row the response never mentioned
# Row statuses worth retrying: what the client library retries (its RETRYABLE codes).
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.ABORTED.value[0],
        grpc.StatusCode.UNAVAILABLE.value[0],
    }
)
SERVER_TIMESTAMP = -1  # Bigtable assigns the time; such a write is not idempotent


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


# -- feature rows: the MutateRows request encoded directly ------------------------------
#
# The client library builds two proto-plus objects per cell and converts each to
# protobuf again when sending: 2,000 rows of 12 cells took 0.5-0.8 s of pure Python,
# twice the emulator's own time. A cell's wire bytes are a constant header (family,
# qualifier, timestamp, lengths) followed by its value, so :class:`CellEncoder` keeps
# the headers and a row costs one ``bytes.join``. The encoding is protobuf's own
# (tests parse it back with the generated message and compare with the library's).


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 (server timestamp -1): 10 bytes
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def timestamp_micros(when: datetime | None) -> int:
    """Bigtable cell timestamp: microseconds truncated to milliseconds, as the library
    writes them; ``None`` asks the server for its time."""
    if when is None:
        return SERVER_TIMESTAMP
    micros = _microseconds_from_datetime(when)  # the library's own (naive = UTC)
    return micros - micros % 1000


class CellEncoder:
    """Wire bytes of ``Mutation{set_cell}`` entries for one (family, qualifier, version).

    ``encode(value)`` is the header cached per value length plus the value.
    """

    def __init__(self, family: str, qualifier: bytes, micros: int) -> None:
        self._prefix = (
            _field(1, family.encode()) + _field(2, qualifier) + _varint(3 << 3) + _varint(micros)
        )
        self._headers: dict[int, bytes] = {}

    def header(self, length: int) -> bytes:
        head = self._headers.get(length)
        if head is None:
            value_tag = _varint(4 << 3 | 2) + _varint(length) if length else b""
            set_cell_len = len(self._prefix) + len(value_tag) + length
            set_cell_head = _varint(1 << 3 | 2) + _varint(set_cell_len)
            mutation_len = len(set_cell_head) + set_cell_len
            head = _varint(2 << 3 | 2) + _varint(mutation_len) + set_cell_head
            head += self._prefix + value_tag
            self._headers[length] = head
        return head

    def encode(self, value: bytes) -> bytes:
        """``Entry.mutations`` field bytes of one SetCell with ``value`` (empty: omitted,
        as protobuf serializes a default field)."""
        return self.header(len(value)) + value


def encode_entry(row_key: bytes, cells: bytes) -> bytes:
    """``MutateRowsRequest.entries`` field bytes of one row from its encoded cells."""
    body = _field(1, row_key) + cells
    return _varint(2 << 3 | 2) + _varint(len(body)) + body


def mutate_entries(
    channel: grpc.Channel,
    table_name: str,
    entries: Sequence[tuple[bytes, bytes]],
    what: str = "bigtable",
    deadline_s: float = DEADLINE_S,
    idempotent: bool = True,
) -> int:
    """Send ``(row key, encoded entry)`` pairs with MutateRows and check every status.

    The same contract as :func:`write_rows`: rows that fail with a retryable code (and
    the whole request on a retryable RPC error) are re-sent with backoff until
    ``deadline_s``; what still failed is raised as :class:`WriteError` with the codes,
    so :func:`l2cache.domain.failures.classify` tells final (missing table, bad family) from
    transient. ``idempotent=False`` (server timestamps) sends once, as the library does.
    Returns the number of rows written.
    """
    call = channel.unary_stream(
        _MUTATE_ROWS,
        request_serializer=bytes,
        response_deserializer=_MutateRowsResponse.FromString,
    )
    head = _field(1, table_name.encode())
    for start in range(0, len(entries), BATCH_ROWS):
        _mutate_batch(
            call, head, list(entries[start : start + BATCH_ROWS]), what, deadline_s, idempotent
        )
    return len(entries)


def _mutate_batch(call, head: bytes, batch, what: str, deadline_s: float, idempotent: bool) -> None:
    deadline = time.monotonic() + deadline_s
    pending = list(range(len(batch)))
    failed: dict[bytes, str] = {}
    codes: set[int] = set()
    delay = 0.01
    while pending:
        results: dict[int, tuple[int, str]] = {}
        rpc_error: grpc.RpcError | None = None
        request = head + b"".join(batch[i][1] for i in pending)
        try:
            timeout = max(deadline - time.monotonic(), 0.001)
            for response in call(request, timeout=timeout):
                for entry in response.entries:
                    if 0 <= entry.index < len(pending):  # else: the row has no status
                        results[pending[entry.index]] = (entry.status.code, entry.status.message)
        except grpc.RpcError as exc:
            rpc_error = exc
        if rpc_error is not None:
            rpc_code = rpc_error.code().value[0]
            rpc_reason = f"{rpc_error.code().name}: {rpc_error.details()}"
        else:  # the stream ended cleanly without a status for some rows: not written
            rpc_code, rpc_reason = NO_STATUS, "UNKNOWN: the server returned no status for the row"
        retry = []
        for i in pending:
            code, message = results.get(i, (rpc_code, rpc_reason))
            if code == 0:
                continue
            if idempotent and code in RETRYABLE_CODES:
                retry.append(i)
                continue
            failed[batch[i][0]] = message or f"code {code}"
            codes.add(code)
        if retry and time.monotonic() + delay >= deadline:
            for i in retry:
                code, message = results.get(i, (rpc_code, rpc_reason))
                failed[batch[i][0]] = f"gave up after {deadline_s:.0f} s: {message or code}"
                codes.add(code)
            retry = []
        if retry:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        pending = retry
        if failed and rpc_error is not None and not pending:
            raise WriteError(what, failed, codes) from rpc_error
    if failed:
        raise WriteError(what, failed, codes)


def encode_rows(
    keys: Iterable[bytes], columns: Sequence[tuple[CellEncoder, Sequence[bytes]]], constant: bytes
) -> list[tuple[bytes, bytes]]:
    """Entries of rows ``keys``: per row its value in each column, then ``constant``
    (cells every row shares, already encoded)."""
    encoders = [enc for enc, _ in columns]
    values = [vals for _, vals in columns]
    out = []
    for i, key in enumerate(keys):
        cells = b"".join([enc.encode(vals[i]) for enc, vals in zip(encoders, values, strict=True)])
        out.append((key, encode_entry(key, cells + constant)))
    return out
