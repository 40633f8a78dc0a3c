"""TensorBoard through tensorboardX: reporter scalars, NaN-safe histograms, image grids.

``TensorBoardReport`` writes every scalar of the trainer's observation as it stands at the
iteration (no averaging, so spikes stay visible), all of one iteration in a single event,
serialised here and written to tensorboardX's event file in batches. ``add_histogram_safe``
(``add_histograms_safe`` for many tags in one event) histograms the finite values only, in
tensorboardX's default buckets, and writes the NaN/Inf counts as scalars beside
(``<tag>/nan_count``, ``<tag>/inf_count``), since tensorboardX's ``add_histogram`` fails on
NaN. ``open_writer`` serves code that has no Trainer (e.g. CMA-ES) with the same writer class.
"""
from __future__ import annotations

import functools
import math
import os
import struct
import time
from typing import TYPE_CHECKING, Any

import chainer
import numpy as np
from chainer import training

from . import chainer_compat as compat
from . import kernels

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.summary_pb2 import HistogramProto, Summary


@functools.cache
def _tbx():
    """tensorboardX's module, imported on first use: it imports torch when torch is installed (~0.7 s)."""
    import tensorboardX.proto.summary_pb2
    import tensorboardX.record_writer

    return tensorboardX


@functools.cache
def _pb():
    """tensorboardX's ``summary_pb2`` (Summary, HistogramProto), imported on first use."""
    return _tbx().proto.summary_pb2

EXTENSION_NAME = "ext_tensorboard"


def open_writer(logdir: str | os.PathLike) -> SummaryWriter:
    """A tensorboardX SummaryWriter on ``logdir`` (created if needed)."""
    logdir = os.fspath(logdir)
    os.makedirs(logdir, exist_ok=True)
    return _tbx().SummaryWriter(logdir=logdir, flush_secs=10)


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
    summary = _pb().Summary()
    add = summary.value.add
    for tag, value in values.items():
        if type(value) is not float:  # the common case (the toolkit's own statistics) skips the checks
            value = _scalar(value)
            if value is None:
                continue
        add(tag=tag, simple_value=value)
    return summary


# Scalar events are serialised here rather than through protobuf objects: an iteration's ~50
# scalars cost ~5 us instead of ~60 us (Summary building, then tensorboardX pickling each Event
# through a multiprocessing queue to its writer thread). The bytes are exactly protobuf's
# encoding of Event{wall_time, step, summary: Summary{value: [{tag, simple_value}]}}.
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_VALUE_PREFIX: dict[str, bytes] = {}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _value_prefix(tag: str) -> bytes:
    """Encoded ``Summary.value`` entry for ``tag`` up to its 4-byte float: field 1 {tag: 1, simple_value: 2}."""
    prefix = _VALUE_PREFIX.get(tag)
    if prefix is None:
        if len(_VALUE_PREFIX) > 100_000:
            _VALUE_PREFIX.clear()
        name = tag.encode("utf-8")
        inner = b"\x0a" + _varint(len(name)) + name + b"\x15"
        prefix = _VALUE_PREFIX[tag] = b"\x0a" + _varint(len(inner) + 4) + inner
    return prefix


def encode_scalars(values: dict[str, Any]) -> bytes:
    """The serialised ``scalar_summary(values)``: every scalar of ``values`` as float32 (others left out)."""
    parts = []
    for tag, value in values.items():
        if type(value) is not float:  # the common case (the toolkit's own statistics) skips the checks
            value = _scalar(value)
            if value is None:
                continue
        if abs(value) > _FLOAT32_MAX:  # protobuf rounds these to +-inf; struct refuses them
            value = math.copysign(math.inf, value)
        parts.append(_value_prefix(tag))
        parts.append(_F32.pack(value))
    return b"".join(parts)


_ROW_LAYOUTS: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}


