"""``l2cache features`` prints the nodes of a real crop and refuses bad input clearly."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from l2cache.engine.features import compute_features
from l2cache_tools.cli import main

CROP = Path(__file__).parent / "data" / "pinky40_crop_96x96x48.npz"


def test_features_command_prints_largest_node_first(capsys):
    assert main(["features", str(CROP), "--top", "3"]) == 0
    out = capsys.readouterr().out
    labels = np.load(CROP)["labels"]
    feats = compute_features(labels, (16, 16, 40))
    largest = int(feats["l2id"][np.argmax(feats["size_nm3"])])
    assert f"{len(feats['l2id'])} L2 nodes" in out
    rows = [
        line for line in out.splitlines() if line.strip()[:1].isdigit() and "volume" not in line
    ]
    assert rows[0].split()[0] == str(largest)
    assert len(rows) == 3
    assert "engine" in out and "edt" in out


def test_features_command_bad_path_and_resolution():
    bad = subprocess.run(
        [sys.executable, "-m", "l2cache_tools.cli", "features", "missing.npz"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stdout
    res = subprocess.run(
        [sys.executable, "-m", "l2cache_tools.cli", "features", str(CROP), "--resolution", "1,2"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "three positive numbers" in res.stderr
