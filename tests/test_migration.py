"""Migration both ways, on the real emulators (issue 20 item 5).

Switch-over: a dataset serves its new l2cache table over the existing service's table
(``fallback_table_id``): rows only in the old table are served from it exactly as the
existing frontend serves them, rows in both come from the new table, ids in neither are
queued (Pub/Sub), computed by the real worker path (the message pushed to on_edit's
function) into the new table, never the old one, and then served from the new table.

Way back: PCGL2Cache's frontend read (kvdbclient's real ``BigTableClient.read_nodes``
with PCGL2Cache's attributes registered, then its handle_attributes loop) on the rows
l2cache wrote answers without error and with the values l2cache serves; rows written
before lineage rows (lineage cells in the feature row) trip it, and are migrated.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.cloud import pubsub_v1
from lookup_support import (
    UPSTREAM,
    assert_same_json,
    frontend_finish,
    frontend_read,
    lookup_client,
    upstream_features,
    upstream_json,
    write_placeholder,
    write_upstream_rows,
)

from l2cache.compute import dataset_context, load_chunk_l2
from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY, encode_column
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import RowReader, bigtable_instance
from l2cache.handlers.on_edit import handle_message, stream_run
from l2cache.handlers.rollback_task import chunk_key_ranges, rollback_chunks
from l2cache.store import lineage_rows
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache.store.missing_guard import create_guard_table
from l2cache_ops.rollback import run_versions
from l2cache_tools.dataset import build_dataset

PROJECT = "migration"
INSTANCE = "inst"
DS = "mig"
OLD, NEW = "pcgl2cache_mig", "l2cache_mig_v1"
RES = (16.0, 16.0, 40.0)
CHUNK = (48, 48, 24)
CROP = "tests/data/pinky40_crop_96x96x48.npz"
URL = f"/l2cache/api/v1/table/{DS}/attributes"
ONLY_OLD, BOTH, NEITHER, FRONTEND_MISSING = (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)
TS = datetime(2026, 2, 1, tzinfo=UTC)
ON_EDIT = Path(__file__).resolve().parents[1] / "functions" / "on_edit" / "main.py"


@pytest.fixture(scope="module")
def env(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("migration")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    volume = np.load(CROP)["labels"]
    built = build_dataset(volume, f"file://{tmp}/sv", RES, CHUNK, instance, DS)
    old = create_cache_table(instance, OLD)  # the existing service's table
    create_cache_table(instance, NEW)
    create_runs_table(instance, "l2cache_runs")
    create_guard_table(instance, "l2cache_lookup_guard")
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, "missing-pull")
    subscriber.create_subscription(name=sub, topic=topic)
    config = {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "pubsub": {"project": PROJECT, "missing_ids_topic": "missing"},
        "datasets": {
            DS: {
                "segmentation": built.segmentation,
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": INSTANCE,
                    "table_id": DS,
                },
                "cache_table_id": NEW,
                "fallback_table_id": OLD,
            }
        },
    }
    cfg = parse_config(config)
    ctx = dataset_context(cfg, DS)

    def direct(coords):
        chunk = load_chunk_l2(ctx, coords, None)
        return compute_features(chunk.labels, RES)

    # the existing service's worker wrote ONLY_OLD and BOTH (BOTH with other values)
    write_upstream_rows(old, upstream_features(direct(ONLY_OLD)))
    stale = direct(BOTH)
    stale["area_nm2"] = stale["area_nm2"] + 1000
    write_upstream_rows(old, upstream_features(stale))
    # l2cache computed BOTH into the new table
    ctx.store.write_features(
        direct(BOTH), Lineage("bulk-mig", code_revision="c0", cell_timestamp=TS)
    )
    with lookup_client(config, tmp, extra_env=pubsub_emulator.env) as client:
        yield {
            "client": client,
            "config": cfg,
            "ctx": ctx,
            "old": old,
            "direct": direct,
            "subscriber": subscriber,
            "sub": sub,
            "geometry": (
                list(RES),
                list(ctx.dataset.voxel_offset),
                list(ctx.dataset.chunk_size),
                int(ctx.dataset.spatial_bits.bits_for(np.array([2]))[0]),
            ),
            "os_env": {"BIGTABLE_PROJECT": PROJECT, "BIGTABLE_INSTANCE": INSTANCE},
            "config_dict": config,
        }


def chunk_ids(env, coords) -> list[int]:
    return sorted(env["direct"](coords)["l2id"].tolist())


def lookup(env, l2ids, **params):
    r = env["client"].post(
        URL, data=json.dumps({"l2_ids": [int(v) for v in l2ids]}), query_string=params
    )
    assert r.status_code == 200, r.get_data()
    return r


def table_cells(table_id: str, l2ids) -> dict[int, dict[bytes, bytes]]:
    rows = RowReader(f"projects/{PROJECT}/instances/{INSTANCE}/tables/{table_id}").read(
        [b"%020d" % n for n in l2ids]
    )
    return {int(k): dict(v.get(FEATURE_FAMILY, {})) for k, v in rows.items()}


def expected_from(env, table_id, l2ids, names=None):
    return upstream_json(table_cells(table_id, l2ids), l2ids, *env["geometry"], names)


def pull(env, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = env["subscriber"].pull(subscription=env["sub"], max_messages=10, timeout=5)
        if resp.received_messages:
            env["subscriber"].acknowledge(
                subscription=env["sub"], ack_ids=[m.ack_id for m in resp.received_messages]
            )
            return [m.message for m in resp.received_messages]
    raise AssertionError("nothing was published")


def push_to_on_edit(message) -> int:
    """POST ``message`` to the on_edit function (functions-framework's own app, in this
    process, the dataset map from ``L2CACHE_CONFIG``) as a push subscription delivers it."""
    import functions_framework

    app = functions_framework.create_app("on_edit", str(ON_EDIT), "cloudevent")
    body = {
        "message": {
            "data": base64.b64encode(message.data).decode(),
            "attributes": dict(message.attributes),
            "messageId": message.message_id,
            "publishTime": message.publish_time.isoformat(),
        },
        "subscription": f"projects/{PROJECT}/subscriptions/missing-push",
    }
    r = app.test_client().post(f"/projects/{PROJECT}/topics/missing", json=body)
    return r.status_code


def test_switch_over_serves_new_then_old_and_heals_gaps_into_the_new_table(env):
    only_old, both, neither = (chunk_ids(env, c) for c in (ONLY_OLD, BOTH, NEITHER))
    old_rows_before = RowReader(env["old"]).keys_in_range(b"", b"")
    r = lookup(env, only_old + both + neither)
    got = r.get_json()
    # only in the old table: served from it, exactly as the existing frontend serves it
    assert_same_json({str(k): got[str(k)] for k in only_old}, expected_from(env, OLD, only_old))
    assert set(table_cells(NEW, only_old)) == set()
    # in both: the new table's values (the old one's differ: area_nm2 + 1000)
    new_both = expected_from(env, NEW, both)
    assert_same_json({str(k): got[str(k)] for k in both}, new_both)
    old_both = expected_from(env, OLD, both)
    assert all(new_both[str(k)]["area_nm2"] + 1000 == old_both[str(k)]["area_nm2"] for k in both)
    # in neither: missing, queued for the new table
    assert all(got[str(k)] == {} for k in neither)
    assert r.headers["X-L2Cache-Missing-Ids"] == str(len(neither))
    assert r.headers["X-L2Cache-Queued-Ids"] == str(len(neither))
    (message,) = pull(env)
    assert dict(message.attributes) == {"table_id": DS, "l2_cache_id": NEW}
    assert sorted(np.frombuffer(message.data, "<u8").tolist()) == neither
    # the real worker path: the message pushed to on_edit's function, as Pub/Sub does
    assert push_to_on_edit(message) == 200
    after = lookup(env, neither, update_cache="false").get_json()
    assert_same_json(after, expected_from(env, NEW, neither))
    assert all(after[str(k)] for k in neither)
    # equal to a direct computation of the chunk, byte for byte
    feats = env["direct"](NEITHER)
    cells = table_cells(NEW, neither)
    for i, node in enumerate(feats["l2id"].tolist()):
        for a in ATTRIBUTES:
            assert cells[node][a.key] == encode_column(a, feats[a.name][i : i + 1])[0]
    # the old table was never written
    assert RowReader(env["old"]).keys_in_range(b"", b"") == old_rows_before
    # every value carries its lineage: the missing-id stream run of this code
    lineage = env["ctx"].store.read_lineage(neither)
    assert sorted(lineage) == neither
    assert {v[b"run"] for v in lineage.values()} == {
        stream_run("missing_ids", env["ctx"].dataset).run_id.encode()
    }
    assert all(v[b"code"] and v[b"params"] and v[b"input"] for v in lineage.values())


def test_the_existing_frontends_missing_id_message_heals_into_the_new_table(env):
    """During the switch-over the existing frontend may still publish missing ids naming
    its own table: computed into the new table, the old one untouched."""
    ids = chunk_ids(env, FRONTEND_MISSING)
    data = np.asarray(ids, dtype="<u8").tobytes()
    attrs = {"table_id": DS, "l2_cache_id": OLD}
    result = handle_message(env["config"], data, attrs, "from-pcgl2cache-1")
    assert result["status"] == "ok", result
    assert set(table_cells(NEW, ids)) == set(ids)
    assert table_cells(OLD, ids) == {}
    # any other table is still refused (dead-lettered)
    bad = handle_message(env["config"], data, {**attrs, "l2_cache_id": "other"}, "bad-1")
    assert bad["status"] == "dead_lettered"


def test_the_existing_frontend_reads_rows_l2cache_wrote(env, monkeypatch):
    """kvdbclient's real client, PCGL2Cache's attributes: no error, l2cache's values."""
    for key, value in env["os_env"].items():
        monkeypatch.setenv(key, value)
    # written by l2cache: BOTH by the fixture, (1, 1, 1) here (the worker path's rows
    # are read in the switch-over test's chunk too when it ran first)
    more = env["direct"]((1, 1, 1))
    env["ctx"].store.write_features(more, Lineage("bulk-wayback", cell_timestamp=TS))
    ids = chunk_ids(env, BOTH) + sorted(more["l2id"].tolist())
    for names in (None, ["size_nm3", "rep_coord_nm"], ["pca", "pca_val"]):
        read = frontend_read(NEW, ids, names)  # caveclient's default: every attribute
        frontend = frontend_finish(read, ids, *env["geometry"])
        ours = lookup(
            env,
            ids,
            update_cache="false",
            **({} if names is None else {"attribute_names": ",".join(names)}),
        ).get_json()
        assert_same_json(ours, frontend)
        assert_same_json(frontend, expected_from(env, NEW, ids, names))
    # an id range read (start_id/end_id) over the chunks never reaches a lineage row
    from kvdbclient import BigTableClient, get_default_client_info

    client = BigTableClient(NEW, config=get_default_client_info().CONFIG)
    both = chunk_ids(env, BOTH)  # its lineage row is keyed lineage#..., outside any id range
    span = client.read_nodes(start_id=np.uint64(min(both)), end_id=np.uint64(max(both) + 1))
    assert sorted(int(k) for k in span) == both
    assert set(UPSTREAM) >= {k.key.decode() for row in span.values() for k in row}


