"""Pub/Sub publish times: every RFC 3339 form becomes the same instant, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from l2cache.handlers.on_edit import parse_publish_time, to_millisecond


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.5+02:00", datetime(2026, 1, 2, 1, 4, 5, 500000, tzinfo=UTC)),
        ("2026-01-02T03:04:05.123456789Z", datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2026-01-02T03:04:05.1-00:30", datetime(2026, 1, 2, 3, 34, 5, 100000, tzinfo=UTC)),
        ("2026-01-02T03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_rfc3339_forms_parse_to_the_same_utc_instant(text, expected):
    parsed = parse_publish_time(text)
    assert parsed == expected and parsed.tzinfo is UTC


@pytest.mark.parametrize("text", [None, "", "yesterday", "2026-13-01T00:00:00Z"])
def test_unreadable_times_are_none(text):
    assert parse_publish_time(text) is None


def test_versions_are_whole_milliseconds_in_utc():
    when = to_millisecond(datetime(2026, 1, 2, 3, 4, 5, 123999))
    assert when == datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
