"""A run id that names no run: say so, with the near matches, never "broken".

``status`` on a mistyped run id used to answer that the run "is broken ... start a new
run": the words for a run whose ledger vanished, which sent an operator to restart
work that never existed. A missing run record now reads as what it is (a
:class:`RunNotFound`, a LookupError: one line, exit 2) with the ids that look like it
and how to list the dataset's runs.
"""

from __future__ import annotations

import difflib

from l2cache.store.ledger import RunLedger
from l2cache_ops.ledger import list_runs


class RunNotFound(LookupError):
    """No run record has this id (a user error: the CLI exits 2)."""


def no_such_run(ledger: RunLedger, run_id: str, dataset: str | None = None) -> RunNotFound:
    """The error for ``run_id``: up to 3 similar run ids (those of ``dataset`` first)
    and the command that lists them. Reads the run records only (one per run)."""
    try:
        runs = list_runs(ledger)
    except Exception:  # noqa: BLE001 - the suggestions are a courtesy; the verdict stands
        runs = []
    ours = [r.run_id for r in runs if dataset is None or r.dataset == dataset]
    near = difflib.get_close_matches(run_id, ours, n=3, cutoff=0.6)
    if not near:
        near = difflib.get_close_matches(run_id, [r.run_id for r in runs], n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    where = f" of dataset {dataset}" if dataset else ""
    listing = f"l2cache runs list {dataset or 'DATASET'}"
    return RunNotFound(f"no run {run_id!r}{where}: {hint}list the runs with: {listing}")
