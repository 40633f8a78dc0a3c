"""NaN/Inf detectors on planted faults: localisation, float64 verdicts, policies, snapshots, clipping."""
from __future__ import annotations

import json
import logging

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

import extensions as ext


class Middle(chainer.Chain):
    """The second of three links; ``mode`` plants a fault inside it."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        with self.init_scope():
            self.fc = L.Linear(4, 4, initialW=0.0, initial_bias=0.0)

    def forward(self, h, s):
        h = self.fc(h)
        if self.mode == "log":      # log of a negative: NaN born here (s = -2 rows)
            return h + F.broadcast_to(F.log(s + 1.0), h.shape)
        if self.mode == "sqrt":     # sqrt(0) is finite, its gradient is Inf: born in backward
            return F.sqrt(h * h)
        if self.mode == "exp":      # exp(100) overflows float32 but not float64
            return F.exp(h + 100.0)
        if self.mode == "mask":     # an intended -inf: log of a 0/1 mask hiding columns 2, 3 of flagged rows
            mask = np.where(getattr(s, "array", s) > 0, 1.0, np.array([[1.0, 1.0, 0.0, 0.0]])).astype(h.dtype)
            return h + F.log(mask)
        return h


class Net(chainer.Chain):
    """l1 -> l2 (Middle) -> l3, mean squared error."""

    def __init__(self, mode: str = "none"):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(3, 4)
            self.l2 = Middle(mode)
            self.l3 = L.Linear(4, 1)

    def forward(self, x, t):
        h = F.relu(self.l1(x[:, :3]))
        h = self.l2(h, x[:, 3:])
        return F.mean_squared_error(self.l3(h), t)


def make_data(bad_batches=(), n_batches=4, batch=5, bad_value=-2.0):
    """x has 3 features and a flag column: 1 in good rows, ``bad_value`` in the rows of ``bad_batches``."""
    rng = np.random.RandomState(0)
    x = rng.rand(n_batches * batch, 4).astype(np.float32)
    x[:, 3] = 1.0
    for b in bad_batches:
        x[b * batch:(b + 1) * batch, 3] = bad_value
    t = rng.rand(n_batches * batch, 1).astype(np.float32)
    return chainer.datasets.TupleDataset(x, t)


def make_trainer(tmp_path, mode="none", bad_batches=(), iterations=4, debug=None, lr=0.1, optimizer=None):
    np.random.seed(1)
    model = Net(mode)
    opt = optimizer or chainer.optimizers.SGD(lr)
    opt.setup(model)
    it = chainer.iterators.SerialIterator(make_data(bad_batches), 5, shuffle=False)
    updater = ext.GradientLoggingUpdater(it, opt, -1)
    trainer = chainer.training.Trainer(updater, (iterations, "iteration"), out=str(tmp_path))
    ext.install(trainer, ext.DebugConfig.from_dict(debug or {"tensorboard": {"logdir": False}}))
    return trainer, model, opt


def run(trainer):
    trainer.run(show_loop_exception_msg=False)


def test_nan_born_in_second_link_forward_is_blamed_not_the_later_link(tmp_path):
    trainer, model, _ = make_trainer(tmp_path, "log", bad_batches=[0])
    with pytest.raises(ext.NonFiniteError) as info:
        run(trainer)
    e = info.value
    assert (e.iteration, e.where, e.link, e.function) == (1, "forward", "l2", "log")
    assert e.link != "l3"  # l3 only passed the NaN along
    assert e.verdict == "bug"  # log(-1) is NaN in float64 too
    report = json.loads((tmp_path / "nonfinite" / "report.json").read_text())
    assert report["birth"]["source"].endswith("return h + F.broadcast_to(F.log(s + 1.0), h.shape)")
    assert __file__ in report["birth"]["source"]
    assert report["birth"]["inputs"][0]["min"] == -1.0 and report["birth"]["outputs"][0]["nan"] == 5
    text = (tmp_path / "nonfinite" / "report.txt").read_text()
    assert "NaN born in forward in Link 'l2' (function log)" in text and "Verdict (float64 replay): bug" in text
    assert "\n" not in e.summary() and "verdict: bug" in e.summary() and "report.txt" in e.summary()


def test_inf_born_in_backward(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, "sqrt")
    with pytest.raises(ext.NonFiniteError) as info:
        run(trainer)
    e = info.value
    assert (e.where, e.link, e.function) == ("backward", "l2", "sqrt")
    report = json.loads((tmp_path / "nonfinite" / "report.json").read_text())
    assert report["birth"]["kind"] == "inf"
    assert report["birth"]["inputs"][0]["inf"] == 0 and report["birth"]["outputs"][0]["inf"] > 0


def test_float32_overflow_gets_precision_verdict(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, "exp")
    with pytest.raises(ext.NonFiniteError) as info:
        run(trainer)
    e = info.value
    assert (e.where, e.link, e.function, e.verdict) == ("forward", "l2", "exp", "precision")
    for p in trainer.updater.get_optimizer("main").target.params():
        assert p.array.dtype == np.float32  # the replay left the model in float32
    assert not chainer.get_function_hooks() and not chainer._get_link_hooks()


def test_intended_inf_in_allowed_link(tmp_path):
    class Pooled(Net):
        def forward(self, x, t):
            h = self.l2(F.relu(self.l1(x[:, :3])), x[:, 3:])
            return F.mean_squared_error(F.logsumexp(h, axis=1)[:, None], t)

    # benign: the -inf of the mask disappears in logsumexp; training runs, nothing is reported
    np.random.seed(0)
    x = np.random.rand(10, 4).astype(np.float32)
    x[::2, 3] = -1.0  # masked rows
    data = chainer.datasets.TupleDataset(x, np.random.rand(10, 1).astype(np.float32))
    model = Pooled("mask")
    model.l2.fc.W.array[...] = np.eye(4, dtype=np.float32)
    model.l2.fc.b.array[...] = np.array([0.0, 0.0, 0.0, 0.0], np.float32)
    opt = chainer.optimizers.SGD(0.01)
    opt.setup(model)
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data, 10), opt, -1)
    trainer = chainer.training.Trainer(updater, (3, "iteration"), out=str(tmp_path / "benign"))
    ext.install(trainer, {"nonfinite": {"allow_inf_in": ["l2"]}, "tensorboard": {"logdir": False}})
    run(trainer)
    assert updater.iteration == 3 and not (tmp_path / "benign" / "nonfinite").exists()

    # harmful downstream: l3 (a Linear) turns -inf into NaN; with l2 allowed, l3 is blamed
    for allow, blamed, kind in ((["l2"], "l3", "nan"), ([], "l2", "inf")):
        out = tmp_path / f"allow{len(allow)}"
        trainer, model, _ = make_trainer(out, "mask", bad_batches=[0],
                                         debug={"nonfinite": {"allow_inf_in": allow}, "tensorboard": {"logdir": False}})
        model.l3.W.array[...] = np.array([[1.0, 1.0, 1.0, -1.0]], np.float32)  # -inf + inf = NaN in l3
        with pytest.raises(ext.NonFiniteError) as info:
            run(trainer)
        assert info.value.link == blamed
        assert json.loads((out / "nonfinite" / "report.json").read_text())["birth"]["kind"] == kind


def _weights(model):
    return {n: p.array.copy() for n, p in model.namedparams()}


def test_last_good_snapshot_reloads_pre_update_weights(tmp_path):
    trainer, model, opt = make_trainer(tmp_path, "log", bad_batches=[2], iterations=4,
                                       optimizer=chainer.optimizers.Adam(0.01))
    seen = []
    trainer.extend(lambda t: seen.append(_weights(model)), trigger=(1, "iteration"))
    with pytest.raises(ext.NonFiniteError) as info:
        run(trainer)
    assert info.value.iteration == 3 and len(seen) == 2
    folder = tmp_path / "nonfinite"
    fresh = Net("log")
    fresh(*[np.zeros((1, 4), np.float32), np.zeros((1, 1), np.float32)])  # initialise shapes
    chainer.serializers.load_npz(str(folder / "model.npz"), fresh)
    for name, param in fresh.namedparams():
        np.testing.assert_array_equal(param.array, seen[-1][name])          # weights before the bad update
        np.testing.assert_array_equal(param.array, _weights(model)[name])   # and the model was not touched
    fresh_opt = chainer.optimizers.Adam(0.01)
    fresh_opt.setup(fresh)
    chainer.serializers.load_npz(str(folder / "optimizer.npz"), fresh_opt)
    assert fresh_opt.t == 2
    batch = np.load(folder / "batch.npz")
    np.testing.assert_array_equal(batch["arr_0"], make_data([2])._datasets[0][10:15])


def test_policy_warn_logs_and_skips_the_update(tmp_path, caplog):
    trainer, model, _ = make_trainer(tmp_path, "log", bad_batches=[1], iterations=3,
                                     debug={"nonfinite": {"policy": "warn"}, "tensorboard": {"logdir": False}})
    seen = []
    trainer.extend(lambda t: seen.append((_weights(model), dict(t.observation))), trigger=(1, "iteration"))
    with caplog.at_level(logging.WARNING, logger="extensions"):
        run(trainer)
    assert trainer.updater.iteration == 3 and trainer.updater.skipped == 1
    assert "NaN born in forward in Link 'l2' (function log)" in caplog.text
    for name, w in seen[1][0].items():
        np.testing.assert_array_equal(w, seen[0][0][name])  # iteration 2 was skipped
    assert seen[1][1]["nonfinite/skipped"] == 1.0
    assert all(np.isfinite(p.array).all() for p in model.params())
    assert not np.array_equal(seen[2][0]["/l1/W"], seen[1][0]["/l1/W"])  # iteration 3 updated again


def test_policy_skip_is_silent_and_counts(tmp_path, caplog):
    trainer, model, _ = make_trainer(tmp_path, "log", bad_batches=[1, 3], iterations=4,
                                     debug={"nonfinite": {"policy": "skip"}, "tensorboard": {"logdir": False}})
    with caplog.at_level(logging.WARNING, logger="extensions"):
        run(trainer)
    assert caplog.text == ""
    assert trainer.updater.skipped == 2
    report = json.loads((tmp_path / "nonfinite" / "report.json").read_text())
    assert report["skipped"] == 2 and report["failures"] == 2 and report["link"] == "l2"
    assert all(np.isfinite(p.array).all() for p in model.params())


def test_update_that_overflows_is_rolled_back(tmp_path):
    trainer, model, opt = make_trainer(tmp_path, "none", lr=1e39)
    before = _weights(model)
    with pytest.raises(ext.NonFiniteError) as info:
        run(trainer)
    assert info.value.where == "update" and info.value.function == "SGDRule"
    for name, p in model.namedparams():
        np.testing.assert_array_equal(p.array, before[name])
    assert opt.t == 0
    assert "rolled back" in (tmp_path / "nonfinite" / "report.txt").read_text()


def test_gradient_clipping_skips_instead_of_spreading_nan(tmp_path):
    model = Net("log")
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    clip = ext.GradientClipping(1.0)
    opt.add_hook(clip)
    it = chainer.iterators.SerialIterator(make_data([1]), 5, shuffle=False)
    updater = chainer.training.updaters.StandardUpdater(it, opt, device=-1)  # a plain updater: the hook alone
    updater.update()
    after_good = _weights(model)
    with pytest.warns(RuntimeWarning, match="update skipped"):
        updater.update()
    assert clip.skipped == 1
    for name, p in model.namedparams():
        np.testing.assert_array_equal(p.array, after_good[name])
    updater.update()
    assert all(np.isfinite(p.array).all() for p in model.params())


def test_gradient_clipping_scales_to_threshold():
    model = Net()
    opt = chainer.optimizers.SGD(0.0)
    opt.setup(model)
    opt.add_hook(ext.GradientClipping(0.5))
    x, t = make_data()._datasets
    model.cleargrads()
    (model(x, t) * 1000.0).backward()
    opt.update()
    norm = np.sqrt(sum(float((p.grad ** 2).sum()) for p in model.params()))
    assert norm == pytest.approx(0.5, rel=1e-5)


def test_replay_outside_reporter_scope_with_reporting_loss(tmp_path):
    """A loss function that reports, replayed without any reporter scope (no Trainer)."""
    model = Net("log")

    def loss_func(x, t):
        loss = model(x, t)
        chainer.reporter.report({"loss": loss}, model)
        return loss

    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    it = chainer.iterators.SerialIterator(make_data([0]), 5, shuffle=False)
    updater = ext.GradientLoggingUpdater(it, opt, -1, loss_func=loss_func, out=str(tmp_path),
                                         debug=ext.DebugConfig.from_dict({"nonfinite": {"policy": "skip"}}))
    updater.update()
    assert updater.last_failure.link == "l2" and updater.last_failure.verdict == "bug"
    assert (tmp_path / "nonfinite" / "report.txt").exists()


def test_localisation_inside_an_overridden_compute_loss(tmp_path):
    """The MDN-RNN style: a mixin subclass with its own compute_loss, replayed with its random state."""

    class NoisyUpdater(ext.GradientLoggingMixin, chainer.training.updaters.StandardUpdater):
        def compute_loss(self, in_arrays):
            x, t = in_arrays
            model = self.get_optimizer("main").target
            noise = np.random.normal(size=t.shape).astype(np.float32)  # replay must see the same draw
            return model(x, t + noise) + F.sum(F.log(x[:, 3:] + 1.0)) * 0.0

    model = Net()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    it = chainer.iterators.SerialIterator(make_data([1], bad_value=-2.0), 5, shuffle=False)
    updater = NoisyUpdater(it, opt, device=-1, debug=ext.DebugConfig.from_dict({"nonfinite": {"policy": "warn"}}),
                           out=str(tmp_path))
    updater.update()
    updater.update()
    failure = updater.last_failure
    assert failure.iteration == 2 and failure.where == "forward"
    assert failure.link is None and failure.function == "log"
    assert "F.log(x[:, 3:] + 1.0)" in failure.birth.source
    assert failure.verdict == "bug"


def test_replay_uses_the_saved_random_state(tmp_path):
    """A loss with NumPy noise whose gradient fails in backward: the replay recomputes the same loss."""

    class NoisySqrt(ext.GradientLoggingMixin, chainer.training.updaters.StandardUpdater):
        def compute_loss(self, in_arrays):
            x, t = in_arrays
            noise = np.random.normal(size=t.shape).astype(np.float32)
            return self.get_optimizer("main").target(x, t + noise)

    model = Net("sqrt")
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    it = chainer.iterators.SerialIterator(make_data(), 5, shuffle=False)
    updater = NoisySqrt(it, opt, device=-1, out=str(tmp_path),
                        debug=ext.DebugConfig.from_dict({"nonfinite": {"policy": "skip"}}))
    np.random.seed(3)
    updater.update()
    failure = updater.last_failure
    assert failure.where == "backward" and np.isfinite(failure.loss)
    assert failure.replay_loss == failure.loss
    assert failure.verdict == "bug"


class Wide(chainer.Chain):
    """A net with one parameter big enough for the toolkit's per-array (in-place) paths."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(200, 100)
            self.l2 = L.Linear(100, 1)

    def forward(self, x, t):
        return F.mean_squared_error(self.l2(F.tanh(self.l1(x))), t)


