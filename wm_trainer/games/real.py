"""The two environments behind one small interface: 64x64 uint8 frames in, controller actions out.

Controller space is what C emits, tanh outputs in [-1, 1]; :mod:`wm_trainer.games.spec` maps it to
each environment's native action, and ``random_policy`` is the paper's collection policy.
"""
from __future__ import annotations

import atexit
import importlib
import threading
from typing import Any

import numpy as np

from ..base.errors import UserError
from . import carracing_road
from .spec import (
    CARRACING_ID,
    DOOM_BUTTONS,
    DOOM_ID,
    ENVS,
    _check_id,
    action_dim,
    carracing_action,
    env_spec,
    native_action,
    resize_frame,
)

# ViZDoom renders at 160x120 rather than take_cover.cfg's 320x240: ~3x the raw step rate and half the resize
# cost, and the 64x64 frames differ from the 320x240 ones by ~2.5/255 per pixel on average (same scene)
DOOM_SCREEN_RESOLUTION = "RES_160X120"


class WorldEnv:
    """A gymnasium env seen as frames (64,64,3) uint8 in and controller-space actions out.

    With ``frame_skip`` k > 1 each action is held for k env frames (the reward summed, only the last frame
    rendered on CarRacing); ``steps`` and ``max_steps`` count env frames either way.
    """

    def __init__(self, env_id: str, gym_env: Any, max_steps: int, frame_skip: int = 1):
        self.env_id = env_id
        self.action_dim = action_dim(env_id)
        self.max_steps = int(max_steps)
        self.frame_skip = int(frame_skip)
        if self.frame_skip < 1:
            raise UserError(f"env.frame_skip: must be at least 1, got {frame_skip}")
        self.gym_env = gym_env
        self.steps = 0
        self._crop = 84 if env_id == CARRACING_ID else None
        self._closed = False
        self._game_started = False

    def _frame(self, obs: Any) -> np.ndarray:
        image = obs["screen"] if isinstance(obs, dict) else obs
        return resize_frame(image, self._crop)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode (deterministic for a given seed) and return its first frame."""
        if self.env_id == DOOM_ID and not self._game_started:
            from ..base.reaper import track_new_children

            with track_new_children():  # the first reset starts the game process; it must not outlive the run
                obs, _ = self.gym_env.reset(seed=None if seed is None else int(seed))
            self._game_started = True
        else:
            obs, _ = self.gym_env.reset(seed=None if seed is None else int(seed))
        self.steps = 0
        return self._frame(obs)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Apply a controller-space action for ``frame_skip`` frames; (next frame, summed reward, done).

        done includes the step cap, which ends the held action early, as the episode's end does.
        """
        native = native_action(self.env_id, action)
        total, done, obs = 0.0, False, None
        for k in range(self.frame_skip):
            if k < self.frame_skip - 1:
                with carracing_road.unrendered(self.gym_env):  # a frame nobody sees is not drawn
                    obs, reward, terminated, truncated, _ = self.gym_env.step(native)
            else:
                obs, reward, terminated, truncated, _ = self.gym_env.step(native)
            self.steps += 1
            total += float(reward)
            done = bool(terminated or truncated or self.steps >= self.max_steps)
            if done:
                break
        return self._frame(obs), total, done  # an episode that ends on an undrawn frame shows the last drawn one

    def close(self) -> None:
        """Release the emulator / renderer (safe to call twice)."""
        if not self._closed:
            self._closed = True
            self.gym_env.close()

    def __enter__(self) -> WorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import_backend(env_id: str) -> None:
    module, package = ENVS[env_id][1], ENVS[env_id][2]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"env.id {env_id!r} needs the {package!r} package: pip install '{package}' ({e})") from None


def _check_doom_buttons(gym_env: Any) -> None:
    env = gym_env.unwrapped
    names = [b.name for b in env.game.get_available_buttons()]
    got = {i: tuple(int(v) for v in env.button_map[i]) for i in range(len(env.button_map))}
    if names != ["MOVE_LEFT", "MOVE_RIGHT"] or got != DOOM_BUTTONS:
        raise UserError(f"this vizdoom's {DOOM_ID} has buttons {names} with map {got}; "
                        f"wm-trainer expects MOVE_LEFT, MOVE_RIGHT with map {DOOM_BUTTONS} (vizdoom>=1.2.3,<2)")