def _row_layout(tags: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(the encoded summary of ``tags`` with zeros for values, as bytes; the byte index of each value's 4 bytes)."""
    layout = _ROW_LAYOUTS.get(tags)
    if layout is None:
        if len(_ROW_LAYOUTS) > 64:
            _ROW_LAYOUTS.clear()
        template, places, at = bytearray(), [], 0
        for tag in tags:
            prefix = _value_prefix(tag)
            template += prefix + bytes(4)
            at += len(prefix)
            places.append(at)
            at += 4
        index = (np.array(places, dtype=np.intp)[:, None] + np.arange(4)).ravel()
        layout = _ROW_LAYOUTS[tags] = (np.frombuffer(bytes(template), dtype=np.uint8), index)
    return layout


def encode_rows(tags: tuple[str, ...], rows: np.ndarray) -> list[bytes]:
    """``[encode_scalars(dict(zip(tags, row))) for row in rows]`` for a 2-D float array, in a few NumPy calls:
    the summaries differ only in their 4-byte floats, written into copies of one template."""
    template, index = _row_layout(tags)
    n = len(rows)
    buf = np.empty((n, template.size), dtype=np.uint8)
    buf[:] = template
    rows = np.asarray(rows, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # beyond float32 (even within rounding of its largest): +-inf, as protobuf
        rows = np.where(np.abs(rows) > _FLOAT32_MAX, np.copysign(np.inf, rows), rows)
    floats = rows.astype("<f4")
    buf[:, index] = floats.view(np.uint8).reshape(n, -1)
    raw, size = buf.tobytes(), template.size
    return [raw[i * size:(i + 1) * size] for i in range(n)]


def encode_event(summary: bytes, step: int, walltime: float) -> bytes:
    """A serialised ``Event(wall_time=walltime, step=step, summary=<summary bytes>)``."""
    # proto3 leaves out fields holding zero
    time_field = b"\x09" + _F64.pack(walltime) if walltime else b""
    step_field = b"\x10" + _varint(int(step)) if step else b""
    return time_field + step_field + b"\x2a" + _varint(len(summary)) + summary


def tf_records(payloads: list[bytes]) -> bytes:
    """TFRecord framing of each payload (length, its masked CRC-32C, the payload, its masked CRC-32C), joined:
    the bytes tensorboardX's ``RecordWriter.write`` writes for each, in one piece."""
    parts, crc = [], _tbx().record_writer.masked_crc32c
    for data in payloads:
        header = _U64.pack(len(data))
        parts += (header, _U32.pack(crc(header)), data, _U32.pack(crc(data)))
    return b"".join(parts)


def write_encoded(writer: SummaryWriter, events: list[tuple[bytes, int, float]]) -> None:
    """Write (serialised summary, step, walltime) events into ``writer``'s event file, in order, in one write."""
    if not events:
        return
    ev = compat.events_writer(writer)
    if ev is None:  # another tensorboardX layout: through its public API
        file_writer = compat.file_writer(writer)
        for summary, step, walltime in events:
            file_writer.add_summary(_pb().Summary.FromString(summary), step, walltime)
        return
    data = tf_records([encode_event(summary, step, walltime) for summary, step, walltime in events])
    compat.write_records(ev, data, len(events))


def _tensorflow_bins() -> np.ndarray:
    """The bucket edges of tensorboardX's default ``bins='tensorflow'``: 0 and +-1e-12 * 1.1**k up to 1e20."""
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    return np.array([-x for x in reversed(pos)] + [0.0] + pos)


_DEFAULT_BINS = _tensorflow_bins()


def _histogram_proto(values: np.ndarray) -> HistogramProto:
    """tensorboardX's histogram of finite 1-D ``values`` (same buckets, trimmed to the support), built directly.

    Values stay in their own dtype (no float64 copy of a big array) and the bucket edges are
    one cached array; values beyond the default buckets (|v| >= 1e20) get 30 uniform ones.
    """
    lo, hi = float(values.min()), float(values.max())
    bins = _DEFAULT_BINS if _DEFAULT_BINS[0] <= lo and hi <= _DEFAULT_BINS[-1] else 30
    counts, limits = np.histogram(values, bins=bins)
    sq = float(np.dot(values, values))
    if not math.isfinite(sq):
        sq = float(np.square(values, dtype=np.float64).sum())
    return _bucket_proto(counts, limits, lo, hi, values.size, float(values.sum(dtype=np.float64)), sq)


def _bucket_proto(counts: np.ndarray, limits: np.ndarray, lo: float, hi: float, num: int, total: float,
                  sq: float) -> HistogramProto:
    """A HistogramProto of bucket ``counts`` between ``limits``, trimmed to the support."""
    nonzero = np.flatnonzero(counts)
    start, end = int(nonzero[0]), int(nonzero[-1]) + 1
    # TensorBoard reads right bucket limits only: keep the empty bucket left of the support
    counts = counts[start - 1:end] if start > 0 else np.concatenate([[0], counts[:end]])
    limits = limits[start:end + 1]
    # a run of empty buckets becomes its last one, as TensorFlow's own encoder writes them: the same
    # histogram in far fewer buckets (the tensorflow bins are 10 % wide, most of them empty)
    keep = counts != 0
    keep[:-1] |= keep[1:]
    counts, limits = counts[keep], limits[keep]
    return _pb().HistogramProto(min=lo, max=hi, num=num, sum=total, sum_squares=sq,
                                bucket_limit=limits.tolist(), bucket=counts.tolist())


_SMALL_HISTOGRAM = 1 << 14  # elements: below this, one compiled pass over many arrays beats np.histogram each


def _count_values(tag: str, nan: int, inf: int) -> list[Any]:
    return [_pb().Summary.Value(tag=f"{tag}/nan_count", simple_value=float(nan)),
            _pb().Summary.Value(tag=f"{tag}/inf_count", simple_value=float(inf))]


def _host_histograms(arrays: dict[str, Any]) -> dict[str, tuple[list[Any], dict[str, int]]]:
    """``histogram_values`` of the small host float arrays among ``arrays``, from one compiled pass over all of
    them (empty without the compiled loops), where per-array NumPy calls cost more than the counting; an array
    with finite values beyond the default buckets is left out. Big arrays are left to ``np.histogram``, whose
    sorted search is faster per value than a bucket search per value."""
    host = {tag: a.ravel() for tag, a in arrays.items()
            if type(a) is np.ndarray and a.dtype.kind == "f" and 0 < a.size < _SMALL_HISTOGRAM}
    if not host or not kernels.available():
        return {}
    sizes = [a.size for a in host.values()]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    gathered = np.concatenate(list(host.values()), axis=None, out=np.empty(int(offsets[-1])), casting="same_kind")
    table = kernels.histogram_table(gathered, offsets, _DEFAULT_BINS, _DEFAULT_BINS.size // 2, 1e-12, 1.1)
    if table is None:
        return {}
    counts, stats = table
    out = {}
    for s, tag in enumerate(host):
        lo, hi, total, sq, finite, nan, inf, outside = stats[s].tolist()
        if outside:
            continue
        values = []
        if finite:
            histo = _bucket_proto(counts[s], _DEFAULT_BINS, lo, hi, int(finite), total, sq)
            values.append(_pb().Summary.Value(tag=tag, histo=histo))
        out[tag] = (values + _count_values(tag, int(nan), int(inf)), {"nan": int(nan), "inf": int(inf)})
    return out


def histogram_values(tag: str, array: Any) -> tuple[list[Any], dict[str, int]]:
    """Summary values for ``array``: the histogram of its finite values (if any) and ``<tag>/nan_count``,
    ``<tag>/inf_count``; plus the counts as ``{"nan": n, "inf": m}``."""
    a = _to_host(array).ravel()
    if a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    finite = np.isfinite(a)
    n_finite = int(np.count_nonzero(finite))
    nan = 0 if n_finite == a.size else int(np.count_nonzero(np.isnan(a)))
    counts = {"nan": nan, "inf": a.size - n_finite - nan}
    values = []
    if n_finite:
        values.append(_pb().Summary.Value(tag=tag, histo=_histogram_proto(a if n_finite == a.size else a[finite])))
    return values + _count_values(tag, counts["nan"], counts["inf"]), counts


def add_histograms_safe(writer: SummaryWriter, arrays: dict[str, Any], step: int) -> dict[str, dict[str, int]]:
    """``add_histogram_safe`` for many tags at once, written as one event; returns the counts per tag."""
    summary = _pb().Summary()
    counts = {}
    done = _host_histograms(arrays)
    for tag, array in arrays.items():
        values, counts[tag] = done[tag] if tag in done else histogram_values(tag, array)
        summary.value.extend(values)
    if summary.value:
        compat.file_writer(writer).add_summary(summary, step)
    return counts


def add_histogram_safe(writer: SummaryWriter, tag: str, array: Any, step: int) -> dict[str, int]:
    """Histogram of the finite values of ``array``; NaN/Inf counts go to ``<tag>/nan_count`` and ``<tag>/inf_count``.

    Returns the counts as ``{"nan": n, "inf": m}``.
    """
    return add_histograms_safe(writer, {tag: array}, step)[tag]


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


def _always(trainer: training.Trainer) -> bool:
    return True


class TensorBoardReport(training.Extension):
    """Writes each iteration's reporter scalars to TensorBoard; closes the writer when training ends.

    Events are handed to the writer in batches of ``batch`` iterations (and on error, on
    ``flush()`` and at the end): one wake-up of tensorboardX's writer thread per batch instead
    of one per iteration. Each event keeps its own step and wall time. Values staged as rows
    under the same tags (the updater's gradient statistics) are encoded together at the flush.
    """

    trigger = staticmethod(_always)  # every iteration, without IntervalTrigger's epoch arithmetic
    priority = training.PRIORITY_READER
    default_name = EXTENSION_NAME

    def __init__(self, writer: SummaryWriter, batch: int = 50):
        self.writer = writer
        self.batch = max(1, int(batch))
        # (observation summary, step, walltime, tags of a staged row or None, the row)
        self._pending: list[tuple[bytes, int, float, tuple[str, ...] | None, Any]] = []
        self._staged: tuple[int, Any] | None = None

    def stage(self, values: dict[str, Any] | tuple[tuple[str, ...], Any], iteration: int) -> None:
        """Scalars to write with ``iteration``'s observation without putting them in the reporter (the
        updater's gradient statistics on iterations no LogReport writes): a dict, or (tags, floats) with
        the floats as a list or a 1-D array (kept, not copied, until the flush)."""
        staged = self._staged
        if staged is not None and staged[0] == iteration:  # several optimizers' statistics in one iteration
            values = {**_as_dict(staged[1]), **_as_dict(values)}
        self._staged = (iteration, values)

    def __call__(self, trainer: training.Trainer) -> None:
        iteration = trainer.updater.iteration
        summary = encode_scalars(trainer.observation)
        staged, self._staged = self._staged, None
        tags = row = None
        if staged is not None and staged[0] == iteration:
            values = staged[1]
            if isinstance(values, dict):
                summary += encode_scalars(values)
            else:
                tags, row = values
        if summary or tags:
            self._pending.append((summary, iteration, time.time(), tags, row))
            if len(self._pending) >= self.batch:
                self.flush()

    def flush(self) -> None:
        """Hand every pending event to the writer."""
        pending, self._pending = self._pending, []
        rows: dict[tuple[str, ...], list[Any]] = {}
        for _, _, _, tags, row in pending:
            if tags is not None:
                rows.setdefault(tags, []).append(row)
        encoded = {tags: iter(encode_rows(tags, np.array(block, dtype=np.float64))) for tags, block in rows.items()}
        write_encoded(self.writer, [(summary + next(encoded[tags]) if tags is not None else summary, step, walltime)
                                    for summary, step, walltime, tags, _ in pending])

    def on_error(self, trainer: training.Trainer, exc: BaseException, tb: Any) -> None:
        self.flush()
        self.writer.flush()

    def finalize(self) -> None:
        self.flush()
        self.writer.close()


def _as_dict(values: dict[str, Any] | tuple[tuple[str, ...], Any]) -> dict[str, Any]:
    if isinstance(values, dict):
        return values
    tags, row = values
    return dict(zip(tags, [float(v) for v in row]))


def get_writer(trainer: training.Trainer) -> SummaryWriter | None:
    """The SummaryWriter ``install`` created for ``trainer`` (None if TensorBoard is off or not installed)."""
    try:
        ext = trainer.get_extension(EXTENSION_NAME)
    except ValueError:
        return None
    return getattr(ext, "writer", None)
