"""The game specs: env ids, action spaces and the pure maps between controller and native actions (no gymnasium).

Controller space is what C emits, tanh outputs in [-1, 1]; the pure functions here map it to
each environment's native action. The gymnasium side (WorldEnv, make_env, random_policy) is
:mod:`wm_trainer.games.real`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..base.errors import UserError

DOOM_ID = "VizdoomTakeCover-v1"
CARRACING_ID = "CarRacing-v3"
FRAME_SIZE = 64

# env id -> (action_dim, module to import for registration, what to pip install)
ENVS: dict[str, tuple[int, str, str]] = {
    DOOM_ID: (1, "vizdoom.gymnasium_wrapper", "vizdoom"),
    CARRACING_ID: (3, "Box2D", "gymnasium[box2d]"),
}

# Indices of vizdoom's Discrete(3) for take_cover.cfg (buttons MOVE_LEFT, MOVE_RIGHT, at most one pressed):
# its button_map is [(0, 0), (0, 1), (1, 0)], so 1 presses MOVE_RIGHT and 2 presses MOVE_LEFT.
DOOM_NOOP, DOOM_RIGHT, DOOM_LEFT = 0, 1, 2
DOOM_BUTTONS = {DOOM_NOOP: (0, 0), DOOM_RIGHT: (0, 1), DOOM_LEFT: (1, 0)}


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What a worker needs to build an env, as plain values (unpickling a Config would import the toolkit)."""

    id: str
    frame_skip: int = 1


def env_spec(env: Any) -> EnvSpec:
    """The :class:`EnvSpec` of an env id, an ``EnvConfig`` or an ``EnvSpec``."""
    if isinstance(env, EnvSpec):
        return env
    if isinstance(env, str):
        return EnvSpec(env)
    return EnvSpec(env.id, int(getattr(env, "frame_skip", 1)))


def action_dim(env_id: str) -> int:
    """Controller outputs for ``env_id`` (Doom 1, CarRacing 3); UserError for an unknown id."""
    _check_id(env_id)
    return ENVS[env_id][0]


def _check_id(env_id: str) -> None:
    if env_id not in ENVS:
        raise UserError(f"env.id: unknown environment {env_id!r}; supported: {', '.join(ENVS)}")


def doom_action(action: np.ndarray) -> int:
    """Controller action (1,) -> Discrete index: < -1/3 left, > 1/3 right, otherwise no move."""
    a = float(np.asarray(action).reshape(-1)[0])
    if a < -1.0 / 3.0:
        return DOOM_LEFT
    if a > 1.0 / 3.0:
        return DOOM_RIGHT
    return DOOM_NOOP


def carracing_action(action: np.ndarray) -> np.ndarray:
    """Controller action (3,) -> native (steer, gas, brake) = (a0, (a1+1)/2, clip(a2, 0, 1))."""
    a = np.clip(np.asarray(action, dtype=np.float32).reshape(3), -1.0, 1.0)
    return np.array([a[0], (a[1] + 1.0) / 2.0, max(a[2], 0.0)], dtype=np.float32)


def executed_action(env_id: str, actions: Any) -> Any:
    """Controller actions (..., A) -> the controller-space actions the env really executes: what M must see.

    Doom: -1, 0 or +1 by :func:`doom_action`'s thresholds; CarRacing: clipped to [-1, 1], brake below 0 as 0.
    NumPy or CuPy arrays (the dream's device); idempotent, so recorded actions map to themselves.
    """
    import chainer

    _check_id(env_id)
    xp = chainer.backend.get_array_module(actions)
    a = xp.asarray(actions)
    dtype = a.dtype if a.dtype.kind == "f" else np.float32
    if env_id == DOOM_ID:
        wide = a.astype(np.float64)  # compared in float64, as doom_action does: -0.33333334f is left
        return (wide > 1.0 / 3.0).astype(dtype) - (wide < -1.0 / 3.0).astype(dtype)
    out = xp.clip(a.astype(dtype, copy=True), -1.0, 1.0)
    out[..., 2] = xp.maximum(out[..., 2], 0.0)
    return out


def native_action(env_id: str, action: np.ndarray) -> Any:
    """Controller action -> the native action ``env_id``'s gymnasium env takes."""
    _check_id(env_id)
    return doom_action(action) if env_id == DOOM_ID else carracing_action(action)


def resize_frame(image: np.ndarray, crop_rows: int | None = None) -> np.ndarray:
    """Crop the top ``crop_rows`` rows (if given) and resize to 64x64x3 uint8 (PIL bilinear, antialiased)."""
    from PIL import Image

    if crop_rows is not None:
        image = image[:crop_rows]
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(img.resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR), dtype=np.uint8)
