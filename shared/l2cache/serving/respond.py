"""How the lookup's attribute answers leave the server: in bounded pieces.

A request of up to ``max_ids_per_request`` ids (500,000 by default) is answered with a
memory bound that does not grow with its JSON: the ids are read from Bigtable in windows
of :data:`WINDOW_IDS` (a few windows read ahead, concurrently), each window is decoded
and serialized to its JSON fragment, and the fragments are joined in id order into
exactly the bytes ``orjson.dumps`` of the whole answer would give (``{"id":{...},...}``
plus the trailing newline). While the JSON stays under :data:`SPILL_BYTES` it is kept
and sent as one body, as before (``Content-Length``, ``ETag``, the missing-id headers);
past it the answer *spills*: it is compressed incrementally (brotli or gzip, as
accepted) and streamed with chunked transfer, which Cloud Run does not cap at 32 MiB.

Pieces here, framework-free: :class:`Admission` (ids in flight per instance, the
memory bound: 429 past it), :class:`Compressor` (incremental brotli/gzip),
:func:`etag` (a weak validator from the rows' newest cell timestamps), the ``.npz``
layout (:func:`npz_arrays`, :func:`accepts_npz`) and :class:`StreamBody` (a WSGI body
that releases its request's resources however the response ends).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from l2cache.config import DatasetConfig
from l2cache.domain.attributes import BY_NAME
from l2cache.domain.lineage import code_revision

WINDOW_IDS = 10_000  # ids per Bigtable read and JSON fragment (the store's READ_BATCH)
READ_AHEAD = 4  # windows read concurrently ahead of the one being encoded
SPILL_BYTES = 8 * 2**20  # JSON kept whole up to here; streamed chunked past it
# Ids being answered at once per instance (8 concurrent requests on 1 GiB): a request
# that would pass it waits for nobody and is answered 429 with Retry-After, unless it is
# alone (one request is always admitted, so no request at the cap is refused forever).
IDS_IN_FLIGHT = 1_000_000
RETRY_AFTER_S = 1  # the admission bound clears within a request's time
THROTTLED_RETRY_AFTER_S = 5  # Bigtable said RESOURCE_EXHAUSTED: give it longer
NPZ_MEDIA_TYPE = "application/x-npz"
JSON_MEDIA_TYPE = "application/json"


class Admission:
    """Counts the ids this instance is answering; refuses past ``limit``.

    The lookup's memory is bounded per id in flight (a request's parsed ids, its
    read-ahead windows, a binary answer's arrays), so bounding the ids bounds the
    instance. Thread-safe; :meth:`release` exactly once per successful :meth:`admit`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.requests = 0
        self._lock = threading.Lock()

    def admit(self, n: int) -> bool:
        """Take ``n`` ids in flight if they fit (or nothing else is in flight)."""
        with self._lock:
            if self.requests and self.in_flight + n > self.limit:
                return False
            self.in_flight += n
            self.requests += 1
            return True

    def release(self, n: int) -> None:
        """Give back what :meth:`admit` took."""
        with self._lock:
            self.in_flight -= n
            self.requests -= 1


class Compressor:
    """Incremental compression in the coding the client accepted (``None``: identity).

    Brotli at quality 0 and gzip at level 1, the settings of the whole-body path, so a
    streamed answer costs the same CPU per byte.
    """

    def __init__(self, coding: str | None) -> None:
        self.coding = coding
        if coding == "br":
            import brotli

            self._br = brotli.Compressor(quality=0)
            self._feed: Callable[[bytes], bytes] = self._br.process
            self._end: Callable[[], bytes] = self._br.finish
        elif coding == "gzip":
            z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            self._feed, self._end = z.compress, z.flush
        elif coding is None:
            self._feed, self._end = bytes, bytes
        else:
            raise ValueError(f"no incremental coder for {coding!r}")

    def feed(self, data: bytes) -> bytes:
        """Compressed bytes ready so far (possibly empty)."""
        return self._feed(data)

    def finish(self) -> bytes:
        """The rest of the stream, trailer included."""
        return self._end()


