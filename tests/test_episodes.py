"""The episode store: naming, atomic saves, structural checks, corrupt files named and skipped."""
from __future__ import annotations

import numpy as np
import pytest

from wm_trainer.base.errors import UserError
from wm_trainer.data.episodes import (
    EPISODE_KEYS,
    CorruptEpisode,
    episode_index,
    episode_path,
    iter_valid_episodes,
    list_episodes,
    load_episode,
    save_episode,
    scan_episode,
)


def _episode(t: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "frames": rng.integers(0, 256, (t, 64, 64, 3), dtype=np.uint8),
        "actions": rng.uniform(-1, 1, (t, 1)).astype(np.float32),
        "rewards": np.ones(t, np.float32),
        "dones": np.arange(t) == t - 1,
        "seed": np.int64(seed),
    }


def test_save_list_load_roundtrip(tmp_path):
    for i in (2, 0, 11):
        save_episode(episode_path(tmp_path, i), **_episode(5 + i, seed=i))
    (tmp_path / ".ep_000003.npz.abc.tmp").write_bytes(b"half written")  # a killed writer's temp file
    (tmp_path / "notes.txt").write_text("not an episode")
    paths = list_episodes(tmp_path)
    assert [p.name for p in paths] == ["ep_000000.npz", "ep_000002.npz", "ep_000011.npz"]
    assert [episode_index(p) for p in paths] == [0, 2, 11]
    data = load_episode(paths[1])
    ref = _episode(7, seed=2)
    assert set(data) == set(EPISODE_KEYS)
    for k in EPISODE_KEYS:
        np.testing.assert_array_equal(data[k], ref[k])
    assert data["frames"].dtype == np.uint8 and data["dones"].dtype == bool
    only = load_episode(paths[1], keys=("rewards",))
    assert list(only) == ["rewards"]
    assert list_episodes(tmp_path / "missing") == []


def test_scan_gives_in_place_offsets_of_each_member(tmp_path):
    path = save_episode(episode_path(tmp_path, 0), **_episode(9, seed=4))
    members = scan_episode(path, EPISODE_KEYS)
    ref = _episode(9, seed=4)
    raw = path.read_bytes()
    for k in EPISODE_KEYS:
        m = members[k]
        assert m.shape == ref[k].shape and m.dtype == ref[k].dtype
        got = np.frombuffer(raw[m.offset:m.offset + m.nbytes], dtype=m.dtype).reshape(m.shape)
        np.testing.assert_array_equal(got, ref[k])


def test_generic_keys_for_latents(tmp_path):
    path = episode_path(tmp_path, 3)
    save_episode(path, mu=np.zeros((4, 32), np.float32), logvar=np.ones((4, 32), np.float32))
    assert scan_episode(path, ("mu", "logvar"))["mu"].shape == (4, 32)
    assert load_episode(path, ("logvar",))["logvar"].sum() == 128
    with pytest.raises(CorruptEpisode, match="missing key.*frames"):
        load_episode(path, ("mu", "frames"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing_key"])
def test_corrupt_files_are_named(tmp_path, damage):
    path = save_episode(episode_path(tmp_path, 5), **_episode(6))
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        arrays = _episode(6)
        del arrays["dones"]
        save_episode(path, **arrays)
    for check in (scan_episode, load_episode):
        with pytest.raises(CorruptEpisode) as info:
            check(path, EPISODE_KEYS)
        assert isinstance(info.value, UserError)
        assert str(path) in str(info.value) and info.value.path == path


def test_member_shorter_than_its_header_is_detected_by_scan(tmp_path):
    """A .npy header that promises more frames than the member holds is caught without reading the data."""
    path = save_episode(episode_path(tmp_path, 0), frames=np.zeros((50, 64, 64, 3), np.uint8))
    raw = path.read_bytes()
    assert raw.count(b"(50, 64, 64, 3)") == 1
    path.write_bytes(raw.replace(b"(50, 64, 64, 3)", b"(90, 64, 64, 3)"))
    with pytest.raises(CorruptEpisode, match="truncated"):
        scan_episode(path, ("frames",))


def test_iter_valid_episodes_warns_by_name_and_skips(tmp_path, caplog):
    for i in range(4):
        save_episode(episode_path(tmp_path, i), **_episode(3 + i, seed=i))
    bad = episode_path(tmp_path, 2)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="ep_000002.npz"):
        got = list(iter_valid_episodes(tmp_path, keys=("rewards", "seed")))
    assert [episode_index(p) for p, _ in got] == [0, 1, 3]
    assert [int(d["seed"]) for _, d in got] == [0, 1, 3]
    assert "ep_000002.npz" in caplog.text
