"""The price file, its environment overrides, its refresh from the Cloud Billing Catalog
(parsed from a recorded response, never fetched), and the row size it charges storage by.

Nothing here reaches the network: the refresh is fed ``tests/data/billing_catalog_skus.json``
through its ``fetch`` argument, and the no-credentials tests fail if a socket is opened.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from l2cache.domain import ids as idlib
from l2cache.domain.ids import SpatialBits
from l2cache_ops import cost, prices_refresh
from l2cache_ops.prices_refresh import (
    CATALOG,
    CatalogError,
    MissingCredentials,
    catalog_fetcher,
    refresh,
    refreshed,
    select_sku,
    unit_factor,
)

DATA = Path(__file__).parent / "data"
FIXTURE = json.loads((DATA / "billing_catalog_skus.json").read_text())
TODAY = date(2026, 12, 24)


class RecordedCatalog:
    """``fetch`` over the recorded pages; remembers every request it answered."""

    def __init__(self, pages: dict = FIXTURE) -> None:
        self.pages = pages
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, url: str, params) -> dict:
        self.calls.append((url, dict(params)))
        prefix = f"{CATALOG}/services/"
        assert url.startswith(prefix) and url.endswith("/skus"), url
        service = url[len(prefix) : -len("/skus")]
        token = params.get("pageToken", "")
        index = 0 if not token else int(token.rsplit("-", 1)[1]) - 1
        return self.pages[service][index]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def no_credentials(monkeypatch):
    for var in (prices_refresh.API_KEY_ENV, prices_refresh.CREDENTIALS_ENV, cost.PRICES_FILE_ENV):
        monkeypatch.delenv(var, raising=False)


# -- the price file ---------------------------------------------------------------------
def test_the_packaged_price_file_has_date_currency_region_and_a_source_per_price():
    doc = cost.load_sheet()
    assert date.fromisoformat(doc["date"]) and doc["currency"] == "USD" and doc["region"]
    for name in cost.PRICE_FIELDS:
        entry = doc["prices"][name]
        assert entry["source"].startswith("https://cloud.google.com/"), name
        assert entry["unit"] and entry["catalog"]["service"] and entry["catalog"]["usage_unit"]
    assert doc["measured"]["row_bytes"]["how"] and doc["measured"]["row_bytes"]["date"]


def test_prices_default_to_the_file_and_no_price_is_written_in_code():
    doc = cost.load_sheet()
    p = cost.prices({})
    assert p == cost.Prices()
    for name in cost.PRICE_FIELDS:
        assert getattr(p, name) == doc["prices"][name]["usd"]
    assert p.row_bytes == doc["measured"]["row_bytes"]["value"]
    assert (p.date, p.currency, p.region) == (doc["date"], doc["currency"], doc["region"])


def test_the_price_file_ships_in_the_package():
    """Read through importlib.resources, so an installed l2cache has it (pyproject
    package-data), and listed there."""
    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    assert 'l2cache_ops = ["prices.yaml"]' in text
    assert cost.price_file_path({}).name == "prices.yaml"
    assert cost.price_file_path({}).parent.name == "l2cache_ops"


def test_environment_overrides_each_price_and_another_file(tmp_path):
    p = cost.prices(
        {
            "L2CACHE_PRICE_BT_NODE_HOUR": "1.5",
            "L2CACHE_COST_BT_NODES": "3",
            "L2CACHE_COST_BT_STORAGE": "hdd",
            "L2CACHE_COST_ROW_BYTES": "1024",
        }
    )
    assert p.bigtable_node_hour == 1.5 and p.bigtable_nodes == 3 and p.bigtable_storage == "HDD"
    assert p.storage_gib_month == p.bigtable_hdd_gib_month
    assert p.row_storage == pytest.approx(1024 / 2**30 * p.bigtable_hdd_gib_month)
    assert set(cost.PRICE_ENV) == {f for f in cost.Prices.__dataclass_fields__} - {
        "date",
        "currency",
        "region",
    }
    doc = cost.load_sheet()
    doc["prices"]["task"]["usd"] = 0.001
    doc["region"] = "europe-west1"
    other = tmp_path / "contract.yaml"
    other.write_text(yaml.safe_dump(doc))
    q = cost.prices({"L2CACHE_PRICES_FILE": str(other)})
    assert q.task == 0.001 and q.region == "europe-west1"
    with pytest.raises(ValueError, match="L2CACHE_PRICE_TASK='cheap' is not a number"):
        cost.prices({"L2CACHE_PRICE_TASK": "cheap"})
    with pytest.raises(ValueError, match="SSD or HDD"):
        cost.prices({"L2CACHE_COST_BT_STORAGE": "tape"})
    with pytest.warns(UserWarning, match="L2CACHE_PRICE_BT_ROW is ignored"):
        cost.prices({"L2CACHE_PRICE_BT_ROW": "1e-7"})


@pytest.mark.parametrize(
    "spoil, words",
    [
        (lambda d: d.pop("date"), "no 'date'"),
        (lambda d: d["prices"]["task"].update(usd=-1), "prices.task.usd"),
        (lambda d: d["prices"]["vcpu_second"].pop("source"), "prices.vcpu_second has no source"),
        (lambda d: d["measured"]["row_bytes"].update(value=0), "row_bytes"),
    ],
)
def test_a_price_file_without_what_makes_it_a_price_list_is_refused(tmp_path, spoil, words):
    doc = cost.load_sheet()
    spoil(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(cost.PriceFileError, match=words):
        cost.load_sheet(bad)


# -- the Catalog refresh ----------------------------------------------------------------
def test_refresh_parses_the_catalog_into_the_file_with_todays_date(tmp_path, offline):
    catalog = RecordedCatalog()
    out = tmp_path / "prices.yaml"
    path, changes = refresh(out=out, env={}, fetch=catalog, today=TODAY)
    assert path == out
    doc = cost.load_sheet(out)
    assert doc["date"] == "2026-12-24" and doc["method"] == "catalog"
    got = {n: doc["prices"][n]["usd"] for n in cost.PRICE_FIELDS}
    assert got == {
        "vcpu_second": 2.41e-05,  # first paid tier, past the free one
        "gib_second": 2.51e-06,  # the latest pricingInfo, not the 2025 one
        "request": 4e-07,  # 2nd gen invocations, 1st gen excluded
        "task": 4e-07,  # first paid tier, not the 5-billion discount
        "bigtable_node_hour": 0.66,  # us-east1 SSD node: not HDD, Data Boost or us-central1
        "bigtable_ssd_gib_month": 0.17,
        "bigtable_hdd_gib_month": 0.026,  # not the backup storage
        "pubsub_tib": 40.0,  # the Catalog bills per GiB: x 1024
    }
    assert changes["vcpu_second"] == (2.4e-05, 2.41e-05) and changes["task"] == (4e-07, 4e-07)
    node = doc["prices"]["bigtable_node_hour"]
    assert node["catalog"]["sku"] == "services/C3BE-24A5-0975/skus/B001-0000-0001"
    assert node["catalog"]["sku_description"] == "Bigtable SSD Node in us-east1"
    assert node["catalog"]["effective"].startswith("2026-11-30")
    assert node["source"] == cost.load_sheet()["prices"]["bigtable_node_hour"]["source"]
    assert doc["measured"] == cost.load_sheet()["measured"]  # measured, not priced: kept
    # every service listed once, in USD, the Cloud Run functions pages followed
    services = [u.split("/services/")[1].split("/")[0] for u, _ in catalog.calls]
    assert sorted(set(services)) == sorted(
        {"29E7-DA93-CA13", "C3BE-24A5-0975", "F3A6-D7B7-9BDA", "A1E8-BE35-7EBC"}
    )
    assert services.count("29E7-DA93-CA13") == 2 and catalog.calls[1][1]["pageToken"] == "page-2"
    assert all(params["currencyCode"] == "USD" for _, params in catalog.calls)
    # the written file is what cost reads, header included
    assert out.read_text().startswith("# Unit prices of l2cache's cost figures")
    p = cost.prices({"L2CACHE_PRICES_FILE": str(out)})
    assert p.vcpu_second == 2.41e-05 and p.bigtable_node_hour == 0.66 and p.date == "2026-12-24"
    # refreshing again changes nothing but the SKU bookkeeping already there
    again = refreshed(doc, RecordedCatalog(), TODAY)
    assert again == doc


def test_refresh_of_an_existing_out_file_reads_that_file(tmp_path, offline):
    """``make prices`` refreshes the packaged file in place, whatever L2CACHE_PRICES_FILE says."""
    out = tmp_path / "prices.yaml"
    out.write_text(Path(cost.price_file_path({})).read_text())
    elsewhere = tmp_path / "contract.yaml"
    doc = cost.load_sheet()
    doc["region"] = "us-central1"
    elsewhere.write_text(yaml.safe_dump(doc))
    refresh(out=out, env={"L2CACHE_PRICES_FILE": str(elsewhere)}, fetch=RecordedCatalog())
    assert cost.load_sheet(out)["region"] == "us-east1"
    assert cost.load_sheet(out)["prices"]["bigtable_node_hour"]["usd"] == 0.66


def test_a_selector_matching_several_prices_or_none_stops_the_refresh():
    skus = FIXTURE["29E7-DA93-CA13"][0]["skus"] + FIXTURE["29E7-DA93-CA13"][1]["skus"]
    loose = {"service": "29E7-DA93-CA13", "description": ["CPU"], "usage_unit": "s"}
    with pytest.raises(CatalogError, match="3 SKUs match at different prices") as err:
        select_sku(skus, loose, "us-east1", "USD", "vcpu_second")
    assert "Min-Instance" in str(err.value) and "1st Gen" in str(err.value)
    none = {**loose, "description": ["GPU"]}
    with pytest.raises(CatalogError, match="no SKU of service 29E7-DA93-CA13 in us-east1"):
        select_sku(skus, none, "us-east1", "USD", "vcpu_second")
    hours = {**loose, "description": ["CPU", "Request-based"], "exclude": ["Min", "1st"]}
    hours["usage_unit"] = "h"  # the Catalog bills seconds; an hour is 3600 of them
    _, price, _ = select_sku(skus, hours, "us-east1", "USD", "vcpu_second")
    assert price == pytest.approx(2.41e-05 * 3600)
    with pytest.raises(CatalogError, match="bills in 's', not in 'GiBy'"):
        select_sku(skus, {**hours, "usage_unit": "GiBy"}, "us-east1", "USD", "vcpu_second")


def test_unit_conversion_is_by_ratio_of_like_units():
    assert unit_factor("GiBy", "TiBy") == 1024
    assert unit_factor("GiBy.s", "GiBy.h") == 3600
    assert unit_factor("GiBy.mo", "GiBy.mo") == 1
    with pytest.raises(CatalogError, match="not a unit"):
        unit_factor("furlong", "s")


# -- credentials: none, no network --------------------------------------------------------
def test_without_credentials_the_refresh_fails_clearly_and_fetches_nothing(
    tmp_path, offline, no_credentials
):
    with pytest.raises(MissingCredentials) as err:
        catalog_fetcher({})
    words = str(err.value)
    assert "L2CACHE_BILLING_API_KEY" in words and "GOOGLE_APPLICATION_CREDENTIALS" in words
    assert "nothing was fetched" in words
    out = tmp_path / "prices.yaml"
    out.write_text("untouched")
    with pytest.raises(MissingCredentials):
        refresh(out=out, env={})
    assert out.read_text() == "untouched"
    with pytest.raises(MissingCredentials, match="no such credentials file"):
        catalog_fetcher({"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "absent.json")})


def test_the_cli_refresh_without_credentials_is_a_user_error(
    tmp_path, capsys, offline, no_credentials
):
    from l2cache_tools.cli import main

    packaged = cost.price_file_path({})
    before = packaged.read_bytes()
    assert main(["prices", "refresh"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refreshing prices needs credentials")
    assert packaged.read_bytes() == before
    assert main(["prices", "show"]) == 0
    shown = capsys.readouterr().out
    assert "USD list prices of us-east1" in shown and "cloud.google.com/bigtable/pricing" in shown


# -- the row size storage is charged by ---------------------------------------------------
def test_row_bytes_is_what_the_real_writer_sends(monkeypatch):
    """Re-measure ``measured.row_bytes``: the cache writer's own MutateRows entries for the
    pinky40 crop's L2 rows, sized as Bigtable sizes data (key + per cell family,
    qualifier, 8-byte timestamp, value). Fails when the row format changes: re-measure
    (prices.yaml ``measured.row_bytes.how``) and update the file."""
    from google.cloud.bigtable_v2.types import MutateRowsRequest

    import l2cache.store.cache as cache
    from l2cache.domain.lineage import Lineage
    from l2cache.engine.features import compute_features

    crop = np.load(DATA / "pinky40_crop_96x96x48.npz")
    feats = compute_features(np.asfortranarray(crop["labels"]), crop["resolution_nm"])
    feats["l2id"] = (np.uint64(2) << np.uint64(56)) + feats["l2id"].astype(np.uint64)
    sent: list[tuple[bytes, bytes]] = []
    monkeypatch.setattr(cache, "data_channel", lambda scope: None)
    monkeypatch.setattr(
        cache, "mutate_entries", lambda ch, t, entries, *a, **k: sent.extend(entries)
    )
    dataset = SimpleNamespace(
        existing_cache_table=False,
        cache_table_id="c",
        name="d",
        fallback_table_id=None,
        spatial_bits=SpatialBits.from_mapping({1: 10, 2: 10, 3: 9}),
    )
    store = cache.CacheStore(SimpleNamespace(name="projects/p/instances/i/tables/c"), dataset)
    lineage = Lineage(
        "bulk-20261203T093903-abcdef",  # l2cache.store.ledger.new_run's form
        "0123456789abcdef",  # params_hash: 16 hex
        "efb9e8615b2d",  # code_revision: 12 hex
        "0123456789abcdef",  # ChunkLabels.checksum: 16 hex
        datetime(2026, 12, 3, tzinfo=UTC),
    )
    n = store.write_features(feats, lineage)
    # a lineage row (6 cells) per chunk of the ids, then a row of 8 feature cells per node
    chunks = {int(c) for c in idlib.get_chunk_id(feats["l2id"], dataset.spatial_bits)}
    assert n == len(sent) - len(chunks) > 50
    assert all(key.startswith(b"lineage#") for key, _ in sent[: len(chunks)])
    total = 0
    for key, raw in sent:
        (entry,) = MutateRowsRequest.deserialize(raw).entries
        cells = [m.set_cell for m in entry.mutations]
        assert len(cells) == (6 if key.startswith(b"lineage#") else 8)
        total += len(entry.row_key) + sum(
            len(c.family_name) + len(c.column_qualifier) + 8 + len(c.value) for c in cells
        )
    print(f"\n{total / n:.1f} B/row on the crop ({n} rows, {len(chunks)} lineage rows)")
    # the crop has 33 rows a chunk (pinky40's chunks ~940), so its lineage share per row
    # is ~28x larger: 229.2 B/row here since the lineage row's key digest and `written`
    # cell (+55 B a lineage row; pinky40: +0.06 B/row, row_bytes unchanged at 222)
    assert total / n == pytest.approx(cost.prices({}).row_bytes, rel=0.04)
