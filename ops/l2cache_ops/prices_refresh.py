"""Refresh ``prices.yaml`` from the public Cloud Billing Catalog API.

``make prices`` / ``l2cache prices refresh`` lists the SKUs of each service the price
file names (``GET https://cloudbilling.googleapis.com/v1/services/{id}/skus``), picks
for every price the one SKU its ``catalog`` selector describes (words its description
must and must not contain, the file's region or ``global``, the usage unit), takes its
current list price past the free tier (the first non-zero tier) and rewrites the file
with today's date, ``method: catalog`` and the SKU each number came from. A selector
that matches no SKU, or several at different prices, stops the refresh with the
candidates listed: a price is never guessed.

Credentials are needed (the Catalog is public but every call must be authenticated):
an API key in ``L2CACHE_BILLING_API_KEY`` or a credentials file in
``GOOGLE_APPLICATION_CREDENTIALS``. Without either, :func:`catalog_fetcher` raises
:class:`MissingCredentials` before anything touches the network (no metadata-server
probe, no gcloud default). Parsing is separate from fetching (:func:`refreshed` takes a
``fetch`` function), so the tests feed it a recorded response and never go online.
"""

from __future__ import annotations

import copy
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from l2cache_ops.cost import PRICE_FIELDS, check_sheet, load_sheet, price_file_path

CATALOG = "https://cloudbilling.googleapis.com/v1"
API_KEY_ENV = "L2CACHE_BILLING_API_KEY"
CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
SCOPE = "https://www.googleapis.com/auth/cloud-billing.readonly"
TIMEOUT_S = 30.0
PAGE_SIZE = 5000

HEADER = """\
# Unit prices of l2cache's cost figures: the only place a price is written down.
# Read by l2cache_ops.cost (status, dashboard, ingest --sample, bench, infra's panel).
# `make prices` / `l2cache prices refresh` rewrites `date`, `method` and each `usd`
# from the Cloud Billing Catalog API (the `catalog` selector finds the SKU); edit by
# hand only with a source. Each figure can be overridden by its L2CACHE_PRICE_*
# environment variable (README, "Environment").
"""

# (url, query parameters) -> the decoded JSON page
Fetch = Callable[[str, Mapping[str, str]], dict]

# how big each usage-unit component is, per kind: a price per one unit converts by ratio
_UNIT_SIZES = {
    "time": {"s": 1, "min": 60, "h": 3600, "d": 86400},
    "month": {"mo": 1},
    "bytes": {"By": 1, "KiBy": 2**10, "MiBy": 2**20, "GiBy": 2**30, "TiBy": 2**40},
    "count": {"count": 1},
}


class MissingCredentials(PermissionError):
    """No credentials for the Catalog API in the environment; the message says how."""


class CatalogError(ValueError):
    """The Catalog's answer does not give one price for a selector; the message lists
    what it found."""


def catalog_fetcher(env: Mapping[str, str] | None = None) -> Fetch:
    """A ``fetch`` for the Catalog API authenticated from the environment: an API key
    (``L2CACHE_BILLING_API_KEY``) or a credentials file (``GOOGLE_APPLICATION_CREDENTIALS``,
    a service account or an authorized user). Raises :class:`MissingCredentials` when
    neither is set, before any connection is made."""
    env = os.environ if env is None else env
    key = (env.get(API_KEY_ENV) or "").strip()
    if key:
        return _key_fetch(key)
    path = (env.get(CREDENTIALS_ENV) or "").strip()
    if path:
        if not Path(path).is_file():
            raise MissingCredentials(f"{CREDENTIALS_ENV}={path}: no such credentials file")
        return _credentials_fetch(path)
    raise MissingCredentials(
        "refreshing prices needs credentials for the Cloud Billing Catalog API: set "
        f"{API_KEY_ENV} to an API key (APIs & Services > Credentials, with the Cloud "
        f"Billing API enabled) or {CREDENTIALS_ENV} to a credentials file; nothing was "
        "fetched and the price file is unchanged"
    )


