"""The map's ``input: {strict: ...}`` and the QC input thresholds: parsed, layered and
refused exactly (issue 20 item 2)."""

import pytest
import yaml

from l2cache.config import ConfigError, load_config, parse_config
from l2cache_ops.qc_summary import QcThresholds
from l2cache_ops.settings import check_sections, qc_thresholds

BASE = {
    "bigtable": {"project": "p", "instance": "i"},
    "datasets": {
        "ds": {
            "segmentation": "file:///x",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "ds"},
            "cache_table_id": "cache_ds",
            "resolution": [8, 8, 40],
            "voxel_offset": [0, 0, 0],
            "chunk_size": [256, 256, 512],
            "spatial_bits": {"1": 10, "2": 10},
        }
    },
}


def with_dataset(**changes):
    return {**BASE, "datasets": {"ds": {**BASE["datasets"]["ds"], **changes}}}


def test_input_strict_defaults_to_false_and_parses():
    assert parse_config(BASE).dataset("ds").strict_input is False
    assert parse_config(with_dataset(input={"strict": True})).dataset("ds").strict_input
    assert not parse_config(with_dataset(input={})).dataset("ds").strict_input


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"strict": "yes"}, "'strict' must be true or false"),
        ({"strict": True, "orphans": 3}, "unknown key 'orphans'"),
        (["strict"], "input must be a mapping"),
    ],
)
def test_bad_input_sections_are_explained(section, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(with_dataset(input=section))


def test_input_thresholds_layer_over_the_top_level_and_refuse_bad_values(tmp_path):
    raw = {
        **with_dataset(qc={"max_ghost_sv_fraction": 0.01}),
        "qc": {"max_orphan_voxel_fraction": 0.0},
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = check_sections(load_config(path))
    th = qc_thresholds(cfg, "ds")
    assert (th.max_orphan_voxel_fraction, th.max_ghost_sv_fraction) == (0.0, 0.01)
    assert QcThresholds().max_orphan_voxel_fraction == 0.001  # the default
    for bad, words in (
        ({"max_ghost_sv_fraction": 2}, "at most 1.0"),
        ({"max_orphans": 1}, "unknown key"),
    ):
        with pytest.raises(ValueError, match=words):
            QcThresholds.from_mapping(bad)


def test_the_per_chunk_ghost_limits_default_and_parse_and_refuse_bad_values():
    ds = parse_config(BASE).dataset("ds")
    assert (ds.ghost_sv_allowance, ds.max_ghost_sv_fraction) == (5, 0.05)
    ds = parse_config(
        with_dataset(input={"ghost_sv_allowance": 0, "max_ghost_sv_fraction": 0.2})
    ).dataset("ds")
    assert (ds.ghost_sv_allowance, ds.max_ghost_sv_fraction) == (0, 0.2)
    for section, words in (
        ({"ghost_sv_allowance": -1}, "ghost_sv_allowance must be a count"),
        ({"ghost_sv_allowance": 2.5}, "ghost_sv_allowance must be a count"),
        ({"max_ghost_sv_fraction": 1.5}, r"must be in \[0, 1\]"),
        ({"max_ghost_sv_fraction": "x"}, "must be a number"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_config(with_dataset(input=section))
