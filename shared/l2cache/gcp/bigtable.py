"""Bigtable access: clients, channels, the retry rule, and the one read path.

Every read of a Bigtable table in l2cache goes through :class:`RowReader` (or the
:func:`read_rows` / :func:`read_row` / :func:`read_versions` shorthands): row keys, key
ranges, prefixes or the whole table, with a server-side :class:`CellFilter` (columns,
timestamp range, exact values, newest N per column, keys only). One engine serves
them all, so one deadline, one retry rule and one classification of failures apply to
the lookup, the graph's parents, the ledger, QC and rollback alike:

- **Deadline**: a read fails when ``deadline_s`` (:data:`READ_DEADLINE_S`, 60 s;
  10,000 rows take ~0.5 s on the emulator) passes without progress, retries included.
  A stream that hangs becomes DEADLINE_EXCEEDED, a transient error its caller owns
  (the lookup answers 503, a task is retried), instead of a request that never ends.
  A stream that keeps delivering is never failed for its length: each attempt lasts
  at most ``deadline_s`` and is resumed after its last row, so a scan of 100 M rows
  (rollback, QC) runs as long as it needs with the same 60 s rule.
- **Retry**: a stream that fails with a transient code (:data:`TRANSIENT_CODES`) is
  resumed after the last row it delivered (or the last key the server reports having
  scanned past), at once when it had made progress, else with backoff
  (:class:`Backoff`) until the deadline; rows already read are kept, never read twice.
- **Failure**: what no retry can change (a missing table: NOT_FOUND; PERMISSION_DENIED;
  INVALID_ARGUMENT) is raised as the ``google.api_core`` exception of its code
  (``NotFound``...), permanent by :func:`l2cache.domain.failures.classify` and what the
  CLI reports as a user error; anything else is raised as the ``grpc.RpcError`` of the
  last attempt, transient.

The engine speaks ReadRows with the generated protobuf messages on a
single-threaded-stream gRPC channel and parses the cell chunks itself: the client
library turns every streamed row into proto-plus objects on a helper thread, which
measured ~9x slower (10,000 rows of 9 cells: 1.2 s vs 0.14 s on the emulator) and was
the whole lookup budget. Writes are :mod:`l2cache.gcp.bigtable_write`; table admin
(create, families) stays with ``google.cloud.bigtable`` (:func:`bigtable_instance`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.api_core import exceptions as api_exceptions
from google.cloud import bigtable
from google.cloud.bigtable_v2.types import bigtable as bt_types
from google.cloud.bigtable_v2.types import data as data_types

from l2cache.domain.failures import FINAL_ROW_CODES
from l2cache.support.gc_defer import gc_deferred

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.instance import Instance
    from google.cloud.bigtable.table import Table
    from google.protobuf.message import Message

EMULATOR_ENV = "BIGTABLE_EMULATOR_HOST"
DATA_ENDPOINT = "bigtable.googleapis.com:443"
DATA_SCOPE = "https://www.googleapis.com/auth/bigtable.data.readonly"
WRITE_SCOPE = "https://www.googleapis.com/auth/bigtable.data"
_READ_ROWS = "/google.bigtable.v2.Bigtable/ReadRows"
_ReadRowsRequest = bt_types.ReadRowsRequest.pb()
_ReadRowsResponse = bt_types.ReadRowsResponse.pb()
_RowFilter = data_types.RowFilter.pb()
_RowRange = data_types.RowRange.pb()
# The most one ReadRows request may serialize to: Bigtable limits a request's size
# (~512 KiB reported; the emulator enforces none), so a read by many keys is split
# into requests of at most this many bytes (~11,900 keys of 20 bytes each).
MAX_REQUEST_BYTES = 256 * 1024
_ROWSET_OVERHEAD = 8  # the ``rows`` field's own tag and length
# No message size limit in either direction (-1), as the client library's own channels:
# gRPC's default 4 MiB receive limit failed the local stack from ~70k chunks ("Received
# message larger than max (6027702 vs. 4194304)"); Bigtable bounds a row (256 MiB) itself.
UNLIMITED_MESSAGES = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)
_CHANNEL_OPTIONS = [
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    *UNLIMITED_MESSAGES,
]
READ_DEADLINE_S = 60.0
# Codes a repeat may cure (a server restarting, a stream cut, a lost race): what the
# client library retries. Reads always retry them; writes only when the request is safe
# to repeat (see l2cache.gcp.bigtable_write).
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)

RowCells = dict[str, dict[bytes, bytes]]  # family -> qualifier -> newest value
# family -> qualifier -> [(timestamp micros, value)], newest first
RowVersions = dict[str, dict[bytes, list[tuple[int, bytes]]]]
KeyRange = tuple[bytes, bytes]  # [start, end); b"" end = to the end of the table
# What a read fills: RowCells (newest values) or RowVersions (every version), by key.
_Rows = TypeVar("_Rows", RowCells, RowVersions)
_T = TypeVar("_T")


def bigtable_instance(project: str, instance: str, admin: bool = False) -> Instance:
    """A ``google.cloud.bigtable`` Instance handle: table admin, and the table names
    (``table.name``) the read and write paths take."""
    client = bigtable.Client(project=project, admin=admin)
    if os.environ.get(EMULATOR_ENV):
        _unlimit_emulator_data_channel(client)
    return client.instance(instance)


def _unlimit_emulator_data_channel(client: bigtable.Client) -> None:
    """Give the client's data channel to the emulator no message size limit.

    Against Bigtable the client library's channels have none, but for the emulator its
    data client (``google-cloud-bigtable`` 2.x) opens ``grpc.insecure_channel(host)``
    without options, i.e. gRPC's 4 MiB receive limit: a 6 MiB row read back through
    ``Table.read_row`` failed with RESOURCE_EXHAUSTED. The client's lazily built data
    client is built here instead, with the channel replaced while the transport is
    being made (its stubs bind the channel they see then); admin channels already carry
    the library's unlimited options. Checked by tests/test_emulator_channels.py.
    """
    import copy

    from google.cloud.bigtable.data import BigtableDataClient

    class _EmulatorDataClient(BigtableDataClient):
        def _build_grpc_channel(self, *args: object, **kwargs: object) -> grpc.Channel:
            swappable = super()._build_grpc_channel(*args, **kwargs)
            host = os.environ[EMULATOR_ENV]
            unlimited = grpc.insecure_channel(host, options=UNLIMITED_MESSAGES)
            swappable.swap_channel(unlimited).close()
            return swappable

    # As bigtable.Client._veneer_data_client builds it, but with the channel above.
    info = copy.copy(client._client_info)  # noqa: SLF001
    info.client_library_version = f"{bigtable.__version__}-data-shim"
    client._table_data_client = _EmulatorDataClient(  # noqa: SLF001
        project=client.project,
        credentials=client._credentials,  # noqa: SLF001
        client_options=client._client_options,  # noqa: SLF001
        _client_info=info,
        _disable_background_refresh=True,
    )


_channel_lock = threading.Lock()
_channels: dict[tuple[str, str], grpc.Channel] = {}


def data_channel(scope: str = DATA_SCOPE) -> grpc.Channel:
    """A shared gRPC channel to the emulator (insecure) or to Bigtable (authorized for
    ``scope``: read-only unless a writer asks for :data:`WRITE_SCOPE`)."""
    target = os.environ.get(EMULATOR_ENV) or DATA_ENDPOINT
    emulated = bool(os.environ.get(EMULATOR_ENV))
    key = (target, "" if emulated else scope)
    with _channel_lock:
        if key not in _channels:
            if emulated:
                _channels[key] = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
            else:
                import google.auth
                from google.auth.transport.grpc import secure_authorized_channel
                from google.auth.transport.requests import Request

                creds, _ = google.auth.default(scopes=[scope])
                _channels[key] = secure_authorized_channel(
                    creds, Request(), target, options=_CHANNEL_OPTIONS
                )
        return _channels[key]


def table_name(table: Table | str) -> str:
    """The full name (``projects/../instances/../tables/..``) of a table handle or name."""
    return table if isinstance(table, str) else table.name


class Backoff:
    """The pause between attempts of one call: 10 ms doubling to 1 s, within a deadline.

    Shared by the read and write paths so both give up at the same kind of moment.
    """

    def __init__(self, deadline_s: float) -> None:
        self.deadline = time.monotonic() + deadline_s
        self.delay = 0.01

    def remaining(self) -> float:
        """Seconds left for the next attempt (at least 1 ms: gRPC refuses 0)."""
        return max(self.deadline - time.monotonic(), 0.001)

    def wait(self) -> bool:
        """Sleep before the next attempt; False (no sleep) when it would end past the
        deadline."""
        if time.monotonic() + self.delay >= self.deadline:
            return False
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 1.0)
        return True


def read_failure(exc: grpc.RpcError) -> BaseException:
    """The exception a failed read raises: what no retry can change as its
    ``google.api_core`` exception (``NotFound`` for a missing table: permanent), anything
    else as the gRPC error itself (transient)."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code is not None and code.value[0] in FINAL_ROW_CODES:
        return api_exceptions.from_grpc_error(exc)
    return exc


