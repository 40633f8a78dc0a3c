"""The ``debug:`` YAML section: every switch validated, errors naming file, line and key path."""
from __future__ import annotations

import pytest

import extensions as ext


def write(tmp_path, text, name="debug.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_full_section(tmp_path):
    assert ext.DebugConfig.from_yaml(write(tmp_path, "")) == ext.DebugConfig()
    cfg = ext.DebugConfig.from_yaml(write(tmp_path, """
experiment:
  name: x
debug:
  float64: true
  gradients: {every: 5, histograms_every: 0, print: true}
  nonfinite: {check: true, localize: false, policy: skip, replay_float64: false, allow_inf_in: [attn/mask]}
  tensorboard: {logdir: false}
"""))
    assert cfg.float64 and cfg.gradients.every == 5 and cfg.gradients.print
    assert cfg.nonfinite.policy == "skip" and cfg.nonfinite.allow_inf_in == ["attn/mask"]
    assert cfg.tensorboard.logdir is False
    body = ext.DebugConfig.from_yaml(write(tmp_path, "nonfinite:\n  policy: warn\n", "body.yaml"))
    assert body.nonfinite.policy == "warn"


@pytest.mark.parametrize("text, line, path, words", [
    ("debug:\n  nonfinite:\n    polcy: warn\n", 3, "debug.nonfinite.polcy", "did you mean 'policy'"),
    ("debug:\n  nonfinite:\n    policy: rase\n", 3, "debug.nonfinite.policy", "did you mean 'raise'"),
    ("debug:\n  gradients:\n    every: -1\n", 3, "debug.gradients.every", "must be >= 0"),
    ("debug:\n  gradients:\n    histograms_every: often\n", 3, "debug.gradients.histograms_every", "integer"),
    ("debug:\n  float64: yes please\n", 2, "debug.float64", "true or false"),
    ("debug:\n  tensorboard:\n    logdir: true\n", 2, "debug.tensorboard", "false to turn TensorBoard off"),
    ("debug:\n  nonfinite:\n    allow_inf_in: attn\n", 3, "debug.nonfinite.allow_inf_in", "list of str"),
    ("gradients:\n  evry: 2\n", 2, "debug.gradients.evry", "did you mean 'every'"),
])
def test_errors_name_file_line_and_key(tmp_path, text, line, path, words):
    file = write(tmp_path, text)
    with pytest.raises(ext.ConfigError) as info:
        ext.DebugConfig.from_yaml(file)
    e = info.value
    assert (e.file, e.line, e.path) == (str(file), line, path)
    assert words in str(e) and str(e).startswith(f"{file}:{line}: {path}:")


def test_dict_errors_and_install_validation(tmp_path):
    with pytest.raises(ext.ConfigError, match="debug.nonfinite.policy: must be one of"):
        ext.DebugConfig.from_dict({"nonfinite": {"policy": "explode"}})
    import chainer

    model = chainer.links.Linear(2, 1)
    opt = chainer.optimizers.SGD()
    opt.setup(model)
    it = chainer.iterators.SerialIterator([(1.0,)], 1)
    trainer = chainer.training.Trainer(ext.GradientLoggingUpdater(it, opt, -1), (1, "iteration"), out=str(tmp_path))
    with pytest.raises(ext.ConfigError, match="debug.gradients.every"):
        ext.install(trainer, {"gradients": {"every": "x"}})
