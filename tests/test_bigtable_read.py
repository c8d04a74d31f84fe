"""The one read path: what it selects, one deadline, resumed retries, failures classified.

Selections and filters run against the real Bigtable emulator; the retry rules against
a loopback gRPC server that speaks ReadRows and fails on cue (a cut stream, a missing
table, a stream that hangs), so the errors are the gRPC stack's own.
"""

from __future__ import annotations

import time
from concurrent import futures
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud.bigtable import column_family
from google.cloud.bigtable_v2.types import bigtable as bt_types

from l2cache.domain.failures import PERMANENT, TRANSIENT, classify
from l2cache.gcp.bigtable import (
    KEYS_ONLY,
    CellFilter,
    RowReader,
    bigtable_instance,
    prefix_range,
    read_row,
    read_rows,
    read_versions,
)
from l2cache.gcp.bigtable_write import Row, write_rows

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
MICROS0 = int(T0.timestamp()) * 1_000_000
MICROS1 = MICROS0 + 1_000_000


@pytest.fixture(scope="module")
def table(bigtable_emulator):
    instance = bigtable_instance("p", "read-test", admin=True)
    t = instance.table("reads")
    if not t.exists():
        gc = column_family.MaxVersionsGCRule(5)
        t.create(column_families={"f": gc, "g": gc})
    rows = []
    for i in range(10):
        row = Row(b"k%02d" % i)
        row.set_cell("f", b"a", b"old-%d" % i, T0)
        row.set_cell("f", b"a", b"new-%d" % i, T1)
        row.set_cell("f", b"b", b"b-%d" % i, T0)
        row.set_cell("g", b"run", b"run-%d" % (i % 3), T0)
        rows.append(row)
    for key in (b"p:1", b"p:2", b"p\xff", b"q:1"):
        rows.append(Row(key).set_cell("f", b"a", key, T0))
    write_rows(t, rows, "test")
    return t


def test_rows_by_key_range_prefix_and_the_whole_table(table):
    reader = RowReader(table)
    by_key = reader.rows(keys=[b"k03", b"k01", b"absent"])
    assert list(by_key) == [b"k01", b"k03"]  # key order, absent rows left out
    assert by_key[b"k01"] == {"f": {b"a": b"new-1", b"b": b"b-1"}, "g": {b"run": b"run-1"}}
    assert list(reader.rows(ranges=[(b"k02", b"k05")])) == [b"k02", b"k03", b"k04"]
    assert list(reader.rows(prefix=b"p:")) == [b"p:1", b"p:2"]
    assert list(reader.rows(prefix=b"p")) == [b"p:1", b"p:2", b"p\xff"]
    assert len(read_rows(table)) == 14  # nothing selected: the whole table
    assert list(read_rows(table, limit=2)) == [b"k00", b"k01"]
    assert read_row(table, b"k09")["f"][b"a"] == b"new-9"
    assert read_row(table, b"nope") is None


def test_an_empty_selection_reads_nothing_not_the_whole_table(table):
    assert read_rows(table, keys=[]) == {}
    assert read_rows(table, ranges=[]) == {}
    assert read_rows(table, keys=[], ranges=[]) == {}


def test_filters_columns_time_values_and_keys_only(table):
    reader = RowReader(table)
    only_b = reader.rows(keys=[b"k01"], cells=CellFilter(columns={"f": [b"b"]}))
    assert only_b == {b"k01": {"f": {b"b": b"b-1"}}}
    two_families = reader.rows(
        keys=[b"k01"], cells=CellFilter(columns={"f": [b"a"], "g": None}, per_column=1)
    )
    assert two_families == {b"k01": {"f": {b"a": b"new-1"}, "g": {b"run": b"run-1"}}}
    # the graph's "at time T": newest cell at or before T0
    at_t0 = reader.read([b"k01"], ["f"], {"f": [b"a"]}, until_micros=MICROS0)
    assert at_t0 == {b"k01": {"f": {b"a": b"old-1"}}}
    # exact values (the lineage:run filter), regex characters taken literally
    runs = read_rows(table, cells=CellFilter(columns={"g": [b"run"]}, values=[b"run-2"]))
    assert list(runs) == [b"k02", b"k05", b"k08"]
    assert read_rows(table, cells=CellFilter(values=[b"run-."])) == {}
    assert reader.keys_in_range(b"k00", b"k03") == [b"k00", b"k01", b"k02"]
    (only,) = reader.rows(keys=[b"k04"], cells=KEYS_ONLY)[b"k04"].values()  # one cell,
    assert list(only.values()) == [b""]  # its value stripped (which family: the server's pick)
    assert reader.any_in_range(b"k05", b"k06") and not reader.any_in_range(b"x", b"y")