# -- what to read ---------------------------------------------------------------------


@dataclass(frozen=True)
class CellFilter:
    """Which cells of a row to return, applied by the server (one ``RowFilter``).

    Applied in this order: ``key_regex`` (rows whose key matches: RE2, anchor it with
    ``^...$``), ``[start_micros, end_micros)`` cell timestamps (first: the
    cheapest cut), ``columns`` (family -> qualifiers, ``None`` or empty for the whole
    family), the newest ``per_column`` cells of each column, ``values`` (exact values,
    any of them: with ``per_column=1`` a predicate on the *current* value, since a
    column's older versions outlive their rewrite until garbage collection), the first
    ``per_row`` cells of a row, then ``strip_values`` (keys and timestamps only). A row with no cell left is not returned at all. The default
    selects everything.
    """

    columns: Mapping[str, Sequence[bytes] | None] | None = None
    start_micros: int | None = None
    end_micros: int | None = None
    values: Sequence[bytes] | None = None
    per_column: int = 0
    per_row: int = 0
    strip_values: bool = False
    key_regex: bytes | None = None  # RE2 on the row key, applied first (e.g. one run's rows)

    def to_pb(self) -> Message | None:
        """The generated ``RowFilter`` message; ``None`` when nothing is filtered.
        Bigtable wants chains and interleaves of >= 2 filters."""
        parts: list[Message] = []
        if self.key_regex is not None:
            parts.append(_RowFilter(row_key_regex_filter=self.key_regex))
        if self.start_micros is not None or self.end_micros is not None:
            window = _RowFilter()
            window.timestamp_range_filter.start_timestamp_micros = self.start_micros or 0
            window.timestamp_range_filter.end_timestamp_micros = self.end_micros or 0
            parts.append(window)
        if self.columns:
            by_family = []
            for family, qualifiers in self.columns.items():
                sel = [_RowFilter(family_name_regex_filter=f"^{re.escape(family)}$")]
                if qualifiers:
                    sel.append(_RowFilter(column_qualifier_regex_filter=_alternatives(qualifiers)))
                by_family.append(sel)
            if len(by_family) == 1:
                parts.extend(by_family[0])
            else:
                union = _RowFilter()
                union.interleave.filters.extend(_chain(sel) for sel in by_family)
                parts.append(union)
        if self.per_column:  # before the values: "the newest cell is X", not "some cell"
            parts.append(_RowFilter(cells_per_column_limit_filter=self.per_column))
        if self.values:
            parts.append(_RowFilter(value_regex_filter=_alternatives(self.values)))
        if self.per_row:
            parts.append(_RowFilter(cells_per_row_limit_filter=self.per_row))
        if self.strip_values:
            parts.append(_RowFilter(strip_value_transformer=True))
        return _chain(parts) if parts else None


