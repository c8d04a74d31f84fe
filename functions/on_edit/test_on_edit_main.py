"""The on_edit entry point: a Pub/Sub CloudEvent in, what is acknowledged, dead-lettered
or raised (functions-framework answers 500 and Pub/Sub redelivers) out.

The dead-letter publisher is our own callable, injected through the module's
``_state`` (``main._state["dead_letter"]``) and recording what it is given: the payload
and the attributes, with ``dead_letter_reason`` and ``original_message_id``. Messages
that need the runs table (an uncached table's count, a known dataset) use the real
Bigtable emulator.
"""

from __future__ import annotations

import base64
import pickle
import uuid

import numpy as np
import pytest
from cloudevents.http import CloudEvent

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.store.ledger import RunLedger
from l2cache_ops.ledger import ignored_count

PUBLISH_TIME = "2026-03-01T12:00:00.123456789Z"


class DeadLetters(list):
    """Records each dead letter as (payload bytes, attributes)."""

    def __call__(self, data: bytes, attributes: dict[str, str]) -> str:
        assert isinstance(data, bytes)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items())
        self.append((data, attributes))
        return f"dead-{len(self)}"


@pytest.fixture
def dead_letters() -> DeadLetters:
    return DeadLetters()


@pytest.fixture
def main(load_main, config_path, dead_letters):
    module = load_main("on_edit")
    module._state["dead_letter"] = dead_letters
    return module


def envelope_event(
    data: bytes | str | None, attributes: dict | None, message_id: str = "m-1"
) -> CloudEvent:
    """The CloudEvent functions-framework hands on_edit for one pushed Pub/Sub message."""
    encoded = base64.b64encode(data).decode() if isinstance(data, bytes) else data
    message = {"messageId": message_id, "publishTime": PUBLISH_TIME}
    if encoded is not None:
        message["data"] = encoded
    if attributes is not None:
        message["attributes"] = attributes
    return CloudEvent(
        {
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "source": "//pubsub.googleapis.com/projects/fn-test/topics/pcg-edits",
            "id": f"event-{message_id}",
        },
        {"message": message, "subscription": "projects/fn-test/subscriptions/on-edit"},
    )


def edit_payload(**fields) -> bytes:
    return pickle.dumps({"operation_id": 7, **fields})


def l2_ids(fn_map, n: int = 2) -> np.ndarray:
    bits = parse_config(fn_map).dataset("ds").spatial_bits
    return idlib.encode_ids(2, np.tile([1, 2, 3], (n, 1)), np.arange(1, n + 1), bits)


def only_dead_letter(dead_letters: DeadLetters, message_id: str = "m-1"):
    assert len(dead_letters) == 1, dead_letters
    data, attributes = dead_letters[0]
    assert attributes["original_message_id"] == message_id
    return data, attributes


def test_undecodable_base64_is_dead_lettered_not_retried(main, dead_letters):
    """Data that is not base64 can never decode: acknowledged (no exception) and
    dead-lettered once, with the original attributes and a reason."""
    main.on_edit(envelope_event("%%% not base64 %%%", {"table_id": "ds"}))
    data, attributes = only_dead_letter(dead_letters)
    assert attributes["table_id"] == "ds"
    assert attributes["dead_letter_reason"].startswith("message data is not base64")
    assert data == b"%%% not base64 %%%"  # what was sent, not a lenient decode of it


def test_corrupted_base64_is_not_read_as_other_bytes(main, dead_letters):
    """A lenient decode turns '%%%abcd%%%' into 3 bytes it never carried."""
    main.on_edit(envelope_event("%%%abcd%%%", {"table_id": "ds"}))
    data, attributes = only_dead_letter(dead_letters)
    assert data == b"%%%abcd%%%"
    assert "not base64" in attributes["dead_letter_reason"]


def test_a_message_without_table_id_is_dead_lettered(main, dead_letters):
    main.on_edit(envelope_event(edit_payload(new_lvl2_ids=[1]), {"user_id": "u"}))
    data, attributes = only_dead_letter(dead_letters)
    assert data == edit_payload(new_lvl2_ids=[1])  # the message exactly as it came
    assert attributes == {
        "user_id": "u",
        "dead_letter_reason": "message has no table_id attribute",
        "original_message_id": "m-1",
    }


def test_an_event_without_a_pubsub_envelope_is_dead_lettered_under_the_event_id(main, dead_letters):
    event = CloudEvent({"type": "t", "source": "s", "id": "ev-9"}, b"not an envelope")
    main.on_edit(event)
    data, attributes = only_dead_letter(dead_letters, message_id="ev-9")
    assert data == b""
    assert attributes["dead_letter_reason"] == "message has no table_id attribute"