def test_versions_carry_their_timestamps_newest_first(table):
    got = read_versions(table, keys=[b"k07"], cells=CellFilter(columns={"f": [b"a"]}))
    assert got == {b"k07": {"f": {b"a": [(MICROS1, b"new-7"), (MICROS0, b"old-7")]}}}
    window = CellFilter(columns={"f": [b"a"]}, start_micros=MICROS1, end_micros=MICROS1 + 1000)
    assert read_versions(table, keys=[b"k07"], cells=window) == {
        b"k07": {"f": {b"a": [(MICROS1, b"new-7")]}}
    }


def test_prefix_range_of_trailing_ff_bytes():
    assert prefix_range(b"p:") == (b"p:", b"p;")
    assert prefix_range(b"a\xff\xff") == (b"a\xff\xff", b"b")
    assert prefix_range(b"\xff") == (b"\xff", b"")


def test_a_missing_table_is_not_found_and_permanent(table):
    missing = table.name.rsplit("/", 1)[0] + "/no_such_table"
    with pytest.raises(api_exceptions.NotFound) as err:
        read_rows(missing, keys=[b"k"])
    assert classify(err.value) == PERMANENT


# -- retries against a ReadRows server that fails on cue ---------------------------------

_Request = bt_types.ReadRowsRequest.pb()
_Response = bt_types.ReadRowsResponse.pb()


