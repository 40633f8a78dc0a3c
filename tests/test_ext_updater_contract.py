"""GradientLoggingUpdater as a drop-in for Chainer's StandardUpdater: constructor, update path, serialize, skips."""
from __future__ import annotations

import inspect
from unittest import mock

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from chainer import dataset, training

import extensions as ext


class Iterator(dataset.Iterator):
    """Returns the same batch forever; counts its calls."""

    epoch = 1
    is_new_epoch = True

    def __init__(self, batch):
        self.batch, self.calls = batch, 0

    def __next__(self):
        self.calls += 1
        return self.batch

    def serialize(self, serializer):
        pass


def mocked_optimizer(target=None):
    """An optimizer whose ``update`` only records how it was called (as a test double or a wrapper would)."""
    opt = chainer.optimizers.SGD()
    opt.setup(target or chainer.Link())
    opt.update = mock.MagicMock()
    return opt


class Net(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(3, 4)
            self.l2 = L.Linear(4, 1)

    def forward(self, x, t):
        return F.mean_squared_error(self.l2(F.tanh(self.l1(x))), t)


def batch():
    rng = np.random.RandomState(0)
    return [(rng.randn(3).astype(np.float32), rng.randn(1).astype(np.float32)) for _ in range(4)]


def test_constructor_is_standard_updaters():
    ours = inspect.signature(ext.GradientLoggingUpdater.__init__).parameters
    theirs = inspect.signature(training.updaters.StandardUpdater.__init__).parameters
    positional = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    for name in positional:
        assert ours[name].default is theirs[name].default, name
    assert ours["input_device"].kind is inspect.Parameter.KEYWORD_ONLY and ours["input_device"].default is None
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("debug", "out", "writer"))


def test_defaults_leave_the_model_where_it_is():
    model = Net()
    arrays = [p.array for p in model.params()]
    opt = mocked_optimizer(model)
    updater = ext.GradientLoggingUpdater(Iterator(batch()), opt)
    assert updater.device is None and updater.input_device is None and updater.loss_func is None
    assert updater.iteration == 0 and updater.converter is dataset.concat_examples
    assert all(p.array is a for p, a in zip(model.params(), arrays))
    assert opt.use_auto_new_epoch is True


@pytest.mark.parametrize("spec", [-1, "@numpy", chainer.backend.CpuDevice()])
def test_seed_form_device_as_third_positional(spec):
    updater = ext.GradientLoggingUpdater(Iterator(batch()), mocked_optimizer(), spec)
    assert updater.device == chainer.get_device(spec) and updater.converter is dataset.concat_examples
    with pytest.raises(TypeError, match="device given twice"):
        ext.GradientLoggingUpdater(Iterator(batch()), mocked_optimizer(), spec, device=-1)


def test_callable_third_positional_is_the_converter():
    seen = []

    @dataset.converter()
    def convert(b, device):
        seen.append(device)
        return dataset.concat_examples(b, device)

    opt = mocked_optimizer()
    updater = ext.GradientLoggingUpdater(Iterator(batch()), opt, convert, input_device=-1)
    assert updater.converter is convert and updater.device is None
    updater.update()
    assert seen == [chainer.get_device(-1)]


@pytest.mark.parametrize("kind", ["tuple", "dict", "array"])
def test_update_goes_through_optimizer_update(kind):
    x = np.arange(3, dtype=np.float32)
    data = {"tuple": [(x, x)], "dict": [{"a": x, "b": x}], "array": [x]}[kind]
    opt = mocked_optimizer()
    it = Iterator(data)
    updater = ext.GradientLoggingUpdater(it, opt)
    updater.update()
    assert updater.iteration == 1 and it.calls == 1 and opt.update.call_count == 1 and opt.epoch == 1
    args, kwargs = opt.update.call_args
    assert args[0] is opt.target  # the loss function itself, as StandardUpdater passes it
    if kind == "tuple":
        assert len(args) == 3 and not kwargs
    elif kind == "dict":
        assert len(args) == 1 and set(kwargs) == {"a", "b"}
    else:
        assert len(args) == 2 and not kwargs


def test_an_optimizer_that_does_its_work_in_update_is_used():
    """A loss-scaling style wrapper overriding ``update`` is called, and the guard still runs inside it."""
    calls = []

    class Wrapping(chainer.optimizers.SGD):
        def update(self, lossfun=None, *args, **kwargs):
            calls.append(lossfun)
            return super().update(lossfun, *args, **kwargs)

    model = Net()
    opt = Wrapping(0.1)
    opt.setup(model)
    updater = ext.GradientLoggingUpdater(Iterator(batch()), opt)
    observation = {}
    with chainer.reporter.Reporter().scope(observation):
        updater.update()
    assert calls == [model] and opt.t == 1
    assert "grad/global_norm" in observation and "grad/l1/W/norm" in observation


class _Recorder(chainer.Serializer):
    def __init__(self):
        self.calls = []

    def __getitem__(self, key):
        return _Recorder()

    def __call__(self, key, value):
        self.calls.append((key, value))  # returns None, as a test double may


def test_serialize_accepts_what_any_serializer_returns(tmp_path):
    updater = ext.GradientLoggingUpdater(Iterator(batch()), mocked_optimizer())
    recorder = _Recorder()
    updater.serialize(recorder)
    assert recorder.calls == [("iteration", 0)]  # the toolkit's counters live under their own child
    updater._ext.failures, updater._ext.skipped = 3, 2
    chainer.serializers.save_npz(str(tmp_path / "u.npz"), updater)
    again = ext.GradientLoggingUpdater(Iterator(batch()), mocked_optimizer())
    chainer.serializers.load_npz(str(tmp_path / "u.npz"), again)
    assert (again._ext.failures, again.skipped) == (3, 2)


def test_skip_leaves_t_weights_and_state_untouched(tmp_path):
    model = Net()
    opt = chainer.optimizers.Adam(1e-3)
    opt.setup(model)
    good = [(x, t) for x, t in batch()]
    it = Iterator(good)
    updater = ext.GradientLoggingUpdater(it, opt, out=str(tmp_path),
                                         debug={"nonfinite": {"policy": "skip", "replay_float64": False}})
    updater.update()
    weights = {n: p.array.copy() for n, p in model.namedparams()}
    state = {n: {k: v.copy() for k, v in p.update_rule.state.items()} for n, p in model.namedparams()}
    rule_t = {n: p.update_rule.t for n, p in model.namedparams()}
    t = opt.t
    it.batch = [(x, np.full_like(y, np.nan)) for x, y in good]
    updater.update()
    assert updater.skipped == 1 and opt.t == t
    for n, p in model.namedparams():
        np.testing.assert_array_equal(p.array, weights[n])
        assert p.update_rule.t == rule_t[n]
        for k, v in p.update_rule.state.items():
            np.testing.assert_array_equal(v, state[n][k])
    it.batch = good
    updater.update()  # training goes on
    assert opt.t == t + 1


def test_user_hooks_run_after_the_guard():
    """The guard is the first 'pre' hook (statistics of raw gradients) even for hooks added before it."""
    model = Net()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    opt.add_hook(chainer.optimizer_hooks.WeightDecay(1e-4))
    updater = ext.GradientLoggingUpdater(Iterator(batch()), opt)
    opt.add_hook(chainer.optimizer_hooks.GradientClipping(1.0))
    updater.update()
    pre, post = ext.chainer_compat.hook_dicts(opt)
    assert next(iter(pre)) == "ext_guard" and next(reversed(post)) == "ext_guard_post"
