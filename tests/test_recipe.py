"""`cxr recipe`: the tuberculosis route end to end on 40 Shenzhen images (--quick), and its one-line refusals."""

import json

import pytest

from cxr import recipe
from tests.data_paths import REPO, needs_lungs

TOML = "conf/recipes/shenzhen-tb.toml"


@pytest.mark.slow
@needs_lungs
def test_the_quick_route_writes_every_row_and_a_rerun_skips_every_step(spark, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository root
    out = tmp_path / "tb"
    summary = recipe.main([TOML, "--out", str(out), "--quick"], spark=spark)
    results = (out / "results.md").read_text()
    assert summary["results"] == str(out / "results.md")
    for row in ("| fine-tuned model (its own test output) | ", "| head on original features | ",
                "| head on masked features | ", "| head on fused features | ", "| fine-tune on lung-masked images | "):
        assert row in results
    assert "from random weights (trained from scratch" in results
    assert f"Made by: `cxr recipe {TOML} --out {out} --quick`" in results
    for pair in ("finetune − original", "masked − original", "fused − original"):
        assert f"### {pair}" in results  # the paired DeLong and bootstrap table of each run against the original
    assert "(finetune/roc_test.png)" in results and "(heads/fused/roc_test.png)" in results
    assert "figures/cam-" in results and "figures/lungs-" in results
    for link in [line.split("](", 1)[1].split(")")[0] for line in results.splitlines() if "](" in line]:
        assert (out / link).is_file(), link
    table = (out / "table.csv").read_text().splitlines()
    assert len(table) == 41 and sum(line.endswith(",1") for line in table) == 20
    capsys.readouterr()
    recipe.main([TOML, "--out", str(out), "--quick"], spark=spark)
    assert capsys.readouterr().err.count("done before, skipped") == 6  # fine-tune, two stores, three heads
    stamp = json.loads((out / ".recipe" / "finetune.json").read_text())
    assert stamp["command"].startswith("cxr finetune --dataset table")


@pytest.mark.parametrize("text, quick, message", [
    (None, False, "no such recipe file"),
    ("[recipe\n", False, "not valid TOML"),
    ("[other]\n", False, "no [recipe] table"),
    ('[recipe]\nmetadata = "x.csv"\n', False, "[recipe] lacks images, path-column"),
    ('[recipe]\nmetadata = "x.csv"\n', True, "--quick given but the file has no [quick] table"),
])
def test_a_bad_recipe_file_is_refused_in_one_line(tmp_path, capsys, text, quick, message):
    path = tmp_path / "r.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        recipe.cli([str(path), "--out", str(tmp_path / "out"), *(["--quick"] if quick else [])])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_bad_table_is_refused_in_one_line_before_any_step(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    cases = [("file,patient,TB\na.png,a,0\n", "no column Tuberculosis (it has file, patient, TB)"),
             ("file,patient,Tuberculosis\na.png,a,0\nb.png,b,2\n", "Tuberculosis must hold 0 and 1 (it holds 0, 2)"),
             ("file,patient,Tuberculosis\na.png,a,1\n", "Tuberculosis must hold 0 and 1 (it holds 1)")]
    for i, (csv, message) in enumerate(cases):
        (tmp_path / "t.csv").write_text(csv)
        (tmp_path / "r.toml").write_text(
            f'[recipe]\nmetadata = "{tmp_path / "t.csv"}"\nimages = "{images}"\npath-column = "file"\n'
            'patient-column = "patient"\nlabel-column = "Tuberculosis"\nbackbone = "resnet50"\nweights = "random:0"\n')
        with pytest.raises(SystemExit):
            recipe.cli([str(tmp_path / "r.toml"), "--out", str(tmp_path / f"out{i}")])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / f"out{i}").exists()
