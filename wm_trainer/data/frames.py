"""A shuffled frame loader for V that never holds the whole episode store in memory.

Each epoch is a random order of episodes laid end to end and cut into chunks of at most
half the memory budget. A chunk is read from disk straight into one buffer (the ``frames``
member of an uncompressed npz is read in place), shuffled within itself, and served in
batches while a background thread reads the next chunk into the other half of the budget.
The order is a pure function of (seed, epoch), so ``serialize`` needs only the position.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import chainer
import numpy as np

from ..base.errors import UserError
from .episodes import CorruptEpisode, list_episodes, load_episode, scan_episode, warn_corrupt


@dataclasses.dataclass(frozen=True)
class _Source:
    path: Path
    offset: int | None  # byte offset of the frames data, None if the member is compressed
    length: int


@dataclasses.dataclass
class _Chunk:
    key: tuple[int, int]  # (epoch, chunk index)
    frames: np.ndarray
    order: np.ndarray | None  # within-chunk permutation, None when not shuffling


def _scan_sources(folder: str | os.PathLike) -> tuple[list[_Source], tuple[int, ...] | None]:
    """Readable episodes with their frames' layout; corrupt or odd-shaped files are warned about and skipped."""
    sources, shape = [], None
    for path in list_episodes(folder):
        try:
            member = scan_episode(path, ("frames",))["frames"]
        except CorruptEpisode as e:
            warn_corrupt(e)
            continue
        if member.dtype != np.uint8 or len(member.shape) != 4:
            warn_corrupt(CorruptEpisode(path, f"frames are {member.dtype} {member.shape}, expected uint8 (T,H,W,C)"))
            continue
        if shape is None:
            shape = member.shape[1:]
        elif member.shape[1:] != shape:
            warn_corrupt(CorruptEpisode(path, f"frames of shape {member.shape[1:]} differ from {shape}"))
            continue
        if member.shape[0] > 0:
            sources.append(_Source(path, member.offset, member.shape[0]))
    return sources, shape


def count_frames(folder: str | os.PathLike) -> int:
    """Frames in the readable episodes of ``folder`` (reads only file headers)."""
    return sum(s.length for s in _scan_sources(folder)[0])


_THREAD_BYTES = 256 * 1024  # the reader thread's stack and objects, counted in the budget


