"""The frame loader: every frame once per epoch, shuffled, resumable, within its memory budget."""
from __future__ import annotations

import collections
import tracemalloc

import chainer
import numpy as np
import pytest

from wm_trainer.base.errors import UserError
from wm_trainer.data.episodes import episode_path, save_episode
from wm_trainer.data.frames import FrameLoader, count_frames

FRAME_MB = 64 * 64 * 3 / 2**20
THREAD_MB = 0.25  # what the loader counts for its reader thread


def _store(folder, lengths, compress_every: int = 0) -> int:
    """Episodes whose frames carry their identity: pixel (0,0) = episode, pixel (0,1) = time step."""
    rng = np.random.default_rng(0)
    for i, t in enumerate(lengths):
        frames = rng.integers(0, 256, (t, 64, 64, 3), dtype=np.uint8)
        frames[:, 0, 0, :] = i
        frames[:, 0, 1, 0] = np.arange(t) % 256
        frames[:, 0, 1, 1] = np.arange(t) // 256
        arrays = dict(frames=frames, actions=np.zeros((t, 1), np.float32), rewards=np.ones(t, np.float32),
                      dones=np.arange(t) == t - 1, seed=np.int64(i))
        path = episode_path(folder, i)
        if compress_every and i % compress_every == 0:
            np.savez_compressed(path, **arrays)
        else:
            save_episode(path, **arrays)
    return sum(lengths)


def _ids(batch: np.ndarray) -> list[tuple[int, int]]:
    return [(int(f[0, 0, 0]), int(f[0, 1, 0]) + 256 * int(f[0, 1, 1])) for f in batch]


LENGTHS = [17, 40, 5, 33, 21, 9, 60, 12, 28, 3, 44, 19]


