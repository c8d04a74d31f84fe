"""``l2cache prices show|refresh``: the unit prices cost figures use, and their refresh.

``show`` prints the price file in use (the packaged ``l2cache_ops/prices.yaml``, or
``L2CACHE_PRICES_FILE``) with its date, region, each price's source and the
environment overrides in effect. ``refresh`` rewrites it from the Cloud Billing Catalog
API (:mod:`l2cache_ops.prices_refresh`); without credentials it stops with a message
saying which variable to set, having fetched nothing.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``prices show|refresh``: every cost figure rests on these prices, so an
    operator can see where each comes from and bring them up to date."""
    p = sub.add_parser("prices", help="unit prices of the cost figures: show, or refresh them")
    cmds = p.add_subparsers(dest="prices_command", required=True)
    show = cmds.add_parser("show", help="the prices in use, their date, region and sources")
    show.set_defaults(func=show_prices)
    ref = cmds.add_parser(
        "refresh",
        help="rewrite the price file from the Cloud Billing Catalog API (needs "
        "L2CACHE_BILLING_API_KEY or GOOGLE_APPLICATION_CREDENTIALS)",
    )
    ref.add_argument("--out", help="write here instead of over the price file in use")
    ref.set_defaults(func=refresh_prices)


def show_prices(args: argparse.Namespace) -> int:
    """``prices show``: the prices as costs use them (environment overrides marked), each
    with its source, so a figure can be checked against Google's pricing pages."""
    from l2cache_ops.cost import PRICE_ENV, PRICE_FIELDS, load_sheet, price_file_path, prices

    path = price_file_path()
    doc = load_sheet(path)
    p = prices()
    print(
        f"{path}: {doc['currency']} list prices of {doc['region']}, {doc['date']} "
        f"({doc.get('method', 'manual')})"
    )
    for name in PRICE_FIELDS:
        entry = doc["prices"][name]
        used = getattr(p, name)
        note = f"  (overridden: {PRICE_ENV[name]})" if used != float(entry["usd"]) else ""
        print(f"  {name:24} {used:>12.8g} per {entry.get('unit', '')}{note}")
        print(f"      {entry['source']}")
    row = doc["measured"]["row_bytes"]
    print(f"  {'row_bytes':24} {p.row_bytes:>12g} {row.get('unit', '')} (measured {row['date']})")
    print(
        f"deployment: worker {p.worker_gib:g} GiB x {p.worker_vcpu:g} vCPU (production chunk; "
        f"runs are priced at their own chunk size), Bigtable {p.bigtable_nodes:g} node(s), "
        f"{p.bigtable_storage}, storage charged for {p.storage_months:g} month(s)"
    )
    return 0


def refresh_prices(args: argparse.Namespace) -> int:
    """``prices refresh``: rewrite the file and print each price's old and new value,
    so a change in a cost figure can be traced to the price that moved."""
    from l2cache_ops.prices_refresh import refresh

    path, changes = refresh(out=args.out)
    print(f"{path}: refreshed from the Cloud Billing Catalog API")
    for name, (old, new) in changes.items():
        mark = "" if old == new else "  (changed)"
        print(f"  {name:24} {old:>12.8g} -> {new:<12.8g}{mark}")
    return 0