def write_older_layout(env, coords, run_id: str) -> np.ndarray:
    """Rows of one chunk as l2cache wrote them before lineage rows: lineage cells in
    every feature row, at one timestamp. Such rows are only in tables not (yet) marked
    migrated (a whole-table ``lineage migrate`` marks it, as the CLI test here does), so
    the mark goes."""
    ctx = env["ctx"]
    marker = ctx.store.table.direct_row(lineage_rows.MIGRATED_KEY)
    marker.delete()
    marker.commit()
    feats = env["direct"](coords)
    nodes = feats["l2id"].astype(np.uint64)
    at = datetime(2026, 1, 15, tzinfo=UTC)
    rows = []
    for i, node in enumerate(nodes.tolist()):
        row = ctx.store.table.direct_row(b"%020d" % node)
        for a in ATTRIBUTES:
            row.set_cell(FEATURE_FAMILY, a.key, encode_column(a, feats[a.name][i : i + 1])[0], at)
        for col, value in ((b"run", run_id.encode()), (b"code", b"c-old"), (b"input", b"in")):
            row.set_cell(LINEAGE_FAMILY, col, value, at)
        rows.append(row)
    assert all(s.code == 0 for s in ctx.store.table.mutate_rows(rows))
    return nodes


def test_lineage_cli_migrates_a_table_and_shows_lineage(env, tmp_path, capsys, monkeypatch):
    from l2cache_tools.cli import main

    for key, value in env["os_env"].items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(env["config_dict"]))
    nodes = sorted(write_older_layout(env, (0, 1, 1), "bulk-older").tolist())
    with pytest.raises(KeyError, match="Unknown key lineage:"):
        frontend_read(NEW, nodes)
    args = ["lineage", "migrate", DS, "--config", str(path)]
    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert f"{len(nodes)} rows of {NEW} hold lineage cells" in dry
    assert main(args) == 2  # no terminal, no --yes: refused, nothing changed
    assert main([*args, "--yes"]) == 0
    assert f"migrated {len(nodes)} rows" in capsys.readouterr().out
    frontend_read(NEW, nodes)  # no longer trips
    assert main(["lineage", "show", DS, str(nodes[0]), "--config", str(path)]) == 0
    assert "run=bulk-older" in capsys.readouterr().out


