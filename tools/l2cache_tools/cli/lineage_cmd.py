"""``l2cache lineage show|migrate|prune``: what each value says about where it came from,
the move of older rows' lineage cells into lineage rows, and the removal of lineage rows
whose versions the table's GC has collected (no GC rule ties a row to another row's
versions; an occasional ``prune`` does).

``migrate`` is for tables l2cache wrote before lineage left the feature rows: their
rows still hold ``lineage:*`` cells, which the existing service's frontend (kvdbclient)
cannot read (``Unknown key lineage:code``, a 500). Page by page (``--page`` rows:
bounded memory), it writes the page's lineage rows first, then deletes the page's own
lineage cells, so every version has its lineage throughout; feature cells are never
touched. Re-run after a crash, it resumes with the rows still holding cells (nothing is
lost: their lineage row is keyed by their own ids, beside the first). A pass that
completes marks the table migrated (rollbacks then skip the old-layout scan).
``--dry-run`` counts only (one paged scan); a real run asks first on a terminal (one
paged counting scan), and with ``--yes`` migrates at once (one scan).

``prune`` never deletes a lineage row written within ``--grace-hours`` (default 24):
a write stores its lineage row before its feature rows, and a row whose versions do not
exist *yet* must not be taken for one whose versions are gone.

``show`` prints every candidate lineage of a value: where two writes stored the same
cell in the same millisecond, Bigtable kept one value and did not record whose.
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
    migrate.add_argument(
        "--page", type=int, default=2000, help="feature rows per read (memory bound)"
    )
    migrate.set_defaults(func=run)
    prune = ls.add_parser(
        "prune", help="delete lineage rows whose feature versions GC has collected"
    )
    add_config_arg(prune)
    prune.add_argument("dataset")
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    prune.add_argument(
        "--grace-hours",
        type=float,
        default=24.0,
        help="never prune a lineage row written this recently (a write in progress)",
    )
    prune.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Both subcommands, on the dataset's cache table."""
    from l2cache.compute import dataset_context
    from l2cache.store.lineage_rows import (
        lineage_candidates,
        mark_migrated,
        migrate_rows,
        prune_rows,
    )

    ctx = dataset_context(config_from(args), args.dataset)
    if args.lineage_command == "show":
        bits = ctx.dataset.spatial_bits
        found = lineage_candidates(ctx.store.reader, args.l2ids, bits)
        for node in args.l2ids:
            cands = found.get(node)
            if not cands:
                print(f"{node}  no l2cache lineage (no row, or a row another service wrote)")
                continue
            if len(cands) > 1:
                print(
                    f"{node}  one of {len(cands)} writes in the same millisecond "
                    "(Bigtable kept one value; which is not recorded):"
                )
            for cols in cands:
                text = " ".join(f"{k.decode()}={v.decode()}" for k, v in sorted(cols.items()))
                print(f"{node}  {text}")
        return 0
    if args.lineage_command == "prune":
        done = prune_rows(ctx.store.table, dry_run=args.dry_run, grace_s=args.grace_hours * 3600)
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"{done.scanned} lineage rows read; {verb} {done.deleted} naming no version left; "
            f"kept {done.young} written within {args.grace_hours:g} h"
        )
        return 0
    bits = ctx.dataset.spatial_bits
    if args.dry_run or not args.yes:
        found = migrate_rows(ctx.store.table, bits, dry_run=True, page=args.page)
        print(
            f"{found.rows} rows of {ctx.dataset.cache_table_id} hold lineage cells "
            f"({found.versions} versions) -> {found.lineage_rows} lineage rows"
        )
        if args.dry_run:
            return 0
        if found.rows == 0:  # the whole table was read: none left, mark it
            mark_migrated(ctx.store.table)
            print("nothing to migrate; table marked migrated")
            return 0
        refused = confirm(args, f"move the lineage of {found.rows} rows into lineage rows")
        if refused is not None:
            return refused
    done = migrate_rows(ctx.store.table, bits, page=args.page)
    print(
        f"migrated {done.rows} rows ({done.versions} versions, {done.lineage_rows} lineage "
        f"rows, {done.pages} pages); table marked migrated"
    )
    return 0