ALL = CellFilter()
NEWEST = CellFilter(per_column=1)
KEYS_ONLY = CellFilter(per_row=1, strip_values=True)


def _alternatives(exact: Iterable[bytes]) -> bytes:
    """An RE2 pattern matching exactly one of ``exact``."""
    return b"^(" + b"|".join(re.escape(bytes(v)) for v in exact) + b")$"


def _chain(parts: list[Message]) -> Message:
    """One filter applying ``parts`` in order: Bigtable refuses a chain of fewer than two
    filters, so a single part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    out = _RowFilter()
    out.chain.filters.extend(parts)
    return out


def prefix_range(prefix: bytes) -> KeyRange:
    """The key range of every key starting with ``prefix``."""
    end = prefix.rstrip(b"\xff")
    end = end[:-1] + bytes([end[-1] + 1]) if end else b""
    return prefix, end


# -- the engine -----------------------------------------------------------------------


class RowReader:
    """Reads of one table: every Bigtable read in l2cache is one of these methods.

    ``deadline_s`` bounds the time a call goes without progress (see the module
    docstring), retries included. The reader holds no state
    between calls, so threads may share it (the lookup reads batches concurrently).
    """

    def __init__(
        self,
        table: Table | str,
        channel: grpc.Channel | None = None,
        deadline_s: float = READ_DEADLINE_S,
    ) -> None:
        self.table_name = table_name(table)
        self.deadline_s = deadline_s
        self._call = (channel or data_channel()).unary_stream(
            _READ_ROWS,
            request_serializer=_ReadRowsRequest.SerializeToString,
            response_deserializer=_ReadRowsResponse.FromString,
        )

    # -- the hot paths: rows by key, newest cells ------------------------------------
    def read(
        self,
        keys: list[bytes],
        families: list[str] | None = None,
        qualifiers: dict[str, list[bytes]] | None = None,
        until_micros: int | None = None,
        stamps: dict[bytes, int] | None = None,
    ) -> dict[bytes, RowCells]:
        """Rows of ``keys`` that exist, newest cell per column, optionally only
        ``families`` (and per family only ``qualifiers``) and only cells with a
        timestamp <= ``until_micros`` (the graph "at time T"). ``stamps``, when given,
        receives each returned row's newest cell timestamp (microseconds): what the
        lookup's ``ETag`` is made of."""
        columns = {f: (qualifiers or {}).get(f) for f in families} if families else None
        # end is exclusive; Bigtable timestamps are whole milliseconds
        end = None if until_micros is None else until_micros + 1000
        cells = CellFilter(columns, end_micros=end, per_column=1)
        out: dict[bytes, RowCells] = {}
        self._read(keys, None, None, cells, 0, False, out, stamps)
        return out

    def any_in_range(self, start_key: bytes, end_key: bytes) -> bool:
        """Whether any row has a key in ``[start_key, end_key)`` (reads one key at most)."""
        return bool(self.keys_in_range(start_key, end_key, limit=1))

    def keys_in_range(self, start_key: bytes, end_key: bytes, limit: int = 0) -> list[bytes]:
        """Row keys in ``[start_key, end_key)`` (at most ``limit``; 0 = all), keys only:
        one cell per row, values stripped."""
        return list(self.rows(ranges=[(start_key, end_key)], cells=KEYS_ONLY, limit=limit))

    # -- the general reads ------------------------------------------------------------
    def rows(
        self,
        *,
        keys: Sequence[bytes] | None = None,
        ranges: Sequence[KeyRange] | None = None,
        prefix: bytes | None = None,
        cells: CellFilter = NEWEST,
        limit: int = 0,
    ) -> dict[bytes, RowCells]:
        """``{key: {family: {qualifier: newest value}}}`` of the rows selected, in key
        order. Rows are ``keys``, ``ranges`` and ``prefix`` together; none of them
        given reads the whole table, an empty list reads nothing. ``limit``: at most
        that many rows (0 = all)."""
        out: dict[bytes, RowCells] = {}
        self._read(keys, ranges, prefix, cells, limit, False, out)
        return out

    def versions(
        self,
        *,
        keys: Sequence[bytes] | None = None,
        ranges: Sequence[KeyRange] | None = None,
        prefix: bytes | None = None,
        cells: CellFilter = ALL,
        limit: int = 0,
    ) -> dict[bytes, RowVersions]:
        """As :meth:`rows`, with every cell version the filter keeps and its timestamp
        (microseconds), newest first: what rollback selects its deletions by."""
        out: dict[bytes, RowVersions] = {}
        self._read(keys, ranges, prefix, cells, limit, True, out)
        return out

    def _read(
        self,
        keys: Sequence[bytes] | None,
        ranges: Sequence[KeyRange] | None,
        prefix: bytes | None,
        cells: CellFilter,
        limit: int,
        versions: bool,
        out: dict[bytes, _Rows],
        stamps: dict[bytes, int] | None = None,
    ) -> None:
        """Build the requests of a selection (:meth:`requests`: several when its keys
        or ranges exceed one request's size) and stream each into ``out``."""
        requests = self.requests(keys, ranges, prefix, cells, limit)
        if len(requests) <= 1:
            for request in requests:
                self._stream(request, out, versions, stamps)
            return
        # several requests: each read on its own, merged in key order, cut to ``limit``
        parts: dict[bytes, _Rows] = {}
        for request in requests:
            self._stream(request, parts, versions, stamps)
        for key in sorted(parts)[: limit or None]:
            out[key] = parts[key]

    def requests(
        self,
        keys: Sequence[bytes] | None,
        ranges: Sequence[KeyRange] | None,
        prefix: bytes | None,
        cells: CellFilter,
        limit: int = 0,
    ) -> list[Message]:
        """The ReadRows requests of one selection, each at most
        :data:`MAX_REQUEST_BYTES` serialized: Bigtable refuses a request over ~512 KiB
        (the emulator does not), and a rollback batch or a prune page names up to ~470,000
        row keys (10 MB). Keys are sorted and split into runs that fit; ranges likewise.
        No request for an empty selection; one whole-table request for none given."""
        given = [s for s in (keys, ranges) if s is not None]
        if prefix is None and given and not any(given):
            return []  # an empty selection, not the whole table
        base = _ReadRowsRequest(table_name=self.table_name, rows_limit=limit)
        filt = cells.to_pb()
        if filt is not None:
            base.filter.CopyFrom(filt)
        budget = MAX_REQUEST_BYTES - base.ByteSize() - _ROWSET_OVERHEAD
        pbranges = []
        for start, end in [
            *(ranges or ()),
            *([prefix_range(prefix)] if prefix is not None else []),
        ]:
            rng = _RowRange(start_key_closed=start)
            if end:
                rng.end_key_open = end
            pbranges.append(rng)
        key_parts = _split(sorted(set(keys or ())), budget, _item_size)
        range_parts = _split(pbranges, budget, _item_size)
        groups: list[tuple[list[bytes], list[Message]]] = [(k, []) for k in key_parts]
        groups += [([], r) for r in range_parts]
        if len(key_parts) == len(range_parts) == 1:
            both = _split([*key_parts[0], *range_parts[0]], budget, _item_size)
            if len(both) == 1:
                groups = [(key_parts[0], range_parts[0])]  # one request, as small reads
        if not groups:
            groups.append(([], []))  # the whole table
        out = []
        for part_keys, part_ranges in groups:
            request = _ReadRowsRequest()
            request.CopyFrom(base)
            request.rows.row_keys.extend(part_keys)
            request.rows.row_ranges.extend(part_ranges)
            out.append(request)
        return out

    def _stream(
        self,
        request: Message,
        out: dict[bytes, _Rows],
        versions: bool,
        stamps: dict[bytes, int] | None,
    ) -> None:
        """Stream one request, resuming it after the last delivered row on a transient
        failure until the deadline."""
        backoff = Backoff(self.deadline_s)
        while True:
            progress = _Progress()
            try:
                with gc_deferred():  # ~3 containers per cell, none in a cycle
                    stream = self._call(request, timeout=backoff.remaining())
                    _parse(stream, out, progress, versions, stamps)
                return
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in TRANSIENT_CODES and progress.last_key is not None:
                    # it was moving: resume after its last row at once, with a full
                    # deadline again (the deadline bounds time without progress)
                    backoff = Backoff(self.deadline_s)
                    if not _resume_after(request, progress.last_key, progress.rows):
                        return  # everything asked for was delivered before the failure
                    continue
                if code not in TRANSIENT_CODES or not backoff.wait():
                    failure = read_failure(exc)
                    if failure is exc:
                        raise
                    raise failure from exc


