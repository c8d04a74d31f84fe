"""The one write helper: every row's status is checked, and a failure is raised, not lost."""

from __future__ import annotations

import pytest
from google.cloud.bigtable import column_family

from l2cache.bigtable_client import bigtable_instance
from l2cache.bigtable_write import WriteError, write_rows


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
