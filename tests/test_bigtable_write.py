"""The one write helper: every row's status is checked, and a failure is raised, not lost."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.cloud.bigtable import column_family
from google.cloud.bigtable.data.mutations import RowMutationEntry
from google.cloud.bigtable_v2.types import bigtable as bt_types

from l2cache.domain.failures import PERMANENT, classify
from l2cache.gcp.bigtable import WRITE_SCOPE, bigtable_instance, data_channel
from l2cache.gcp.bigtable_write import (
    RETRYABLE_CODES,
    SERVER_TIMESTAMP,
    CellEncoder,
    WriteError,
    encode_entry,
    encode_rows,
    mutate_entries,
    timestamp_micros,
    write_rows,
)
from l2cache_tools.local.emulators import free_port


@pytest.fixture
def table(bigtable_emulator):
    instance = bigtable_instance("p", "write-test", admin=True)
    t = instance.table("writes")
    if not t.exists():
        t.create(column_families={"f": column_family.MaxVersionsGCRule(1)})
    return t


def test_rows_are_written_and_counted(table):
    rows = []
    for i in range(3):
        row = table.direct_row(b"ok-%d" % i)
        row.set_cell("f", b"c", b"v%d" % i)
        rows.append(row)
    assert write_rows(table, rows, "test") == 3
    assert table.read_row(b"ok-2").cells["f"][b"c"][0].value == b"v2"


def test_a_row_that_fails_is_raised_with_its_key(table):
    good = table.direct_row(b"good")
    good.set_cell("f", b"c", b"v")
    bad = table.direct_row(b"bad")
    bad.set_cell("no_such_family", b"c", b"v")
    with pytest.raises(WriteError) as err:
        write_rows(table, [good, bad], "test", deadline_s=5)
    assert list(err.value.failed) == [b"bad"]
    assert "1 test row(s) failed" in str(err.value)


def test_a_missing_table_is_raised_not_swallowed(table):
    missing = bigtable_instance("p", "write-test").table("no_such_table")
    row = missing.direct_row(b"k")
    row.set_cell("f", b"c", b"v")
    with pytest.raises(WriteError) as err:
        write_rows(missing, [row], "test", deadline_s=3)
    assert b"k" in err.value.failed


# -- the feature rows' own encoder and MutateRows writer ------------------------------

TS = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def _library_request(table, rows) -> bytes:
    """The MutateRows request the client library would send for ``rows``."""
    # as Table.mutate_rows hands rows to the data client, which sends entry._to_pb()
    entries = [RowMutationEntry(r.row_key, r._get_mutations())._to_pb() for r in rows]
    request = bt_types.MutateRowsRequest(table_name=table.name, entries=entries)
    return bt_types.MutateRowsRequest.serialize(request)


def test_the_encoded_request_is_byte_for_byte_the_librarys(table):
    values = [b"\x01\x02", b"", b"x" * 300]  # short, empty (omitted), long length varint
    shared = [(b"run", b"r-1"), (b"params", b"p" * 16)]
    keys = [b"%020d" % (7 + i) for i in range(3)]
    rows = []
    for key, value in zip(keys, values, strict=True):
        row = table.direct_row(key)
        row.set_cell("f", b"c", value, timestamp=TS)
        for col, v in shared:
            row.set_cell("f", col, v, timestamp=TS)
        rows.append(row)
    micros = timestamp_micros(TS)
    constant = b"".join(CellEncoder("f", col, micros).encode(v) for col, v in shared)
    entries = encode_rows(keys, [(CellEncoder("f", b"c", micros), values)], constant)
    head = bt_types.MutateRowsRequest.serialize(bt_types.MutateRowsRequest(table_name=table.name))
    ours = head + b"".join(e for _, e in entries)
    assert ours == _library_request(table, rows)
    # the server's own timestamp (-1, a 10-byte varint) too
    server = table.direct_row(keys[0])
    server.set_cell("f", b"c", values[0])
    ours = head + encode_entry(keys[0], CellEncoder("f", b"c", SERVER_TIMESTAMP).encode(values[0]))
    assert ours == _library_request(table, [server])


def _entries(keys, family="f"):
    enc = CellEncoder(family, b"c", timestamp_micros(TS))
    return [(k, encode_entry(k, enc.encode(b"v-" + k))) for k in keys]


def test_mutate_entries_writes_and_counts(table):
    keys = [b"raw-%d" % i for i in range(5)]
    channel = data_channel(WRITE_SCOPE)
    assert mutate_entries(channel, table.name, _entries(keys), "test") == 5
    assert table.read_row(b"raw-3").cells["f"][b"c"][0].value == b"v-raw-3"


def test_mutate_entries_raises_a_failed_row_with_its_key_and_code(table):
    good = _entries([b"raw-good"])
    bad = _entries([b"raw-bad"], family="no_such_family")
    with pytest.raises(WriteError) as err:
        mutate_entries(data_channel(WRITE_SCOPE), table.name, good + bad, "test", deadline_s=5)
    assert list(err.value.failed) == [b"raw-bad"]
    assert "no_such_family" in err.value.failed[b"raw-bad"]
    assert err.value.codes and not err.value.codes & RETRYABLE_CODES
    assert table.read_row(b"raw-good") is not None


def test_mutate_entries_on_a_missing_table_is_permanent_not_swallowed(table):
    missing = table.name.rsplit("/", 1)[0] + "/no_such_table"
    with pytest.raises(WriteError) as err:
        mutate_entries(data_channel(WRITE_SCOPE), missing, _entries([b"k"]), "test", deadline_s=3)
    assert b"k" in err.value.failed
    assert classify(err.value) == PERMANENT


class _UnreachableFirstCalls:
    """A channel whose first ``n`` calls go to a loopback port nobody listens on: a real
    UNAVAILABLE from the gRPC stack, the transient failure of a server restarting."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.calls = 0
        self._dead = grpc.insecure_channel(f"127.0.0.1:{free_port()}")
        self._live = data_channel(WRITE_SCOPE)

    def unary_stream(self, method, request_serializer, response_deserializer):
        calls = [
            ch.unary_stream(method, request_serializer, response_deserializer)
            for ch in (self._dead, self._live)
        ]

        def call(request, timeout=None):
            self.calls += 1
            if self.left:
                self.left -= 1
                return calls[0](request, timeout=timeout)
            return calls[1](request, timeout=timeout)

        return call


