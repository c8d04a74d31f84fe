"""Read PCG's pickled edit messages as plain data, within limits checked before allocation.

PCG publishes ``pickle.dumps({"operation_id": int, "new_lvl2_ids": [int, ...],
"new_root_ids": [int, ...]})`` (its manual-remesh publisher adds ``"old_root_ids": []``
and sends operation id 0): builtins only, no class, no numpy. Never unpickle untrusted
bytes with plain ``pickle.loads``: it runs whatever callable the bytes name, and even a
loader that admits only "safe" globals is not safe for memory: numpy's array
reconstruction admitted by the previous loader let a 183-byte message allocate 1.15 GB
(and hand uninitialized heap words onward), and CPython's own unpickler sizes its memo
from an index in the data (a 6-byte ``LONG_BINPUT`` asks for gigabytes).

So :func:`restricted_loads` does not call the unpickler at all. It interprets the
binary pickle opcodes that plain data needs (protocols 2-5: dict, list, tuple, str,
bytes, int, float, bool, None, the memo) itself, and refuses every opcode that names a
global, builds an object or reads out-of-band buffers. Every limit is checked before
the object it guards exists: the payload size, the number of opcodes (so of objects
and references), the memo size, the length of each str/bytes (and that the payload
holds that many bytes), the width of each int, and the nesting depth. A container
can only be filled before it is placed inside another (what every pickler emits), so
no cycle can be built and a container's depth is final when it is nested.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# Pub/Sub's largest message (10 MB; a MiB, to be safe): nothing larger comes from a topic.
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
# Opcodes (so objects and references) in one message: PCG needs one per id plus two per
# 1,000 ids; a 10 MB message holds at most ~1 M uint64 ids (10 bytes each).
MAX_OPS = 1_100_000
MAX_MEMO = 10_000  # PCG's payload memoizes ~8 objects (its containers and keys)
MAX_CONTAINERS = 10_000  # dicts, lists and tuples (PCG sends 4)
MAX_STRINGS = 10_000  # str and bytes objects (PCG sends its 3-4 keys)
MAX_DEPTH = 8  # PCG's payload is a dict of lists of ints: depth 2
MAX_STRING_BYTES = 4_096  # one str or bytes (PCG sends only the dict's keys)
MAX_INT_BYTES = 9  # any uint64 (and int64) in two's complement; nothing wider


NOT_DECODABLE = "not a decodable pickle"  # how malformed data's reasons start


class UnsafePickleError(ValueError):
    """The payload is not plain data within the limits (or is not a pickle): why."""


@dataclass(frozen=True)
class Limits:
    """What one message may cost; the defaults fit everything PCG sends."""

    max_bytes: int = MAX_MESSAGE_BYTES
    max_ops: int = MAX_OPS
    max_memo: int = MAX_MEMO
    max_containers: int = MAX_CONTAINERS
    max_strings: int = MAX_STRINGS
    max_depth: int = MAX_DEPTH
    max_string_bytes: int = MAX_STRING_BYTES
    max_int_bytes: int = MAX_INT_BYTES


DEFAULT_LIMITS = Limits()

# Opcodes that name a global, build an object, or read out-of-band data: never admitted.
_REFUSED_BY_NAME = {
    b"c": "GLOBAL",
    b"\x93": "STACK_GLOBAL",
    b"R": "REDUCE",
    b"b": "BUILD",
    b"\x81": "NEWOBJ",
    b"\x92": "NEWOBJ_EX",
    b"i": "INST",
    b"o": "OBJ",
    b"\x82": "EXT1",
    b"\x83": "EXT2",
    b"\x84": "EXT4",
    b"P": "PERSID",
    b"Q": "BINPERSID",
    b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
    b"\x96": "BYTEARRAY8",
}
_REFUSED = {code[0]: name for code, name in _REFUSED_BY_NAME.items()}
_KEY_TYPES = (str, int)  # hashing is then cheap and collision-free enough


class _Mark:
    """The MARK sentinel on the stack."""


_MARK = _Mark()


class _Reader:
    """One pass over the opcodes; every object it creates was paid for first."""

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
        self.pos = 0
        self.limits = limits
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.depth: dict[int, int] = {}  # id(container) -> nesting depth (1 = flat)
        self.sealed: set[int] = set()  # ids of containers placed inside another
        self.keep: list[Any] = []  # containers kept alive, so their ids stay theirs
        self.strings = 0

    # -- reading the byte stream ------------------------------------------------------
    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise UnsafePickleError(
                f"{NOT_DECODABLE}: {what} needs {n} bytes at offset {self.pos}; "
                f"only {len(self.data) - self.pos} remain (truncated)"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def sized(self, width: int, what: str) -> bytes:
        """A length-prefixed str/bytes, its count and length checked before it is read."""
        self.strings += 1
        if self.strings > self.limits.max_strings:
            raise UnsafePickleError(f"more than {self.limits.max_strings} str/bytes objects")
        n = self.uint(width, what)
        if n > self.limits.max_string_bytes:
            raise UnsafePickleError(
                f"{what} of {n} bytes exceeds the limit of {self.limits.max_string_bytes}"
            )
        return self.take(n, what)

    # -- the stack --------------------------------------------------------------------
    def pop_mark(self, what: str) -> list[Any]:
        if not self.marks:
            raise UnsafePickleError(f"{what} without a MARK")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self, what: str) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise UnsafePickleError(f"{what} on an empty stack")
        return self.stack[-1]

    def pop(self, what: str) -> Any:
        value = self.top(what)
        self.stack.pop()
        return value

    def count_container(self) -> None:
        if len(self.keep) >= self.limits.max_containers:
            raise UnsafePickleError(f"more than {self.limits.max_containers} containers")

    def new_container(self, value: list | dict) -> None:
        self.keep.append(value)
        self.depth[id(value)] = 1
        self.stack.append(value)

    def nest(self, parent: list | dict | None, children: list[Any]) -> int:
        """Seal ``children`` into ``parent`` (None: a tuple being built); the parent's
        depth, refused when it would exceed the limit."""
        if parent is not None and id(parent) in self.sealed:
            raise UnsafePickleError("a container is modified after being nested")
        deepest = self.depth.get(id(parent), 1) - 1 if parent is not None else 0
        for child in children:
            if child is _MARK:
                raise UnsafePickleError("a MARK inside a container's items")
            if isinstance(child, list | dict | tuple):
                if child is parent:
                    raise UnsafePickleError("a container placed inside itself")
                self.sealed.add(id(child))
                deepest = max(deepest, self.depth[id(child)])
        depth = deepest + 1
        if depth > self.limits.max_depth:
            raise UnsafePickleError(f"nesting deeper than {self.limits.max_depth} levels")
        if parent is not None:
            self.depth[id(parent)] = depth
        return depth

    def push_tuple(self, items: list[Any]) -> None:
        self.count_container()
        depth = self.nest(None, items)
        value = tuple(items)
        self.keep.append(value)
        self.depth[id(value)] = depth
        self.stack.append(value)

    def set_items(self, items: list[Any], what: str) -> None:
        target = self.top(what)
        if not isinstance(target, dict) or len(items) % 2:
            raise UnsafePickleError(f"{what} needs a dict and key/value pairs")
        keys = items[0::2]
        for key in keys:
            if not isinstance(key, _KEY_TYPES):
                raise UnsafePickleError(f"a dict key of type {type(key).__name__}")
        self.nest(target, items[1::2])
        for key, value in zip(keys, items[1::2], strict=True):
            target[key] = value

    def append_items(self, items: list[Any], what: str) -> None:
        target = self.top(what)
        if not isinstance(target, list):
            raise UnsafePickleError(f"{what} to a {type(target).__name__}, not a list")
        self.nest(target, items)
        target.extend(items)

    def put(self, index: int) -> None:
        if index not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise UnsafePickleError(f"more than {self.limits.max_memo} memo entries")
        self.memo[index] = self.top("memoize")

    def get(self, index: int) -> None:
        if index not in self.memo:
            raise UnsafePickleError(f"memo entry {index} was never stored")
        self.stack.append(self.memo[index])

    # -- the opcodes ------------------------------------------------------------------
    def run(self) -> Any:
        data, limits, stack = self.data, self.limits, self.stack
        size = len(data)
        if size < 2 or data[0] != 0x80:
            raise UnsafePickleError(f"{NOT_DECODABLE}: not a binary pickle (protocol 2 or later)")
        from_bytes, max_int, append = int.from_bytes, limits.max_int_bytes, stack.append
        ops = 0
        pos = 0
        while True:
            if pos >= size:
                raise UnsafePickleError(f"{NOT_DECODABLE}: data ends without STOP (truncated)")
            op = data[pos]
            pos += 1
            ops += 1
            if ops > limits.max_ops:
                raise UnsafePickleError(f"more than {limits.max_ops} pickle opcodes")
            # the opcodes of an id list, inline: a 1 M-id message is ~1 M of them
            if op == 0x8A:  # LONG1: a length byte, then that many bytes
                n = data[pos] if pos < size else -1
                if n > max_int:
                    raise UnsafePickleError(f"an integer of {n} bytes exceeds 64 bits")
                if n < 0 or pos + 1 + n > size:
                    raise UnsafePickleError(f"{NOT_DECODABLE}: LONG1 truncated at offset {pos}")
                if n == 8:  # an L2 id: read the whole run of them at once
                    run = (_LONG1_8_RUN.match(data, pos - 1).end() - pos + 1) // 10
                    ops += run - 1
                    if ops > limits.max_ops:
                        raise UnsafePickleError(f"more than {limits.max_ops} pickle opcodes")
                    ints = np.frombuffer(data, _LONG1_8, count=run, offset=pos - 1)["value"]
                    stack.extend(ints.tolist())
                    pos += run * 10 - 1
                    continue
                append(from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True))
                pos += 1 + n
                continue
            width = _INT_WIDTHS.get(op)
            if width is not None:  # BININT1, BININT2, BININT
                if pos + width > size:
                    raise UnsafePickleError(f"{NOT_DECODABLE}: an int truncated at offset {pos}")
                append(from_bytes(data[pos : pos + width], "little", signed=op == 0x4A))
                pos += width
                continue
            handler = _HANDLERS.get(op)
            if handler is None:
                self.pos = pos
                raise UnsafePickleError(self._refusal(op))
            self.pos = pos
            stopped = handler(self) is _STOP
            pos = self.pos
            if stopped:
                if len(stack) != 1 or self.marks:
                    raise UnsafePickleError(f"{NOT_DECODABLE}: STOP with a malformed stack")
                if pos != size:
                    raise UnsafePickleError(f"{NOT_DECODABLE}: {size - pos} bytes after STOP")
                return stack[0]

    def _refusal(self, op: int) -> str:
        """Why opcode ``op`` is refused; a global is named, never looked up."""
        if op == 0x63:  # GLOBAL "module\nname\n"
            return f"pickle refers to {self._global_name()}, which is not allowed"
        pair = self.stack[-2:]
        if op == 0x93 and len(pair) == 2 and all(isinstance(p, str) for p in pair):
            return f"pickle refers to {pair[0]}.{pair[1]}, which is not allowed"
        name = _REFUSED.get(op)
        if name is not None:
            return f"pickle opcode {name} is not allowed (plain data only)"
        return f"{NOT_DECODABLE}: opcode {bytes([op])!r} at offset {self.pos - 1} is not accepted"

    def _global_name(self) -> str:
        text = self.data[self.pos : self.pos + 200].decode("ascii", "replace").split("\n")
        return ".".join(text[:2])


_STOP = object()


def _op_proto(r: _Reader) -> None:
    version = r.uint(1, "PROTO")
    if not 2 <= version <= 5:
        raise UnsafePickleError(f"pickle protocol {version} is not accepted (2-5)")


def _op_frame(r: _Reader) -> None:
    size = r.uint(8, "FRAME")
    if size > len(r.data) - r.pos:
        raise UnsafePickleError(f"{NOT_DECODABLE}: FRAME of {size} bytes overruns the data")


def _op_long(width: int) -> Any:
    def op(r: _Reader) -> None:
        n = r.uint(width, "LONG")
        if n > r.limits.max_int_bytes:
            raise UnsafePickleError(f"an integer of {n} bytes exceeds 64 bits")
        r.stack.append(int.from_bytes(r.take(n, "LONG"), "little", signed=True))

    return op


def _op_unicode(width: int) -> Any:
    def op(r: _Reader) -> None:
        raw = r.sized(width, "a str")
        try:
            r.stack.append(str(raw, "utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:
            raise UnsafePickleError(f"a str that is not UTF-8: {exc}") from None

    return op


def _op_bytes(width: int) -> Any:
    def op(r: _Reader) -> None:
        r.stack.append(bytes(r.sized(width, "bytes")))

    return op


def _op_float(r: _Reader) -> None:
    r.stack.append(struct.unpack(">d", r.take(8, "BINFLOAT"))[0])


def _op_mark(r: _Reader) -> None:
    r.stack.append(_MARK)  # on the stack too, so a MARK is never popped or nested as data
    r.marks.append(len(r.stack))


def _pop_marked(r: _Reader, what: str) -> list[Any]:
    items = r.pop_mark(what)
    if not r.stack or r.stack[-1] is not _MARK:
        raise UnsafePickleError(f"{what}: malformed MARK")
    r.stack.pop()
    return items


def _op_empty(kind: type) -> Any:
    def op(r: _Reader) -> None:
        r.count_container()  # before the container exists
        r.new_container(kind())

    return op


def _op_tuple(r: _Reader) -> None:
    r.push_tuple(_pop_marked(r, "TUPLE"))


def _op_tuple_n(n: int) -> Any:
    def op(r: _Reader) -> None:
        if len(r.stack) < n:
            raise UnsafePickleError(f"TUPLE{n} on a stack of {len(r.stack)}")
        items = r.stack[len(r.stack) - n :] if n else []
        if n:
            del r.stack[-n:]
        r.push_tuple(items)

    return op


def _op_append(r: _Reader) -> None:
    value = r.pop("APPEND")
    r.append_items([value], "APPEND")


def _op_appends(r: _Reader) -> None:
    r.append_items(_pop_marked(r, "APPENDS"), "APPENDS")


def _op_setitem(r: _Reader) -> None:
    value = r.pop("SETITEM")
    key = r.pop("SETITEM")
    r.set_items([key, value], "SETITEM")


def _op_setitems(r: _Reader) -> None:
    r.set_items(_pop_marked(r, "SETITEMS"), "SETITEMS")


def _op_pop(r: _Reader) -> None:
    r.pop("POP")


def _op_pop_mark(r: _Reader) -> None:
    _pop_marked(r, "POP_MARK")


def _op_memoize(r: _Reader) -> None:
    r.put(len(r.memo))


def _op_put(width: int) -> Any:
    def op(r: _Reader) -> None:
        r.put(r.uint(width, "PUT"))

    return op


def _op_get(width: int) -> Any:
    def op(r: _Reader) -> None:
        r.get(r.uint(width, "GET"))

    return op


def _const(value: Any) -> Any:
    def op(r: _Reader) -> None:
        r.stack.append(value)

    return op


def _op_stop(r: _Reader) -> object:
    return _STOP


_BY_NAME: dict[bytes, Any] = {
    b"\x80": _op_proto,
    b"\x95": _op_frame,
    b".": _op_stop,
    b"(": _op_mark,
    b"0": _op_pop,
    b"1": _op_pop_mark,
    b"}": _op_empty(dict),
    b"]": _op_empty(list),
    b")": _op_tuple_n(0),
    b"\x85": _op_tuple_n(1),
    b"\x86": _op_tuple_n(2),
    b"\x87": _op_tuple_n(3),
    b"t": _op_tuple,
    b"a": _op_append,
    b"e": _op_appends,
    b"s": _op_setitem,
    b"u": _op_setitems,
    b"N": _const(None),
    b"\x88": _const(True),
    b"\x89": _const(False),
    b"\x8b": _op_long(4),
    b"G": _op_float,
    b"\x8c": _op_unicode(1),
    b"X": _op_unicode(4),
    b"\x8d": _op_unicode(8),
    b"C": _op_bytes(1),
    b"B": _op_bytes(4),
    b"\x8e": _op_bytes(8),
    b"\x94": _op_memoize,
    b"q": _op_put(1),
    b"r": _op_put(4),
    b"h": _op_get(1),
    b"j": _op_get(4),
}


_HANDLERS: dict[int, Any] = {code[0]: op for code, op in _BY_NAME.items()}
# LONG1 with 8 bytes: the opcode, the length, a little-endian two's complement int64
_LONG1_8 = np.dtype([("op", "u1"), ("n", "u1"), ("value", "<i8")])
_LONG1_8_RUN = re.compile(rb"(?:\x8a\x08.{8})+", re.DOTALL)
_INT_WIDTHS = {0x4B: 1, 0x4D: 2, 0x4A: 4}  # BININT1, BININT2 (unsigned), BININT (signed)


def restricted_loads(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The plain data a binary pickle (protocol 2-5) holds, or :class:`UnsafePickleError`
    saying why not. Nothing is imported, called or allocated beyond ``limits``."""
    if len(data) > limits.max_bytes:
        raise UnsafePickleError(f"message of {len(data)} bytes exceeds {limits.max_bytes}")
    return _Reader(bytes(data), limits).run()
