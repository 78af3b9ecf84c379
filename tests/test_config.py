import argparse
import importlib

import pytest

from common.config import ConfigError, parse_with_config, require
from tests.data_paths import REPO


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--local-mode", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--store", nargs="+")
    p.add_argument("--hidden", default="128,32")
    return p


def parse_file(tmp_path, body, *flags):
    conf = tmp_path / "job.toml"
    conf.write_text("[extract]\n" + body + "\n")
    return parse_with_config(parser(), ["--config", str(conf), *flags], "extract")


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    conf = tmp_path / "job.toml"
    conf.write_text('[extract]\nchunk-size = 16\nbackbone = "resnet50"\n')
    args = parse_with_config(parser(), ["--config", str(conf), "--backbone", "vgg19"], "extract")
    assert args.chunk_size == 16 and args.backbone == "vgg19"
    assert parse_with_config(parser(), [], "extract").chunk_size == 4096
    args = parse_file(tmp_path, 'device = "cpu"\nlocal-mode = false\nchunk-size = 16',
                      "--device", "auto", "--local-mode", "--chunk-size", "8")
    assert (args.device, args.local_mode, args.chunk_size) == ("auto", True, 8)


def test_unknown_config_key_is_an_error_naming_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.toml \[extract\] chunk_sise: unknown setting"):
        parse_file(tmp_path, "chunk_sise = 16")
    with pytest.raises(ConfigError, match=r"\[extract\] config: unknown setting"):
        parse_file(tmp_path, 'config = "other.toml"')


def test_a_config_value_outside_the_flags_choices_is_refused_naming_file_table_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^\S+job\.toml \[extract\] device: invalid choice: 'cuda'"):
        parse_file(tmp_path, 'device = "cuda"')


def test_a_config_value_goes_through_the_flags_type(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.toml \[extract\] chunk-size: invalid int value: '1\.5'"):
        parse_file(tmp_path, "chunk-size = 1.5")
    with pytest.raises(ConfigError, match=r"job\.toml \[extract\] lr: invalid float value: 'fast'"):
        parse_file(tmp_path, 'lr = "fast"')
    with pytest.raises(ConfigError, match=r"\[extract\] chunk-size: expected a value, got true"):
        parse_file(tmp_path, "chunk-size = true")
    # Converted as the same text on the command line would be: an int, not the string "12".
    args = parse_file(tmp_path, 'chunk-size = "12"\nlr = 1')
    assert args.chunk_size == 12 and args.lr == 1.0 and isinstance(args.lr, float)


def test_on_off_flags_take_booleans_only(tmp_path):
    args = parse_file(tmp_path, "overwrite = true\nlocal-mode = false")
    assert args.overwrite is True and args.local_mode is False
    assert parse_file(tmp_path, "overwrite = false").overwrite is False
    for body in ('overwrite = "yes"', "local-mode = 0"):
        with pytest.raises(ConfigError, match=r"job\.toml \[extract\] \S+: expected true or false, got"):
            parse_file(tmp_path, body)


def test_lists_give_several_values_or_a_comma_separated_one(tmp_path):
    args = parse_file(tmp_path, 'store = ["a", "b"]\nhidden = [256, 64]')
    assert args.store == ["a", "b"] and args.hidden == "256,64"
    assert parse_file(tmp_path, 'store = "a"').store == ["a"]
    with pytest.raises(ConfigError, match=r"\[extract\] store: expected at least one argument"):
        parse_file(tmp_path, "store = []")


@pytest.mark.parametrize("conf, section, module", [
    ("extract.toml", "extract", "jobs.extract"), ("sample.toml", "extract", "jobs.extract"),
    ("finetune.toml", "finetune", "jobs.fine_tune"), ("heads.toml", "train", "heads.train"),
    ("heads.toml", "predict", "heads.predict")])
def test_the_shipped_config_files_pass_their_jobs_flags(conf, section, module):
    args = parse_with_config(importlib.import_module(module).build_parser(),
                             ["--config", str(REPO / "conf" / conf)], section)
    assert args.config.endswith(conf)


def test_require_names_the_missing_flag_once():
    args = argparse.Namespace(store="s", out=None)
    with pytest.raises(ConfigError, match=r"^--out is required \(or set it in --config\)$"):
        require(args, "store", "out")