class StreamBody:
    """A WSGI response body from a generator that runs ``on_close`` exactly once:
    when it is exhausted, fails, or the server closes it (client gone), even if it
    never started (a generator's ``finally`` would not run then)."""

    def __init__(self, pieces: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._pieces = pieces
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> StreamBody:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._pieces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the body early or late; idempotent."""
        on_close, self._on_close = self._on_close, None
        if on_close is None:
            return
        try:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()
        finally:
            on_close()

    def read_all(self) -> bytes:
        """Every remaining byte (for in-process callers and tests)."""
        return b"".join(self)


def etag(
    kind: str,
    ids: np.ndarray,
    stamps: np.ndarray,
    identity: Sequence[str],
) -> str:
    """A weak ``ETag`` for an answer: ``ids`` (ascending, uint64), each id's newest cell
    timestamp (0: no row), and what else shapes the bytes (``identity``: format,
    attribute set, ``int64_as_str``, dataset, table, :func:`serving_identity`).

    Sound because a row's answer is a function of its newest cells and every write
    changes a row's newest timestamp: l2cache writes all cells of a row at the run's
    timestamp, a rollback that deletes a run's cells brings back the older (tagged
    before) ones, and a missing id that gets computed turns 0 into its row's stamp.
    Weak (``W/``): the same answer in brotli, gzip or identity has the same tag.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((kind, *identity)).encode())
    h.update(np.ascontiguousarray(ids, dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(stamps, dtype="<u8").tobytes())
    return f'W/"{h.hexdigest()}"'


def serving_identity(ds: DatasetConfig) -> tuple[str, ...]:
    """What turns a dataset's stored cells into answer bytes, besides the cells: the
    lookup's code revision (a deploy may decode rows differently) and the map's serving
    fields (row format, geometry, the fallback table). Part of every ``ETag``, so a
    corrected map entry or a new decoder is never answered 304 with the old values."""
    fields = (
        ds.row_format,
        ds.resolution,
        ds.integral_resolution,
        ds.voxel_offset,
        ds.chunk_size,
        ds.spatial_bits,
        ds.fallback_table_id,
    )
    return code_revision(), hashlib.blake2b(repr(fields).encode(), digest_size=8).hexdigest()


def if_none_match(header: str | None, tag: str | None) -> bool:
    """Whether an ``If-None-Match`` header matches ``tag`` (weak comparison, ``*``)."""
    if not header or tag is None:
        return False
    if header.strip() == "*":
        return True
    want = tag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == want for t in header.split(","))


# -- the binary (.npz) answer ---------------------------------------------------------------


def q_values(header: str | None) -> list[tuple[str, float]]:
    """``[(token, q)]`` of an ``Accept`` or ``Accept-Encoding`` header, in its order,
    tokens lowercased; a missing ``q`` is 1, an unreadable one 0 (refused)."""
    out: list[tuple[str, float]] = []
    for part in (header or "").lower().split(","):
        token, _, params = part.partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if token.strip():
            out.append((token.strip(), q))
    return out


def accepts_npz(accept: str | None) -> bool:
    """Whether ``Accept`` prefers the ``.npz`` answer: listed with q > 0 and not below
    JSON's q (JSON's from its most specific match: ``application/json``, else
    ``application/*``, else ``*/*``; a tie goes to ``.npz``, which had to be named).
    JSON stays the default: ``*/*``, ``application/json`` or no header get JSON."""
    q_of = dict(q_values(accept))
    q_npz = q_of.get(NPZ_MEDIA_TYPE, 0.0)
    q_json = next((q_of[m] for m in (JSON_MEDIA_TYPE, "application/*", "*/*") if m in q_of), 0.0)
    return q_npz > 0 and q_npz >= q_json


def accepts_json(accept: str | None) -> bool:
    """Whether ``Accept`` allows JSON: no header, or ``application/json``,
    ``application/*`` or ``*/*`` listed with q > 0 (an answer that exists only as
    JSON, such as ``?state=true``'s, is refused 406 otherwise)."""
    if not (accept or "").strip():
        return True
    allowed = (JSON_MEDIA_TYPE, "application/*", "*/*")
    return any(q > 0 for media, q in q_values(accept) if media in allowed)


