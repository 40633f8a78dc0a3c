"""``wm-trainer collect``: parallel, deterministic per episode, resumable after kills and corrupt files."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import signal
import threading
import time
import weakref
import zipfile

import numpy as np
import pytest

from wm_trainer import cli
from wm_trainer.base.parallel import LocalExecutor
from wm_trainer.collect import collect_episodes, episode_seed, rollout_random
from wm_trainer.config import load_config
from wm_trainer.data.episodes import EPISODE_KEYS, episode_path, list_episodes, load_episode
from wm_trainer.games.real import make_env


def _cfg(tmp_path, *overrides: str):
    return load_config(None, [f"experiment.out_dir={tmp_path}", "experiment.name=run", "experiment.seed=4",
                              "env.id=VizdoomTakeCover-v1", "collect.max_steps=40", "parallel.workers=2",
                              *overrides])


@pytest.fixture(scope="module")
def pool():
    """One local pool for the tests that do not kill workers (its workers keep their envs between runs)."""
    with LocalExecutor(workers=2) as ex:
        yield ex


def _assert_same(path, ref) -> None:
    got = load_episode(path)
    assert set(got) == set(EPISODE_KEYS)
    for k in EPISODE_KEYS:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{path.name}:{k}")


def _assert_reproducible(cfg, paths) -> None:
    """Each episode file equals its episode re-run in this process from the episode's seed."""
    with make_env(cfg.env, cfg.collect.max_steps) as env:
        for i, path in enumerate(paths):
            ref = rollout_random(env, episode_seed(cfg.experiment.seed, i), cfg.collect.repeat_prob)
            _assert_same(path, ref)


def test_episode_seeds_are_deterministic_and_distinct():
    seeds = [episode_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and seeds == [episode_seed(0, i) for i in range(1000)]
    assert episode_seed(1, 0) != episode_seed(0, 0) and all(0 <= s < 2**31 for s in seeds)


def test_cli_collect_writes_episodes_then_resumes_without_redoing(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"experiment: {{out_dir: {tmp_path}, name: run, seed: 4}}\n"
                        "env: {id: VizdoomTakeCover-v1}\n"
                        "collect: {episodes: 2, max_steps: 40}\n"
                        "parallel: {workers: 2}\n")
    assert cli.main(["collect", "-c", str(cfg_file)]) == 0
    err = capsys.readouterr().err
    assert "collect" in err and "2/2" in err and "fps=" in err  # the progress bar
    cfg = _cfg(tmp_path)
    folder = tmp_path / "run" / "episodes"
    paths = list_episodes(folder)
    assert [p.name for p in paths] == ["ep_000000.npz", "ep_000001.npz"]
    for i, p in enumerate(paths):
        ep = load_episode(p)
        t = len(ep["frames"])
        assert ep["frames"].shape == (t, 64, 64, 3) and ep["frames"].dtype == np.uint8
        assert ep["actions"].shape == (t, 1) and ep["actions"].dtype == np.float32
        assert ep["rewards"].shape == (t,) and ep["dones"].shape == (t,)
        assert ep["dones"][-1] and not ep["dones"][:-1].any() and 1 < t <= 40
        assert int(ep["seed"]) == episode_seed(4, i)
    _assert_reproducible(cfg, paths)
    before = {p.name: os.stat(p).st_ino for p in paths}
    # the run grows to 3 episodes: only the new one is collected, finished ones are left alone
    (folder / ".ep_000002.npz.x1.tmp").write_bytes(b"left by a killed run")
    assert cli.main(["collect", "-c", str(cfg_file), "--set", "collect.episodes=3"]) == 0
    assert {p.name: os.stat(p).st_ino for p in list_episodes(folder)[:2]} == before
    assert len(list_episodes(folder)) == 3 and not list(folder.glob(".*.tmp"))


def test_corrupt_episode_is_reported_and_recollected(tmp_path, pool):
    cfg = _cfg(tmp_path, "collect.episodes=3")
    paths = collect_episodes(cfg, executor=pool)
    originals = [load_episode(p) for p in paths]
    paths[1].write_bytes(paths[1].read_bytes()[:3000])  # truncated
    paths[2].write_bytes(b"garbage" * 50)
    with pytest.warns(RuntimeWarning) as record:
        again = collect_episodes(cfg, executor=pool)
    named = " ".join(str(w.message) for w in record)
    assert "ep_000001.npz" in named and "ep_000002.npz" in named and "ep_000000.npz" not in named
    for path, original in zip(again, originals):
        _assert_same(path, original)


def _live_members_of_group(pgid: int) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {proc.info['name']}")
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def test_worker_killed_mid_collection_loses_nothing(tmp_path):
    cfg = _cfg(tmp_path, "collect.episodes=10", "collect.max_steps=60")
    folder = tmp_path / "run" / "episodes"
    killed = []

    def kill_a_worker_once_an_episode_is_written():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = ex.worker_pids()
            if list_episodes(folder) and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], len(list_episodes(folder))))
            time.sleep(0.005)

    with LocalExecutor(workers=2) as ex:
        killer = threading.Thread(target=kill_a_worker_once_an_episode_is_written)
        killer.start()
        paths = collect_episodes(cfg, executor=ex)
        killer.join()
        assert killed and killed[0][1] < 10, "no worker was killed mid-run: the test proved nothing"
        assert ex.restarts == 1
        # the dead worker's vizdoom game process did not outlive it
        assert _live_members_of_group(killed[0][0]) == []
    assert [p.name for p in list_episodes(folder)] == [episode_path(folder, i).name for i in range(10)]
    _assert_reproducible(cfg, paths)


