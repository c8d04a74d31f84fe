"""The emulator channels have no 4 MiB message limit (as production's have none).

From ~70k chunks the local stack failed with ``Received message larger than max
(6027702 vs. 4194304)``: gRPC's default receive limit on a channel to the emulator.
A 6 MiB cell is written and read back through every path the code and the operator
commands use: the one read path (``read_rows`` / ``read_row``) and the client
library's ``Table`` (table admin and its data client, built by ``bigtable_instance``).
"""

from __future__ import annotations

import pytest
from google.cloud.bigtable import column_family

from l2cache.gcp.bigtable import bigtable_instance, read_row, read_rows
from l2cache.gcp.bigtable_write import Row, write_rows

BIG = 6 * 1024 * 1024  # > gRPC's default 4 MiB receive limit


@pytest.fixture(scope="module")
def big_table(bigtable_emulator):
    table = bigtable_instance("p", "channels", admin=True).table("big")
    if not table.exists():
        table.create(column_families={"f": column_family.MaxVersionsGCRule(1)})
    write_rows(table, [Row(b"big").set_cell("f", b"v", b"\x07" * BIG)], "test")
    return table


def test_the_read_path_reads_a_row_larger_than_4_mib(big_table):
    assert len(read_row(big_table, b"big")["f"][b"v"]) == BIG
    assert len(read_rows(big_table)[b"big"]["f"][b"v"]) == BIG


def test_the_client_library_reads_a_row_larger_than_4_mib(big_table):
    table = bigtable_instance("p", "channels").table("big")  # a fresh client, read-only use
    row = table.read_row(b"big")
    assert len(row.cells["f"][b"v"][0].value) == BIG
    assert [len(r.cells["f"][b"v"][0].value) for r in table.read_rows()] == [BIG]


def test_the_client_library_writes_a_row_larger_than_4_mib(big_table):
    table = bigtable_instance("p", "channels").table("big")
    row = table.direct_row(b"big2")
    row.set_cell("f", b"v", b"\x08" * BIG)
    assert [s.code for s in table.mutate_rows([row])] == [0]
    assert len(read_row(big_table, b"big2")["f"][b"v"]) == BIG