def _wide_skipping(tmp_path, opt: chainer.Optimizer) -> tuple[Wide, chainer.Optimizer, ext.GradientLoggingUpdater]:
    """A ``Wide`` net set up with ``opt`` under an updater whose policy is skip, on a fixed random batch stream."""
    np.random.seed(0)
    model = Wide()
    opt.setup(model)
    rng = np.random.RandomState(0)
    data = chainer.datasets.TupleDataset(rng.randn(40, 200).astype(np.float32), rng.randn(40, 1).astype(np.float32))
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data, 10), opt, -1, out=str(tmp_path),
                                         debug=ext.DebugConfig.from_dict({"nonfinite": {"policy": "skip"}}))
    return model, opt, updater


def test_adam_update_that_overflows_is_rolled_back_with_its_state(tmp_path):
    """Good updates, then one whose step overflows: parameters, Adam's moments and t come back bit for bit
    (Chainer's Adam does not save what it overwrites: the backup copies them before the update)."""
    model, opt, updater = _wide_skipping(tmp_path, chainer.optimizers.Adam(1e-3))
    updater.update()
    updater.update()

    def state():
        return {n: (p.array.copy(), p.update_rule.state["m"].copy(), p.update_rule.state["v"].copy(),
                    p.update_rule.t) for n, p in model.namedparams()}

    before = state()
    opt.alpha = 1e39  # the step overflows float32: every weight would become +-inf
    updater.update()
    assert updater.skipped == 1 and updater.last_failure.where == "update" and opt.t == 2
    for name, (w, m, v, t) in state().items():
        np.testing.assert_array_equal(w, before[name][0])
        np.testing.assert_array_equal(m, before[name][1])
        np.testing.assert_array_equal(v, before[name][2])
        assert t == before[name][3]
    opt.alpha = 1e-3
    updater.update()  # training goes on from the restored state
    assert opt.t == 3 and all(np.isfinite(p.array).all() for p in model.params())
    assert not np.array_equal(model.l1.W.array, before["/l1/W"][0])


