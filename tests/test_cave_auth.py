"""CAVE auth, CORS and caveclient against the lookup function (functions-framework process).

The lookup runs the real middle-auth-client against a loopback HTTPS stand-in of the
auth service (tests/cave_standins.py); caveclient's ``CAVEclient(datastack)`` finds the
lookup through a loopback stand-in of the info service, as it would find a CAVE
deployment's ``local_server``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import yaml
from cave_standins import auth_service, info_service, self_signed_cert
from lookup_support import PROJECT, dataset_entry, upstream_features, write_upstream_rows
from test_lookup_rows import BITS, crop_features

from l2cache.domain import ids
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import create_cache_table
from l2cache_tools.local.functions import start_function

NS = "pychunkedgraph"
USERS = {
    "tok-viewer": {"pinky_ds": ["view"], "public_ds": ["view"]},
    "tok-other": {"other_ds": ["view", "edit"]},
    "tok-public": {"public_ds": ["view"]},
    "tok-cache": {"pinky_ds": ["view"]},
}
TABLES = {(NS, "pinky"): "pinky_ds", (NS, "pinky_public"): "public_ds"}
XRW = {"X-Requested-With": "XMLHttpRequest"}  # what makes the library answer 401, not 302


@pytest.fixture(scope="module")
def cave(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cave")
    cert, key = self_signed_cert(tmp)
    auth = auth_service(USERS, TABLES, ssl=(cert, key))
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    table = create_cache_table(instance, "auth_cache")
    feats = crop_features((3, 5, 2), 1)
    write_upstream_rows(table, upstream_features(feats))
    config = {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        "auth": {"url": f"127.0.0.1:{auth.port}/auth", "service_namespace": NS},
        "virtual_tables": {"pinky_public": "pinky"},
        "datasets": {
            "pinky": dataset_entry("auth_cache"),
            "pinky_fixed": dataset_entry("auth_cache", auth_dataset="pinky_ds"),
        },
    }
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(config))
    fn = start_function(
        "lookup",
        {
            "L2CACHE_CONFIG": str(tmp / "l2cache.yaml"),
            "REQUESTS_CA_BUNDLE": str(cert),  # trust the stand-in's certificate
            **bigtable_emulator.env,
        },
        log_dir=tmp,
    )
    base = f"http://{fn.host}"
    info = info_service(
        {
            "pinky_stack": {
                "local_server": base,
                "segmentation_source": f"graphene://{base}/segmentation/table/pinky",
                "aligned_volume": {"name": "pinky_av", "id": 1, "image_source": "precomputed://x"},
                "analysis_database": None,
                "viewer_site": None,
                "synapse_table": None,
                "soma_table": None,
                "description": "stand-in",
            }
        }
    )
    yield {"base": base, "auth": auth, "info": info, "feats": feats, "cert": cert, "tmp": tmp}
    fn.stop()
    info.stop()
    auth.stop()


def attributes(cave, table="pinky", headers=None, **kw):
    l2 = [int(v) for v in cave["feats"]["l2id"][:5]]
    return requests.post(
        f"{cave['base']}/l2cache/api/v1/table/{table}/attributes",
        data=json.dumps({"l2_ids": l2}),
        headers=headers or {},
        allow_redirects=False,
        timeout=30,
        **kw,
    )


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_metadata_routes_are_open_as_upstream(cave):
    for path in (
        "/l2cache/api/v1/attribute_metadata",
        "/l2cache/api/v1/table_mapping",
        "/l2cache/",
        "/l2cache/index",
        "/l2cache/api/versions",
    ):
        r = requests.get(cave["base"] + path, headers=XRW, timeout=10)
        assert r.status_code == 200, path
    # the v1 index is auth_required upstream: a token, no permission
    r = requests.get(f"{cave['base']}/l2cache/api/v1/", headers=XRW, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "no_token"
    r = requests.get(f"{cave['base']}/l2cache/api/v1/", headers=bearer("tok-other"), timeout=10)
    assert r.status_code == 200


def test_no_token_401_or_login_redirect(cave):
    r = attributes(cave, headers=XRW)
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == 401 and body["error"] == "no_token" and body["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
    # a browser (no programmatic header) is sent to the auth service's login page
    r = attributes(cave)
    assert r.status_code == 302
    assert r.headers["Location"].startswith(
        f"https://127.0.0.1:{cave['auth'].port}/auth/api/v1/authorize"
    )


def test_invalid_token_401_and_missing_view_403(cave):
    r = attributes(cave, headers=bearer("tok-nobody"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    r = attributes(cave, headers=bearer("tok-other"))
    assert r.status_code == 403
    body = r.json()
    assert body["code"] == 403 and body["error"] == "missing_permission"
    assert body["data"] == {"required_permission": "view", "auth_dataset": "pinky_ds"}
    r = requests.post(
        f"{cave['base']}/l2cache/api/v1/table/Authorization/attributes",
        headers={"Authorization": "Basic abc"},
        data="{}",
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_auth_header"


def test_token_from_header_cookie_or_query_parameter(cave):
    expected = attributes(cave, headers=bearer("tok-viewer"))
    assert expected.status_code == 200 and len(expected.json()) == 5
    assert all("size_nm3" in v for v in expected.json().values())
    r = attributes(cave, headers=XRW, cookies={"middle_auth_token": "tok-viewer"})
    assert r.status_code == 200 and r.json() == expected.json()
    r = attributes(cave, headers=XRW, params={"middle_auth_token": "tok-viewer"})
    assert r.status_code == 200 and r.json() == expected.json()


def test_user_lookups_are_cached_per_token(cave):
    before = cave["auth"].count("/auth/api/v1/user/cache", "tok-cache")
    for _ in range(3):
        assert attributes(cave, headers=bearer("tok-cache")).status_code == 200
    assert cave["auth"].count("/auth/api/v1/user/cache", "tok-cache") - before == 1


def test_dataset_from_the_map_or_from_the_auth_service(cave):
    lookups = f"/auth/api/v1/service/{NS}/table/pinky_fixed/dataset"
    assert attributes(cave, "pinky_fixed", headers=bearer("tok-viewer")).status_code == 200
    assert attributes(cave, "pinky_fixed", headers=bearer("tok-other")).status_code == 403
    assert cave["auth"].count(lookups) == 0  # auth_dataset in the map: no lookup
    assert cave["auth"].count(f"/auth/api/v1/service/{NS}/table/pinky/dataset") >= 1
    # a table the auth service does not know: the library's 400
    r = attributes(cave, "nope", headers=bearer("tok-viewer"))
    assert r.status_code == 400 and r.json()["error"] == "invalid_table_id"


def test_virtual_table_is_authorized_under_its_own_name(cave):
    """Upstream checks permission on the public alias, then serves the real table."""
    r = attributes(cave, "pinky_public", headers=bearer("tok-public"))
    assert r.status_code == 200
    assert r.json() == attributes(cave, headers=bearer("tok-viewer")).json()
    assert attributes(cave, "pinky", headers=bearer("tok-public")).status_code == 403


def test_cors_preflight_and_headers(cave):
    origin = {"Origin": "https://neuroglancer.example.org"}
    r = requests.options(
        f"{cave['base']}/l2cache/api/v1/table/pinky/attributes",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] in ("*", origin["Origin"])
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = attributes(cave, headers=origin)  # an Origin makes it programmatic: 401
    assert r.status_code == 401
    assert r.headers["Access-Control-Allow-Origin"] in ("*", origin["Origin"])
    assert "WWW-Authenticate" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(f"{cave['base']}/l2cache/api/v1/table_mapping", headers=origin, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] in ("*", origin["Origin"])


def test_caveclient_datastack_client_with_and_without_a_token(cave, monkeypatch):
    from caveclient import CAVEclient
    from caveclient.base import AuthException

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cave["cert"]))  # the login redirect's TLS
    server = f"http://127.0.0.1:{cave['info'].port}"
    l2 = [int(v) for v in cave["feats"]["l2id"][:8]]
    none_file = str(cave["tmp"] / "no-token.json")

    client = CAVEclient(
        "pinky_stack", server_address=server, auth_token="tok-viewer", auth_token_file=none_file
    )
    data = client.l2cache.get_l2data(l2)
    direct = requests.post(
        f"{cave['base']}/l2cache/api/v1/table/pinky/attributes",
        data=json.dumps({"l2_ids": l2}),
        headers=bearer("tok-viewer"),
        timeout=30,
    ).json()
    assert data == direct and len(data) == 8
    table = client.l2cache.get_l2data_table(l2)
    assert sorted(table.index.tolist()) == sorted(l2)
    assert client.l2cache.table_mapping()["pinky"]["l2cache_id"] == "auth_cache"
    assert client.l2cache.has_cache()
    assert cave["info"].count("/info/api/v2/datastack/full/pinky_stack") >= 1

    bad = CAVEclient(
        "pinky_stack", server_address=server, auth_token="tok-nobody", auth_token_file=none_file
    )
    with pytest.raises(requests.HTTPError, match="401"):
        bad.l2cache.get_l2data(l2)

    anonymous = CAVEclient("pinky_stack", server_address=server, auth_token_file=none_file)
    with pytest.raises(AuthException, match="token"):
        anonymous.l2cache.get_l2data(l2)
    missing = int(ids.encode_ids(2, [[3, 5, 2]], 9_999, BITS)[0])
    assert client.l2cache.get_l2data([missing]) == {str(missing): {}}
    assert np.all(np.isin(l2, [int(k) for k in data]))
    # all caveclient asks the info service for: its version and the datastack
    asked = {p for _, p, _ in cave["info"].requests}
    assert asked == {"/info/version", "/info/api/v2/datastack/full/pinky_stack"}