def _key_fetch(key: str) -> Fetch:
    def fetch(url: str, params: Mapping[str, str]) -> dict:
        query = urllib.parse.urlencode({**params, "key": key})
        with urllib.request.urlopen(f"{url}?{query}", timeout=TIMEOUT_S) as resp:  # noqa: S310
            return json.loads(resp.read())

    return fetch


def _credentials_fetch(path: str) -> Fetch:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, _ = google.auth.load_credentials_from_file(path, scopes=[SCOPE])
    session = AuthorizedSession(credentials)

    def fetch(url: str, params: Mapping[str, str]) -> dict:
        resp = session.get(url, params=dict(params), timeout=TIMEOUT_S)
        resp.raise_for_status()
        return resp.json()

    return fetch


def list_skus(service: str, fetch: Fetch, currency: str) -> list[dict]:
    """Every SKU of ``service`` (all pages), priced in ``currency``."""
    url = f"{CATALOG}/services/{service}/skus"
    skus: list[dict] = []
    token = ""
    while True:
        params = {"currencyCode": currency, "pageSize": str(PAGE_SIZE)}
        if token:
            params["pageToken"] = token
        page = fetch(url, params)
        skus.extend(page.get("skus") or [])
        token = page.get("nextPageToken") or ""
        if not token:
            return skus


def _unit_parts(unit: str) -> list[tuple[str, float]]:
    parts = []
    for name in unit.split("."):
        kind = next((k for k, sizes in _UNIT_SIZES.items() if name in sizes), None)
        if kind is None:
            raise CatalogError(f"usage unit {unit!r}: {name!r} is not a unit this refresh knows")
        parts.append((kind, float(_UNIT_SIZES[kind][name])))
    return parts


def unit_factor(catalog_unit: str, wanted_unit: str) -> float:
    """What a price per one ``catalog_unit`` is multiplied by to be per ``wanted_unit``
    (``GiBy`` -> ``TiBy``: x 1024); the two must measure the same kinds in order."""
    have, want = _unit_parts(catalog_unit), _unit_parts(wanted_unit)
    if [k for k, _ in have] != [k for k, _ in want]:
        raise CatalogError(f"the Catalog bills in {catalog_unit!r}, not in {wanted_unit!r}")
    factor = 1.0
    for (_, h), (_, w) in zip(have, want, strict=True):
        factor *= w / h
    return factor


def sku_price(sku: Mapping[str, Any], currency: str, wanted_unit: str) -> tuple[float, str]:
    """(price per ``wanted_unit``, effective time) of a SKU: its latest pricing info, the
    first tier with a non-zero price (the list price past the free tier; 0 if all are
    free)."""
    infos = sku.get("pricingInfo") or []
    if not infos:
        raise CatalogError(f"SKU {sku.get('name')} has no pricingInfo")
    info = max(infos, key=lambda i: i.get("effectiveTime", ""))
    expr = info.get("pricingExpression") or {}
    rates = sorted(expr.get("tieredRates") or [], key=lambda r: r.get("startUsageAmount", 0))
    price = 0.0
    for rate in rates:
        money = rate.get("unitPrice") or {}
        if money.get("currencyCode", currency) != currency:
            raise CatalogError(
                f"SKU {sku.get('name')} is priced in {money.get('currencyCode')}, not {currency}"
            )
        value = int(money.get("units") or 0) + int(money.get("nanos") or 0) / 1e9
        if value > 0:
            price = value
            break
    factor = unit_factor(str(expr.get("usageUnit", "")), wanted_unit)
    return price * factor, str(info.get("effectiveTime", ""))


def matches(sku: Mapping[str, Any], selector: Mapping[str, Any], region: str) -> bool:
    """Whether ``sku`` is the one ``selector`` describes: offered in ``region`` (or
    globally), its description holding every ``description`` word and no ``exclude``
    word (case-insensitive)."""
    regions = sku.get("serviceRegions") or []
    if region not in regions and "global" not in regions:
        return False
    text = str(sku.get("description", "")).lower()
    if not all(str(w).lower() in text for w in selector.get("description") or []):
        return False
    return not any(str(w).lower() in text for w in selector.get("exclude") or [])