def test_collect_on_dask_localcluster_compressed(tmp_path):
    pytest.importorskip("distributed")
    cfg = _cfg(tmp_path, "collect.episodes=2", "collect.max_steps=20", "parallel.backend=dask",
               "parallel.workers=1", "env.id=CarRacing-v3", "collect.compress=true")
    paths = collect_episodes(cfg)
    for p in paths:
        ep = load_episode(p)
        assert ep["actions"].shape == (20, 3) and ep["frames"].shape == (20, 64, 64, 3)
        with zipfile.ZipFile(p) as zf:
            assert zf.getinfo("frames.npy").compress_type == zipfile.ZIP_DEFLATED
    _assert_reproducible(cfg, paths)


def test_repeat_probs_cycle_over_episodes(tmp_path, pool):
    """Episode i plays with repeat_probs[i mod n]: 1.0 never switches, 0.0 switches often; each file is that run."""
    from wm_trainer.collect import episode_repeat_prob

    cfg = _cfg(tmp_path, "collect.episodes=4", "collect.max_steps=60", "collect.repeat_probs=[1.0, 0.0]")
    assert [episode_repeat_prob(cfg.collect, i) for i in range(4)] == [1.0, 0.0, 1.0, 0.0]
    paths = collect_episodes(cfg, pool)
    switches = [int((np.diff(load_episode(p)["actions"], axis=0) != 0).any(axis=1).sum()) for p in paths]
    assert switches[0] == switches[2] == 0 and switches[1] > 5 and switches[3] > 5
    with make_env(cfg.env, cfg.collect.max_steps) as env:
        for i, path in enumerate(paths):
            seed = episode_seed(cfg.experiment.seed, i)
            _assert_same(path, rollout_random(env, seed, episode_repeat_prob(cfg.collect, i)))


def test_repeat_probs_out_of_range_is_a_one_line_config_error(tmp_path):
    from wm_trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"collect.repeat_probs\[1\].*<= 1"):
        _cfg(tmp_path, "collect.repeat_probs=[0.9, 1.5]")


class _LazyExecutor:
    """Runs each episode only when ``as_completed`` reaches it, and counts the episodes still in memory."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.most_live = 0

    def submit(self, fn, *args) -> cf.Future:
        future = cf.Future()
        future.task = (fn, args)
        return future

    def as_completed(self, futures):
        pending = list(futures)

        def finished():
            while pending:
                future = pending.pop(0)
                gc.collect()
                self.most_live = max(self.most_live, sum(r() is not None for r in self.refs))
                fn, args = future.task
                index, arrays = fn(*args)
                self.refs.append(weakref.ref(arrays["frames"]))
                future.set_result((index, arrays))
                yield future
        return finished()


def test_a_saved_episode_leaves_memory(tmp_path):
    cfg = _cfg(tmp_path, "collect.episodes=6", "env.max_steps=30")
    ex = _LazyExecutor()
    paths = collect_episodes(cfg, executor=ex)
    assert all(p.exists() for p in paths) and len(paths) == 6
    assert ex.most_live <= 1  # at most the one episode just saved: collection memory does not grow with episodes


def test_cli_collect_with_frame_skip_stores_the_frames_the_agent_sees(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"experiment: {{out_dir: {tmp_path}, name: run, seed: 4}}\n"
                        "env: {id: CarRacing-v3, frame_skip: 2}\n"
                        "collect: {episodes: 2, max_steps: 30}\n"
                        "parallel: {workers: 2}\n")
    assert cli.main(["collect", "-c", str(cfg_file)]) == 0
    cfg = load_config(cfg_file)
    paths = list_episodes(tmp_path / "run" / "episodes")
    assert len(paths) == 2
    for p in paths:
        ep = load_episode(p)
        assert len(ep["frames"]) == 15 and ep["dones"][-1]  # 30 env steps, one stored frame per held action
    _assert_reproducible(cfg, paths)
    capsys.readouterr()
    # the dream counts one env step per M step: frame skip there is a one-line error
    assert cli.main(["train-controller", "-c", str(cfg_file), "--set", "controller.mode=dream"]) == 2
    err = capsys.readouterr().err.strip()
    assert "env.frame_skip" in err and "controller.mode real" in err and len(err.splitlines()) == 1
