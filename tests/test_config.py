import argparse

import pytest

from common.config import ConfigError, parse_with_config, require


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--backbone", default="densenet121")
    return p


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    conf = tmp_path / "job.toml"
    conf.write_text('[extract]\nchunk-size = 16\nbackbone = "resnet50"\n')
    args = parse_with_config(parser(), ["--config", str(conf), "--backbone", "vgg19"], "extract")
    assert args.chunk_size == 16 and args.backbone == "vgg19"
    assert parse_with_config(parser(), [], "extract").chunk_size == 4096


def test_unknown_config_key_is_an_error_naming_file_and_key(tmp_path):
    conf = tmp_path / "job.toml"
    conf.write_text("[extract]\nchunk_sise = 16\n")
    with pytest.raises(ConfigError, match=r"job\.toml: unknown setting 'chunk_sise' in \[extract\]"):
        parse_with_config(parser(), ["--config", str(conf)], "extract")


def test_require_names_the_missing_flag_once():
    args = argparse.Namespace(store="s", out=None)
    with pytest.raises(ConfigError, match=r"^--out is required \(or set it in --config\)$"):
        require(args, "store", "out")
