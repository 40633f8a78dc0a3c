"""What the stages' Chainer Trainers share: the device, tqdm progress, global-RNG snapshotting, weight saving.

Moved out of ``train_vae`` (issue 21): V's, M's and C's stages all use these helpers.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import chainer
import numpy as np
from chainer import training
from tqdm import tqdm

import extensions as ext

from ..base import gpu_compat
from ..base.storage import atomic_write_bytes
from .distributed import RankStates, World

SNAPSHOT_NAME = "snapshot_iter_{.updater.iteration}"


def resolve_device(index: int) -> chainer.backend.Device:
    """-1 -> CPU, N -> CUDA device N through the CuPy shims (UserError when CuPy or the GPU is missing)."""
    return gpu_compat.use_device(index)


class TqdmProgress(training.Extension):
    """A tqdm bar (stderr) over the iterations, with the latest reported ``loss``."""

    trigger = (1, "iteration")
    priority = training.PRIORITY_READER

    def __init__(self, total: int, desc: str, key: str = "main/loss"):
        self.total, self.desc, self.key = total, desc, key
        self._bar = None

    def __call__(self, trainer) -> None:
        if self._bar is None:  # opened at the first call: after a snapshot's autoload, so resumes start mid-bar
            self._bar = tqdm(total=self.total, initial=trainer.updater.iteration, desc=self.desc, unit="it",
                             dynamic_ncols=True, disable=None)
        self._bar.update(trainer.updater.iteration - self._bar.n)
        loss = trainer.observation.get(self.key)
        if loss is not None:
            self._bar.set_postfix(loss=f"{float(chainer.as_array(loss)):.4g}", refresh=False)

    def finalize(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class GlobalRNGState(training.Extension):
    """Saves numpy's global RNG (V's reparameterisation noise) in snapshots, so a resumed run is the same run."""

    trigger = (1, "iteration")
    priority = training.PRIORITY_READER

    def __call__(self, trainer) -> None:
        """Nothing to do per iteration; the state travels through ``serialize``."""

    def serialize(self, serializer) -> None:
        """Write or restore ``np.random``'s MT19937 state."""
        if isinstance(serializer, chainer.serializer.Serializer):
            _, keys, pos, has_gauss, cached = np.random.get_state()
            serializer("keys", keys)
            serializer("pos", int(pos))
            serializer("has_gauss", int(has_gauss))
            serializer("cached", float(cached))
        else:
            try:
                keys = serializer("keys", np.zeros(624, np.uint32))
            except KeyError:  # a snapshot without the RNG state: the global RNG goes on as seeded
                return
            state = ("MT19937", keys, serializer("pos", 0), serializer("has_gauss", 0), serializer("cached", 0.0))
            np.random.set_state(state)


def snapshot_trigger(every: int, total: int) -> Callable[[training.Trainer], bool]:
    """Fire every ``every`` iterations and at the last one, so a finished run can be extended."""
    def fire(trainer) -> bool:
        it = trainer.updater.iteration
        return it % every == 0 or it >= total
    return fire


def save_npz_fast(file, obj) -> None:
    """``save_npz`` without zlib: float weights barely compress, and compressing V's 50 MB costs seconds."""
    chainer.serializers.save_npz(file, obj, compression=False)


def save_weights(path, model: chainer.Link) -> Path:
    """A model's final weights to ``path`` atomically (uncompressed npz, loadable with ``load_npz``)."""
    buf = io.BytesIO()
    save_npz_fast(buf, model)
    return atomic_write_bytes(path, buf.getvalue())


def add_common_extensions(trainer: training.Trainer, *, total: int, snapshot_every: int, desc: str,
                          log_every: int = 10, world: World | None = None) -> None:
    """Auto-resuming snapshots, the log, the global-RNG state and the progress bar.

    In a data-parallel run (``world`` of several processes) every process loads the newest snapshot, rank 0
    alone writes snapshots, the log and the progress bar, and the snapshots keep each process's own state.
    """
    world = world or World()
    trainer.extend(GlobalRNGState(), name="global_rng")
    due = snapshot_trigger(snapshot_every, total)
    if world.size > 1:
        trainer.extend(RankStates(world, due), name="rank_states")
    trainer.extend(ext.snapshot(savefun=save_npz_fast, filename=SNAPSHOT_NAME, autoload=True, n_retains=2),
                   trigger=due if world.writes else (lambda trainer: False), name="snapshot")
    if world.writes:
        trainer.extend(ext.LogReport(trigger=(max(1, min(log_every, total)), "iteration")), name="log")
        trainer.extend(TqdmProgress(total, desc), name="progress")
