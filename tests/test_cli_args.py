"""The command line as a newcomer meets it: formats and defaults in every ``--help``,
malformed boxes refused by argparse with the expected format, the dashboard's default
place. No emulator: parsing and help only."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from l2cache_tools.cli import build_parser, main
from l2cache_tools.cli.argformats import box
from l2cache_tools.cli.dashboard_cmd import DEFAULT_DIR, default_out


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "l2cache")
def test_every_help_exits_0_and_names_defaults_and_formats(path, capsys):
    assert main([*path, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    parser = dict(_commands(build_parser()))[path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # every subcommand says what it does
                assert choice.help, f"{' '.join(path)} {choice.dest}: no help"
            continue
        if action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        where = f"{' '.join(path)} {action.dest}"
        assert action.help, f"{where}: no help"
        if action.option_strings and action.default not in (None, False):
            assert f"default: {action.default}" in text or "default" in action.help.lower(), where
        if action.dest in ("bbox", "region"):
            assert "x0,y0,z0,x1,y1,z1" in text.lower(), where
        if not action.option_strings and action.dest == "run":
            assert "runs list" in text, where


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["ingest", "ds", "--bbox", "1,2,3"], "expected 6 integers x0,y0,z0,x1,y1,z1, got 3"),
        (["ingest", "ds", "--bbox", "0,0,0,a,1,1"], "expected 6 integers x0,y0,z0,x1,y1,z1"),
        (["ingest", "ds", "--bbox", "0,0,5,9,9,5"], "needs z0<z1"),
        (["features", "x.npz", "--bbox", "1,2,3"], "expected 6 integers"),
        (["ingest", "ds", "--batch", "0"], "expected a positive integer"),
        (["ingest", "ds", "--sample-timeout", "soon"], "expected a positive number"),
    ],
)
def test_malformed_arguments_are_usage_errors_naming_the_format(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "--help" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_box_parses_six_integers_end_exclusive():
    assert box("0, 0, 0, 48, 48, 24") == [0, 0, 0, 48, 48, 24]
    with pytest.raises(argparse.ArgumentTypeError, match="needs x0<x1, y0<y1"):
        box("5,5,0,5,4,1")


def test_the_dashboard_goes_to_one_place_whatever_the_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("L2CACHE_DASHBOARD_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_out("pinky") == DEFAULT_DIR / "pinky.html"
    assert DEFAULT_DIR.is_absolute() and DEFAULT_DIR.parts[-2:] == ("build", "dashboard")
    monkeypatch.setenv("L2CACHE_DASHBOARD_DIR", str(tmp_path / "d"))
    assert default_out("pinky") == Path(tmp_path / "d" / "pinky.html")
