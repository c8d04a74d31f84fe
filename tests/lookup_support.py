"""Test helpers for the lookup: the existing service's writer and frontend, as oracles.

``UPSTREAM`` are PCGL2Cache's own attribute definitions (pcgl2cache/core/attributes.py,
kvdbclient serializers), so rows written with them are byte-for-byte what its worker
writes (core/features.py write_to_db, workers/common.py for placeholders).
:func:`upstream_json` replays its frontend (app/common.py handle_attributes,
_add_offset_to_coords, _rescale_volume, app CustomJsonEncoder) on the stored cells.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kvdbclient.attributes import _Attribute
from kvdbclient.serializers import NumPyArray, NumPyValue

REPO = Path(__file__).resolve().parents[1]

UINT64 = np.dtype("uint64").newbyteorder("L")
UINT32 = np.dtype("uint32").newbyteorder("L")
UINT16 = np.dtype("uint16").newbyteorder("L")
FLOAT16 = np.dtype("float16").newbyteorder("L")
FLOAT32 = np.dtype("float32").newbyteorder("L")

UPSTREAM = {
    "size_nm3": _Attribute(key=b"size_nm3", family_id="0", serializer=NumPyValue(dtype=UINT32)),
    "area_nm2": _Attribute(key=b"area_nm2", family_id="0", serializer=NumPyValue(dtype=UINT32)),
    "max_dt_nm": _Attribute(key=b"max_dt_nm", family_id="0", serializer=NumPyValue(dtype=UINT16)),
    "mean_dt_nm": _Attribute(
        key=b"mean_dt_nm", family_id="0", serializer=NumPyValue(dtype=FLOAT16)
    ),
    "rep_coord_nm": _Attribute(
        key=b"rep_coord_nm", family_id="0", serializer=NumPyArray(dtype=UINT16)
    ),
    "chunk_intersect_count": _Attribute(
        key=b"chunk_intersect_count",
        family_id="0",
        serializer=NumPyArray(dtype=UINT16, shape=(-1, 3)),
    ),
    "pca": _Attribute(
        key=b"pca", family_id="0", serializer=NumPyArray(dtype=FLOAT16, shape=(-1, 3))
    ),
    "pca_val": _Attribute(
        key=b"pca_val", family_id="0", serializer=NumPyArray(dtype=FLOAT32, shape=(-1,))
    ),
}


def write_upstream_rows(table, features: dict[str, np.ndarray]) -> None:
    """write_to_db: one row per node, every attribute serialized by kvdbclient."""
    rows = []
    for i, l2id in enumerate(features["l2id"].tolist()):
        row = table.direct_row(b"%020d" % l2id)
        for name, attr in UPSTREAM.items():
            row.set_cell(attr.family_id, attr.key, attr.serialize(features[name][i]))
        rows.append(row)
    statuses = table.mutate_rows(rows)
    assert all(s.code == 0 for s in statuses)


def write_placeholder(table, l2id: int) -> bytes:
    """workers/common.py for an id it could not compute: {SIZE_NM3: np.uint64(0)}."""
    value = UPSTREAM["size_nm3"].serialize(np.uint64(0))
    row = table.direct_row(b"%020d" % l2id)
    row.set_cell("0", b"size_nm3", value)
    status = row.commit()
    assert status is None or status.code == 0
    return value


def upstream_features(feats: dict[str, np.ndarray]) -> dict[str, list]:
    """Our engine's output in the upstream writer's per-node types (empty PCA arrays)."""
    out: dict[str, list] = {"l2id": feats["l2id"]}
    for name in UPSTREAM:
        values = []
        for v in feats[name]:
            v = np.asarray(v)
            if name in ("pca", "pca_val") and np.isnan(v).any():
                v = np.zeros((0, 3) if name == "pca" else (0,))
            dtype = UPSTREAM[name].serializer.basetype
            values.append(dtype(v) if v.ndim == 0 else v.astype(dtype))
        out[name] = values
    return out


class CustomJsonEncoder(json.JSONEncoder):
    """pcgl2cache/app/__init__.py, verbatim."""

    def __init__(self, int64_as_str=False, **kwargs):
        super().__init__(**kwargs)
        self.int64_as_str = int64_as_str

    def default(self, obj):
        if isinstance(obj, np.ndarray):
            if self.int64_as_str and obj.dtype.type in (np.int64, np.uint64):
                return obj.astype(str).tolist()
            return obj.tolist()
        elif isinstance(obj, np.generic):
            if self.int64_as_str and obj.dtype.type in (np.int64, np.uint64):
                return obj.astype(str).item()
            return obj.item()
        elif isinstance(obj, datetime.datetime):
            return obj.__str__()
        return json.JSONEncoder.default(self, obj)


def upstream_json(
    cells: dict[int, dict[bytes, bytes]],
    l2ids,
    resolution: list,
    voxel_offset: list,
    chunk_size: list,
    layer_bits: int,
    attribute_names: list[str] | None = None,
    int64_as_str: bool = False,
) -> Any:
    """What PCGL2Cache answers for ``l2ids`` given the newest family-0 ``cells``."""
    l2ids = np.unique(np.array(l2ids, dtype=np.uint64))
    wanted = list(UPSTREAM) if attribute_names is None else attribute_names
    result: dict[int, dict] = {}
    for l2id in l2ids:
        # kvdbclient read_nodes with a column filter: rows without those cells are absent
        entry = {k: v for k, v in cells.get(int(l2id), {}).items() if k.decode() in wanted}
        result[int(l2id)] = {}
        for k, raw in sorted(entry.items()):
            val = UPSTREAM[k.decode()].deserialize(raw)
            try:
                if len(val) > 0:
                    result[int(l2id)][k.decode()] = val
            except TypeError:
                result[int(l2id)][k.decode()] = val
    return frontend_finish(
        result, l2ids, resolution, voxel_offset, chunk_size, layer_bits, int64_as_str
    )


def frontend_read(
    cache_table_id: str, l2ids, attribute_names: list[str] | None = None
) -> dict[int, dict]:
    """handle_attributes' read and loop, verbatim, on kvdbclient's real ``BigTableClient``
    (as app/utils.py get_l2cache_client makes it: table id + get_default_client_info(),
    BIGTABLE_PROJECT/BIGTABLE_INSTANCE from the environment). ``read_nodes`` turns every
    cell it reads into an attribute with ``attributes.from_key``, so an unknown column in
    a row raises ``KeyError("Unknown key family:qualifier")``: the existing frontend's 500.

    ``attr_keys=False`` gives the loop qualifier bytes for ``k.decode()``, as the
    frontend's ``read_entries`` did before kvdbclient 0.7 (with 0.7's default the keys are
    ``_Attribute`` objects, which have no ``decode``); the cells read are the same.
    """
    from kvdbclient import BigTableClient, get_default_client_info

    # the frontend's process registers PCGL2Cache's attributes; kvdbclient's registry is
    # global, and a test may have registered another serializer under a key since
    _Attribute._attributes.update({(a.family_id, a.key): a for a in UPSTREAM.values()})
    info = get_default_client_info()
    cache_client = BigTableClient(cache_table_id, config=info.CONFIG)
    l2ids = np.unique(np.array(l2ids, dtype=np.uint64))
    attributes = None
    if attribute_names is not None:
        attributes = [UPSTREAM[name] for name in attribute_names]
    entries = cache_client.read_nodes(node_ids=l2ids, properties=attributes, attr_keys=False)
    result: dict[int, dict] = {}
    for l2id in l2ids:
        try:
            attrs = entries[l2id]
            result[int(l2id)] = {}
            for k, v in attrs.items():
                val = v[0].value
                try:
                    if len(val) > 0:
                        result[int(l2id)][k.decode()] = val
                except TypeError:
                    result[int(l2id)][k.decode()] = val
        except KeyError:
            result[int(l2id)] = {}
    return result


def frontend_finish(
    result: dict[int, dict],
    l2ids,
    resolution: list,
    voxel_offset: list,
    chunk_size: list,
    layer_bits: int,
    int64_as_str: bool = False,
) -> Any:
    """_add_offset_to_coords, _rescale_volume and the app's JSON encoder on ``result``."""
    l2ids = np.unique(np.array(l2ids, dtype=np.uint64))
    # CloudVolume types the resolution int unless a component is a float
    res = np.array(
        resolution, dtype=float if any(isinstance(v, float) for v in resolution) else int
    )
    start_offset = np.array(voxel_offset)
    ids = np.array(l2ids, dtype=int)
    x_off = 64 - 8 - layer_bits
    coords = (
        np.column_stack([ids >> (x_off - i * layer_bits) & 2**layer_bits - 1 for i in range(3)])
        if len(ids)
        else np.array([])
    )
    for l2id, coord in zip(l2ids, coords, strict=False):
        features = result[int(l2id)]
        if "rep_coord_nm" in features:
            rep = np.array(features["rep_coord_nm"], dtype=np.uint64)
            offset = (coord * chunk_size) + start_offset
            features["rep_coord_nm"] = (rep + offset) * res
    sv_vol = np.array(res).prod()
    for l2id in l2ids:
        features = result[int(l2id)]
        if "size_nm3" in features:
            features["size_nm3"] = features["size_nm3"] * sv_vol
    text = json.dumps(
        result, cls=CustomJsonEncoder, int64_as_str=int64_as_str, separators=(",", ":")
    )
    return json.loads(text)