def test_the_model_keeps_its_arrays_and_a_replaced_array_is_followed(tmp_path):
    """The toolkit never re-points a parameter's array; an array replaced between iterations (as
    ``to_device`` or ``cast_link`` do) is noticed, and a failed update after it is rolled back onto the new
    array."""
    model, opt, updater = _wide_skipping(tmp_path, chainer.optimizers.Adam(1e-3))
    arrays = {n: p.array for n, p in model.namedparams()}
    updater.update()  # Adam's state is created by this update
    updater.update()
    assert all(p.array is arrays[n] for n, p in model.namedparams())

    replaced = model.l2.W.array.copy()
    model.l2.W.array = replaced  # a new array behind the toolkit's back
    expected = replaced.copy()
    opt.alpha = 1e39
    updater.update()
    assert updater.skipped == 1 and model.l2.W.array is replaced
    np.testing.assert_array_equal(model.l2.W.array, expected)


class _WritesWeights:
    """A pre-update hook that writes a parameter (not a gradient): the backup must copy before it runs."""

    name = "writes_weights"
    timing = "pre"
    call_for_each_param = True

    def __call__(self, rule, param):
        param.array *= 1.0


@pytest.mark.parametrize("case", ["saves", "custom_hook", "frozen_param"])
def test_rule_that_saves_what_it_overwrites_is_rolled_back_bit_for_bit(tmp_path, monkeypatch, case):
    """FastAdam saves each block before updating it (the toolkit's save protocol) instead of a copy beforehand;
    a failed update comes back bit for bit. A custom pre-update hook turns the protocol off (the copy is
    taken first); a parameter with no gradient is not updated and its values are left as they are."""
    from extensions import backup
    from wm_trainer.ops.adam import FastAdam, FastAdamRule

    monkeypatch.setattr(backup, "DELEGATE_BYTES", 0)  # the path of big nets

    saved = []
    orig = FastAdamRule.update_core_cpu

    def spy(self, param):
        saved.append(self.save_overwritten is not None)
        return orig(self, param)
    monkeypatch.setattr(FastAdamRule, "update_core_cpu", spy)
    model, opt, updater = _wide_skipping(tmp_path, FastAdam(1e-3))
    if case == "custom_hook":
        opt.add_hook(_WritesWeights())
    updater.update()
    updater.update()
    if case == "frozen_param":
        model.l1.b.update_rule.enabled = False  # given a save target, but its update never runs
    before = {n: (p.array.copy(), p.update_rule.state["m"].copy(), p.update_rule.state["v"].copy())
              for n, p in model.namedparams()}
    saved.clear()
    opt.alpha = 1e39
    updater.update()
    assert updater.skipped == 1 and updater.last_failure.where == "update"
    assert all(saved) == (case != "custom_hook") and saved
    for name, p in model.namedparams():
        np.testing.assert_array_equal(p.array, before[name][0])
        np.testing.assert_array_equal(p.update_rule.state["m"], before[name][1])
        np.testing.assert_array_equal(p.update_rule.state["v"], before[name][2])
    assert all(rule.save_overwritten is None for rule in (p.update_rule for p in model.params()))
    opt.alpha = 1e-3
    updater.update()
    assert all(np.isfinite(p.array).all() for p in model.params())


