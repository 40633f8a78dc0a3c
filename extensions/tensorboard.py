"""TensorBoard through tensorboardX: reporter scalars, NaN-safe histograms, image grids.

``TensorBoardReport`` writes every scalar of the trainer's observation as it stands at the
iteration (no averaging, so spikes stay visible), all of one iteration in a single event.
``add_histogram_safe`` histograms the finite values only and writes the NaN/Inf counts as
scalars beside (``<tag>/nan_count``, ``<tag>/inf_count``), since tensorboardX's
``add_histogram`` fails on NaN. ``open_writer`` serves code that has no Trainer (e.g.
CMA-ES) with the same writer class.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import chainer
import numpy as np
from chainer import training
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary

EXTENSION_NAME = "ext_tensorboard"


def open_writer(logdir: str | os.PathLike) -> SummaryWriter:
    """A tensorboardX SummaryWriter on ``logdir`` (created if needed)."""
    logdir = os.fspath(logdir)
    os.makedirs(logdir, exist_ok=True)
    return SummaryWriter(logdir=logdir, flush_secs=10)


def _to_host(a: Any) -> np.ndarray:
    a = getattr(a, "array", a)
    return np.asarray(chainer.backend.CpuDevice().send(a))


def _scalar(value: Any) -> float | None:
    value = getattr(value, "array", value)
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    size = getattr(value, "size", None)
    if size == 1 and getattr(value, "dtype", None) is not None and value.dtype.kind in "fiu":
        return float(value.reshape(()))  # one device->host copy for a GPU scalar
    return None


def scalar_summary(values: dict[str, Any]) -> Summary:
    """One Summary protobuf holding every scalar in ``values`` (non-scalars are left out)."""
    summary = Summary()
    add = summary.value.add
    for tag, value in values.items():
        if type(value) is not float:  # the common case (the toolkit's own statistics) skips the checks
            value = _scalar(value)
            if value is None:
                continue
        add(tag=tag, simple_value=value)
    return summary


def write_scalars(writer: SummaryWriter, values: dict[str, Any], step: int) -> int:
    """Write every scalar in ``values`` as one event at ``step``; returns how many were written."""
    summary = scalar_summary(values)
    if summary.value:
        writer._get_file_writer().add_summary(summary, step)
    return len(summary.value)


def add_histogram_safe(writer: SummaryWriter, tag: str, array: Any, step: int) -> dict[str, int]:
    """Histogram of the finite values of ``array``; NaN/Inf counts go to ``<tag>/nan_count`` and ``<tag>/inf_count``.

    Returns the counts as ``{"nan": n, "inf": m}``.
    """
    a = _to_host(array).ravel()
    if a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    finite = np.isfinite(a)
    n_finite = int(finite.sum())
    counts = {"nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum())}
    if n_finite:
        writer.add_histogram(tag, a if n_finite == a.size else a[finite], step)
    write_scalars(writer, {f"{tag}/nan_count": counts["nan"], f"{tag}/inf_count": counts["inf"]}, step)
    return counts


def image_grid(images: Any) -> np.ndarray:
    """Tile N images (NHWC or NHW; uint8, or float in [0, 1]) into one uint8 HWC grid, as square as possible."""
    x = _to_host(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be NHWC or NHW, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = (np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, c = x.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    return grid


def add_image_grid(writer: SummaryWriter, tag: str, images: Any, step: int) -> np.ndarray:
    """Write a batch of images (e.g. VAE inputs over reconstructions) as one grid image; returns the grid."""
    grid = image_grid(images)
    writer.add_image(tag, grid, step, dataformats="HWC")
    return grid


class TensorBoardReport(training.Extension):
    """Writes each iteration's reporter scalars to TensorBoard; closes the writer when training ends.

    Events are handed to the writer in batches of ``batch`` iterations (and on error, on
    ``flush()`` and at the end): one wake-up of tensorboardX's writer thread per batch instead
    of one per iteration. Each event keeps its own step and wall time.
    """

    trigger = 1, "iteration"
    priority = training.PRIORITY_READER
    default_name = EXTENSION_NAME

    def __init__(self, writer: SummaryWriter, batch: int = 50):
        self.writer = writer
        self.batch = max(1, int(batch))
        self._pending: list[tuple[Summary, int, float]] = []

    def __call__(self, trainer: training.Trainer) -> None:
        summary = scalar_summary(trainer.observation)
        if summary.value:
            self._pending.append((summary, trainer.updater.iteration, time.time()))
            if len(self._pending) >= self.batch:
                self.flush()

    def flush(self) -> None:
        """Hand every pending event to the writer."""
        pending, self._pending = self._pending, []
        if pending:
            file_writer = self.writer._get_file_writer()
            for summary, step, walltime in pending:
                file_writer.add_summary(summary, step, walltime)

    def on_error(self, trainer: training.Trainer, exc: BaseException, tb: Any) -> None:
        self.flush()
        self.writer.flush()

    def finalize(self) -> None:
        self.flush()
        self.writer.close()


def get_writer(trainer: training.Trainer) -> SummaryWriter | None:
    """The SummaryWriter ``install`` created for ``trainer`` (None if TensorBoard is off or not installed)."""
    try:
        ext = trainer.get_extension(EXTENSION_NAME)
    except ValueError:
        return None
    return getattr(ext, "writer", None)
