"""Decode PCG's pickled edit messages without ever running code from them.

PCG publishes ``pickle.dumps({"operation_id": ..., "new_lvl2_ids": [...], ...})``.
A plain ``pickle.loads`` of bytes from a topic would run whatever callable the bytes
name. :func:`restricted_loads` admits only what such a payload can contain: the
pickle opcodes for plain containers, strings and numbers (which need no class
lookup), plus numpy's own array/scalar/dtype reconstructors. Any other global
(``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) raises
:class:`UnsafePickleError` before it is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
    # protocol-2 pickles rebuild bytes as _codecs.encode(str, "latin1"): pure data.
    | {("_codecs", "encode")}
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class UnsafePickleError(pickle.UnpicklingError):
    """The payload names a global outside the allow-list (or is not a pickle)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"pickle refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` admitting only plain containers, numbers, strings, numpy arrays."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise UnsafePickleError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated, garbage, wrong protocol ...
        raise UnsafePickleError(f"not a decodable pickle: {type(exc).__name__}: {exc}") from None