def _split(items: list[_T], budget: int, size: Callable[[_T], int]) -> list[list[_T]]:
    """``items`` in runs whose serialized size as repeated fields (tag, length, bytes)
    stays within ``budget`` (an item bigger than the budget alone in its run)."""
    out: list[list[_T]] = []
    part: list[_T] = []
    used = 0
    for item in items:
        n = size(item)
        cost = 1 + _varint_len(n) + n
        if part and used + cost > budget:
            out.append(part)
            part, used = [], 0
        part.append(item)
        used += cost
    if part:
        out.append(part)
    return out


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _item_size(item: bytes | Message) -> int:
    return len(item) if isinstance(item, bytes) else item.ByteSize()


def _resume_after(request: Message, last_key: bytes, delivered: int) -> bool:
    """Narrow ``request`` to the rows after ``last_key`` (rows stream in key order);
    False when nothing is left to read."""
    if request.rows_limit:
        request.rows_limit -= delivered
        if request.rows_limit <= 0:
            return False
    rows = request.rows
    whole_table = not rows.row_keys and not rows.row_ranges
    keys = [k for k in rows.row_keys if k > last_key]
    ranges = []
    for rng in rows.row_ranges:
        end_kind = rng.WhichOneof("end_key")
        end = getattr(rng, end_kind) if end_kind else None
        if end is not None and end <= last_key:
            continue  # wholly delivered
        start_kind = rng.WhichOneof("start_key")
        start = getattr(rng, start_kind) if start_kind else b""
        if start <= last_key:
            rng.start_key_open = last_key
        ranges.append(rng)
    if whole_table:
        rng = data_types.RowRange.pb()(start_key_open=last_key)
        ranges.append(rng)
    if not keys and not ranges:
        return False
    new = data_types.RowSet.pb()(row_keys=keys, row_ranges=ranges)
    request.rows.CopyFrom(new)
    return True