def test_rows_of_the_older_layout_trip_the_frontend_and_are_migrated(env, monkeypatch):
    for key, value in env["os_env"].items():
        monkeypatch.setenv(key, value)
    ctx = env["ctx"]
    bits = ctx.dataset.spatial_bits
    nodes = write_older_layout(env, (0, 0, 1), "bulk-old")
    ids = sorted(nodes.tolist())
    with pytest.raises(KeyError, match="Unknown key lineage:"):
        frontend_read(NEW, ids)
    # l2cache reads them (values and lineage) as before
    served = lookup(env, ids, update_cache="false").get_json()
    assert_same_json(served, expected_from(env, NEW, ids))
    before = ctx.store.read_lineage(ids)
    assert {v[b"run"] for v in before.values()} == {b"bulk-old"}
    versions = run_versions(ctx.store.table, "bulk-old")
    assert len(versions) == len(ids)
    # migrated: lineage rows instead of the rows' own cells, nothing else changes
    ranges = chunk_key_ranges(idlib.get_chunk_id(nodes, bits), bits)
    dry = lineage_rows.migrate_rows(ctx.store.table, bits, ranges, dry_run=True)
    assert (dry.rows, dry.versions, dry.lineage_rows) == (len(ids), len(ids), 1)
    done = lineage_rows.migrate_rows(ctx.store.table, bits, ranges)
    assert (done.rows, done.lineage_rows) == (len(ids), 1)
    assert lineage_rows.migrate_rows(ctx.store.table, bits, ranges).rows == 0  # idempotent
    frontend = frontend_finish(frontend_read(NEW, ids), ids, *env["geometry"])
    assert_same_json(frontend, served)
    assert ctx.store.read_lineage(ids) == before
    assert run_versions(ctx.store.table, "bulk-old") == versions
    assert all(set(r) == {"0"} for r in ctx.store.read_raw(ids).values())


