"""The wait's bounds without a server: the map's ``lookup_wait`` section checked at load,
the slots' arithmetic, and the defaults derived from the instance's threads (the HTTP
behaviour is tests/adversarial/test_state_abuse.py's)."""

from __future__ import annotations

import pytest

from l2cache.config import ConfigError, LookupWaitPolicy, parse_config
from l2cache.serving import wait
from l2cache.serving.respond import accepts_json, accepts_npz


def _map(section: dict | None) -> dict:
    out: dict = {"bigtable": {"project": "p", "instance": "i"}, "datasets": {}}
    if section is not None:
        out["lookup_wait"] = section
    return out


def test_the_section_defaults_and_values():
    assert parse_config(_map(None)).lookup_wait == LookupWaitPolicy()
    got = parse_config(
        _map({"max_s": 5, "max_ids": 10, "max_concurrent": 3, "max_per_caller": 2})
    ).lookup_wait
    assert got == LookupWaitPolicy(5.0, 10, 3, 2)


@pytest.mark.parametrize(
    "section, words",
    [
        ({"max_s": 61}, "at most 60"),
        ({"max_s": float("inf")}, "at most 60"),
        ({"max_s": float("nan")}, "number of seconds"),
        ({"max_s": -1}, "number of seconds"),
        ({"max_s": "30"}, "number of seconds"),
        ({"max_s": True}, "number of seconds"),
        ({"max_ids": 0}, "positive integer"),
        ({"max_concurrent": 0}, "positive integer"),
        ({"max_concurrent": 2.5}, "positive integer"),
        ({"max_per_caller": -1}, "positive integer"),
        ({"max_wait": 5}, "unknown keys"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_a_bad_section_fails_the_load_not_a_request(section, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(_map(section))


def test_defaults_follow_the_instance_threads(monkeypatch):
    config = parse_config(_map(None))
    for threads, expected in [("4", (2, 1)), ("1", (1, 1)), ("8", (4, 2)), ("3", (1, 1))]:
        monkeypatch.setenv("THREADS", threads)
        assert wait.wait_limits(config) == expected, threads
    monkeypatch.setenv("THREADS", "4")
    set_ = parse_config(_map({"max_concurrent": 3, "max_per_caller": 9}))
    assert wait.wait_limits(set_) == (3, 3)  # a caller never gets more than the instance


def test_slots_per_instance_and_per_caller():
    slots = wait.WaitSlots()
    assert slots.take("a", 2, 1) is None
    assert "this caller" in (slots.take("a", 2, 1) or "")
    assert slots.take("b", 2, 1) is None
    assert "this instance" in (slots.take("c", 2, 1) or "")
    assert (slots.running, slots.peak, slots.by_caller) == (2, 2, {"a": 1, "b": 1})
    slots.give_back("a")
    assert slots.take("c", 2, 1) is None
    slots.give_back("b")
    slots.give_back("c")
    assert (slots.running, slots.peak, slots.by_caller) == (0, 2, {})


def test_a_busy_slot_raises_and_a_held_one_is_given_back_on_error(monkeypatch):
    monkeypatch.setenv("THREADS", "2")  # one wait per instance
    config = parse_config(_map(None))
    slots = wait.WaitSlots()
    with pytest.raises(RuntimeError), wait.wait_slot(config, "a", slots):
        with pytest.raises(wait.WaitBusy, match="retry after 2 s"):
            with wait.wait_slot(config, "b", slots):
                pass
        raise RuntimeError("the request failed")
    assert slots.running == 0 and slots.by_caller == {}


@pytest.mark.parametrize(
    "value, seconds",
    [
        (None, 0.0),
        ("", 0.0),
        (" 2 ", 2.0),
        ("2.5", 2.5),
        ("1e9", 30.0),
        ("1e999", 30.0),
        ("-0", 0.0),
        (".5", 0.5),
    ],
)
def test_wait_values_taken(value, seconds):
    assert wait.parse_wait(value, 30.0) == seconds


@pytest.mark.parametrize(
    "value", ["-1", "nan", "inf", "Infinity", "5_0", "\u0661", "0x10", "1,2", ".", "e", "9" * 41]
)
def test_wait_values_refused(value):
    with pytest.raises(wait.WaitError):
        wait.parse_wait(value, 30.0)


def test_a_repeated_parameter_is_refused():
    from werkzeug.datastructures import MultiDict

    config = parse_config(_map(None))
    with pytest.raises(wait.WaitError, match="given 2 times"):
        wait.options(MultiDict([("wait", "1"), ("wait", "1")]), config)
    assert wait.options(MultiDict([("wait", "1"), ("state", "1")]), config) == wait.Options(
        1.0, True
    )


@pytest.mark.parametrize(
    "accept, ok",
    [
        (None, True),
        ("", True),
        ("application/json", True),
        ("*/*", True),
        ("application/*;q=0.2", True),
        ("application/x-npz", False),
        ("application/x-npz, application/json;q=0", False),
        ("text/html", False),
    ],
)
def test_accepts_json(accept, ok):
    assert accepts_json(accept) is ok


@pytest.mark.parametrize(
    ("accept", "npz"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("application/x-npz", True),
        ("application/x-npz, application/json", True),  # a tie: .npz had to be named
        ("application/x-npz;q=0.5, application/json;q=0.9", False),  # JSON preferred
        ("application/json;q=0.5, application/x-npz", True),
        ("application/x-npz;q=0.8, */*;q=0.9", False),
        ("application/x-npz;q=0.8, application/*;q=0.1, */*", True),  # most specific match
        ("application/x-npz;q=0", False),
    ],
)
def test_accepts_npz_honours_the_clients_preference(accept, npz):
    assert accepts_npz(accept) is npz