def test_mutate_entries_retries_a_transient_rpc_failure_until_it_lands(table):
    faults = _UnreachableFirstCalls(2)
    channel = faults
    assert mutate_entries(channel, table.name, _entries([b"raw-retried"]), "test") == 1
    assert faults.calls == 3
    assert table.read_row(b"raw-retried").cells["f"][b"c"][0].value == b"v-raw-retried"


def test_mutate_entries_gives_up_at_its_deadline_as_a_transient_error(table):
    faults = _UnreachableFirstCalls(10**6)
    channel = faults
    with pytest.raises(WriteError) as err:
        mutate_entries(channel, table.name, _entries([b"raw-never"]), "test", deadline_s=0.5)
    assert "gave up after" in err.value.failed[b"raw-never"]
    assert classify(err.value) != PERMANENT  # the task is retried as a whole later
    assert faults.calls > 2


def test_server_timestamped_writes_are_sent_once(table):
    faults = _UnreachableFirstCalls(1)
    channel = faults
    enc = CellEncoder("f", b"c", SERVER_TIMESTAMP)
    entries = [(b"raw-once", encode_entry(b"raw-once", enc.encode(b"v")))]
    with pytest.raises(WriteError):
        mutate_entries(channel, table.name, entries, "test", idempotent=False)
    assert faults.calls == 1


class _StatusesDropped:
    """The live emulator, with the response stream rewritten on its way back: entries
    after the first are dropped or their index pushed out of range. The rows are written;
    what is tested is that a row without a status is never counted as written."""

    def __init__(self, out_of_range: bool) -> None:
        self.out_of_range = out_of_range
        self._live = data_channel(WRITE_SCOPE)

    def unary_stream(self, method, request_serializer, response_deserializer):
        live = self._live.unary_stream(method, request_serializer, response_deserializer)

        def call(request, timeout=None):
            for response in live(request, timeout=timeout):
                kept = type(response)()
                for entry in response.entries:
                    if entry.index == 0 or self.out_of_range:
                        added = kept.entries.add()
                        added.CopyFrom(entry)
                        if entry.index:
                            added.index = 99 + entry.index
                yield kept

        return call


@pytest.mark.parametrize("out_of_range", [False, True])
def test_a_row_the_server_gives_no_status_is_a_transient_failure(table, out_of_range):
    keys = [b"raw-status-%d" % i for i in range(3)]
    with pytest.raises(WriteError) as err:
        mutate_entries(_StatusesDropped(out_of_range), table.name, _entries(keys), "test")
    assert sorted(err.value.failed) == keys[1:]
    assert all("no status" in reason for reason in err.value.failed.values())
    assert err.value.codes == {grpc.StatusCode.UNKNOWN.value[0]}
    assert classify(err.value) != PERMANENT  # retried as a whole by the task