def test_rollback_by_lineage_rows_restores_the_previous_version(env):
    """Two writes of one chunk by two runs; rolling back the second restores the first's
    bytes and lineage, deletes its lineage row, and a repeat deletes nothing."""
    ctx = env["ctx"]
    bits = ctx.dataset.spatial_bits
    feats = env["direct"]((1, 0, 1))
    ids = sorted(feats["l2id"].tolist())
    first, second = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)
    ctx.store.write_features(feats, Lineage("bulk-a", code_revision="ca", cell_timestamp=first))
    before = ctx.store.read_raw(ids)
    changed = dict(feats)
    changed["size_nm3"] = feats["size_nm3"] + 1
    ctx.store.write_features(changed, Lineage("bulk-b", code_revision="cb", cell_timestamp=second))
    assert {v[b"run"] for v in ctx.store.read_lineage(ids).values()} == {b"bulk-b"}
    cid = int(idlib.get_chunk_id(np.array(ids[:1], dtype=np.uint64), bits)[0])
    stamp_ms = int(second.timestamp() * 1000)
    dry = rollback_chunks(ctx.store.table, ["bulk-b"], [cid], bits, [stamp_ms], dry_run=True)
    assert (dry.rows_scanned, dry.rows_touched, dry.versions_deleted) == (1, len(ids), len(ids))
    done = rollback_chunks(ctx.store.table, ["bulk-b"], [cid], bits, [stamp_ms])
    assert done.runs == {"bulk-b": len(ids)}
    assert ctx.store.read_raw(ids) == before
    assert {v[b"code"] for v in ctx.store.read_lineage(ids).values()} == {b"ca"}
    again = rollback_chunks(ctx.store.table, ["bulk-b"], [cid], bits, [stamp_ms])
    assert (again.rows_scanned, again.versions_deleted) == (0, 0)
    assert not run_versions(ctx.store.table, "bulk-b")
    assert len(run_versions(ctx.store.table, "bulk-a")) == len(ids)