@pytest.mark.parametrize(
    ("payload", "attributes", "reason"),
    [
        (pickle.dumps({"operation_id": 7}), {"table_id": "ds"}, "edit message has no new_lvl2_ids"),
        (
            edit_payload(new_lvl2_ids=["x"]),
            {"table_id": "ds"},
            "new_lvl2_ids are not uint64 ids",
        ),
        (
            pickle.dumps(print),  # a global outside the allow-list: never called
            {"table_id": "ds"},
            "edit message rejected: pickle refers to builtins.print, which is not allowed",
        ),
        (
            b"\x01" * 7,
            {"table_id": "ds", "l2_cache_id": "cache_ds"},
            "missing-id data of 7 bytes is not uint64 ids",
        ),
    ],
)
def test_poison_messages_are_dead_lettered_with_their_reason(
    main, dead_letters, payload, attributes, reason
):
    """Decided from the message alone (no Bigtable): dead-lettered as it came."""
    main.on_edit(envelope_event(payload, attributes))
    data, dead_attributes = only_dead_letter(dead_letters)
    assert data == payload
    assert dead_attributes["dead_letter_reason"].startswith(reason)
    assert {k: dead_attributes[k] for k in attributes} == attributes


def test_messages_naming_no_ids_are_dead_lettered(main, dead_letters, bigtable):
    main.on_edit(envelope_event(b"", {"table_id": "ds", "l2_cache_id": "cache_ds"}, "m-1"))
    main.on_edit(envelope_event(edit_payload(new_lvl2_ids=[]), {"table_id": "ds"}, "m-2"))
    assert [a["dead_letter_reason"] for _, a in dead_letters] == ["message names no L2 ids"] * 2
    assert [a["original_message_id"] for _, a in dead_letters] == ["m-1", "m-2"]


def test_ids_for_another_cache_table_are_dead_lettered(main, dead_letters, bigtable, fn_map):
    data = l2_ids(fn_map).astype("<u8").tobytes()
    main.on_edit(envelope_event(data, {"table_id": "ds", "l2_cache_id": "someone_elses"}))
    payload, attributes = only_dead_letter(dead_letters)
    assert payload == data
    assert "is not the cache table of 'ds'" in attributes["dead_letter_reason"]


def test_messages_for_tables_without_our_cache_are_acknowledged_and_counted(
    main, dead_letters, bigtable, fn_map
):
    """The edits topic carries every PCG table's edits: an uncached table, or one whose
    cache another service owns, is counted in ``ignored:<table>``, never dead-lettered."""
    ledger = RunLedger(bigtable.table(fn_map.get("runs_table_id", "l2cache_runs")))
    uncached = f"not_cached_{uuid.uuid4().hex[:8]}"
    before_theirs = ignored_count(ledger, "theirs")
    for i in range(2):
        main.on_edit(
            envelope_event(edit_payload(new_lvl2_ids=[5]), {"table_id": uncached}, f"u{i}")
        )
    main.on_edit(envelope_event(edit_payload(new_lvl2_ids=[5]), {"table_id": "theirs"}, "t"))
    assert ignored_count(ledger, uncached) == 2
    assert ignored_count(ledger, "theirs") == before_theirs + 1
    assert dead_letters == []


def test_a_missing_runs_table_is_permanent_and_dead_lettered(
    load_main, dead_letters, bigtable, fn_map, use_map
):
    """The runs table does not exist (NotFound): no redelivery can help, so the message
    is dead-lettered with the reason and acknowledged (no 5xx loop)."""
    fn_map["runs_table_id"] = "no_such_runs_table"
    use_map(fn_map)
    main = load_main("on_edit")
    main._state["dead_letter"] = dead_letters
    data = l2_ids(fn_map).astype("<u8").tobytes()
    main.on_edit(envelope_event(data, {"table_id": "ds", "l2_cache_id": "cache_ds"}))
    payload, attributes = only_dead_letter(dead_letters)
    assert payload == data
    assert "no_such_runs_table" in attributes["dead_letter_reason"]


def test_a_transient_failure_raises_so_pubsub_redelivers(
    main, dead_letters, bigtable, fn_map, monkeypatch
):
    """The runs table cannot be read right now (Bigtable unavailable): on_edit raises
    (the function answers 500) and dead-letters nothing."""
    from google.api_core.exceptions import ServiceUnavailable

    def unavailable(self, run):
        raise ServiceUnavailable("bigtable is down")

    monkeypatch.setattr(RunLedger, "ensure_run", unavailable)
    data = l2_ids(fn_map).astype("<u8").tobytes()
    with pytest.raises(ServiceUnavailable):
        main.on_edit(envelope_event(data, {"table_id": "ds", "l2_cache_id": "cache_ds"}))
    assert dead_letters == []
