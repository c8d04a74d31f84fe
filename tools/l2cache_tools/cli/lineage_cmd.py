"""``l2cache lineage show|migrate|prune``: what each value says about where it came from,
the move of older rows' lineage cells into lineage rows, and the removal of lineage rows
whose versions the table's GC has collected (no GC rule ties a row to another row's
versions; an occasional ``prune`` does).

``migrate`` is for tables l2cache wrote before lineage left the feature rows: their
rows still hold ``lineage:*`` cells, which the existing service's frontend (kvdbclient)
cannot read (``Unknown key lineage:code``, a 500). It writes the lineage rows first,
then deletes the rows' own lineage cells, so every version has its lineage throughout;
feature cells are never touched. One scan of the table (O(table), once); ``--dry-run``
counts only; without a terminal it needs ``--yes``.
"""

from __future__ import annotations

import argparse

from .common import add_config_arg, config_from
from .rollback_cmd import add_confirm_args, confirm


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lineage show`` (the lineage of given L2 ids) and ``lineage migrate`` (older
    rows to lineage rows: what makes a table readable by the existing frontend again)."""
    p = sub.add_parser("lineage", help="show the lineage of L2 ids; migrate older rows' lineage")
    ls = p.add_subparsers(dest="lineage_command", required=True)
    show = ls.add_parser("show", help="run, parameters, code and input of each id's value")
    add_config_arg(show)
    show.add_argument("dataset")
    show.add_argument(
        "l2ids", nargs="+", type=int, metavar="L2_ID", help="layer-2 ids (decimal uint64)"
    )
    show.set_defaults(func=run)
    migrate = ls.add_parser(
        "migrate", help="move lineage cells out of feature rows (older tables) into lineage rows"
    )
    add_config_arg(migrate)
    migrate.add_argument("dataset")
    add_confirm_args(migrate, "the migration")
    migrate.set_defaults(func=run)
    prune = ls.add_parser(
        "prune", help="delete lineage rows whose feature versions GC has collected"
    )
    add_config_arg(prune)
    prune.add_argument("dataset")
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    prune.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Both subcommands, on the dataset's cache table."""
    from l2cache.compute import dataset_context
    from l2cache.store.lineage_rows import migrate_rows, prune_rows

    ctx = dataset_context(config_from(args), args.dataset)
    if args.lineage_command == "show":
        found = ctx.store.read_lineage(args.l2ids)
        for node in args.l2ids:
            cols = found.get(node)
            text = (
                " ".join(f"{k.decode()}={v.decode()}" for k, v in sorted(cols.items()))
                if cols
                else "no l2cache lineage (no row, or a row another service wrote)"
            )
            print(f"{node}  {text}")
        return 0
    if args.lineage_command == "prune":
        done = prune_rows(ctx.store.table, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{done.scanned} lineage rows read; {verb} {done.deleted} naming no version left")
        return 0
    bits = ctx.dataset.spatial_bits
    found = migrate_rows(ctx.store.table, bits, dry_run=True)
    print(
        f"{found.rows} rows of {ctx.dataset.cache_table_id} hold lineage cells "
        f"({found.versions} versions) -> {found.lineage_rows} lineage rows"
    )
    if args.dry_run or found.rows == 0:
        return 0
    refused = confirm(args, f"move the lineage of {found.rows} rows into lineage rows")
    if refused is not None:
        return refused
    done = migrate_rows(ctx.store.table, bits)
    print(f"migrated {done.rows} rows ({done.versions} versions, {done.lineage_rows} lineage rows)")
    return 0