def assert_same_json(got: Any, expected: Any, where: str = "$") -> None:
    """Equal values *and* JSON types (1600 and 1600.0 differ, as do 5 and "5")."""
    assert type(got) is type(expected), f"{where}: {got!r} ({type(got).__name__}) != {expected!r}"
    if isinstance(expected, dict):
        assert set(got) == set(expected), f"{where}: keys {sorted(got)} != {sorted(expected)}"
        for key in expected:
            assert_same_json(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), f"{where}: length {len(got)} != {len(expected)}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_same_json(g, e, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


PROJECT = "lookup-rows"
LAYER_BITS = 10
SPATIAL_BITS = {1: 10, 2: LAYER_BITS, 3: 9}


def dataset_entry(cache_table: str, **extra) -> dict:
    entry = {
        "segmentation": "file:///nowhere/sv",
        "graph": {"kind": "bigtable", "project": PROJECT, "instance": "inst", "table_id": "g"},
        "cache_table_id": cache_table,
        "resolution": [16, 16, 40],
        "voxel_offset": [1000, 2000, 300],
        "chunk_size": [96, 96, 48],
        "spatial_bits": dict(SPATIAL_BITS),
    }
    entry.update(extra)
    return entry


@contextlib.contextmanager
def lookup_client(config: dict, tmp_path: Path, extra_env: dict[str, str] | None = None):
    """The lookup function in-process (functions-framework's own Flask app), test client.

    The dataset map goes through ``L2CACHE_CONFIG`` as in the cloud; the environment
    is restored afterwards.
    """
    import functions_framework

    from l2cache.handlers import lookup as lookup_http

    path = tmp_path / f"l2cache-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"L2CACHE_CONFIG": str(path), **(extra_env or {})}
    saved = {k: os.environ.get(k) for k in [*env, "FUNCTION_SIGNATURE_TYPE"]}
    os.environ.update(env)
    lookup_http.reset()
    try:
        app = functions_framework.create_app(
            "lookup", str(REPO / "functions" / "lookup" / "main.py"), "http"
        )
        yield app.test_client()
    finally:
        lookup_http.reset()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