class FakeBigtable:
    """A loopback ReadRows server over ``rows`` (sorted keys, one cell each). ``plan``
    says, per call, how many rows to send before failing with which code (``None``:
    send everything and end cleanly); every request is kept."""

    def __init__(
        self,
        rows: dict[bytes, bytes],
        plan: list[tuple[int, grpc.StatusCode | None]],
        row_delay_s: float = 0.0,
        scanned: bytes | None = None,
    ):
        self.rows = dict(sorted(rows.items()))
        self.plan = list(plan)
        self.row_delay_s = row_delay_s  # a slow server: this long before each row
        self.scanned = scanned  # first answer only: "scanned past this key", no rows
        self.requests: list = []
        handler = grpc.method_handlers_generic_handler(
            "google.bigtable.v2.Bigtable",
            {
                "ReadRows": grpc.unary_stream_rpc_method_handler(
                    self._read_rows,
                    request_deserializer=_Request.FromString,
                    response_serializer=_Response.SerializeToString,
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def _selected(self, request) -> list[bytes]:
        rs = request.rows
        if not rs.row_keys and not rs.row_ranges:
            return list(self.rows)
        out = [k for k in self.rows if k in set(rs.row_keys)]
        for rng in rs.row_ranges:
            for k in self.rows:
                lo_ok = (
                    k > rng.start_key_open
                    if rng.WhichOneof("start_key") == "start_key_open"
                    else k >= rng.start_key_closed
                )
                hi_ok = not rng.end_key_open or k < rng.end_key_open
                if lo_ok and hi_ok:
                    out.append(k)
        return sorted(set(out))

    def _read_rows(self, request, context):
        self.requests.append(request)
        sent, failure = self.plan.pop(0) if self.plan else (None, None)
        keys = self._selected(request)
        if request.rows_limit:
            keys = keys[: request.rows_limit]
        if self.scanned is not None:  # a filter matched nothing up to here, then a stall
            yield _Response(last_scanned_row_key=self.scanned)
            self.scanned = None
            time.sleep(30)
            return
        for i, key in enumerate(keys):
            if sent is not None and i == sent:
                break
            time.sleep(self.row_delay_s)
            response = _Response()
            chunk = response.chunks.add(row_key=key, value=self.rows[key], commit_row=True)
            chunk.family_name.value = "f"
            chunk.qualifier.value = b"a"
            yield response
        if failure is not None:
            context.abort(failure, "cut by the test")

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def fake():
    servers: list[FakeBigtable] = []

    def make(plan, n=10, **kw):
        server = FakeBigtable({b"r%02d" % i: b"v%d" % i for i in range(n)}, plan, **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _reader(server, deadline_s=10.0) -> RowReader:
    return RowReader("projects/p/instances/i/tables/t", server.channel, deadline_s=deadline_s)


def test_a_cut_stream_resumes_after_the_last_row_delivered(fake):
    server = fake([(3, grpc.StatusCode.UNAVAILABLE), (2, grpc.StatusCode.ABORTED)])
    got = _reader(server).rows(ranges=[(b"r00", b"r08")])
    assert list(got) == [b"r%02d" % i for i in range(8)]
    assert len(server.requests) == 3
    second, third = (r.rows.row_ranges[0] for r in server.requests[1:])
    assert second.start_key_open == b"r02" and second.end_key_open == b"r08"
    assert third.start_key_open == b"r04"


def test_resumed_keys_whole_table_and_limit(fake):
    server = fake([(2, grpc.StatusCode.UNAVAILABLE)])
    keys = [b"r07", b"r01", b"r04", b"r09"]
    assert list(_reader(server).rows(keys=keys)) == [b"r01", b"r04", b"r07", b"r09"]
    assert sorted(server.requests[1].rows.row_keys) == [b"r07", b"r09"]

    server = fake([(4, grpc.StatusCode.DEADLINE_EXCEEDED)])
    assert len(_reader(server).rows()) == 10
    assert server.requests[1].rows.row_ranges[0].start_key_open == b"r03"

    server = fake([(2, grpc.StatusCode.UNAVAILABLE)])
    assert list(_reader(server).rows(limit=5)) == [b"r00", b"r01", b"r02", b"r03", b"r04"]
    assert server.requests[1].rows_limit == 3


def test_a_stream_cut_after_its_last_row_is_not_read_again(fake):
    server = fake([(2, grpc.StatusCode.UNAVAILABLE)])
    assert list(_reader(server).rows(keys=[b"r00", b"r01"])) == [b"r00", b"r01"]
    assert len(server.requests) == 1


def test_not_found_is_raised_at_once_as_permanent(fake):
    server = fake([(0, grpc.StatusCode.NOT_FOUND)] * 5)
    with pytest.raises(api_exceptions.NotFound) as err:
        _reader(server).rows(keys=[b"r01"])
    assert classify(err.value) == PERMANENT
    assert len(server.requests) == 1


def test_transient_failures_are_retried_until_the_deadline_then_raised(fake):
    server = fake([(0, grpc.StatusCode.UNAVAILABLE)] * 1000)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _reader(server, deadline_s=0.5).rows(keys=[b"r01"])
    assert time.monotonic() - t < 5
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert classify(err.value) == TRANSIENT
    assert len(server.requests) > 2


def test_a_slow_stream_that_keeps_delivering_is_never_failed_for_its_length(fake):
    """The deadline bounds time without progress: a scan longer than it (here 10 rows
    at 0.1 s, deadline 0.35 s) goes on in attempts, each resumed after its last row."""
    server = fake([], row_delay_s=0.1)
    t = time.monotonic()
    got = _reader(server, deadline_s=0.35).rows()
    assert list(got) == [b"r%02d" % i for i in range(10)]
    assert time.monotonic() - t > 0.35  # longer than one deadline in all
    assert len(server.requests) >= 3  # cut at each deadline and resumed
    starts = [r.rows.row_ranges[0].start_key_open for r in server.requests[1:]]
    assert starts == sorted(starts) and all(starts)  # always past what was delivered


def test_scan_progress_the_server_reports_is_resumed_past(fake):
    """A filtered scan that matched nothing for a long stretch still moved: the
    resumed request starts after the key the server says it scanned past."""
    server = fake([], scanned=b"r05")
    got = _reader(server, deadline_s=0.4).rows()
    assert list(got) == [b"r%02d" % i for i in range(6, 10)]
    assert server.requests[1].rows.row_ranges[0].start_key_open == b"r05"


def test_other_codes_are_not_retried_and_stay_transient(fake):
    server = fake([(1, grpc.StatusCode.INTERNAL)])
    with pytest.raises(grpc.RpcError) as err:
        _reader(server).rows()
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert classify(err.value) == TRANSIENT
    assert len(server.requests) == 1


# -- request size: a read by many keys is split under Bigtable's request limit -------


def test_a_read_of_100000_keys_is_split_into_requests_under_the_byte_budget():
    from l2cache.gcp.bigtable import MAX_REQUEST_BYTES

    reader = RowReader("projects/p/instances/i/tables/t", channel=grpc.insecure_channel("x:1"))
    keys = [b"%020d" % (0x0204_0000_0000_0000 + i) for i in range(100_000)]
    cells = CellFilter(columns={"0": [b"size_nm3"]}, strip_values=True)
    requests = reader.requests(keys[::-1], None, None, cells)  # any order in, sorted out
    sizes = [len(r.SerializeToString()) for r in requests]
    assert max(sizes) <= MAX_REQUEST_BYTES
    assert len(requests) == 9  # 100,000 x 22 bytes / 256 KiB, no more
    got = [k for r in requests for k in r.rows.row_keys]
    assert got == keys  # every key once, in key order
    assert all(r.filter == requests[0].filter and r.filter.ByteSize() for r in requests)
    # ranges are bounded the same way; a small selection stays one request
    ranges = [(b"%020d" % i, b"%020d" % (i + 1)) for i in range(0, 40_000, 2)]
    split = reader.requests(None, ranges, None, cells)
    assert len(split) > 1
    assert max(len(r.SerializeToString()) for r in split) <= MAX_REQUEST_BYTES
    assert sum(len(r.rows.row_ranges) for r in split) == len(ranges)
    assert len(reader.requests(keys[:10], ranges[:5], b"p", cells)) == 1
    assert reader.requests([], None, None, cells) == []
    whole = reader.requests(None, None, None, cells)
    assert len(whole) == 1 and not whole[0].rows.row_keys and not whole[0].rows.row_ranges


def test_a_split_read_returns_every_row_once_in_key_order_and_keeps_its_limit(
    bigtable_emulator, monkeypatch
):
    from l2cache.gcp import bigtable as bt

    instance = bigtable_instance("p", "read-test", admin=True)
    t = instance.table("split")
    if not t.exists():
        t.create(column_families={"f": column_family.MaxVersionsGCRule(2)})
    write_rows(t, [Row(b"%020d" % i).set_cell("f", b"a", b"%d" % i, T0) for i in range(300)], "t")
    monkeypatch.setattr(bt, "MAX_REQUEST_BYTES", 1024)  # ~40 keys per request
    reader = RowReader(t)
    keys = [b"%020d" % i for i in range(0, 600, 2)]  # 300 keys, half of them absent
    assert len(reader.requests(keys, None, None, bt.NEWEST)) >= 7
    stamps: dict[bytes, int] = {}
    rows = reader.read(keys[::-1], stamps=stamps)
    assert list(rows) == [b"%020d" % i for i in range(0, 300, 2)]
    assert rows[b"%020d" % 42] == {"f": {b"a": b"42"}}
    assert set(stamps) == set(rows)
    limited = reader.rows(keys=keys, ranges=[(b"%020d" % 1, b"%020d" % 4)], limit=5)
    assert list(limited) == [b"%020d" % i for i in (0, 1, 2, 3, 4)]
