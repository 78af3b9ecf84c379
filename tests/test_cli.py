"""The command lines' front: `cxr` and its subcommands, help without heavy imports, defaults in help."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr import cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "pyspark", "sklearn", "matplotlib")
PARSERS = ("jobs.extract", "jobs.fine_tune", "jobs.lung_model", "heads.train", "heads.predict", "heads.evaluate",
           "heads.ensemble", "heads.report", "serve.__main__", "cxr.cli")
HELP_LINES = [  # (command line after `python`, the prog its usage line names)
    (["-m", "cxr", "--help"], "cxr"),
    *[(["-m", "cxr", name, "--help"], f"cxr {name}") for name in cli.COMMANDS],
    (["jobs/extract.py", "--help"], "jobs/extract.py"),
    (["jobs/fine_tune.py", "--help"], "jobs/fine_tune.py"),  # jobs/fine_tune.py must not shadow finetune/
    (["jobs/lung_model.py", "--help"], "jobs/lung_model.py"),  # nor jobs/lung_model.py lungs/
    (["jobs/lung_model.py", "train", "--help"], "jobs/lung_model.py train"),
    (["-m", "heads.train", "--help"], "python -m heads.train"),
    (["-m", "heads.predict", "--help"], "python -m heads.predict"),
    (["-m", "heads.report", "--help"], "python -m heads.report"),
]


def _loaded_heavy(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; the exit code and which HEAVY packages it left imported."""
    probe = (f"import sys, json\ntry:\n    exec({code!r})\nexcept SystemExit as e:\n    code = e.code\nelse:\n"
             f"    code = 0\nprint(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", PARSERS)
def test_building_a_parser_imports_no_heavy_package(module):
    got = _loaded_heavy(f"import importlib; importlib.import_module({module!r}).build_parser().format_help()")
    assert got == {"code": 0, "heavy": []}


@pytest.mark.parametrize("line, prog", HELP_LINES, ids=[" ".join(a) for a, _ in HELP_LINES])
def test_help_imports_no_heavy_package(line, prog):
    """Every module a process imports is listed by -X importtime, so this sees what --help loads."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *line], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {prog} ")
    imported = {row.rsplit("|", 1)[-1].strip() for row in proc.stderr.splitlines() if row.startswith("import time:")}
    assert {name.split(".")[0] for name in imported} & set(HEAVY) == set()


def test_a_dispatched_command_keeps_its_heavy_imports_for_after_parsing():
    got = _loaded_heavy("from cxr.cli import main; main(sys.argv[1:])", "train", "--policy", "nope", "--store", "s",
                        "--out", "o")
    assert got == {"code": 2, "heavy": []}


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "cxr"
    if not script.is_file():
        pytest.skip(f"no {script}: run `pip install -e .` after changing setup.py")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: cxr ")


def test_the_listing_has_one_line_per_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, summary) in cli.COMMANDS.items():
        assert f"    {name} " in out and f"{summary}\n" in out


def test_cxr_alone_lists_the_commands_and_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cxr ") and all(f"    {name} " in err for name in cli.COMMANDS)


def test_an_unknown_command_is_one_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["trian", "--store", "s"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("cxr: error: unknown command 'trian' "
                                       "(choose from extract, finetune, train, predict, evaluate, ensemble, report, compare, "
                                       "lungs, recipe, serve)\n")


@pytest.mark.parametrize("argv, code, line", [
    (["train", "--store", "s", "--out", "o", "--policy", "nope"], 2,
     "cxr train: error: --policy 'nope': choose from ignore, zeros, ones, multiclass, selftrained"),
    (["predict", "--run", "r", "--out", "p.txt"], 2,
     "cxr predict: error: --out p.txt: name a .parquet or .csv file, or - for CSV on stdout"),
    (["extract", "--weights", "random"], 2, "cxr extract: error: --metadata is required (or set it in --config)"),
    (["finetune", "--out", "x"], 2, "cxr finetune: error: --metadata is required (or set it in --config)"),
    (["report", "--run"], 2, "cxr report: error: argument --run: expected one argument"),
    (["lungs", "train", "--images", "i", "--masks", "m", "--out", "o", "--split", "0.5,0.5"], 2,
     "cxr lungs: error: --split [0.5, 0.5]: give three non-negative fractions that sum to 1"),
])
def test_commands_get_their_flags_and_name_and_their_exit_codes_pass_through(capsys, argv, code, line):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_a_command_help_exits_0_under_its_cxr_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: cxr report [-h] --run RUN")


def test_report_says_where_the_report_is(tmp_path, capsys):
    with pytest.raises(SystemExit):  # no run there: one line naming it
        cli.main(["report", "--run", str(tmp_path)])
    assert capsys.readouterr().err.startswith(f"cxr report: error: {tmp_path / 'config.json'}")


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("module", PARSERS)
def test_every_default_is_in_the_help(module):
    top = importlib.import_module(module).build_parser()
    # A command with subcommands (jobs/lung_model.py train|evaluate) keeps its flags in the subparsers.
    parsers = [top, *[sub for a in top._actions if isinstance(a, argparse._SubParsersAction) for sub in a.choices.values()]]
    checked = 0
    for parser, action in ((p, a) for p in parsers for a in p._actions):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            continue
        text = _help_text(parser, action)
        assert str(action.default) in text, f"{module} {action.option_strings}: {text!r}"
        assert text.count("default") == 1, f"{module} {action.option_strings}: default said twice: {text!r}"
        checked += 1
    assert checked or module in ("heads.report", "cxr.cli")


def test_help_shows_zero_defaults_but_not_none_or_false():
    text = {a.dest: _help_text(p, a) for p in [importlib.import_module("heads.train").build_parser()]
            for a in p._actions}
    assert text["init_seed"].endswith("(default: 0)") and text["weight_decay"].endswith("(default: 0.0)")
    assert "default" not in text["grid_lr"] and "default" not in text["quiet"]