class _Progress:
    """How far one attempt got: the last key it delivered or the server scanned past,
    and how many rows it delivered (for ``rows_limit``). Kept as two numbers, not a
    list of keys, so a scan of 100 M rows holds no second copy of its keys."""

    __slots__ = ("last_key", "rows")

    def __init__(self) -> None:
        self.last_key: bytes | None = None
        self.rows = 0

    def row(self, key: bytes) -> None:
        self.last_key = key
        self.rows += 1

    def scanned(self, key: bytes) -> None:
        """The server scanned up to ``key`` (``last_scanned_row_key``): rows a filter
        dropped count as progress, so a filtered scan over a long stretch with no match
        resumes past it instead of starting over."""
        if self.last_key is None or key > self.last_key:
            self.last_key = key


def _parse(
    responses: Iterable[Message],
    out: dict[bytes, _Rows],
    progress: _Progress,
    versions: bool,
    stamps: dict[bytes, int] | None = None,
) -> None:
    """Cell chunks -> rows: the newest value per column (the first cell of a column is
    the newest), or with ``versions`` every cell as ``(timestamp micros, value)``,
    newest first. ``stamps`` (newest values only) receives each row's newest cell
    timestamp."""
    row: dict = {}
    key = family = qualifier = None
    stamp = newest = 0
    timed = versions or stamps is not None
    parts: list[bytes] = []
    for response in responses:
        for chunk in response.chunks:
            if chunk.reset_row:
                row, parts, newest = {}, [], 0
                continue
            if chunk.row_key:
                key = chunk.row_key
            if chunk.HasField("family_name"):
                family = chunk.family_name.value
            if chunk.HasField("qualifier"):
                qualifier = chunk.qualifier.value
            if timed and not parts:  # a cell's first chunk carries its timestamp
                stamp = chunk.timestamp_micros
                newest = stamp if stamp > newest else newest
            parts.append(chunk.value)
            if chunk.value_size == 0:  # the cell is complete
                value = parts[0] if len(parts) == 1 else b"".join(parts)
                parts = []
                columns = row.setdefault(family, {})
                if versions:
                    columns.setdefault(qualifier, []).append((stamp, value))
                else:
                    columns.setdefault(qualifier, value)
            if chunk.commit_row:
                out[key] = row
                if stamps is not None:
                    stamps[key] = newest
                progress.row(key)
                row, newest = {}, 0
        if response.last_scanned_row_key:
            progress.scanned(response.last_scanned_row_key)


