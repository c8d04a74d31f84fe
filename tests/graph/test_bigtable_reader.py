"""PCG graph-table reader on the real Bigtable emulator: timestamps, zstd and raw children."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from l2cache.domain import ids
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.inputs import graph
from l2cache_tools.dataset.build import create_graph_table

BITS = ids.SpatialBits.from_mapping({1: 10, 2: 10})
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


@pytest.fixture(scope="module")
def table(bigtable_emulator):
    instance = bigtable_instance("graph-test", "inst", admin=True)
    return create_graph_table(instance, "pcg_graph")


def test_parents_at_a_timestamp_and_both_children_encodings(table, monkeypatch):
    n = 25
    svs = ids.encode_ids(1, np.tile([2, 3, 4], (n, 1)), np.arange(1, n + 1), BITS)
    old = ids.encode_ids(2, [[2, 3, 4]], 1, BITS)[0]
    new = ids.encode_ids(2, [[2, 3, 4]], 2, BITS)[0]
    rows = []
    for i, sv in enumerate(svs.tolist()):
        r = table.direct_row(ids.row_key(sv))
        r.set_cell("0", b"parents", struct.pack("<Q", int(old)), timestamp=T0)
        if i % 2:  # every other supervoxel moves to the new node at T1
            r.set_cell("0", b"parents", struct.pack("<Q", int(new)), timestamp=T1)
        rows.append(r)
    moved = svs[1::2]
    for node, children, compress in ((old, svs, True), (new, moved, False)):
        r = table.direct_row(ids.row_key(node))
        r.set_cell("0", b"children", graph.encode_children(children, compress), timestamp=T1)
        rows.append(r)
    assert all(s.code == 0 for s in table.mutate_rows(rows))
    monkeypatch.setattr(graph, "READ_BATCH", 7)  # several read batches
    reader = graph.BigtableGraphReader(table.name)
    unknown = ids.encode_ids(1, [[9, 9, 9]], 1, BITS)
    query = np.concatenate([svs, unknown])
    before = reader.l2_parents(query, T0 + timedelta(seconds=1))
    after = reader.l2_parents(query, T1)
    latest = reader.l2_parents(query)
    assert before.tolist() == [int(old)] * n + [0]
    expected = [int(new) if i % 2 else int(old) for i in range(n)] + [0]
    assert after.tolist() == expected and latest.tolist() == expected
    assert reader.l2_parents(query, T0 - timedelta(seconds=1)).tolist() == [0] * (n + 1)
    kids = reader.l2_children(np.array([old, new, 12345], dtype=np.uint64))
    assert kids[int(old)].tolist() == svs.tolist()
    assert kids[int(new)].tolist() == moved.tolist()
    assert 12345 not in kids
    compressed = table.read_row(ids.row_key(old)).cells["0"][b"children"][0].value
    assert compressed[:4] == graph.ZSTD_MAGIC


def test_a_read_stream_that_hangs_ends_at_its_deadline():
    """A loopback gRPC server that takes ReadRows and never answers (a hung backend):
    the reader raises DEADLINE_EXCEEDED, which callers treat as transient, instead of
    waiting for ever."""
    import threading
    import time
    from concurrent import futures

    import grpc

    from l2cache.domain.failures import TRANSIENT, classify
    from l2cache.gcp.bigtable import RowReader

    release = threading.Event()

    def hang(request, context):
        release.wait(30)
        return iter(())

    handler = grpc.method_handlers_generic_handler(
        "google.bigtable.v2.Bigtable",
        {"ReadRows": grpc.unary_stream_rpc_method_handler(hang)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        reader = RowReader("projects/p/instances/i/tables/t", channel, deadline_s=0.5)
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            reader.read([b"1", b"2"])
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t < 10  # not the 30 s the server would hang
        assert classify(err.value) == TRANSIENT
        with pytest.raises(grpc.RpcError) as err:
            reader.keys_in_range(b"1", b"2")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # the general read, same one deadline
            reader.rows(prefix=b"r")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t < 3  # one deadline, not one per attempt
        assert classify(err.value) == TRANSIENT
    finally:
        release.set()
        server.stop(0)
