"""float64 mode end to end: the switch, the converter, the check that names float32 parameters, cast_link."""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

import extensions as ext


@pytest.fixture(autouse=True)
def restore_dtype():
    before = chainer.global_config.dtype
    yield
    ext.set_float64(False)
    chainer.global_config.dtype = before


class Classifier(chainer.Chain):
    """Records the dtypes it is fed, so the test can see what the converter did."""

    def __init__(self):
        super().__init__()
        self.fed = []
        with self.init_scope():
            self.l1 = L.Linear(3, 4)
            self.l2 = L.Linear(4, 2)

    def forward(self, x, t):
        self.fed.append((x.dtype, t.dtype))
        return F.softmax_cross_entropy(self.l2(F.tanh(self.l1(x))), t)


def data():
    rng = np.random.RandomState(0)
    return chainer.datasets.TupleDataset(rng.randn(12, 3).astype(np.float32), rng.randint(0, 2, 12).astype(np.int32))


def build(debug, tmp_path, iterations=3):
    model = Classifier()
    opt = chainer.optimizers.Adam(0.01)
    opt.setup(model)
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data(), 4), opt, -1)
    trainer = chainer.training.Trainer(updater, (iterations, "iteration"), out=str(tmp_path))
    ext.install(trainer, debug)
    return trainer, model, opt


def test_float64_end_to_end_from_yaml(tmp_path):
    path = tmp_path / "debug.yaml"
    path.write_text("debug:\n  float64: true\n  tensorboard:\n    logdir: false\n")
    debug = ext.DebugConfig.from_yaml(path)
    ext.set_float64(debug.float64)
    assert ext.float64_requested()
    trainer, model, opt = build(debug, tmp_path)
    trainer.run()
    assert model.fed == [(np.float64, np.int32)] * 3  # floats cast, integer labels untouched
    assert all(p.array.dtype == np.float64 and p.grad.dtype == np.float64 for p in model.params())
    assert all(v.dtype == np.float64 for p in model.params() for v in p.update_rule.state.values())


def test_float32_model_trains_in_float64_from_the_yaml_switch_alone(tmp_path, caplog):
    """No set_float64, no cast_link: ``float64: true`` makes install cast the model and Adam's state, in one line."""
    caplog.set_level("WARNING", logger="extensions")
    trainer, model, opt = build({"tensorboard": {"logdir": False}}, tmp_path, iterations=1)
    trainer.run()  # float32 training first: Adam's state exists and must be cast too
    assert model.l1.W.array.dtype == np.float32
    trainer2 = chainer.training.Trainer(trainer.updater, (4, "iteration"), out=str(tmp_path / "b"))
    ext.install(trainer2, {"float64": True, "tensorboard": {"logdir": False}})
    lines = [r.getMessage() for r in caplog.records if "float64" in r.getMessage()]
    assert len(lines) == 1 and "main (4 parameter(s))" in lines[0] and "\n" not in lines[0]
    trainer2.run()
    assert model.fed[-1] == (np.float64, np.int32)
    assert all(p.array.dtype == np.float64 and p.grad.dtype == np.float64 for p in model.params())
    assert all(v.dtype == np.float64 for p in model.params() for v in p.update_rule.state.values())


def test_float32_parameter_it_cannot_cast_is_named(tmp_path):
    """A parameter made float32 after install (out of its reach) stops training with an error naming it."""
    trainer, model, _ = build({"float64": True, "tensorboard": {"logdir": False}}, tmp_path)
    model.l1.W.array = model.l1.W.array.astype(np.float32)
    model.l2.b.array = model.l2.b.array.astype(np.float32)
    with pytest.raises(ext.Float64Error) as info:
        trainer.run(show_loop_exception_msg=False)
    message = str(info.value)
    assert "l1/W (float32)" in message and "l2/b (float32)" in message and "cast_link" in message
    assert isinstance(info.value, ext.ConfigError)  # a CLI shows it as a one-line configuration error


def test_cast_link_switches_a_float32_model_with_its_optimizer_state(tmp_path):
    trainer, model, opt = build({"tensorboard": {"logdir": False}}, tmp_path, iterations=1)
    trainer.run()
    state_before = {n: {k: v.copy() for k, v in p.update_rule.state.items()} for n, p in model.namedparams()}
    ext.cast_link(model, np.float64, opt)
    for name, p in model.namedparams():
        assert p.array.dtype == np.float64 and p.grad.dtype == np.float64
        for key, value in p.update_rule.state.items():
            assert value.dtype == np.float64
            np.testing.assert_array_equal(value, state_before[name][key])
    trainer2 = chainer.training.Trainer(trainer.updater, (3, "iteration"), out=str(tmp_path / "b"))
    ext.install(trainer2, {"float64": True, "tensorboard": {"logdir": False}})
    trainer2.run()
    assert model.fed[-1] == (np.float64, np.int32)
    assert all(p.array.dtype == np.float64 for p in model.params())


def test_float64_converter_casts_floats_only():
    batch = [(np.ones(2, np.float32), np.int32(1)), (np.zeros(2, np.float32), np.int32(0))]
    x, t = ext.float64_converter()(batch)
    assert x.dtype == np.float64 and t.dtype == np.int32

    def old_style(batch, device=None):  # a pre-Device converter returning a dict
        return {"x": np.stack([b[0] for b in batch]), "t": np.array([b[1] for b in batch])}

    out = ext.float64_converter(old_style)(batch, -1)
    assert out["x"].dtype == np.float64 and out["t"].dtype == np.int32
    wrapped = ext.float64_converter(old_style)
    assert ext.float64_converter(wrapped) is wrapped  # wrapping twice is a no-op


def test_set_float64_builds_float64_parameters():
    ext.set_float64(True)
    assert Classifier().l1.W.array.dtype == np.float64
    ext.set_float64(False)
    assert not ext.float64_requested() and Classifier().l1.W.array.dtype == np.float32
