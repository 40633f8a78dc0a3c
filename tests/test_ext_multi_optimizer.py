"""Updaters with several optimizers (a GAN in the style of Chainer's DCGAN example): guard and stats per optimizer."""
from __future__ import annotations

import warnings

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from chainer import training

import extensions as ext


class GANUpdater(training.updaters.StandardUpdater):
    """Chainer's DCGAN example in miniature: ``update_core`` updates the discriminator, then the generator."""

    def __init__(self, *args, **kwargs):
        self.gen, self.dis = kwargs.pop("models")
        super().__init__(*args, **kwargs)

    def loss_dis(self, dis, y_fake, y_real):
        return F.sum(F.softplus(-y_real)) / len(y_real) + F.sum(F.softplus(y_fake)) / len(y_fake)

    def loss_gen(self, gen, y_fake):
        return F.sum(F.softplus(-y_fake)) / len(y_fake)

    def update_core(self):
        gen_optimizer, dis_optimizer = self.get_optimizer("gen"), self.get_optimizer("dis")
        x_real = self.converter(self.get_iterator("main").next(), self.input_device)
        z = np.random.RandomState(self.iteration).randn(len(x_real), 2).astype(np.float32)
        x_fake = self.gen(z)
        y_real, y_fake = self.dis(x_real), self.dis(x_fake)
        dis_optimizer.update(self.loss_dis, self.dis, y_fake, y_real)
        gen_optimizer.update(self.loss_gen, self.gen, y_fake)


class Bypassing(training.updaters.StandardUpdater):
    """Updates the weights by hand, never through ``optimizer.update``."""

    def update_core(self):
        x = self.converter(self.get_iterator("main").next(), self.input_device)
        model = self.get_optimizer("main").target
        model.cleargrads()
        F.sum(model(x)).backward()
        for p in model.params():
            p.array -= 0.01 * p.grad


def gan_trainer(tmp_path, iterations=3, debug=None):
    np.random.seed(0)
    gen, dis = L.Linear(2, 3), L.Linear(3, 1)
    gen_opt, dis_opt = chainer.optimizers.Adam(1e-3), chainer.optimizers.Adam(1e-3)
    gen_opt.setup(gen)
    dis_opt.setup(dis)
    data = np.random.RandomState(1).randn(16, 3).astype(np.float32)
    it = chainer.iterators.SerialIterator(data, 4)
    updater = GANUpdater(it, {"gen": gen_opt, "dis": dis_opt}, models=(gen, dis))
    trainer = training.Trainer(updater, (iterations, "iteration"), out=str(tmp_path))
    ext.install(trainer, {"tensorboard": {"logdir": False}, **(debug or {})})
    return trainer, gen, dis, gen_opt, dis_opt


def test_each_optimizer_is_logged_under_its_name(tmp_path):
    trainer, *_ = gan_trainer(tmp_path)
    log = training.extensions.LogReport(trigger=(1, "iteration"), filename=None)
    trainer.extend(log)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # it updates through its optimizers: no bypass warning
        trainer.run()
    entry = log.log[-1]
    for name, path in (("gen", "W"), ("gen", "b"), ("dis", "W"), ("dis", "b")):
        assert f"grad/{name}/{path}/norm" in entry
    assert entry["grad/gen/global_norm"] > 0 and entry["grad/dis/global_norm"] > 0
    assert not any(k.startswith("grad/W") for k in entry)


def test_a_nonfinite_step_is_vetoed_per_optimizer_and_named_by_it(tmp_path):
    trainer, gen, dis, gen_opt, dis_opt = gan_trainer(
        tmp_path, iterations=2, debug={"nonfinite": {"policy": "skip", "replay_float64": False}})
    trainer.run()
    t_dis = dis_opt.t
    dis.W.array[0, 0] = np.nan  # the discriminator's gradients are not finite
    dis_w, dis_m = dis.W.array.copy(), dis.W.update_rule.state["m"].copy()
    trainer.updater.update()
    np.testing.assert_array_equal(dis.W.array, dis_w)  # vetoed: weights, state and t as they were
    np.testing.assert_array_equal(dis.W.update_rule.state["m"], dis_m)
    assert dis_opt.t == t_dis and trainer.updater.iteration == 3
    session = trainer.get_extension("ext_report_schedule").session
    assert session.skipped >= 1 and session.last_failure is not None
    assert session.last_failure.where.startswith("dis: ")  # the first optimizer it hit, by its name


def test_an_updater_that_bypasses_the_optimizers_is_told_in_one_line(tmp_path):
    model = L.Linear(3, 2)
    opt = chainer.optimizers.SGD()
    opt.setup(model)
    it = chainer.iterators.SerialIterator(np.ones((4, 3), np.float32), 2)
    trainer = training.Trainer(Bypassing(it, opt), (2, "iteration"), out=str(tmp_path))
    ext.install(trainer, {"tensorboard": {"logdir": False}})
    with pytest.warns(UserWarning, match="updated no optimizer through optimizer.update") as record:
        trainer.run()
    messages = [str(w.message) for w in record if "optimizer.update" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
