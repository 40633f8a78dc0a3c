"""Run by tests/test_mpi.py under ``mpiexec -n N`` (or alone): one scenario per sub-command, results as JSON.

nan POLICY OUT        the toolkit alone: a NaN born in rank 1's forward at its third batch under a multi-node optimizer
vae CONFIG [KILL]     ``wm-trainer train-vae`` with V's noise taken out (z = mu), so runs can be compared; alone,
                      the batch is the two shards' batches laid side by side, as two processes would see it;
                      KILL=K: rank 1 is killed (SIGKILL) after iteration K
"""
from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np


def nan_run(policy: str, out: str) -> None:
    """Six iterations of a small net; rank 1's third batch carries a marker that makes its forward NaN."""
    # isort: off
    import extensions as ext  # first: it lets Chainer 7.8.1 import on NumPy 2
    # isort: on
    import chainer
    import chainer.functions as F
    import chainer.links as L
    import chainermn

    comm = chainermn.create_communicator("naive")
    rank = comm.rank

    class Net(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1 = L.Linear(4, 8)
                self.l2 = L.Linear(8, 1)

        def forward(self, x, t):
            h = self.l1(x)
            if float(x[0, 0]) == 777.0:  # the planted batch: a NaN born in Log, in this process only
                h = F.log(-h * h - 1.0)
            return F.mean_squared_error(self.l2(F.relu(h)), t)

    np.random.seed(0)
    model = Net()
    optimizer = chainermn.create_multi_node_optimizer(chainer.optimizers.Adam(), comm)
    optimizer.setup(model)
    ext.start_multi_node(optimizer)
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(48, 4)).astype(np.float32)
    if rank == 1:
        x[16, 0] = 777.0  # first row of the third batch of 8
    data = list(zip(x, rng.normal(size=(48, 1)).astype(np.float32)))
    it = chainer.iterators.SerialIterator(data, 8, shuffle=False)
    debug = ext.DebugConfig.from_dict({"nonfinite": {"policy": policy}, "tensorboard": {"logdir": False}})
    updater = ext.GradientLoggingUpdater(it, optimizer, device=-1, debug=debug)
    trainer = chainer.training.Trainer(updater, (6, "iteration"), out=out)
    ext.install(trainer, debug)
    raised = None
    try:
        trainer.run(show_loop_exception_msg=False)
    except ext.NonFiniteError as e:
        raised = {"iteration": e.iteration, "message": str(e)}
    weights = np.concatenate([p.array.ravel() for _, p in sorted(model.namedparams())])
    every = comm.gather_obj({"rank": rank, "weights": weights.tolist(), "skipped": updater.skipped,
                             "t": int(optimizer.t), "iteration": updater.iteration, "raised": raised})
    if rank == 0:
        print("RESULT " + json.dumps(every))


def vae_run(config: str, kill: int | None) -> None:
    """``wm-trainer train-vae -c CONFIG``, deterministic (z = mu); rank 1 killed after iteration ``kill``."""
    from wm_trainer import cli, train_vae
    from wm_trainer.data import frames
    from wm_trainer.models.vision import ConvVAE
    from wm_trainer.training import distributed, trainer

    ConvVAE.sample_z = lambda self, mu, logvar: mu
    if distributed.launched_processes() == 1:
        base = frames.FrameLoader

        class TwoShards(base):
            """One process serving what two would: shard 0's half batch, then shard 1's."""

            def __init__(self, folder, batch_size, **kwargs):
                kwargs.pop("shard", None)
                self.halves = [base(folder, batch_size // 2, shard=(r, 2), **kwargs) for r in (0, 1)]
                super().__init__(folder, batch_size, **kwargs)

            def __next__(self):
                return np.concatenate([next(h) for h in self.halves])

            next = __next__

            def finalize(self):
                for h in getattr(self, "halves", ()):
                    h.finalize()
                super().finalize()

        train_vae.frames.FrameLoader = TwoShards
    if kill is not None:
        common = trainer.add_common_extensions

        def with_kill(tr, **kwargs):
            common(tr, **kwargs)

            def maybe_kill(t):
                if distributed.current().rank == 1 and t.updater.iteration == kill:
                    os.kill(os.getpid(), signal.SIGKILL)
            tr.extend(maybe_kill, trigger=(1, "iteration"), name="kill", priority=-1000)
        train_vae.add_common_extensions = with_kill
    sys.exit(cli.main(["train-vae", "-c", config]))


if __name__ == "__main__":
    if sys.argv[1] == "nan":
        nan_run(sys.argv[2], sys.argv[3])
    else:
        vae_run(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
