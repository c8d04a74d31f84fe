"""The one write path: every row's status is checked, and a failure is raised, not lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.cloud.bigtable import column_family
from google.cloud.bigtable.data.mutations import RowMutationEntry
from google.cloud.bigtable.row_filters import TimestampRange
from google.cloud.bigtable_v2.types import bigtable as bt_types

from l2cache.domain.failures import PERMANENT, classify
from l2cache.gcp import bigtable_write
from l2cache.gcp.bigtable import WRITE_SCOPE, CellFilter, bigtable_instance, data_channel, read_row
from l2cache.gcp.bigtable_write import (
    RETRYABLE_CODES,
    Row,
    WriteError,
    check_and_mutate,
    encode_columns,
    increment,
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


# -- the generated-message encoding and the MutateRows engine ------------------------

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
    columns = [("f", b"c", values)]
    entries = encode_columns(keys, columns, [("f", col, v) for col, v in shared], TS)
    head = bt_types.MutateRowsRequest.serialize(bt_types.MutateRowsRequest(table_name=table.name))
    ours = head + b"".join(e for _, e in entries)
    assert ours == _library_request(table, rows)
    # one Row at a time, the same bytes
    built = []
    for key, value in zip(keys, values, strict=True):
        row = Row(key).set_cell("f", b"c", value, TS)
        for col, v in shared:
            row.set_cell("f", col, v, TS)
        built.append(row.encode())
    assert head + b"".join(built) == _library_request(table, rows)
    # the server's own timestamp (-1, a 10-byte varint) too
    server = table.direct_row(keys[0])
    server.set_cell("f", b"c", values[0])
    ours = head + Row(keys[0]).set_cell("f", b"c", values[0]).encode()
    assert ours == _library_request(table, [server])


def _entries(keys, family="f"):
    return [(k, Row(k).set_cell(family, b"c", b"v-" + k, TS).encode()) for k in keys]


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
        return self._switch("unary_stream", method, request_serializer, response_deserializer)

    def unary_unary(self, method, request_serializer, response_deserializer):
        return self._switch("unary_unary", method, request_serializer, response_deserializer)

    def _switch(self, kind, method, request_serializer, response_deserializer):
        calls = [
            getattr(ch, kind)(method, request_serializer, response_deserializer)
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
    row = Row(b"raw-once").set_cell("f", b"c", b"v")  # no timestamp: the server's
    assert not row.idempotent
    with pytest.raises(WriteError):
        write_rows(table, [row], "test", channel=channel)
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


def test_deletes_by_time_range_are_byte_for_byte_the_librarys(table):
    start = TS.replace(microsecond=123000)
    library = table.direct_row(b"del")
    window = TimestampRange(start=start, end=start + timedelta(milliseconds=1))
    library.delete_cells("f", [b"a", b"b"], time_range=window)
    micros = timestamp_micros(start)
    ours = Row(b"del").delete_cells("f", [b"a", b"b"], micros, micros + 1000)
    head = bt_types.MutateRowsRequest.serialize(bt_types.MutateRowsRequest(table_name=table.name))
    assert head + ours.encode() == _library_request(table, [library])


def test_rows_and_library_rows_go_through_the_same_checked_path(table):
    row = Row(b"mixed-ours").set_cell("f", b"c", b"ours", TS)
    theirs = table.direct_row(b"mixed-theirs")
    theirs.set_cell("f", b"c", b"theirs", timestamp=TS)
    assert write_rows(table, [row, theirs], "test") == 2
    assert read_row(table, b"mixed-theirs")["f"][b"c"] == b"theirs"
    assert read_row(table, b"mixed-ours")["f"][b"c"] == b"ours"


class _Counting:
    """The live channel, counting MutateRows requests and the rows in each."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._live = data_channel(WRITE_SCOPE)

    def unary_stream(self, method, request_serializer, response_deserializer):
        live = self._live.unary_stream(method, request_serializer, response_deserializer)

        def call(request, timeout=None):
            self.sizes.append(len(bt_types.MutateRowsRequest.pb().FromString(request).entries))
            return live(request, timeout=timeout)

        return call


def test_requests_stay_within_the_mutation_limit_and_every_failure_is_named(table, monkeypatch):
    monkeypatch.setattr(bigtable_write, "MAX_MUTATIONS", 7)
    rows = []
    for i in range(5):
        row = Row(b"limit-%d" % i)
        for col in (b"a", b"b", b"c"):
            row.set_cell("no_such_family" if i in (0, 4) else "f", col, b"v", TS)
        rows.append(row)
    counting = _Counting()
    with pytest.raises(WriteError) as err:
        write_rows(table, rows, "test", deadline_s=5, channel=counting)
    assert counting.sizes == [2, 2, 1]  # 3 mutations a row, at most 7 a request
    assert sorted(err.value.failed) == [b"limit-0", b"limit-4"]  # both batches' failures
    assert err.value.codes and not err.value.codes & RETRYABLE_CODES
    assert all(read_row(table, b"limit-%d" % i) is not None for i in (1, 2, 3))


def test_retried_rows_and_rows_sent_once_travel_apart(table):
    faults = _UnreachableFirstCalls(1)
    explicit = Row(b"apart-explicit").set_cell("f", b"c", b"v", TS)
    server = Row(b"apart-server").set_cell("f", b"c", b"v")
    assert write_rows(table, [server, explicit], "test", channel=faults) == 2
    assert faults.calls == 3  # the explicit row's request retried once, the other sent once
    assert read_row(table, b"apart-server") is not None


def test_check_and_mutate_applies_only_as_the_predicate_says(table):
    done = CellFilter(columns={"f": [b"status"]}, values=[b"done"])
    key = b"cam"
    write_rows(table, [Row(key).set_cell("f", b"status", b"running", TS)], "test")
    assert not check_and_mutate(table, Row(key).set_cell("f", b"status", b"failed"), done)
    assert read_row(table, key)["f"][b"status"] == b"failed"
    write_rows(table, [Row(key).set_cell("f", b"status", b"done")], "test")
    assert check_and_mutate(table, Row(key).set_cell("f", b"status", b"failed"), done)
    assert read_row(table, key)["f"][b"status"] == b"done"
    assert check_and_mutate(table, Row(key).set_cell("f", b"note", b"seen"), done, if_matched=True)
    assert read_row(table, key)["f"][b"note"] == b"seen"


def test_increment_counts_atomically(table):
    assert [increment(table, b"counter", "f", b"n") for _ in range(3)] == [1, 2, 3]
    assert increment(table, b"counter", "f", b"n", by=10) == 13


@pytest.mark.parametrize("kind", ["check_and_mutate", "increment"])
def test_single_row_writes_fail_classified_and_are_sent_once(table, kind):
    def send(target, channel=None, what="test"):
        if kind == "increment":
            return increment(target, b"once", "f", b"n", what=what, channel=channel)
        row = Row(b"once").set_cell("f", b"c", b"v")
        return check_and_mutate(target, row, CellFilter(), what=what, channel=channel)

    missing = table.name.rsplit("/", 1)[0] + "/no_such_table"
    with pytest.raises(WriteError) as err:
        send(missing)
    assert list(err.value.failed) == [b"once"]
    assert classify(err.value) == PERMANENT
    faults = _UnreachableFirstCalls(1)
    with pytest.raises(WriteError) as err:
        send(table, channel=faults)
    assert "UNAVAILABLE" in err.value.failed[b"once"]
    assert classify(err.value) != PERMANENT  # the caller's task is retried
    assert faults.calls == 1
