"""Per-parameter gradient logging through the reporter: values, cadence, missing gradients, seed forms."""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

import extensions as ext


class MLP(chainer.Chain):
    """Two Linear links under a ``predictor`` chain, plus one link that never gets a gradient."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.predictor = chainer.Sequential(L.Linear(3, 5), F.relu, L.Linear(5, 2))
            self.unused = L.Linear(2, 2)

    def forward(self, x, t):
        return F.softmax_cross_entropy(self.predictor(x), t)


def data(n=20):
    rng = np.random.RandomState(0)
    return chainer.datasets.TupleDataset(rng.randn(n, 3).astype(np.float32),
                                         rng.randint(0, 2, n).astype(np.int32))


def plain_trainer(tmp_path, iterations):
    """An MLP trained by SGD through a GradientLoggingUpdater (20 examples, batch 5), nothing installed."""
    np.random.seed(0)
    model = MLP()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data(), 5), opt, -1)
    return chainer.training.Trainer(updater, (iterations, "iteration"), out=str(tmp_path)), model


def trainer_with_capture(tmp_path, debug=None, iterations=4):
    trainer, model = plain_trainer(tmp_path, iterations)
    ext.install(trainer, {"tensorboard": {"logdir": False}, **(debug or {})})
    seen = []

    @chainer.training.make_extension(trigger=(1, "iteration"), priority=chainer.training.PRIORITY_READER)
    def capture(t):
        grads = {n.lstrip("/"): None if p.grad is None else p.grad.copy() for n, p in model.namedparams()}
        seen.append((dict(t.observation), grads))

    trainer.extend(capture)
    return trainer, model, seen


def test_per_parameter_stats_are_the_values_of_the_iteration(tmp_path):
    trainer, model, seen = trainer_with_capture(tmp_path)
    trainer.run()
    assert len(seen) == 4
    for obs, grads in seen:
        total = 0.0
        for path in ("predictor/0/W", "predictor/0/b", "predictor/1/W", "predictor/1/b"):
            g = grads[path].astype(np.float64)
            total += float((g ** 2).sum())
            expect = {"norm": np.sqrt((g ** 2).sum()), "mean": g.mean(), "std": g.std(),
                      "max_abs": np.abs(g).max(), "zero_frac": (g == 0).mean(), "nan": 0.0, "inf": 0.0}
            for stat, value in expect.items():
                assert obs[f"grad/{path}/{stat}"] == pytest.approx(value, rel=1e-5, abs=1e-7), (path, stat)
        assert obs["grad/global_norm"] == pytest.approx(np.sqrt(total), rel=1e-5)
        # a parameter with no gradient is reported as missing, not a crash
        assert obs["grad/unused/W/missing"] == 1.0 and "grad/unused/W/norm" not in obs
    assert seen[0][0]["grad/global_norm"] != seen[1][0]["grad/global_norm"]  # per iteration, not averaged


def test_every_n_iterations(tmp_path):
    trainer, _, seen = trainer_with_capture(tmp_path, {"gradients": {"every": 2}})
    trainer.run()
    assert ["grad/global_norm" in obs for obs, _ in seen] == [False, True, False, True]


def test_stats_off_still_guards(tmp_path):
    trainer, _, seen = trainer_with_capture(tmp_path, {"gradients": {"every": 0}}, iterations=2)
    trainer.run()
    assert not any(k.startswith("grad/") for obs, _ in seen for k in obs)


def test_log_report_sees_the_stats(tmp_path):
    trainer, _, _ = trainer_with_capture(tmp_path, iterations=2)
    log = chainer.training.extensions.LogReport(trigger=(1, "iteration"), filename=None)
    trainer.extend(log)
    trainer.run()
    assert "grad/predictor/0/W/norm" in log.log[-1] and "grad/global_norm" in log.log[-1]


def test_seed_three_argument_form_and_print_mode(tmp_path, capsys):
    model = MLP()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    it = chainer.iterators.SerialIterator(data(), 5)
    updater = ext.GradientLoggingUpdater(it, opt, -1)  # as the MDN blog post builds its CustomStandardUpdater
    assert isinstance(updater, chainer.training.updaters.StandardUpdater)
    trainer = chainer.training.Trainer(updater, (2, "iteration"), out=str(tmp_path))
    trainer.run()
    assert capsys.readouterr().out == ""
    updater.debug = ext.DebugConfig.from_dict({"gradients": {"print": True}})
    updater.update()
    out = capsys.readouterr().out
    assert out.count("/predictor/0/W [[") == 1 and "/predictor/1/b [" in out
    assert "/unused/W" in out  # the optimizer allocated a zero gradient for it, as the blog post's updater would print


def test_mixin_on_a_custom_updater_with_next_batch(tmp_path):
    class PairUpdater(ext.GradientLoggingMixin, chainer.training.updaters.StandardUpdater):
        def next_batch(self):
            x, t = super().next_batch()
            return {"x": x, "t": t}

    model = MLP()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    updater = PairUpdater(chainer.iterators.SerialIterator(data(), 5), opt, device=-1)
    trainer = chainer.training.Trainer(updater, (2, "iteration"), out=str(tmp_path))
    ext.install(trainer, {"tensorboard": {"logdir": False}})
    seen = []
    trainer.extend(lambda t: seen.append(t.observation.get("grad/predictor/0/W/norm")), trigger=(1, "iteration"))
    trainer.run()
    assert len(seen) == 2 and all(v > 0 for v in seen)


def test_gradient_summary_api():
    g = np.array([[0.0, 3.0], [-4.0, 0.0]], np.float32)
    summary = ext.gradient_summary(["a", "b"], [g, None])
    assert summary.global_norm == pytest.approx(5.0)
    assert summary.stats["a"] == pytest.approx({"norm": 5.0, "mean": -0.25, "std": float(g.std()), "max_abs": 4.0,
                                                "zero_frac": 0.5, "nan": 0.0, "inf": 0.0})
    assert summary.missing == ["b"]
    bad = ext.gradient_summary(["a"], [np.array([np.nan, np.inf, 1.0], np.float32)])
    assert not bad.finite and bad.stats["a"]["nan"] == 1.0 and bad.stats["a"]["inf"] == 1.0
    zeros = ext.gradient_summary(["a", "b"], [np.array([0.0, np.nan, 0.0, 2.0], np.float32), np.zeros(3, np.float32)])
    assert zeros.stats["a"]["zero_frac"] == 0.5 and zeros.stats["b"]["zero_frac"] == 1.0  # exact beside a NaN
    huge = ext.gradient_summary(["a"], [np.full(4, 1e20, np.float32)], with_stats=False)
    assert huge.finite and huge.global_norm == pytest.approx(2e20)  # float32 squares would overflow


def test_updater_serialises_its_counters(tmp_path):
    def make():
        model = MLP()
        opt = chainer.optimizers.SGD(0.1)
        opt.setup(model)
        return ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data(), 5), opt, -1)

    updater = make()
    updater.update()
    updater._ext.skipped, updater._ext.failures = 2, 3
    chainer.serializers.save_npz(str(tmp_path / "u.npz"), updater)
    resumed = make()
    chainer.serializers.load_npz(str(tmp_path / "u.npz"), resumed)
    assert (resumed.iteration, resumed.skipped, resumed._ext.failures) == (1, 2, 3)
    plain = chainer.training.updaters.StandardUpdater(chainer.iterators.SerialIterator(data(), 5),
                                                      updater.get_optimizer("main"))
    chainer.serializers.save_npz(str(tmp_path / "plain.npz"), plain)
    chainer.serializers.load_npz(str(tmp_path / "plain.npz"), make())  # a snapshot from before the toolkit


def _reference_stats(g):
    g = g.astype(np.float64).ravel()
    return {"norm": np.sqrt((g ** 2).sum()), "mean": g.mean(), "std": g.std(), "max_abs": np.abs(g).max(),
            "zero_frac": (g == 0).mean(), "nan": 0.0, "inf": 0.0}


def test_stats_of_big_and_small_gradients_match_float64():
    """Big gradients are reduced in place (chunked dots), small ones gathered: both agree with float64."""
    from extensions.stats import BIG

    rng = np.random.RandomState(1)
    shapes = {"a": (3, 4), "big": (BIG + 3,), "huge": (300, 300), "b": (7,)}
    grads = {n: (rng.randn(*s) * 1e-3 + 2e-4).astype(np.float32) for n, s in shapes.items()}
    grads["big"][::5] = 0.0
    grads["huge"][:10] = 0.0
    names = list(grads)
    summary = ext.gradient_summary(names, list(grads.values()))
    for name, g in grads.items():
        assert summary.stats[name] == pytest.approx(_reference_stats(g), rel=1e-5, abs=1e-9), name
    total = sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())
    assert summary.global_norm == pytest.approx(np.sqrt(total), rel=1e-6)
    guard_only = ext.gradient_summary(names, list(grads.values()), with_stats=False)
    assert guard_only.stats is None and guard_only.global_norm == pytest.approx(np.sqrt(total), rel=1e-6)
    report = summary.as_report()
    assert report["grad/huge/max_abs"] == pytest.approx(np.abs(grads["huge"]).max())
    assert all(type(v) is float for v in report.values())


def test_nonfinite_and_float32_overflow_in_big_gradients():
    from extensions.stats import BIG

    g = np.ones(BIG * 2, np.float32)
    g[3], g[10], g[11] = np.nan, np.inf, -np.inf
    bad = ext.gradient_summary(["w", "b"], [g, np.ones(3, np.float32)])
    assert not bad.finite and bad.nonfinite == {"w": (1, 2)}
    assert bad.stats["w"]["nan"] == 1.0 and bad.stats["w"]["inf"] == 2.0 and bad.stats["b"]["nan"] == 0.0
    assert np.isnan(bad.stats["w"]["max_abs"]) and bad.stats["b"]["norm"] == pytest.approx(np.sqrt(3))
    huge = np.full(BIG * 2, 1e20, np.float32)  # every square overflows float32; the norm is finite
    for with_stats in (True, False):
        s = ext.gradient_summary(["w"], [huge], with_stats=with_stats)
        assert s.finite and s.global_norm == pytest.approx(1e20 * np.sqrt(huge.size), rel=1e-6)


def _logged_run(tmp_path, log_trigger, report="logged", iterations=8):
    """A trainer with TensorBoard on and a LogReport on ``log_trigger``: (LogReport log, TB norms by step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _ = plain_trainer(tmp_path, iterations)
    ext.install(trainer, {"gradients": {"report": report}, "tensorboard": {"logdir": str(tmp_path / "tb")}})
    log = chainer.training.extensions.LogReport(trigger=log_trigger, filename=None)
    trainer.extend(log)
    seen = []
    trainer.extend(lambda t: seen.append("grad/global_norm" in t.observation), trigger=(1, "iteration"))
    trainer.run()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    norms = {e.step: e.value for e in acc.Scalars("grad/predictor/0/W/norm")}
    return log.log, norms, seen


def test_log_report_shows_the_logged_iteration_not_an_interval_average(tmp_path):
    log, norms, seen = _logged_run(tmp_path, (2, "iteration"))
    assert sorted(norms) == list(range(1, 9))  # TensorBoard: every iteration
    assert seen == [False, True] * 4  # the reporter: the iterations LogReport writes
    assert [entry["iteration"] for entry in log] == [2, 4, 6, 8]
    for entry in log:
        assert entry["grad/predictor/0/W/norm"] == pytest.approx(norms[entry["iteration"]], rel=1e-6)
    assert norms[1] != pytest.approx(norms[2], rel=1e-3)  # an average would have differed


def test_report_every_gives_log_report_the_interval_average(tmp_path):
    log, norms, seen = _logged_run(tmp_path, (2, "iteration"), report="every", iterations=4)
    assert seen == [True] * 4
    assert log[0]["grad/predictor/0/W/norm"] == pytest.approx((norms[1] + norms[2]) / 2, rel=1e-5)


def test_epoch_log_trigger_reports_at_the_end_of_each_epoch(tmp_path):
    log, norms, seen = _logged_run(tmp_path, (1, "epoch"))  # 20 examples, batch 5: 4 iterations an epoch
    assert seen == [False, False, False, True] * 2
    assert [entry["iteration"] for entry in log] == [4, 8]
    assert log[1]["grad/predictor/0/W/norm"] == pytest.approx(norms[8], rel=1e-6)


def test_report_tensorboard_keeps_the_statistics_out_of_log_report(tmp_path):
    log, norms, seen = _logged_run(tmp_path, (2, "iteration"), report="tensorboard", iterations=4)
    assert sorted(norms) == [1, 2, 3, 4] and seen == [False] * 4
    assert not any(k.startswith("grad/") for entry in log for k in entry)


def test_report_key_is_validated():
    with pytest.raises(ext.ConfigError, match="debug.gradients.report"):
        ext.DebugConfig.from_dict({"gradients": {"report": "sometimes"}})
    with pytest.raises(ext.ConfigError, match="tensorboard.logdir is false"):
        ext.DebugConfig.from_dict({"gradients": {"report": "tensorboard"}, "tensorboard": {"logdir": False}})
