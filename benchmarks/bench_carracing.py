"""Real-env CMA-ES throughput on CarRacing, per worker process, and what the paper's setting costs from it.

The paper trains CarRacing's C in the real environment: 64 candidates x 16 episodes x 1,000 steps per
generation for ~1,800 generations (~1.8e9 env steps). Here one worker process steps ``n`` CarRacing-v3 envs in
lockstep with one batched V/M/C forward per step (``sim.rollout.run_jobs``, what real-mode fitness and
``wm-trainer evaluate`` run), with the paper's CarRacing sizes (V z 32, M hidden 256 without a done head, C on
[z, h] with a bias), untrained: throughput depends on the weights only through episode length, and CarRacing
episodes run to the step cap unless the car leaves the playfield. The raw env stepped by the random policy (no
resize, no V/M/C) is the ceiling, measured with this project's vectorized road drawing and with
gymnasium's own (the same frames). Sides alternate within each repeat; medians over repeats.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

ENV_ID = "CarRacing-v3"
PAPER = {"population": 64, "episodes_per_candidate": 16, "max_steps": 1000, "generations": 1800}


def _weights(seed: int, population: int) -> Any:
    """Untrained CarRacing-sized V (z 32), M (hidden 256, no done head) and ``population`` random controllers."""
    import chainer

    from wm_trainer.models.controller import Controller
    from wm_trainer.models.memory import MDNRNN
    from wm_trainer.models.vision import ConvVAE
    from wm_trainer.sim.rollout import AgentWeights

    np.random.seed(seed)
    chainer.global_config.dtype = np.dtype(np.float32)
    vae, m = ConvVAE(32), MDNRNN(32, 3, 256, 5, done_head=False)
    ctrl = Controller(32, 256, 3, inputs="zh", bias=True)
    params = np.random.default_rng(seed).normal(0.0, 0.1, (population, ctrl.n_params)).astype(np.float32)
    return AgentWeights.from_models(vae, m, params, ctrl)


def raw_rate(seconds: float, seed: int = 0, stock: bool = False) -> float:
    """Random-policy CarRacing env steps/s in this process (the env alone: no resize, no V/M/C).

    ``stock``: gymnasium's own road drawing instead of :mod:`wm_trainer.games.carracing_road` (same frames).
    """
    import gymnasium as gym

    from benchmarks.envsteps import step_random
    from wm_trainer.games import carracing_road

    gym_env = gym.make(ENV_ID)
    if not stock:
        carracing_road.install(gym_env)
    try:
        steps, wall = step_random(gym_env, ENV_ID, seconds, seed)
    finally:
        gym_env.close()
    return steps / wall


def agent_rate(weights: Any, n_envs: int, max_steps: int, first_seed: int, frame_skip: int = 1) -> float:
    """Env steps/s of one worker playing ``n_envs`` episodes in lockstep with V, M and C in the loop.

    ``frame_skip`` k: each action held for k env steps, V, M and C run once per k (``env.frame_skip``).
    """
    from wm_trainer.games.spec import EnvSpec
    from wm_trainer.sim.rollout import Job, run_jobs

    jobs = [Job(i % len(weights.params), first_seed + i) for i in range(n_envs)]
    t0 = time.perf_counter()
    res = run_jobs(weights, jobs, EnvSpec(ENV_ID, frame_skip), max_steps, n_envs)
    return sum(r.steps for r in res) / (time.perf_counter() - t0)


def measure(quick: bool) -> dict:
    """Per-worker env-steps/s (raw, the agent at 1, 4 and 16 lockstep envs, and at 16 with frame skip 2) and the
    paper's cost from the best rate without frame skip (the paper's setting has none)."""
    repeats = 2 if quick else 3
    max_steps = 200 if quick else 500
    raw_seconds = 3.0 if quick else 10.0
    lockstep = (1, 4, 16)
    weights = _weights(0, 16)
    agent_rate(weights, 1, 20, 0)  # builds V and M, warms the kernels
    figures: dict[str, list[float]] = {"raw": [], "raw_stock": [], **{f"agent_{n}env": [] for n in lockstep},
                                       "agent_16env_skip2": []}
    seed = 100
    for r in range(repeats):
        for stock in ((False, True) if r % 2 == 0 else (True, False)):
            figures["raw_stock" if stock else "raw"].append(raw_rate(raw_seconds, seed, stock))
        for n in lockstep:
            figures[f"agent_{n}env"].append(agent_rate(weights, n, max_steps, seed))
            seed += n
        figures["agent_16env_skip2"].append(agent_rate(weights, 16, max_steps, seed - 16, frame_skip=2))
    med = {k: statistics.median(v) for k, v in figures.items()}
    best = max((f"agent_{n}env" for n in lockstep), key=med.get)
    per_generation = PAPER["population"] * PAPER["episodes_per_candidate"] * PAPER["max_steps"]
    steps = per_generation * PAPER["generations"]
    return {
        "env": ENV_ID, "model": "V z32, M hidden 256 (no done head), C on [z, h] with bias; untrained",
        "episode_steps": max_steps, "repeats": repeats, "cpu_count": os.cpu_count(),
        "steps_per_s_per_worker": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in figures.items()},
        "best": best, "best_vs_raw": med[best] / med["raw"],
        "raw_vs_stock_road": statistics.median(a / b for a, b in zip(figures["raw"], figures["raw_stock"])),
        # the same 16 tracks right after each other, so each pair shares the machine's state of the moment
        "frame_skip2_vs_1": statistics.median(a / b for a, b in zip(figures["agent_16env_skip2"],
                                                                    figures["agent_16env"])),
        "paper_setting": {**PAPER, "env_steps": steps,
                          "worker_hours": steps / med[best] / 3600,
                          "worker_seconds_per_generation": per_generation / med[best]},
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure("--quick" in sys.argv), indent=2))