def test_lineage_costs_bytes_per_chunk_not_per_row(env):
    """Stored bytes (key + family + qualifier + value + 8-byte timestamp per cell) of one
    chunk's rows with a bulk run's real lineage: in every row (before) vs one lineage
    row per chunk (now)."""
    ctx = env["ctx"]
    coords = (1, 1, 1)
    chunk = load_chunk_l2(ctx, coords, None)
    feats = compute_features(chunk.labels, RES)
    run = new_run("bulk_ingest", ctx.dataset)
    lineage = run.lineage(chunk.checksum, datetime(2026, 4, 1, tzinfo=UTC))
    ctx.store.write_features(feats, lineage)
    ids = sorted(feats["l2id"].tolist())
    reader = RowReader(ctx.store.table)
    features = reader.versions(keys=[b"%020d" % n for n in ids])
    mine = {
        k: v
        for k, v in reader.versions(prefix=lineage_rows.PREFIX).items()
        if lineage_rows.parse_key(k)[2] == run.run_id
    }

    def size(rows) -> int:
        return sum(
            len(key) + len(fam) + len(col) + len(value) + 8
            for key, fams in rows.items()
            for fam, cols in fams.items()
            for col, versions in cols.items()
            for _, value in versions
        )

    per_row_before = sum(  # the same columns in each feature row (key: 20 bytes)
        20 + len(LINEAGE_FAMILY) + len(col) + len(value) + 8
        for col, value in lineage.columns().items()
    )
    n = len(ids)
    feature_bytes, lineage_bytes = size(features), size(mine)
    print(
        f"\n{n} rows: features {feature_bytes / n:.0f} B/row; lineage before "
        f"{per_row_before} B/row ({(feature_bytes + per_row_before * n) / n:.0f} B/row in "
        f"all), now {lineage_bytes} B in {len(mine)} lineage row = {lineage_bytes / n:.1f} "
        f"B/row ({(feature_bytes + lineage_bytes) / n:.0f} B/row in all)"
    )
    assert len(mine) == 1 and all(set(r) == {"0"} for r in features.values())
    assert lineage_bytes / n < per_row_before / 4