# -- shorthands for reads that need no reader of their own ---------------------------


def read_rows(
    table: Table | str,
    *,
    keys: Sequence[bytes] | None = None,
    ranges: Sequence[KeyRange] | None = None,
    prefix: bytes | None = None,
    cells: CellFilter = NEWEST,
    limit: int = 0,
    deadline_s: float = READ_DEADLINE_S,
) -> dict[bytes, RowCells]:
    """:meth:`RowReader.rows` of ``table`` (a handle or its name)."""
    reader = RowReader(table, deadline_s=deadline_s)
    return reader.rows(keys=keys, ranges=ranges, prefix=prefix, cells=cells, limit=limit)


def read_versions(
    table: Table | str,
    *,
    keys: Sequence[bytes] | None = None,
    ranges: Sequence[KeyRange] | None = None,
    prefix: bytes | None = None,
    cells: CellFilter = ALL,
    limit: int = 0,
    deadline_s: float = READ_DEADLINE_S,
) -> dict[bytes, RowVersions]:
    """:meth:`RowReader.versions` of ``table`` (a handle or its name)."""
    reader = RowReader(table, deadline_s=deadline_s)
    return reader.versions(keys=keys, ranges=ranges, prefix=prefix, cells=cells, limit=limit)


def read_row(table: Table | str, key: bytes, cells: CellFilter = NEWEST) -> RowCells | None:
    """The newest cells of one row; ``None`` when it does not exist."""
    return read_rows(table, keys=[key], cells=cells).get(key)
