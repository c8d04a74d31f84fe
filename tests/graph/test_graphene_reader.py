"""The graphene reader through CloudVolume against a small PCG REST stand-in on 127.0.0.1.

The stand-in answers the three endpoints CloudVolume's graphene client calls (info,
roots_binary, node leaves) from a fixed two-level graph, so the test checks our use of
CloudVolume (stop_layer=2, binary ids, timestamps, leaves) without a PCG deployment.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from l2cache.domain import ids
from l2cache.inputs.graph import GrapheneGraphReader

BITS = ids.SpatialBits.from_mapping({1: 10, 2: 10, 3: 9})
SV = ids.encode_ids(1, [[1, 2, 3]] * 4, [1, 2, 3, 4], BITS)
L2 = ids.encode_ids(2, [[1, 2, 3]] * 2, [7, 8], BITS)
PARENT = {
    int(SV[0]): int(L2[0]),
    int(SV[1]): int(L2[0]),
    int(SV[2]): int(L2[1]),
    int(SV[3]): int(L2[1]),
}


class PcgStandIn(BaseHTTPRequestHandler):
    requests_seen: list = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _json(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        self.requests_seen.append(("GET", url.path, parse_qs(url.query)))
        if url.path.endswith("/info"):
            return self._json(
                {
                    "data_dir": "file:///nonexistent/ws",
                    "app": {"supported_api_versions": [0, 1]},
                    "graph": {
                        "chunk_size": [64, 64, 64],
                        "n_layers": 3,
                        "n_bits_for_layer_id": 8,
                        "spatial_bit_masks": {"1": 10, "2": 10, "3": 9},
                    },
                    "type": "segmentation",
                    "data_type": "uint64",
                    "num_channels": 1,
                    "scales": [
                        {
                            "key": "s0",
                            "resolution": [16, 16, 40],
                            "size": [256, 256, 256],
                            "voxel_offset": [0, 0, 0],
                            "chunk_sizes": [[64, 64, 64]],
                            "encoding": "raw",
                        }
                    ],
                }
            )
        if "/node/" in url.path and url.path.endswith("/leaves"):
            node = int(url.path.split("/node/")[1].split("/")[0])
            return self._json({"leaf_ids": [s for s, p in PARENT.items() if p == node]})
        self.send_error(404)

    def do_POST(self):
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests_seen.append(("POST", url.path, parse_qs(url.query)))
        if url.path.endswith("/roots_binary"):
            svs = np.frombuffer(body, dtype=np.uint64)
            out = np.array([PARENT.get(int(s), 0) for s in svs], dtype=np.uint64).tobytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_error(404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PcgStandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_l2_parents_and_children_through_cloudvolume(server):
    reader = GrapheneGraphReader(
        f"graphene://{server}/segmentation/table/pinky_test", token="0123abcd"
    )
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    parents = reader.l2_parents(np.array([SV[2], SV[0], SV[3]], dtype=np.uint64), ts)
    assert parents.tolist() == [int(L2[1]), int(L2[0]), int(L2[1])]
    roots = [r for r in PcgStandIn.requests_seen if r[1].endswith("/roots_binary")]
    assert roots and roots[-1][2]["stop_layer"] == ["2"]
    assert "timestamp" in roots[-1][2]
    children = reader.l2_children(L2)
    assert sorted(children[int(L2[0])].tolist()) == sorted(SV[:2].tolist())
    assert sorted(children[int(L2[1])].tolist()) == sorted(SV[2:].tolist())
    assert reader.l2_parents(np.zeros(0, np.uint64)).size == 0