def test_a_pre_2022_fallback_table_is_served_as_stored_beside_the_new_one(env):
    """``row_format: legacy_nm`` describes the fallback table; the new table's rows are
    l2cache's (current) whatever the map says."""
    from kvdbclient.serializers import NumPyArray

    from l2cache.store.cache import CacheStore

    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    old = create_cache_table(instance, "pcgl2cache_legacy")
    new = create_cache_table(instance, "l2cache_legacy_v2")
    entry = {
        **env["config_dict"]["datasets"][DS],
        "cache_table_id": "l2cache_legacy_v2",
        "fallback_table_id": "pcgl2cache_legacy",
        "row_format": "legacy_nm",
    }
    cfg = parse_config({**env["config_dict"], "datasets": {DS: entry}})
    store = CacheStore(new, cfg.dataset(DS))
    bits = cfg.dataset(DS).spatial_bits
    legacy_id = int(idlib.encode_ids(2, [[1, 1, 1]], [7], bits)[0])
    row = old.direct_row(b"%020d" % legacy_id)
    row.set_cell("0", b"size_nm3", UPSTREAM["size_nm3"].serialize(np.uint32(4_096_000)))
    rep = NumPyArray(dtype=np.dtype("<u8")).serialize(np.array([1600, 3200, 4000], np.uint64))
    row.set_cell("0", b"rep_coord_nm", rep)
    row.commit()
    feats = env["direct"](BOTH)
    store.write_features(feats, Lineage("bulk-legacy", cell_timestamp=TS))
    ours = int(feats["l2id"][0])
    got = store.read_features([legacy_id, ours], ["size_nm3", "rep_coord_nm"])
    assert got[legacy_id] == {"size_nm3": 4_096_000, "rep_coord_nm": [1600, 3200, 4000]}
    current = CacheStore(new, env["ctx"].dataset).read_features([ours], ["size_nm3"])
    assert got[ours]["size_nm3"] == current[ours]["size_nm3"]
    assert got[ours]["size_nm3"] == int(feats["size_nm3"][0]) * 16 * 16 * 40


def test_prune_deletes_only_lineage_rows_whose_versions_are_gone(env, tmp_path, capsys):
    """GC keeps a column's last N versions; a lineage row is its own row, so it outlives
    them until ``lineage prune`` finds no version it names."""
    from l2cache_tools.cli import main

    ctx = env["ctx"]
    feats = env["direct"]((0, 0, 1))  # a chunk no other test writes after this
    ids = sorted(feats["l2id"].tolist())
    stamps = [datetime(2026, 5, d, tzinfo=UTC) for d in (1, 2, 3)]
    for i, at in enumerate(stamps):
        ctx.store.write_features(feats, Lineage(f"stream-{i}", cell_timestamp=at))
    # as GC would: the oldest version gone everywhere, the second kept in one row only
    rows = []
    for node in ids:
        row = ctx.store.table.direct_row(b"%020d" % node)
        gone = stamps[:1] if node == ids[0] else stamps[:2]
        for at in gone:
            row.delete_cells("0", [a.key for a in ATTRIBUTES], time_range=_window(at))
        rows.append(row)
    assert all(s.code == 0 for s in ctx.store.table.mutate_rows(rows))
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(env["config_dict"]))
    prune = ["lineage", "prune", DS, "--config", str(path)]
    # written just now: within the default grace period (24 h) nothing is pruned
    assert main([*prune, "--dry-run"]) == 0
    assert "would delete 0 naming no version left" in capsys.readouterr().out
    # past it (grace 0 here), the row whose versions are all gone
    assert main([*prune, "--dry-run", "--grace-hours", "0"]) == 0
    assert "would delete 1 naming no version left" in capsys.readouterr().out
    runs_before = {r: run_versions(ctx.store.table, r) for r in ("stream-1", "stream-2")}
    assert main([*prune, "--grace-hours", "0"]) == 0
    assert "deleted 1 naming" in capsys.readouterr().out
    assert not run_versions(ctx.store.table, "stream-0")
    assert {r: run_versions(ctx.store.table, r) for r in runs_before} == runs_before
    assert len(runs_before["stream-1"]) == 1  # the one row that still has that version
    assert lineage_rows.prune_rows(ctx.store.table, grace_s=0).deleted == 0  # none left