def select_sku(
    skus: list[dict], selector: Mapping[str, Any], region: str, currency: str, name: str
) -> tuple[dict, float, str]:
    """The one SKU (with its price and effective time) ``selector`` picks for ``name``;
    several at the same price are one price listed twice, at different prices an error."""
    found = [s for s in skus if matches(s, selector, region)]
    if not found:
        raise CatalogError(
            f"prices.{name}: no SKU of service {selector.get('service')} in {region} has "
            f"{selector.get('description')} and none of {selector.get('exclude')} in its "
            "description: fix the catalog selector in the price file"
        )
    priced = [(s, *sku_price(s, currency, str(selector["usage_unit"]))) for s in found]
    if len({round(p, 15) for _, p, _ in priced}) > 1:
        listed = "; ".join(f"{s.get('description')!r} = {p:g}" for s, p, _ in priced)
        raise CatalogError(
            f"prices.{name}: {len(found)} SKUs match at different prices ({listed}): "
            "narrow the catalog selector in the price file"
        )
    return priced[0]


def refreshed(doc: Mapping[str, Any], fetch: Fetch, today: date) -> dict[str, Any]:
    """A copy of price document ``doc`` with every price taken from the Catalog (through
    ``fetch``), dated ``today``. Selectors, units, descriptions and pages stay; each
    entry gains the SKU and effective time its number came from."""
    check_sheet(doc)
    new = copy.deepcopy(dict(doc))
    currency, region = str(doc["currency"]), str(doc["region"])
    by_service: dict[str, list[dict]] = {}
    for name in PRICE_FIELDS:
        entry = new["prices"][name]
        selector = entry.get("catalog")
        if not selector or not selector.get("service") or not selector.get("usage_unit"):
            raise CatalogError(f"prices.{name} has no catalog selector (service, usage_unit)")
        service = str(selector["service"])
        if service not in by_service:
            by_service[service] = list_skus(service, fetch, currency)
        sku, price, effective = select_sku(by_service[service], selector, region, currency, name)
        entry["usd"] = float(f"{price:.10g}")
        selector["sku"] = str(sku.get("name", ""))
        selector["sku_description"] = str(sku.get("description", ""))
        selector["effective"] = effective
    new["date"] = today.isoformat()
    new["method"] = "catalog"
    new["method_note"] = (
        f"Cloud Billing Catalog API (services/{{id}}/skus), {currency} list prices of "
        f"{region} (or global), first non-zero tier (past the free tier), fetched "
        f"{today.isoformat()}; each entry's catalog.sku is its source SKU and `source` the "
        "pricing page that explains it."
    )
    check_sheet(new)
    return new


def dump_sheet(doc: Mapping[str, Any]) -> str:
    """The price file's text: the fixed header, then the document in its key order."""
    return HEADER + yaml.safe_dump(dict(doc), sort_keys=False, width=88, allow_unicode=True)


def refresh(
    out: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    fetch: Fetch | None = None,
    today: date | None = None,
) -> tuple[Path, dict[str, tuple[float, float]]]:
    """Rewrite a price file from the Catalog: ``out`` in place when it exists (``make
    prices`` refreshes the packaged file so), else the file in use written to ``out``
    (default: over itself). Returns the path and ``{price: (old, new)}``. Credentials
    are checked before anything is read or fetched."""
    env = os.environ if env is None else env
    fetch = catalog_fetcher(env) if fetch is None else fetch
    source = Path(out) if out is not None and Path(out).is_file() else price_file_path(env)
    doc = load_sheet(source)
    new = refreshed(doc, fetch, today or date.today())
    target = Path(out) if out is not None else source
    target.write_text(dump_sheet(new))
    load_sheet(target)  # what was written reads back
    changes = {
        n: (float(doc["prices"][n]["usd"]), float(new["prices"][n]["usd"])) for n in PRICE_FIELDS
    }
    return target, changes
