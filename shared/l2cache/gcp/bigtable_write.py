"""The one write path: every Bigtable write in l2cache, its statuses checked, its
failures raised as :class:`WriteError` and classified in one place.

Three kinds of request, one module:

- **MutateRows** (:func:`write_rows` for :class:`Row` objects, :func:`encode_columns`
  + :func:`mutate_entries` for the feature rows): every row's status is checked; rows
  that fail with a transient code (and the whole request on a transient RPC error)
  are re-sent with backoff until the deadline (:data:`DEADLINE_S`), but only when the
  request is safe to repeat: a write with server timestamps (``timestamp=None``)
  would add a version per repeat, so it is sent once, as the client library does.
- **CheckAndMutateRow** (:func:`check_and_mutate`) and **ReadModifyWriteRow**
  (:func:`increment`): one row, sent once (a repeat could apply a second time or
  count twice), the RPC's failure raised.

``DirectRow.commit()`` and ``Table.mutate_rows()`` *return* per-row statuses instead of
raising, so a caller that forgets to look loses writes silently (a run enqueued with no
run row, a chunk computed but never marked done); that is why nothing calls them. A
:class:`WriteError` carries the gRPC codes of what failed, so
:func:`l2cache.domain.failures.classify` tells final (a missing table, a bad family:
permanent) from transient (everything else: the caller answers 5xx and the whole,
idempotent, operation is retried).

Requests are built with the library's generated protobuf messages (upb). The feature
rows were once encoded by hand for speed; side by side the generated messages cost
2.6-4.9 ms more per 1,000 rows, 0.08 % of the bare EDT of a production chunk
(BENCHMARKS.md, "Write encoding"), so the hand encoder went. Each row is
serialized once, as the bytes of a ``MutateRowsRequest`` holding only its entry, so a
request is the table name's bytes followed by its rows' (protobuf concatenates repeated
fields) and a retry re-sends the failed rows' bytes without encoding them again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.cloud._helpers import _microseconds_from_datetime
from google.cloud.bigtable_v2.types import bigtable as bt_types

from l2cache.gcp.bigtable import (
    TRANSIENT_CODES,
    WRITE_SCOPE,
    Backoff,
    CellFilter,
    data_channel,
    table_name,
)

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.row import DirectRow
    from google.cloud.bigtable.table import Table
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
    from google.protobuf.message import Message

BATCH_ROWS = 2_000
MAX_MUTATIONS = 100_000  # Bigtable's limit per MutateRows request, all rows together
DEADLINE_S = 60.0  # a write call ends within this, retries included
_MUTATE_ROWS = "/google.bigtable.v2.Bigtable/MutateRows"
_CHECK_AND_MUTATE = "/google.bigtable.v2.Bigtable/CheckAndMutateRow"
_READ_MODIFY_WRITE = "/google.bigtable.v2.Bigtable/ReadModifyWriteRow"
_MutateRowsRequest = bt_types.MutateRowsRequest.pb()
_MutateRowsResponse = bt_types.MutateRowsResponse.pb()
_Entry = _MutateRowsRequest.Entry
_CheckAndMutateRowRequest = bt_types.CheckAndMutateRowRequest.pb()
_CheckAndMutateRowResponse = bt_types.CheckAndMutateRowResponse.pb()
_ReadModifyWriteRowRequest = bt_types.ReadModifyWriteRowRequest.pb()
_ReadModifyWriteRowResponse = bt_types.ReadModifyWriteRowResponse.pb()
NO_STATUS = grpc.StatusCode.UNKNOWN.value[0]  # a row the response never mentioned
# Row statuses worth retrying (as integers, the form row statuses come in).
RETRYABLE_CODES = frozenset(code.value[0] for code in TRANSIENT_CODES)
SERVER_TIMESTAMP = -1  # Bigtable assigns the time; such a write is not idempotent
_Response = TypeVar("_Response", bound="Message")  # what a single-row request answers


class WriteError(RuntimeError):
    """Rows that could not be written; ``failed`` maps row key -> reason, ``codes`` holds
    the gRPC codes of the failures (what :func:`l2cache.domain.failures.classify` reads)."""

    def __init__(self, what: str, failed: dict[bytes, str], codes: set[int] | None = None) -> None:
        self.failed = failed
        self.codes = codes or set()
        sample = ", ".join(
            f"{k.decode(errors='replace')}: {v}" for k, v in list(failed.items())[:3]
        )
        super().__init__(f"{len(failed)} {what} row(s) failed to write ({sample})")


def timestamp_micros(when: datetime | None) -> int:
    """Bigtable cell timestamp: microseconds truncated to milliseconds, as the library
    writes them; ``None`` asks the server for its time."""
    if when is None:
        return SERVER_TIMESTAMP
    micros = _microseconds_from_datetime(when)  # the library's own (naive = UTC)
    return micros - micros % 1000


class Row:
    """The mutations of one row, held in the generated ``MutateRowsRequest.Entry``.

    ``idempotent`` stays true while every cell has an explicit timestamp; a row with a
    server-timestamped cell is sent once.
    """

    __slots__ = ("_request", "_entry", "idempotent")

    def __init__(self, key: bytes) -> None:
        self._request = _MutateRowsRequest()  # holds the entry: one serialization encodes it
        self._entry = self._request.entries.add(row_key=key)
        self.idempotent = True

    @property
    def key(self) -> bytes:
        """The row key, held by the entry itself: what a failure is reported under."""
        return self._entry.row_key

    @property
    def mutations(self) -> RepeatedCompositeFieldContainer[Message]:
        """The generated ``Mutation`` messages, in order."""
        return self._entry.mutations

    def set_cell(
        self, family: str, qualifier: bytes, value: bytes, timestamp: datetime | None = None
    ) -> Row:
        """Write ``value`` at ``timestamp`` (ms precision; ``None``: the server's time)."""
        micros = timestamp_micros(timestamp)
        if micros == SERVER_TIMESTAMP:
            self.idempotent = False
        cell = self._entry.mutations.add().set_cell
        cell.family_name = family
        cell.column_qualifier = qualifier
        cell.timestamp_micros = micros
        cell.value = value
        return self

    def delete_cells(
        self, family: str, qualifiers: Iterable[bytes], start_micros: int, end_micros: int
    ) -> Row:
        """Delete the versions in ``[start_micros, end_micros)`` of each column (a
        whole-family delete cannot be limited to a time range)."""
        for qualifier in qualifiers:
            delete = self._entry.mutations.add().delete_from_column
            delete.family_name = family
            delete.column_qualifier = qualifier
            delete.time_range.start_timestamp_micros = start_micros
            delete.time_range.end_timestamp_micros = end_micros
        return self

    def add_to_cell(self, family: str, qualifier: bytes, amount: int) -> Row:
        """Add ``amount`` to the int64 sum cell of an aggregate family (AddToCell).

        All adds go to timestamp 0, so the server merges them into one cell instead of
        stacking a version per add (a read-modify-write counter leaves one version per
        increment until compaction). Not idempotent: the row is sent once, never retried.
        """
        self.idempotent = False
        add = self._entry.mutations.add().add_to_cell
        add.family_name = family
        add.column_qualifier.raw_value = qualifier
        add.timestamp.raw_timestamp_micros = 0
        add.input.int_value = amount
        return self

    def delete_row(self) -> Row:
        """Delete the whole row (every family, every version): what clears a chunk's
        in-flight and failure marks once it is done."""
        self._entry.mutations.add().delete_from_row.SetInParent()
        return self

    def encode(self) -> bytes:
        """The row's ``MutateRowsRequest.entries`` field bytes."""
        return self._request.SerializeToString()


def _entry_of(row: Row | DirectRow) -> tuple[bytes, bytes, bool, int]:
    """(key, entry bytes, idempotent, mutation count) of a :class:`Row`, or of a client
    library ``DirectRow`` (tests and scripts build those; they are sent the same way)."""
    if isinstance(row, Row):
        return row.key, row.encode(), row.idempotent, len(row.mutations)
    from google.cloud.bigtable.data.mutations import RowMutationEntry

    entry = RowMutationEntry(row.row_key, row._get_mutations())
    request = _MutateRowsRequest(entries=[bt_types.MutateRowsRequest.Entry.pb(entry._to_pb())])
    return row.row_key, request.SerializeToString(), entry.is_idempotent(), len(entry.mutations)


# -- MutateRows -----------------------------------------------------------------------


def write_rows(
    table: Table | str,
    rows: Sequence[Row | DirectRow],
    what: str = "bigtable",
    deadline_s: float = DEADLINE_S,
    channel: grpc.Channel | None = None,
) -> int:
    """Apply ``rows`` to ``table`` (a handle or its name) and check every row's status.

    Sent in requests of at most :data:`BATCH_ROWS` rows and :data:`MAX_MUTATIONS`
    mutations, as :func:`mutate_entries`: rows whose cells all have explicit timestamps
    are retried, rows with a server timestamp are sent once, in requests of their own.
    Returns the number of rows written; raises :class:`WriteError` naming every row
    that failed.
    """
    encoded = [_entry_of(row) for row in rows]
    failures = _Failures(what)
    for idempotent in (True, False):
        batch: list[tuple[bytes, bytes]] = []
        mutations = 0
        for key, entry, repeatable, n in encoded:
            if bool(repeatable) != idempotent:
                continue
            if batch and (len(batch) == BATCH_ROWS or mutations + n > MAX_MUTATIONS):
                failures.run(mutate_entries, channel, table, batch, what, deadline_s, idempotent)
                batch, mutations = [], 0
            batch.append((key, entry))
            mutations += n
        if batch:
            failures.run(mutate_entries, channel, table, batch, what, deadline_s, idempotent)
    failures.raise_any()
    return len(encoded)


class _Failures:
    """Failed rows gathered over several requests, raised as one :class:`WriteError`
    once every request was tried (the others' rows are written meanwhile)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failed: dict[bytes, str] = {}
        self.codes: set[int] = set()
        self.first: WriteError | None = None

    def run(self, send: Callable[..., object], *args: object) -> None:
        """Call ``send(*args)``, keeping its :class:`WriteError` for :meth:`raise_any`
        instead of letting it stop the requests still to send."""
        try:
            send(*args)
        except WriteError as exc:
            self.first = self.first or exc
            self.failed.update(exc.failed)
            self.codes |= exc.codes

    def raise_any(self) -> None:
        if self.first is not None:
            raise WriteError(self.what, self.failed, self.codes) from (
                self.first.__cause__ or self.first
            )


def encode_columns(
    keys: Iterable[bytes],
    columns: Sequence[tuple[str, bytes, Sequence[bytes]]],
    shared: Sequence[tuple[str, bytes, bytes]],
    timestamp: datetime | None,
) -> list[tuple[bytes, bytes]]:
    """``(key, entry bytes)`` of rows ``keys``: row i gets each column's i-th value,
    then the ``shared`` cells, every cell at ``timestamp``. An empty value is a cell
    with an empty value (protobuf omits the default field, as the library does).

    One template entry with every cell is copied per row and only its values are set:
    the cheapest way through the generated messages (BENCHMARKS.md, "Write encoding").
    """
    micros = timestamp_micros(timestamp)
    template = _Entry()
    for family, qualifier, _ in columns:
        _set_cell(template, family, qualifier, b"", micros)
    for family, qualifier, value in shared:
        _set_cell(template, family, qualifier, value, micros)
    values = [column_values for *_, column_values in columns]
    out = []
    for i, key in enumerate(keys):
        one = _MutateRowsRequest()
        entry = one.entries.add()
        entry.CopyFrom(template)
        entry.row_key = key
        cells = entry.mutations
        for j, column_values in enumerate(values):
            cells[j].set_cell.value = column_values[i]
        out.append((key, one.SerializeToString()))
    return out


def _set_cell(entry: Message, family: str, qualifier: bytes, value: bytes, micros: int) -> None:
    cell = entry.mutations.add().set_cell
    cell.family_name = family
    cell.column_qualifier = qualifier
    cell.timestamp_micros = micros
    cell.value = value


def mutate_entries(
    channel: grpc.Channel | None,
    table: Table | str,
    entries: Sequence[tuple[bytes, bytes]],
    what: str = "bigtable",
    deadline_s: float = DEADLINE_S,
    idempotent: bool = True,
) -> int:
    """Send ``(row key, entry bytes)`` pairs with MutateRows and check every status.

    Rows that fail with a transient code (and the whole request on a transient RPC
    error) are re-sent with backoff until ``deadline_s``; what still failed is raised
    as :class:`WriteError` with the codes. A row the server gives no status is not
    written (UNKNOWN, transient). ``idempotent=False`` (server timestamps) sends once.
    ``channel`` ``None`` is the shared write channel. Returns the number of rows sent.
    """
    call = (channel or data_channel(WRITE_SCOPE)).unary_stream(
        _MUTATE_ROWS,
        request_serializer=bytes,
        response_deserializer=_MutateRowsResponse.FromString,
    )
    head = _MutateRowsRequest(table_name=table_name(table)).SerializeToString()
    failures = _Failures(what)
    for start in range(0, len(entries), BATCH_ROWS):
        batch = list(entries[start : start + BATCH_ROWS])
        failures.run(_mutate_batch, call, head, batch, what, deadline_s, idempotent)
    failures.raise_any()
    return len(entries)


def _mutate_batch(
    call: grpc.UnaryStreamMultiCallable,
    head: bytes,
    batch: Sequence[tuple[bytes, bytes]],
    what: str,
    deadline_s: float,
    idempotent: bool,
) -> None:
    """One MutateRows batch: send, re-send the rows that failed transiently while
    ``idempotent`` and the deadline allow, raise :class:`WriteError` for the rest."""
    backoff = Backoff(deadline_s)
    pending = list(range(len(batch)))
    failed: dict[bytes, str] = {}
    codes: set[int] = set()
    while pending:
        results: dict[int, tuple[int, str]] = {}
        rpc_error: grpc.RpcError | None = None
        request = head + b"".join(batch[i][1] for i in pending)
        try:
            for response in call(request, timeout=backoff.remaining()):
                for entry in response.entries:
                    if 0 <= entry.index < len(pending):  # else: the row has no status
                        results[pending[entry.index]] = (entry.status.code, entry.status.message)
        except grpc.RpcError as exc:
            rpc_error = exc
        if rpc_error is not None:
            rpc_code, rpc_reason = _code_and_reason(rpc_error)
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
        if retry and not backoff.wait():
            for i in retry:
                code, message = results.get(i, (rpc_code, rpc_reason))
                failed[batch[i][0]] = f"gave up after {deadline_s:.0f} s: {message or code}"
                codes.add(code)
            retry = []
        pending = retry
        if failed and rpc_error is not None and not pending:
            raise WriteError(what, failed, codes) from rpc_error
    if failed:
        raise WriteError(what, failed, codes)


# -- single-row requests --------------------------------------------------------------


def check_and_mutate(
    table: Table | str,
    row: Row,
    predicate: CellFilter,
    *,
    if_matched: bool = False,
    what: str = "bigtable",
    deadline_s: float = DEADLINE_S,
    channel: grpc.Channel | None = None,
) -> bool:
    """Apply ``row``'s mutations only if the row has (``if_matched``) or has no
    (default) cell that ``predicate`` keeps; returns whether it had one.

    One CheckAndMutateRow, sent once: the server checks and writes atomically, which is
    what makes "unless done" safe against a concurrent delivery.
    """
    request = _CheckAndMutateRowRequest(table_name=table_name(table), row_key=row.key)
    condition = predicate.to_pb()
    if condition is not None:
        request.predicate_filter.CopyFrom(condition)
    (request.true_mutations if if_matched else request.false_mutations).extend(row.mutations)
    response = _unary(
        channel, _CHECK_AND_MUTATE, request, _CheckAndMutateRowResponse, row.key, what, deadline_s
    )
    return response.predicate_matched


def increment(
    table: Table | str,
    key: bytes,
    family: str,
    qualifier: bytes,
    by: int = 1,
    *,
    what: str = "bigtable",
    deadline_s: float = DEADLINE_S,
    channel: grpc.Channel | None = None,
) -> int:
    """Atomically add ``by`` to a 64-bit big-endian counter cell; returns the new value.

    One ReadModifyWriteRow, sent once (a repeat would count twice), so two callers
    never get the same number.
    """
    request = _ReadModifyWriteRowRequest(table_name=table_name(table), row_key=key)
    request.rules.add(family_name=family, column_qualifier=qualifier, increment_amount=by)
    response = _unary(
        channel, _READ_MODIFY_WRITE, request, _ReadModifyWriteRowResponse, key, what, deadline_s
    )
    for fam in response.row.families:
        if fam.name == family:
            for column in fam.columns:
                if column.qualifier == qualifier and column.cells:
                    return struct.unpack(">q", column.cells[0].value)[0]
    raise WriteError(what, {key: "the increment returned no value"}, {NO_STATUS})


def increment_many(
    table: Table | str,
    key: bytes,
    family: str,
    amounts: Mapping[bytes, int],
    *,
    what: str = "bigtable",
    deadline_s: float = DEADLINE_S,
    channel: grpc.Channel | None = None,
) -> dict[bytes, int]:
    """Atomically add to several counter cells of one row; returns their new values.

    One ReadModifyWriteRow with a rule per column, sent once: the counters of one
    chunk's outcome (done, rows, compute time, histogram bins) move together, and a
    reader never sees half of them.
    """
    request = _ReadModifyWriteRowRequest(table_name=table_name(table), row_key=key)
    for qualifier, by in sorted(amounts.items()):
        request.rules.add(family_name=family, column_qualifier=qualifier, increment_amount=by)
    if not request.rules:
        return {}
    response = _unary(
        channel, _READ_MODIFY_WRITE, request, _ReadModifyWriteRowResponse, key, what, deadline_s
    )
    return {
        column.qualifier: struct.unpack(">q", column.cells[0].value)[0]
        for fam in response.row.families
        if fam.name == family
        for column in fam.columns
        if column.cells
    }


def _unary(
    channel: grpc.Channel | None,
    method: str,
    request: Message,
    response_type: type[_Response],
    key: bytes,
    what: str,
    deadline_s: float,
) -> _Response:
    """Send a single-row request once (neither kind is safe to repeat), its failure
    raised as a :class:`WriteError` for ``key``."""
    call = (channel or data_channel(WRITE_SCOPE)).unary_unary(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    try:
        return call(request, timeout=deadline_s)
    except grpc.RpcError as exc:
        code, reason = _code_and_reason(exc)
        raise WriteError(what, {key: reason}, {code}) from exc


def _code_and_reason(exc: grpc.RpcError) -> tuple[int, str]:
    if not isinstance(exc, grpc.Call):
        return NO_STATUS, f"{type(exc).__name__}: {exc}"
    return exc.code().value[0], f"{exc.code().name}: {exc.details()}"
