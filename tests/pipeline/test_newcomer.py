"""The local stack tried as a new operator would (issue 18's list), end to end.

- A dataset added to the map after the stack has served is ingested without a restart
  (the running compute function had read the map once and rejected the new dataset's
  task as unknown; its run showed "1 pending" forever).
- ``ingest --sample`` prints its progress while it waits, and its run then reads
  finished (it read pending, with an ETA, for chunks nobody had enqueued); resuming it
  covers the whole region without computing the sampled chunks again.
- ``status`` on a mistyped run id says there is no such run, with the near match, exit
  2 (it said the run was "broken ... start a new run").
- ``dashboard`` writes to one predictable place, not the current directory.
"""

from __future__ import annotations

import os
import re

import pytest
from stackutil import add_dataset, crop_volume, wait_for

from l2cache.compute import dataset_context
from l2cache.config import load_config
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.status import run_status
from l2cache_tools.cli import main
from l2cache_tools.local.stack import LocalStack

FIRST, SECOND = "newcomer_first", "newcomer_second"
N_CHUNKS = 8  # the crop is 2 x 2 x 2 chunks


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    saved = dict(os.environ)
    directory = tmp_path_factory.mktemp("newcomer")
    try:
        with LocalStack(directory, compute_workers=2) as st:
            add_dataset(st, FIRST, crop_volume(), directory)
            yield {"stack": st, "dir": directory, "path": str(st.config_path)}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _ingest_and_wait(stack: LocalStack, dataset: str):
    config = load_config(stack.config_path)
    ledger = dataset_context(config, dataset).ledger
    run = start_ingest(config, dataset, batch=8)
    return wait_for(
        lambda: (s := run_status(ledger, run.run_id)).finished and s,
        120,
        f"the ingest of {dataset} to finish",
    )


def test_a_dataset_added_after_the_stack_serves_is_ingested(stack):
    st = stack["stack"]
    first = _ingest_and_wait(st, FIRST)  # the function has read the map by now
    assert (first.done, first.failed) == (N_CHUNKS, 0)
    add_dataset(st, SECOND, crop_volume(), stack["dir"])
    second = _ingest_and_wait(st, SECOND)
    assert (second.done, second.failed, second.broken) == (N_CHUNKS, 0, None)


def test_a_sample_prints_progress_reads_finished_and_resumes(stack, capsys):
    path = stack["path"]
    code, out, err = cli(capsys, "ingest", FIRST, "--sample", "3", "--max-instances", "2",
                         "--config", path)  # fmt: skip
    assert code == 0, out + err
    run_id = re.search(r"run (\S+): sampling 3 of 8 chunks", out).group(1)
    progress = re.findall(r"^sample: (\d)/3 chunks finished .* ([\d.]+) chunks/s", out, re.M)
    assert progress and progress[-1][0] == "3", out
    assert f"--resume {run_id}" in out

    config = load_config(path)
    ledger = dataset_context(config, FIRST).ledger
    st = run_status(ledger, run_id)
    assert (st.total, st.done, st.pending, st.finished) == (3, 3, 0, True)
    assert st.eta_s in (0.0, None)

    code, out, err = cli(capsys, "ingest", FIRST, "--resume", run_id, "--watch", "--config", path)
    assert code == 0, out + err
    rows = chunk_rows(ledger, run_id)
    assert len(rows) == N_CHUNKS and all(r["status"] == "done" for r in rows)
    assert all(r["attempts"] == 1 for r in rows)  # the sampled chunks were not redone
    assert run_status(ledger, run_id).total == N_CHUNKS


def test_status_of_a_mistyped_run_says_it_does_not_exist(stack, capsys):
    config = load_config(stack["path"])
    run = start_ingest(config, FIRST, [0, 0, 0, 48, 48, 24], batch=1)
    typo = run.run_id[:-1] + ("0" if run.run_id[-1] != "0" else "1")
    code, out, err = cli(capsys, "status", FIRST, typo, "--config", stack["path"])
    assert code == 2, out + err
    assert err.startswith(f"error: no run '{typo}'"), err
    assert f"did you mean {run.run_id}" in err and "l2cache runs list" in err
    assert "broken" not in err


def test_dashboard_writes_to_its_own_directory_not_the_current_one(
    stack, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "dashboards"
    monkeypatch.setenv("L2CACHE_DASHBOARD_DIR", str(target))
    code, out, err = cli(capsys, "dashboard", FIRST, "--config", stack["path"])
    assert code == 0, out + err
    assert out.strip() == f"dashboard: {target / (FIRST + '.html')}"
    assert (target / f"{FIRST}.html").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["dashboards"]  # nothing in the cwd
    code, out, err = cli(capsys, "dashboard", FIRST, "--out", str(target), "--config",
                         stack["path"])  # fmt: skip
    assert code == 2 and "is a directory" in err