def test_post_update_check_trusts_a_rule_that_checked_what_it_wrote(tmp_path, monkeypatch):
    """FastAdam checks each block it wrote while in cache and says so (``overwritten_finite``): the post-update
    check then reads only the other parameters (here the one whose update was switched off)."""
    from extensions import backup
    from wm_trainer.ops.adam import FastAdam

    monkeypatch.setattr(backup, "DELEGATE_BYTES", 0)  # the path of big nets
    model, opt, updater = _wide_skipping(tmp_path, FastAdam(1e-3))
    updater.update()
    updater.update()
    read = []
    orig = backup.all_finite

    def spy(arrays):
        read.append([a.shape for a in arrays])
        return orig(arrays)
    monkeypatch.setattr(backup, "all_finite", spy)
    model.l1.b.update_rule.enabled = False
    updater.update()
    assert read == [[model.l1.b.shape]] and updater.skipped == 0
    assert all(p.update_rule.overwritten_finite is None for p in model.params())


class _ReplacingSGDRule(chainer.optimizers.sgd.SGDRule):
    """An update that builds a new array instead of writing in place (as Chainer's fp32 update of float16 does)."""

    def update_core_cpu(self, param):
        param.array = param.array - param.array.dtype.type(self.hyperparam.lr) * param.grad


