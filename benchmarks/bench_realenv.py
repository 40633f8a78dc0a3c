"""Real-env evaluation throughput against the raw random-policy env step rate (the ceiling).

Measured on ViZDoom TakeCover (the paper's Doom setting: V z 64, M hidden 512 with the done head, episode
cap 2100) with untrained V, M and C (throughput does not depend on the weights, only episode lengths do):

- raw: the gymnasium env stepped by the paper's random policy, nothing else (no resize, no V/M/C), in 1
  process and in 2 processes at once;
- eval: ``rollout.play`` (what ``wm-trainer evaluate`` and real-env CMA-ES fitness use) on a local
  process pool of 1 and 2 workers, each stepping ``envs_per_worker`` envs in lockstep with one batched
  V/M/C forward per step (4) or one env at a time (1).

Sides alternate within each repeat (raw 1, raw 2, then every eval variant), so a shared machine's drift
hits all of them; ratios to the raw rate are taken within a repeat, and min/median/max over repeats.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import numpy as np

ENV_ID = "VizdoomTakeCover-v1"
LOCKSTEP = 4  # envs per worker on the batched side


def _raw_worker(seconds: float, seed: int, start: Any, out: Any) -> None:
    """Step the raw env with the random policy for ``seconds`` after ``start`` fires; put (steps, wall)."""
    import gymnasium as gym

    from benchmarks.envsteps import step_random
    from wm_trainer.games import real

    real._import_backend(ENV_ID)
    env = gym.make(ENV_ID, screen_resolution=real.DOOM_SCREEN_RESOLUTION)
    step_random(env, ENV_ID, 0.0, seed, warmup=50)
    start.wait()
    out.put(step_random(env, ENV_ID, seconds, seed + 1))
    env.close()


def raw_rate(processes: int, seconds: float) -> float:
    """Random-policy env steps/s summed over ``processes`` concurrent processes (each its own env)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(seconds, 1000 + i, start, out)) for i in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.1)
    start.set()
    res = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    return sum(s / w for s, w in res)


def _weights(seed: int, population: int) -> Any:
    """Untrained Doom-sized V (z 64), M (hidden 512, done head) and ``population`` random controllers."""
    import chainer

    from wm_trainer.models.controller import Controller
    from wm_trainer.models.memory import MDNRNN
    from wm_trainer.models.vision import ConvVAE
    from wm_trainer.sim.rollout import AgentWeights

    np.random.seed(seed)
    chainer.global_config.dtype = np.dtype(np.float32)
    vae, m = ConvVAE(64), MDNRNN(64, 1, 512, 5, done_head=True)
    n = Controller(64, 512, 1).n_params
    params = np.random.default_rng(seed).normal(0.0, 0.1, (population, n)).astype(np.float32)
    return AgentWeights.from_models(vae, m, params)


def _config(workers: int, envs_per_worker: int) -> Any:
    from wm_trainer.config import load_config

    return load_config(None, [f"env.id={ENV_ID}", "env.max_steps=2100", f"parallel.workers={workers}",
                              f"parallel.envs_per_worker={envs_per_worker}"])


def _eval_once(executor: Any, weights: Any, cfg: Any, episodes: int, first_seed: int) -> tuple[float, float, float]:
    """(env-steps/s, episodes/s, wall s) of one ``play`` over ``episodes`` Doom episodes.

    TakeCover pays +1 per step survived, so an episode's return is its length in env steps.
    """
    from wm_trainer.sim.rollout import Job, play

    jobs = [Job(i % len(weights.params), first_seed + i) for i in range(episodes)]
    t0 = time.perf_counter()
    rets = play(executor, weights, jobs, cfg)
    wall = time.perf_counter() - t0
    return float(np.sum(rets)) / wall, episodes / wall, wall


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "repeats": len(values)}


def measure(quick: bool) -> dict:
    """Raw vs evaluation throughput (1 and 2 workers, lockstep batched vs one env at a time), as plain data."""
    from wm_trainer.base.parallel import LocalExecutor

    repeats = 2 if quick else 3
    seconds = 2.0 if quick else 5.0
    episodes = 8 if quick else 24
    weights = _weights(0, 8)
    variants = [(w, e) for w in (1, 2) for e in (1, LOCKSTEP)]
    executors: dict[int, Any] = {}
    cold: dict[str, float] = {}
    figures: dict[str, dict[str, list[float]]] = {"raw_1_process": {"steps_per_s": []},
                                                  "raw_2_processes": {"steps_per_s": []}}
    for w, e in variants:
        figures[f"eval_{w}w_{e}env"] = {"steps_per_s": [], "episodes_per_s": [], "vs_raw_same_processes": [],
                                        "vs_raw_1_process": []}
    try:
        for w in (1, 2):
            t0 = time.perf_counter()
            executors[w] = LocalExecutor(w)
            _eval_once(executors[w], weights, _config(w, 1), w, 0)  # start workers, build V and M there
            cold[f"{w}_workers_first_play_s"] = time.perf_counter() - t0
        seed = 100
        for _ in range(repeats):
            raw = {1: raw_rate(1, seconds), 2: raw_rate(2, seconds)}
            figures["raw_1_process"]["steps_per_s"].append(raw[1])
            figures["raw_2_processes"]["steps_per_s"].append(raw[2])
            for w, e in variants:
                rate, eps, _ = _eval_once(executors[w], weights, _config(w, e), episodes, seed)
                seed += episodes
                f = figures[f"eval_{w}w_{e}env"]
                f["steps_per_s"].append(rate)
                f["episodes_per_s"].append(eps)
                f["vs_raw_same_processes"].append(rate / raw[w])
                f["vs_raw_1_process"].append(rate / raw[1])
    finally:
        for ex in executors.values():
            ex.shutdown()
    out: dict[str, Any] = {"env": ENV_ID, "model": "V z64, M hidden 512 (done head), C linear; untrained",
                           "lockstep_envs_per_worker": LOCKSTEP, "episodes_per_eval": episodes,
                           "raw_seconds_per_process": seconds, "cpu_count": os.cpu_count(), "cold_start": cold}
    for name, fig in figures.items():
        out[name] = {k: _summary(v) for k, v in fig.items()}
    best = max((f"eval_2w_{e}env" for e in (1, LOCKSTEP)), key=lambda k: out[k]["steps_per_s"]["median"])
    ratio = out[best]["vs_raw_same_processes"]["median"]
    out["target"] = {"what": ">= 80% of the raw env step rate with 2 workers (vs 2 raw processes)",
                     "variant": best, "ratio_median": ratio, "met": ratio >= 0.8}
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure("--quick" in sys.argv), indent=2))