def test_one_epoch_serves_every_frame_once_shuffled(tmp_path):
    n = _store(tmp_path, LENGTHS, compress_every=5)  # a few compressed files take the slow path
    assert count_frames(tmp_path) == n
    # two chunks of 50 frames, their orders and two batches of 32
    loader = FrameLoader(tmp_path, 32, memory_mb=164 * FRAME_MB + THREAD_MB + 0.001, seed=1, repeat=False)
    assert loader.chunk_frames == 50 and loader.n_frames == n
    batches = []
    for batch in loader:
        assert batch.dtype == np.uint8 and batch.shape[1:] == (64, 64, 3)
        batches.append(batch)
    loader.finalize()
    seen = [i for b in batches for i in _ids(b)]
    assert sorted(seen) == sorted((e, t) for e, n_t in enumerate(LENGTHS) for t in range(n_t))
    assert [len(b) for b in batches] == [32] * (n // 32) + [n % 32]
    assert loader.epoch == 1 and loader.is_new_epoch
    # shuffled: not episode order, and a single batch mixes several episodes
    assert seen != sorted(seen)
    assert len({e for e, _ in _ids(batches[0])}) >= 2
    with pytest.raises(StopIteration):
        next(loader)


def test_unshuffled_order_is_the_store_order(tmp_path):
    n = _store(tmp_path, LENGTHS[:4])
    budget = (30 + 2 * 10) * FRAME_MB + THREAD_MB + 0.001
    loader = FrameLoader(tmp_path, 10, memory_mb=budget, shuffle=False, repeat=False)
    seen = [i for b in loader for i in _ids(b)]
    assert seen == [(e, t) for e, n_t in enumerate(LENGTHS[:4]) for t in range(n_t)] and len(seen) == n


def test_repeat_crosses_epochs_like_serial_iterator(tmp_path):
    n = _store(tmp_path, LENGTHS)
    loader = FrameLoader(tmp_path, 25, memory_mb=(80 + 2 * 25) * FRAME_MB + THREAD_MB + 0.001, seed=3)
    counts: collections.Counter = collections.Counter()
    epochs, orders = [], {0: [], 1: []}
    assert loader.previous_epoch_detail is None
    for _ in range(2 * n // 25):
        before = loader.epoch
        batch = next(loader)
        ids = _ids(batch)
        counts.update(ids)
        if loader.is_new_epoch:
            epochs.append(loader.epoch)
            assert loader.epoch == before + 1
        assert loader.epoch_detail == pytest.approx(loader.epoch + loader.current_position / n)
        assert loader.previous_epoch_detail < loader.epoch_detail
        orders.setdefault(before, []).extend(ids)
    assert epochs == [1, 2] or epochs == [1]
    assert loader.epoch_detail == pytest.approx(2 * n // 25 * 25 / n)
    # a frame is served at most twice in two epochs and each epoch has its own order
    assert max(counts.values()) <= 2 and len(counts) == n
    assert orders[0][:50] != orders[1][:50]
    loader.finalize()


def test_serialize_resume_continues_the_same_stream(tmp_path):
    _store(tmp_path, LENGTHS)
    budget = (60 + 2 * 16) * FRAME_MB + THREAD_MB + 0.001  # chunks of 30 frames beside two batches
    original = FrameLoader(tmp_path, 16, memory_mb=budget, seed=5)
    for _ in range(11):  # mid-epoch (291 frames), mid-chunk (60 frames)
        next(original)
    snapshot = tmp_path / "iter.npz"
    chainer.serializers.save_npz(snapshot, original)
    expected = [next(original) for _ in range(30)]  # runs into epochs 1 and 2
    resumed = FrameLoader(tmp_path, 16, memory_mb=budget, seed=5)
    chainer.serializers.load_npz(snapshot, resumed)
    assert resumed.epoch == 0 and resumed.current_position == 11 * 16
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)
    assert resumed.epoch == original.epoch and resumed.epoch_detail == original.epoch_detail
    resumed.reset()
    fresh = FrameLoader(tmp_path, 16, memory_mb=budget, seed=5)
    np.testing.assert_array_equal(next(resumed), next(fresh))
    for it in (original, resumed, fresh):
        it.finalize()


def test_memory_stays_within_budget_smaller_than_the_store(tmp_path):
    lengths = [50] * 40  # 2000 frames = 23.4 MB on disk
    n = _store(tmp_path, lengths)
    budget_mb = 2.0
    assert n * FRAME_MB > 10 * budget_mb
    tracemalloc.start()
    try:
        loader = FrameLoader(tmp_path, 20, memory_mb=budget_mb, seed=0, repeat=False)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        served = 0
        for batch in loader:
            served += len(batch)
            del batch
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    loader.finalize()
    assert served == n
    assert loader.chunk_frames * 2 * 64 * 64 * 3 <= budget_mb * 2**20
    assert peak < budget_mb * 2**20 + 256 * 1024, peak / 2**20  # batches included in the budget


def test_corrupt_episodes_are_skipped_with_a_warning(tmp_path):
    _store(tmp_path, [10, 20, 30, 40])
    truncated = episode_path(tmp_path, 1)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    episode_path(tmp_path, 2).write_bytes(b"not a zip file at all")
    with pytest.warns(RuntimeWarning) as record:
        assert count_frames(tmp_path) == 50
        loader = FrameLoader(tmp_path, 8, memory_mb=1, repeat=False)
    named = [str(w.message) for w in record]
    assert sum("ep_000001.npz" in m for m in named) == 2 and sum("ep_000002.npz" in m for m in named) == 2
    assert loader.n_frames == 50
    episodes = {e for b in loader for e, _ in _ids(b)}
    assert episodes == {0, 3}


def test_budget_too_small_and_empty_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no readable episodes"):
        FrameLoader(tmp_path, 8, memory_mb=1)
    _store(tmp_path, [30, 30])
    with pytest.raises(UserError, match="too small for batches of 16"):
        FrameLoader(tmp_path, 16, memory_mb=10 * FRAME_MB)