class FrameLoader(chainer.dataset.Iterator):
    """Batches of uint8 frames (B, 64, 64, 3) from an episode folder, shuffled, within ``memory_mb``."""

    def __init__(self, folder: str | os.PathLike, batch_size: int, *, memory_mb: float, seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, shard: tuple[int, int] = (0, 1)):
        self._threads: cf.ThreadPoolExecutor | None = None
        self._buffers: list[np.ndarray | None] = [None, None]
        self._current: _Chunk | None = None
        self._next: tuple[tuple[int, int], cf.Future] | None = None
        self.folder = Path(folder)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.repeat = repeat
        sources, shape = _scan_sources(self.folder)
        # the frames of every shard: what a snapshot records, the same on every process of a data-parallel run
        self.total_frames = sum(s.length for s in sources)
        self.shard = (int(shard[0]), int(shard[1]))
        self._sources = sources[self.shard[0]::self.shard[1]]  # process r of n reads episodes r, r + n, ...
        if not self._sources:
            raise UserError(f"no readable episodes with frames in {self.folder}" + (
                f" for process {self.shard[0]} of {self.shard[1]} (each reads every {self.shard[1]}th episode; "
                f"there are {len(sources)})" if self.shard[1] > 1 else ""))
        self.frame_shape: tuple[int, ...] = tuple(shape)
        self._lengths = np.array([s.length for s in self._sources], dtype=np.int64)
        self.n_frames = int(self._lengths.sum())
        frame_bytes = int(np.prod(self.frame_shape))
        self.memory_bytes = int(memory_mb * 2**20)
        # the budget holds two chunks (one served, one read ahead), their shuffled orders (8 bytes a
        # frame), two batches (the one the caller holds while the next is filled) and the reader thread
        batches = 2 * self.batch_size * frame_bytes + _THREAD_BYTES
        self.chunk_frames = min(max(self.memory_bytes - batches, 0) // (2 * (frame_bytes + 8)), self.n_frames)
        if self.chunk_frames < min(self.batch_size, self.n_frames):
            need = (batches + 2 * self.batch_size * (frame_bytes + 8)) / 2**20
            raise UserError(f"frame loader memory budget {memory_mb} MB is too small for batches of "
                            f"{self.batch_size} frames (needs at least {need:.1f} MB)")
        self._threads = cf.ThreadPoolExecutor(1, thread_name_prefix="frame-loader")
        self.reset()

    # ---- the order of an epoch -------------------------------------------------------------
    def _episode_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._sources))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._sources))

    @property
    def chunks_per_epoch(self) -> int:
        """Chunks each epoch is read in."""
        return -(-self.n_frames // self.chunk_frames)

    def _load_chunk(self, epoch: int, k: int) -> _Chunk:
        """Read chunk ``k`` of ``epoch`` from disk into one buffer."""
        order = self._episode_order(epoch)
        starts = np.concatenate([[0], np.cumsum(self._lengths[order])])
        a, b = k * self.chunk_frames, min((k + 1) * self.chunk_frames, self.n_frames)
        # two buffers, used alternately: chunk n is read into buffer n % 2 while buffer (n - 1) % 2 is
        # served, so memory stays at two chunks however the allocator behaves
        slot = (epoch * self.chunks_per_epoch + k) % 2
        if self._buffers[slot] is None:
            self._buffers[slot] = np.empty((self.chunk_frames, *self.frame_shape), dtype=np.uint8)
        buf = self._buffers[slot][:b - a]
        first = int(np.searchsorted(starts, a, side="right")) - 1
        j = first
        while j < len(order) and starts[j] < b:
            src = self._sources[order[j]]
            lo, hi = max(a - starts[j], 0), min(b - starts[j], src.length)
            self._read(src, int(lo), int(hi), buf[starts[j] + lo - a: starts[j] + hi - a])
            j += 1
        perm = np.random.default_rng([self.seed, epoch, k]).permutation(b - a) if self.shuffle else None
        return _Chunk((epoch, k), buf, perm)

    @staticmethod
    def _read(src: _Source, lo: int, hi: int, out: np.ndarray) -> None:
        if src.offset is None:
            out[...] = load_episode(src.path, ("frames",))["frames"][lo:hi]
            return
        view = memoryview(out.reshape(-1))
        with open(src.path, "rb") as f:
            f.seek(src.offset + lo * out[0].nbytes)
            got = f.readinto(view)
        if got != out.nbytes:
            raise CorruptEpisode(src.path, f"frames truncated (read {got} of {out.nbytes} bytes)")

    def _chunk(self, epoch: int, k: int) -> _Chunk:
        """The chunk to serve from; the next one is read in the background, at most two in memory."""
        if self._current is not None and self._current.key == (epoch, k):
            return self._current
        self._current = None
        pending, self._next = self._next, None
        chunk = None
        if pending is not None:
            result = pending[1].result()
            chunk = result if pending[0] == (epoch, k) else None
            del result
        if chunk is None:
            chunk = self._load_chunk(epoch, k)
        self._current = chunk
        if k + 1 < self.chunks_per_epoch:
            nxt = (epoch, k + 1)
        elif self.repeat:
            nxt = (epoch + 1, 0)
        else:
            return chunk
        self._next = (nxt, self._threads.submit(self._load_chunk, *nxt))
        return chunk

    # ---- chainer.dataset.Iterator ----------------------------------------------------------
    def __next__(self) -> np.ndarray:
        if not self.repeat and self.epoch > 0:
            raise StopIteration
        self._previous_epoch_detail = self.epoch_detail
        out = np.empty((self.batch_size, *self.frame_shape), dtype=np.uint8)
        filled = 0
        self.is_new_epoch = False
        while filled < self.batch_size:
            k, off = divmod(self._pos, self.chunk_frames)
            chunk = self._chunk(self.epoch, k)
            take = min(self.batch_size - filled, len(chunk.frames) - off)
            if chunk.order is None:
                out[filled:filled + take] = chunk.frames[off:off + take]
            else:
                np.take(chunk.frames, chunk.order[off:off + take], axis=0, out=out[filled:filled + take])
            filled += take
            self._pos += take
            chunk = None  # let the next _chunk() call free this one before it prefetches (budget = 2 chunks)
            if self._pos >= self.n_frames:
                self.epoch += 1
                self._pos = 0
                self.is_new_epoch = True
                if not self.repeat:
                    return out[:filled]
        return out

    next = __next__

    @property
    def epoch_detail(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.epoch + self._pos / self.n_frames

    @property
    def previous_epoch_detail(self) -> float | None:
        """``epoch_detail`` before the last batch (None before the first)."""
        return None if self._previous_epoch_detail < 0 else self._previous_epoch_detail

    @property
    def current_position(self) -> int:
        """Frames served so far in the current epoch."""
        return self._pos

    def serialize(self, serializer: Any) -> None:
        """Save or restore the position; the order itself is recomputed from the seed."""
        self.epoch = int(serializer("epoch", self.epoch))
        self._pos = int(serializer("current_position", self._pos))
        self.is_new_epoch = bool(serializer("is_new_epoch", self.is_new_epoch))
        self._previous_epoch_detail = float(serializer("previous_epoch_detail", self._previous_epoch_detail))
        n_frames = int(serializer("n_frames", self.total_frames))
        if n_frames != self.total_frames:
            warnings.warn(f"{self.folder} now holds {self.total_frames} frames, the snapshot was taken with "
                          f"{n_frames}; resuming at the same fraction of the epoch", RuntimeWarning, stacklevel=2)
            self._pos = min(int(round(self._pos * self.total_frames / max(n_frames, 1))), self.n_frames - 1)
        self._pos = min(self._pos, self.n_frames - 1)  # another process's position, until its own is restored

    def reset(self) -> None:
        """Back to the start of epoch 0."""
        self._drop_chunks()
        self.epoch = 0
        self._pos = 0
        self.is_new_epoch = False
        self._previous_epoch_detail = -1.0

    def _drop_chunks(self) -> None:
        self._current = None
        if self._next is not None:
            self._next[1].cancel()
            try:
                self._next[1].result()
            except (cf.CancelledError, Exception):
                pass
            self._next = None

    def finalize(self) -> None:
        """Stop the reader thread and free the buffers."""
        self._drop_chunks()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
