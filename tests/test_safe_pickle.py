"""The restricted unpickler admits PCG's payloads and never executes anything else."""

import os
import pickle

import numpy as np
import pytest

from l2cache.support.safe_pickle import UnsafePickleError, restricted_loads


def test_pcg_edit_payload_round_trips():
    payload = {
        "operation_id": 17,
        "new_lvl2_ids": np.array([2**60 + 1, 2**60 + 2], dtype=np.uint64).tolist(),
        "new_root_ids": [864691135776832352],
    }
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert restricted_loads(pickle.dumps(payload, protocol=protocol)) == payload


def test_numpy_arrays_and_scalars_are_admitted():
    payload = {"new_lvl2_ids": np.array([1, 2**63 + 5], dtype=np.uint64), "n": np.int64(3)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        out = restricted_loads(pickle.dumps(payload, protocol=protocol))
        assert out["new_lvl2_ids"].dtype == np.uint64
        assert out["new_lvl2_ids"].tolist() == [1, 2**63 + 5]
        assert out["n"] == 3


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
    with pytest.raises(UnsafePickleError, match="not a decodable pickle"):
        restricted_loads(b"\x80\x04garbage")
    with pytest.raises(UnsafePickleError):
        restricted_loads(b"")
