"""Config loading: includes, overrides, --float64, and each kind of user error through the CLI."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from extensions.schema import ConfigError
from wm_trainer.cli import main
from wm_trainer.config import load_config


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return err


def test_defaults_and_types(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "vae:\n  batch_size: 64\n"))
    assert cfg.vae.batch_size == 64 and cfg.vae.z_dim == 64
    assert cfg.mdnrnn.mixtures == 5 and cfg.debug.nonfinite.policy == "raise"


def test_include_and_override(tmp_path):
    write(tmp_path / "base.yaml", """
        experiment: {name: base}
        vae: {z_dim: 32, batch_size: 100}
        mdnrnn: {hidden: 256}
    """)
    small = write(tmp_path / "small.yaml", """
        include: base.yaml
        vae: {batch_size: 10}
    """)
    cfg = load_config(small, ["mdnrnn.hidden=32", "debug.nonfinite.policy=skip"], float64=True)
    assert (cfg.vae.z_dim, cfg.vae.batch_size, cfg.mdnrnn.hidden) == (32, 10, 32)
    assert cfg.experiment.name == "base"
    assert cfg.debug.float64 is True and cfg.debug.nonfinite.policy == "skip"


def test_unknown_key_suggests_and_names_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", """
        vae:
          z_dim: 32
          batch_sise: 10
    """)
    err = error_line(capsys, ["config", "show", "-c", str(bad)])
    assert f"{bad}:4" in err and "vae.batch_sise" in err and "did you mean 'batch_size'" in err


def test_wrong_type_names_key_and_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "mdnrnn:\n  hidden: lots\n")
    err = error_line(capsys, ["config", "show", "-c", str(bad)])
    assert f"{bad}:2" in err and "mdnrnn.hidden" in err and "integer" in err


def test_out_of_range(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "collect:\n  repeat_prob: 1.5\n")
    err = error_line(capsys, ["config", "show", "-c", str(bad)])
    assert "collect.repeat_prob" in err and "<= 1.0" in err and ":2" in err


def test_yaml_syntax_error_has_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "vae:\n  z_dim: 32\n  lr: [1, 2\n")
    err = error_line(capsys, ["config", "show", "-c", str(bad)])
    assert "YAML syntax error" in err and str(bad) in err


def test_missing_file(tmp_path, capsys):
    err = error_line(capsys, ["config", "show", "-c", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err and "not found" in err


def test_bad_override_and_debug_section(tmp_path, capsys):
    err = error_line(capsys, ["config", "show", "--set", "debug.nonfinite.policy=rasie"])
    assert "debug.nonfinite.policy" in err and "did you mean 'raise'" in err
    err = error_line(capsys, ["config", "show", "--set", "debug.gradients.every=-1"])
    assert "debug.gradients.every" in err and ">= 0" in err
    err = error_line(capsys, ["config", "show", "--set", "novalue"])
    assert "section.key=value" in err


def test_error_in_included_file_names_that_file(tmp_path):
    write(tmp_path / "base.yaml", "vae:\n  z_dim: x\n")
    top = write(tmp_path / "top.yaml", "include: base.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert info.value.file.endswith("base.yaml") and info.value.line == 2


def test_config_show_prints_resolved_yaml(tmp_path, capsys):
    cfg_file = write(tmp_path / "c.yaml", "vae: {batch_size: 7}\n")
    assert main(["config", "show", "-c", str(cfg_file), "--set", "vae.z_dim=16", "--float64"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["vae"]["batch_size"] == 7 and shown["vae"]["z_dim"] == 16
    assert shown["debug"]["float64"] is True


def test_config_keys_lists_documented_fields(capsys):
    assert main(["config", "keys", "vae"]) == 0
    out = capsys.readouterr().out
    assert "vae.kl_tolerance" in out and "free bits" in out
    assert "mdnrnn." not in out


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("config", "mdn-toy", "collect", "train-vae", "encode", "train-mdnrnn",
                 "train-controller", "evaluate", "render", "pipeline"):
        assert name in out
