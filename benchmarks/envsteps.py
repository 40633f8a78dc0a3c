"""The raw environment's speed: a gymnasium env stepped by the random policy, nothing else in the loop."""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def step_random(gym_env: Any, env_id: str, seconds: float, seed: int, warmup: int = 0) -> tuple[int, float]:
    """Step ``gym_env`` with the random policy for ``seconds`` (after ``warmup`` steps); (steps, wall seconds)."""
    from wm_trainer.games import real, spec

    policy = real.random_policy(env_id, np.random.default_rng(seed))
    gym_env.reset(seed=seed)

    def step() -> None:
        _, _, term, trunc, _ = gym_env.step(spec.native_action(env_id, policy()))
        if term or trunc:
            gym_env.reset()
            policy.reset()

    for _ in range(warmup):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps, time.perf_counter() - t0