class _ReplacingSGD(chainer.optimizers.SGD):
    def create_update_rule(self):
        return _ReplacingSGDRule(self.hyperparam)


@pytest.mark.parametrize("steps", [1, 7])
def test_rule_that_replaces_its_arrays_is_rolled_back_onto_them(tmp_path, steps):
    """The failed update replaced the weight arrays: the saved values come back in the arrays the model had."""
    model, opt, updater = _wide_skipping(tmp_path, _ReplacingSGD(1e-3))
    for _ in range(steps):
        updater.update()
    before = {n: (p.array, p.array.copy()) for n, p in model.namedparams()}
    opt.lr = 1e39
    updater.update()
    assert updater.skipped == 1
    for name, p in model.namedparams():  # the model's own arrays again
        assert p.array is before[name][0]
        np.testing.assert_array_equal(p.array, before[name][1])


@pytest.mark.parametrize("fast", [True, False])
def test_rng_tracker_captures_the_exact_state_cheaply(monkeypatch, fast):
    """The raw-memory capture equals get_state(), cached Gaussian included, and replays the same draws."""
    from extensions import replay
    from extensions.replay import RngState, RngTracker

    if not fast:  # a NumPy whose memory layout cannot be verified: get_state() instead
        monkeypatch.setattr(replay._RawReader, "create", classmethod(lambda cls, random_state: None))
    tracker = RngTracker()
    np.random.seed(7)
    for draws in (0, 1, 2, 3):  # odd draws leave a cached Gaussian, even ones do not
        np.random.normal(size=draws)
        captured = tracker.capture()
        want = np.random.get_state()
        got = captured.legacy_state()
        assert got[0] == want[0] and np.array_equal(got[1], want[1]) and got[2:] == want[2:]
        first = np.random.normal(size=5)
        np.random.permutation(10)
        captured.restore()
        np.testing.assert_array_equal(np.random.normal(size=5), first)
    assert (tracker._reader is not None) == fast  # the fast path is in use on this NumPy
    assert RngState.capture().legacy_state()[2] == np.random.get_state()[2]

    # consecutive captures with no draw, one draw, a Gaussian taken from the cache (the position stays),
    # 624 draws (every word regenerated, the position back where it was): each equals get_state()
    np.random.seed(3)
    for draw in (lambda: None, lambda: np.random.rand(), lambda: np.random.normal(), lambda: np.random.normal(),
                 lambda: np.random.randint(0, 2 ** 31, size=624), lambda: None):
        draw()
        got, want = tracker.capture().legacy_state(), np.random.get_state()
        assert np.array_equal(got[1], want[1]) and got[2:] == want[2:]