def make_env(env_cfg: Any, max_steps: int | None = None) -> WorldEnv:
    """Build ``env_cfg.id`` capped at ``max_steps`` (default ``env_cfg.max_steps``) steps per episode.

    ``env_cfg`` may also be the env id or an ``EnvSpec`` (worker tasks get plain values), with ``max_steps`` given.
    """
    spec = env_spec(env_cfg)
    return open_env(spec.id, max_steps or env_cfg.max_steps, spec.frame_skip)


def open_env(env_id: str, max_steps: int, frame_skip: int = 1) -> WorldEnv:
    """Build an env from its id, step cap and frame skip (what worker tasks get: plain values, not the Config)."""
    import gymnasium as gym

    _check_id(env_id)
    _import_backend(env_id)
    gym_env = gym.make(env_id, screen_resolution=DOOM_SCREEN_RESOLUTION) if env_id == DOOM_ID else gym.make(env_id)
    if env_id == DOOM_ID:
        _check_doom_buttons(gym_env)
    else:
        carracing_road.install(gym_env)  # the same frames, ~2x the step rate
    return WorldEnv(env_id, gym_env, max_steps, frame_skip)


_LOCAL = threading.local()
_OPEN: list[WorldEnv] = []
_OPEN_LOCK = threading.Lock()
_CLEANUP_REGISTERED = False


def _close_cached() -> None:
    with _OPEN_LOCK:
        envs = list(_OPEN)
        _OPEN.clear()
    for env in envs:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - best effort at process exit
            pass


def cached_env(env_id: str, max_steps: int, frame_skip: int = 1) -> WorldEnv:
    """An env kept per thread and reused across episodes (worker tasks); closed when the process exits.

    Closing matters for Doom: each env owns a vizdoom game process that outlives an unclosed env.
    """
    global _CLEANUP_REGISTERED
    cache = _LOCAL.__dict__.setdefault("envs", {})
    key = (env_id, int(max_steps), int(frame_skip))
    env = cache.get(key)
    if env is None:
        env = cache[key] = open_env(env_id, max_steps, frame_skip)
        with _OPEN_LOCK:
            if not _CLEANUP_REGISTERED:
                _CLEANUP_REGISTERED = True
                # multiprocessing children skip atexit but run Finalize callbacks; the main process runs atexit
                import multiprocessing.util

                multiprocessing.util.Finalize(None, _close_cached, exitpriority=100)
                atexit.register(_close_cached)
            _OPEN.append(env)
    return env


class RandomPolicy:
    """The paper's random collection policy in controller space: repeat the last action with prob ``repeat_prob``."""

    def __init__(self, env_id: str, rng: np.random.Generator, repeat_prob: float = 0.9):
        self.env_id = env_id
        self.action_dim = action_dim(env_id)
        self.rng = rng
        self.repeat_prob = float(repeat_prob)
        self.previous: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous action (call at each episode start)."""
        self.previous = None

    def sample(self) -> np.ndarray:
        """A fresh random action: Doom uniform over {-1, 0, 1}; CarRacing a native action never all zero."""
        if self.env_id == DOOM_ID:
            return np.array([self.rng.choice((-1.0, 0.0, 1.0))], dtype=np.float32)
        while True:
            steer = self.rng.uniform(-1.0, 1.0)
            gas = self.rng.uniform(-1.0, 1.0)
            # brake is zero most of the time (controller value <= 0), as a driver mostly accelerates
            brake = self.rng.uniform(0.0, 1.0) if self.rng.random() < 0.2 else self.rng.uniform(-1.0, 0.0)
            a = np.array([steer, gas, brake], dtype=np.float32)
            if np.abs(carracing_action(a)).max() >= 0.05:
                return a

    def __call__(self, frame: np.ndarray | None = None) -> np.ndarray:
        """Next controller-space action (the frame is not looked at)."""
        if self.previous is None or self.rng.random() >= self.repeat_prob:
            self.previous = self.sample()
        return self.previous.copy()


def random_policy(env_id: str, rng: np.random.Generator, repeat_prob: float = 0.9) -> RandomPolicy:
    """The paper's random policy for ``env_id``: call it once per step for a controller-space action."""
    return RandomPolicy(env_id, rng, repeat_prob)