def _window(at: datetime):
    from google.cloud.bigtable.row_filters import TimestampRange

    return TimestampRange(start=at, end=at + timedelta(milliseconds=1))


@pytest.mark.parametrize(
    "extra",
    [
        {"fallback_table_id": NEW},  # the table it would fall back from
        {"fallback_table_id": OLD, "existing_cache_table": True},  # nothing to heal into
        {"fallback_table_id": ""},
    ],
)
def test_a_fallback_table_the_map_cannot_mean_is_refused(extra):
    from l2cache.config import ConfigError

    entry = {
        "segmentation": "file:///nowhere",
        "graph": {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": DS},
        "cache_table_id": NEW,
        "resolution": [16, 16, 40],
        "voxel_offset": [0, 0, 0],
        "chunk_size": list(CHUNK),
        "spatial_bits": {1: 10, 2: 10, 3: 9},
        **extra,
    }
    with pytest.raises(ConfigError, match="fallback_table_id"):
        parse_config(
            {"bigtable": {"project": PROJECT, "instance": INSTANCE}, "datasets": {DS: entry}}
        )


PLACEHOLDERS = (0, 0, 1)  # a chunk the existing worker could not compute


def test_fallback_placeholders_are_served_as_is_and_healed_into_the_new_table(env):
    """The existing worker's placeholder ({size_nm3: 0}) for ids it could not compute is
    answered as its frontend answers it, and queued: the children path computes them
    into the new table, so the switch-over heals these gaps too."""
    ids = chunk_ids(env, PLACEHOLDERS)
    healed, empty = ids[0], ids[1]
    new_table = env["ctx"].store.table  # earlier tests wrote this chunk: these ids not
    for node in (healed, empty):
        row = new_table.direct_row(b"%020d" % node)
        row.delete()
        status = row.commit()
        assert status is None or status.code == 0
    assert table_cells(NEW, [healed, empty]) == {}
    for node in (healed, empty):
        write_placeholder(env["old"], node)
    # the state of a fallback placeholder under an attribute filter that leaves it {}
    st = lookup(env, [empty], state="true", update_cache="false", attribute_names="area_nm2")
    assert st.get_json()["state"][str(empty)]["state"] == "empty"
    r = lookup(env, [healed])
    assert_same_json(r.get_json(), expected_from(env, OLD, [healed]))
    assert r.get_json()[str(healed)] == {"size_nm3": 0}
    assert r.headers["X-L2Cache-Missing-Ids"] == "0"
    assert r.headers["X-L2Cache-Fallback-Placeholder-Ids"] == "1"
    assert r.headers["X-L2Cache-Queued-Ids"] == "1"
    (message,) = pull(env)
    assert np.frombuffer(message.data, "<u8").tolist() == [healed]
    assert dict(message.attributes) == {"table_id": DS, "l2_cache_id": NEW}
    assert push_to_on_edit(message) == 200
    after = lookup(env, [healed], update_cache="false")
    assert after.headers.get("X-L2Cache-Fallback-Placeholder-Ids") is None
    assert_same_json(after.get_json(), expected_from(env, NEW, [healed]))
    feats = env["direct"](PLACEHOLDERS)
    i = feats["l2id"].tolist().index(healed)
    cells = table_cells(NEW, [healed])[healed]
    assert all(cells[a.key] == encode_column(a, feats[a.name][i : i + 1])[0] for a in ATTRIBUTES)
    assert table_cells(OLD, [healed])[healed] == {b"size_nm3": bytes(8)}  # never written
