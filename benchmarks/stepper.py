"""Run a chainer Trainer a few iterations at a time, as ``Trainer.run`` would, so two can be timed alternately."""
from __future__ import annotations

import chainer
from chainer import training
from chainer.training.trainer import _get_time


class TrainerStepper:
    """Drives ``trainer``'s loop body (update + triggered extensions) for ``n`` iterations per call."""

    def __init__(self, trainer: training.Trainer):
        self.trainer = trainer
        # what Trainer.run sets before its loop (LogReport reads elapsed_time)
        trainer._start_at = _get_time()
        trainer._snapshot_elapsed_time = 0.0
        ordered = sorted(trainer._extensions.items(), key=lambda kv: kv[1].priority, reverse=True)
        self.entries = [entry for _, entry in ordered]
        for entry in self.entries:
            init = getattr(entry.extension, "initialize", None)
            if init is not None:
                init(trainer)

    def run(self, n: int) -> None:
        """``n`` training iterations with the trainer's reporter and extensions."""
        tr = self.trainer
        for _ in range(n):
            tr.observation = {}
            with tr.reporter.scope(tr.observation):
                tr.updater.update()
                for entry in self.entries:
                    if entry.trigger(tr):
                        entry.extension(tr)

    def close(self) -> None:
        """Finalize extensions and the updater (closes TensorBoard writers)."""
        for entry in self.entries:
            fin = getattr(entry.extension, "finalize", None)
            if fin is not None:
                fin()
        self.trainer.updater.finalize()


def make_trainer(updater: chainer.training.Updater, out: str) -> training.Trainer:
    """A Trainer with a LogReport, as every side of a toolkit comparison has.

    Both sides get ``extensions.LogReport`` (Chainer's, appending each entry instead of rewriting the whole
    log; ``install`` gives it to the toolkit's side anyway): with Chainer's, the toolkit's side would pay a
    whole-log rewrite that grows with the benchmark's length, and the ratio would depend on that length.
    ``bench_toolkit`` measures that rewrite on its own.
    """
    import os

    import extensions as ext

    os.makedirs(out, exist_ok=True)
    trainer = training.Trainer(updater, (10 ** 9, "iteration"), out=out)
    trainer.extend(ext.LogReport(trigger=(100, "iteration")))
    return trainer
