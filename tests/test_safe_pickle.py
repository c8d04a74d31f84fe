"""The restricted unpickler admits PCG's payloads and never executes anything else."""

import os
import pickle

import numpy as np
import pytest

from l2cache.support.safe_pickle import UnsafePickleError, restricted_loads


def test_pcg_edit_payload_round_trips():
    """PCG's publish_edit and its manual remesh payloads, every protocol 3-5 (protocol 2
    is read too, but pickles bytes through a global, which is refused)."""
    payloads = [
        {
            "operation_id": 17,
            "new_lvl2_ids": np.array([2**60 + 1, 2**60 + 2], dtype=np.uint64).tolist(),
            "new_root_ids": [864691135776832352],
        },
        {"operation_id": 0, "new_lvl2_ids": [2**63 + 5, 1], "new_root_ids": [], "old_root_ids": []},
        {"t": (1, (2,), "é", b"x", 1.5, None, True, False), "n": [-(2**63), 2**64 - 1, -5]},
    ]
    for payload in payloads:
        for protocol in range(3, pickle.HIGHEST_PROTOCOL + 1):
            assert restricted_loads(pickle.dumps(payload, protocol=protocol)) == payload
    assert restricted_loads(pickle.dumps(payloads[0], protocol=2)) == payloads[0]


def test_numpy_arrays_and_scalars_are_refused():
    """PCG sends lists (``.tolist()``); numpy reconstruction is how 183 bytes once
    allocated 1.15 GB, so no numpy global is admitted any more."""
    for payload in (np.array([1, 2], dtype=np.uint64), np.int64(3), np.dtype("u8")):
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(UnsafePickleError, match="not allowed"):
                restricted_loads(pickle.dumps({"new_lvl2_ids": payload}, protocol=protocol))


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _EvalExploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').write('x')",))


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
def test_malicious_pickle_is_rejected_and_never_executed(tmp_path, exploit):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"operation_id": 1, "new_lvl2_ids": [exploit(str(marker))]})
    with pytest.raises(UnsafePickleError, match="not allowed"):
        restricted_loads(data)
    assert not marker.exists()


def test_garbage_is_a_clear_error():
    with pytest.raises(
        UnsafePickleError, match="not a decodable pickle: opcode .* is not accepted"
    ):
        restricted_loads(b"\x80\x04garbage")
    with pytest.raises(UnsafePickleError):
        restricted_loads(b"")
    with pytest.raises(UnsafePickleError, match="protocol 2 or later"):
        restricted_loads(pickle.dumps([1], protocol=0))


def test_runs_of_l2_ids_read_at_once_equal_what_pickle_wrote():
    """8-byte LONG1 runs (L2 ids) take the numpy path; mixed with every other int width
    and split across APPENDS batches, the values are exactly pickle's."""
    rng = np.random.default_rng(0)
    ids = (rng.integers(1, 2**62, 2500, dtype=np.int64) + (2 << 56)).tolist()
    mixed = ids[:1200] + [0, 255, 65535, -1, -(2**31), 2**31, 2**63, 2**64 - 1] + ids[1200:]
    payload = {"operation_id": 2**40, "new_lvl2_ids": mixed, "new_root_ids": ids[:3]}
    assert restricted_loads(pickle.dumps(payload)) == payload


def test_limits_are_checked_before_the_data_is_read():
    with pytest.raises(UnsafePickleError, match="exceeds the limit of 4096"):
        restricted_loads(b"\x80\x04\x8d" + (2**62).to_bytes(8, "little"))
    with pytest.raises(UnsafePickleError, match="nesting deeper than 8"):
        restricted_loads(b"\x80\x04" + b"]" * 10 + b"a" * 9 + b".")
    with pytest.raises(UnsafePickleError, match="exceeds 64 bits"):
        restricted_loads(b"\x80\x04\x8a\x0a" + bytes(10) + b".")