def npz_layout(names: Sequence[str], integral_resolution: bool) -> dict[str, tuple[Any, tuple]]:
    """``{attribute: (dtype, per-id shape)}`` of the ``.npz`` answer.

    Stored dtypes where the API serves the stored value (``area_nm2`` uint32,
    ``max_dt_nm`` uint16, ``mean_dt_nm`` float16, ``chunk_intersect_count`` uint16
    (2, 3), ``pca`` float16 (3, 3), ``pca_val`` float32 (3,)); the API's units where it
    converts: ``size_nm3`` int64 nm^3 (float64 when the resolution is not integral) and
    ``rep_coord_nm`` float64 (3,) nm, exactly the JSON's numbers.
    """
    out: dict[str, tuple[Any, tuple]] = {}
    for name in names:
        attr = BY_NAME[name]
        if name == "size_nm3":
            out[name] = (np.dtype("<i8") if integral_resolution else np.dtype("<f8"), ())
        elif name == "rep_coord_nm":
            out[name] = (np.dtype("<f8"), (3,))
        else:
            out[name] = (attr.dtype, attr.shape)
    return out


class NpzBuilder:
    """The ``.npz`` arrays of one answer, filled window by window.

    Members: ``l2id`` (uint64, the distinct requested ids ascending, as the JSON's
    keys), ``found`` (bool: the id's JSON object is not empty), and per requested
    attribute ``<name>`` (n, *shape) in :func:`npz_layout`'s dtype with
    ``<name>_valid`` (bool: the JSON has this attribute for the id); values where
    ``_valid`` is False are 0.
    """

    def __init__(self, ids: np.ndarray, names: Sequence[str], integral_resolution: bool) -> None:
        n = ids.size
        self.arrays: dict[str, np.ndarray] = {
            "l2id": ids.astype("<u8"),
            "found": np.zeros(n, dtype=bool),
        }
        for name, (dtype, shape) in npz_layout(names, integral_resolution).items():
            self.arrays[name] = np.zeros((n, *shape), dtype=dtype)
            self.arrays[f"{name}_valid"] = np.zeros(n, dtype=bool)
        self.names = list(names)

    def fill(self, offset: int, window: np.ndarray, found: Mapping[int, Mapping[str, Any]]) -> None:
        """Set the rows of ``window`` (ids at ``offset``..) from their API values.

        The values are the JSON's own (so the two formats cannot disagree), flattened
        with one ``np.fromiter`` per attribute rather than ``np.asarray`` of nested
        lists (5-10x faster for the (3, 3) PCA).
        """
        if not found:
            return
        ids = window.tolist()
        pos_list = [offset + i for i, v in enumerate(ids) if v in found]
        rows = [found[v] for v in ids if v in found]
        pos = np.array(pos_list, dtype=np.int64)
        self.arrays["found"][pos] = np.fromiter(map(bool, rows), bool, len(rows))
        for name in self.names:
            target = self.arrays[name]
            if all(name in r for r in rows):
                at, values = pos, [r[name] for r in rows]
            else:
                keep = [i for i, r in enumerate(rows) if name in r]
                if not keep:
                    continue
                at, values = pos[keep], [rows[i][name] for i in keep]
            if isinstance(values[0], str):  # int64_as_str does not apply to arrays
                values = list(map(int, values))
            per_id = int(np.prod(target.shape[1:], dtype=np.int64))
            flat: Any = values
            for _ in range(target.ndim - 1):
                flat = itertools.chain.from_iterable(flat)
            kind = np.float64 if target.dtype.kind == "f" else np.int64
            try:
                column = np.fromiter(flat, kind, len(values) * per_id)
            except (ValueError, TypeError):  # an odd-sized cell served with another shape
                self._fill_one_by_one(name, at, values)
                continue
            target[at] = column.reshape(len(values), *target.shape[1:])
            self.arrays[f"{name}_valid"][at] = True

    def _fill_one_by_one(self, name: str, at: np.ndarray, values: list[Any]) -> None:
        """The slow path: values not of the layout's shape stay invalid (the JSON still
        has them; the layout has no place for them)."""
        target = self.arrays[name]
        for p, v in zip(at.tolist(), values, strict=True):
            arr = np.asarray(v, dtype=np.float64 if target.dtype.kind == "f" else np.int64)
            if arr.shape == target.shape[1:]:
                target[p] = arr
                self.arrays[f"{name}_valid"][p] = True

    def to_bytes(self) -> bytes:
        """The ``.npz`` (an uncompressed zip of ``.npy`` members: the HTTP coding
        compresses it, once)."""
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **self.arrays)
        return buf.getvalue()


def npz_arrays(body: bytes) -> dict[str, np.ndarray]:
    """A ``.npz`` answer's arrays (``allow_pickle=False``: no object arrays, ever)."""
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
