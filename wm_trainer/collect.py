"""``wm-trainer collect``: random-policy episodes, in parallel workers, resumable.

Episode i is reproducible from ``episode_seed(experiment.seed, i)``. Workers run episodes and
send the arrays back; this process writes each file atomically, so a killed run leaves only
complete files and a re-run collects just the missing (or corrupt) ones.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .base.parallel import Executor, executor_scope
from .base.storage import RunPaths
from .data.episodes import EPISODE_KEYS, CorruptEpisode, episode_path, save_episode, scan_episode, warn_corrupt
from .games.real import WorldEnv, cached_env, make_env, random_policy

log = logging.getLogger(__name__)

def episode_seed(master_seed: int, index: int) -> int:
    """The seed of episode ``index``: a deterministic hash of (master seed, index), in [0, 2**31)."""
    state = np.random.SeedSequence([int(master_seed), int(index)]).generate_state(1, np.uint32)[0]
    return int(state) & 0x7FFFFFFF


def rollout_random(env: WorldEnv, seed: int, repeat_prob: float) -> dict[str, np.ndarray]:
    """One random-policy episode: frames[t] is the observation before actions[t]."""
    policy = random_policy(env.env_id, np.random.default_rng([seed, 1]), repeat_prob)
    frames, actions, rewards, dones = [], [], [], []
    frame, done = env.reset(seed), False
    while not done:
        action = policy(frame)
        frames.append(frame)
        actions.append(action)
        frame, reward, done = env.step(action)
        rewards.append(reward)
        dones.append(done)
    return {
        "frames": np.stack(frames).astype(np.uint8),
        "actions": np.stack(actions).astype(np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "dones": np.asarray(dones, dtype=bool),
        "seed": np.int64(seed),
    }


def episode_repeat_prob(collect_cfg: Any, index: int) -> float:
    """The repeat probability of episode ``index``: ``repeat_probs`` cycled over episodes, else ``repeat_prob``."""
    probs = collect_cfg.repeat_probs
    return float(probs[index % len(probs)]) if probs else float(collect_cfg.repeat_prob)


def collect_one(env_id: str, max_steps: int, repeat_prob: float, index: int, seed: int, frame_skip: int = 1
                ) -> tuple[int, dict[str, np.ndarray]]:
    """Worker task: episode ``index`` with ``seed``; returns (index, arrays). Envs are reused per worker.

    Takes plain values, not the Config: unpickling a Config in a worker would import the whole toolkit.
    """
    return index, rollout_random(cached_env(env_id, max_steps, frame_skip), seed, repeat_prob)


def _remove_stale_temps(folder: Path) -> None:
    for tmp in folder.glob(".ep_*.npz.*.tmp"):
        tmp.unlink(missing_ok=True)


def pending_episodes(folder: Path, count: int) -> list[int]:
    """Indices in [0, count) without a complete episode file; corrupt files are reported by name."""
    todo = []
    for i in range(count):
        path = episode_path(folder, i)
        if not path.exists():
            todo.append(i)
            continue
        try:
            scan_episode(path, EPISODE_KEYS)
        except CorruptEpisode as e:
            warn_corrupt(e)
            log.warning("re-collecting episode %d (%s)", i, path)
            todo.append(i)
    return todo


def collect_episodes(cfg: Any, executor: Executor | None = None) -> list[Path]:
    """Collect ``collect.episodes`` random-policy episodes into ``<run>/episodes``; returns every episode's path."""
    from tqdm import tqdm

    folder = RunPaths(cfg.run_dir).episodes
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    total = cfg.collect.episodes
    todo = pending_episodes(folder, total)
    max_steps = cfg.collect.max_steps or cfg.env.max_steps
    if todo:
        make_env(cfg.env, max_steps).close()  # an unknown id or missing package fails here, not in a worker
        with executor_scope(cfg.parallel, executor) as ex:
            _run(ex, cfg, todo, folder, max_steps, total, tqdm)
    return [episode_path(folder, i) for i in range(total)]


def _run(ex: Executor, cfg: Any, todo: list[int], folder: Path, max_steps: int, total: int, tqdm: Any) -> None:
    futures = [ex.submit(collect_one, cfg.env.id, max_steps, episode_repeat_prob(cfg.collect, i), i,
                         episode_seed(cfg.experiment.seed, i), cfg.env.frame_skip) for i in todo]
    finished = ex.as_completed(futures)
    futures.clear()  # as_completed lets go of each future it yields: a saved episode leaves memory (and Dask workers)
    frames, start = 0, time.perf_counter()
    with tqdm(total=total, initial=total - len(todo), unit="ep", desc="collect", dynamic_ncols=True) as bar:
        for future in finished:
            index, arrays = future.result()
            del future
            save_episode(episode_path(folder, index), compress=cfg.collect.compress, **arrays)
            frames += len(arrays["frames"])
            rate = frames / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(frames=frames, fps=f"{rate:.0f}", refresh=False)
            bar.update(1)


def main(cfg: Any, args: argparse.Namespace | None = None) -> int:
    """CLI entry: collect (or finish collecting) the run's episodes."""
    start = time.perf_counter()
    paths = collect_episodes(cfg)
    print(f"{len(paths)} episodes in {RunPaths(cfg.run_dir).episodes} ({time.perf_counter() - start:.1f} s)")
    return 0
