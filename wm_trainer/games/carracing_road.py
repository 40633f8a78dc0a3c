"""CarRacing's road and grass drawn from one vectorized transform: gymnasium's pixels, without its Python loop.

gymnasium's ``CarRacing._render_road`` rotates, scales and bounds-checks each of ~730 polygons in Python on every
step (the grass grid and every road tile, although ~40 are on screen), which is most of the env's step time. Here
the same arithmetic runs over all polygons at once in NumPy (pygame's ``Vector2.rotate_rad``, including its exact
quarter-turn cases, then ``zoom`` and the translation, in the same order of float operations), and only the
polygons gymnasium would draw are drawn, in its order, with its calls. The frames are the same pixels; a test
compares them with the stock env's on whole episodes. gymnasium's private ``_render_road``, ``_render`` and road
attributes are reached here only, and :func:`install` and :func:`unrendered` leave an env they do not recognise
untouched.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

_EPSILON = 1e-6  # pygame's default Vector2.epsilon, which rotate_rad uses for its quarter-turn cases


def _rotate(points: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of ``points`` (..., 2) rotated by ``angle`` radians exactly as pygame-ce's ``rotate_rad`` does."""
    x, y = points[..., 0], points[..., 1]
    angle = math.fmod(angle, 2 * math.pi)
    if angle < 0:
        angle += 2 * math.pi
    if math.fmod(angle + _EPSILON, math.pi / 2) < 2 * _EPSILON:
        quarter = int((angle + _EPSILON) / (math.pi / 2)) % 4
        return [(x, y), (-y, x), (-x, -y), (y, -x)][quarter]
    s, c = math.sin(angle), math.cos(angle)
    return c * x - s * y, s * x + c * y


def _to_screen(points: np.ndarray, zoom: float, translation: Any, angle: float) -> np.ndarray:
    """Screen coordinates of ``points`` (n, k, 2): rotate, then ``c * zoom + translation`` as gymnasium does."""
    x, y = _rotate(points, angle)
    return np.stack([x * zoom + translation[0], y * zoom + translation[1]], axis=-1)


class RoadRenderer:
    """Draws one CarRacing env's background, grass and road; keeps the constant polygons as arrays."""

    def __init__(self, env: Any, gfxdraw: Any, bounds: dict[str, float]):
        self.env = env
        self.gfxdraw = gfxdraw
        self.lo_x, self.hi_x = -bounds["max_shape"], bounds["window_w"] + bounds["max_shape"]
        self.lo_y, self.hi_y = -bounds["max_shape"], bounds["window_h"] + bounds["max_shape"]
        f, g = bounds["playfield"], bounds["grass_dim"]
        self.field = np.array([[(f, f), (f, -f), (-f, -f), (-f, f)]], dtype=np.float64)
        self.grass = np.array([[(g * x + g, g * y), (g * x, g * y), (g * x, g * y + g), (g * x + g, g * y + g)]
                               for x in range(-20, 20, 2) for y in range(-20, 20, 2)], dtype=np.float64)
        self._road_of: Any = None
        self._road = np.zeros((0, 4, 2))

    def _road_points(self) -> np.ndarray:
        road_poly = self.env.road_poly
        if self._road_of is not road_poly or len(self._road) != len(road_poly):
            self._road = np.array([[(p[0], p[1]) for p in poly] for poly, _ in road_poly], dtype=np.float64)
            self._road_of = road_poly
        return self._road

    def _visible(self, screen: np.ndarray) -> np.ndarray:
        x, y = screen[..., 0], screen[..., 1]
        inside = (self.lo_x <= x) & (x <= self.hi_x) & (self.lo_y <= y) & (y <= self.hi_y)
        return np.flatnonzero(inside.any(axis=1))

    def _draw(self, poly: list, color: Any) -> None:
        self.gfxdraw.aapolygon(self.env.surf, poly, color)
        self.gfxdraw.filled_polygon(self.env.surf, poly, color)

    def __call__(self, zoom: float, translation: Any, angle: float) -> None:
        """Draw what gymnasium's ``_render_road(zoom, translation, angle)`` draws, in the same order."""
        env = self.env
        self._draw(_to_screen(self.field, zoom, translation, angle)[0].tolist(), env.bg_color)
        grass = _to_screen(self.grass, zoom, translation, angle)
        for i in self._visible(grass):
            self._draw(grass[i].tolist(), env.grass_color)
        road = _to_screen(self._road_points(), zoom, translation, angle)
        polys = env.road_poly
        for i in self._visible(road):
            self._draw(road[i].tolist(), [int(c) for c in polys[i][1]])


def install(gym_env: Any) -> bool:
    """Give a CarRacing env (gymnasium's, wrapped or not) the vectorized road; False where it does not apply."""
    env = _carracing(gym_env)
    if env is None or not callable(getattr(type(env), "_render_road", None)):
        return False
    from pygame import gfxdraw

    cr = sys.modules[type(env).__module__]
    needed = ("PLAYFIELD", "GRASS_DIM", "MAX_SHAPE_DIM", "WINDOW_W", "WINDOW_H")
    if not all(hasattr(cr, n) for n in needed):
        return False
    bounds = {"playfield": cr.PLAYFIELD, "grass_dim": cr.GRASS_DIM, "max_shape": cr.MAX_SHAPE_DIM,
              "window_w": cr.WINDOW_W, "window_h": cr.WINDOW_H}
    env._render_road = RoadRenderer(env, gfxdraw, bounds)  # an instance attribute: called as (zoom, translation, angle)
    return True


def _carracing(gym_env: Any) -> Any:
    """The unwrapped CarRacing env of ``gym_env``, or None when it is not gymnasium's CarRacing."""
    env = getattr(gym_env, "unwrapped", gym_env)
    module = type(env).__module__
    if type(env).__name__ != "CarRacing" or not module.startswith("gymnasium.envs.box2d"):
        return None
    return env


@contextlib.contextmanager
def unrendered(gym_env: Any) -> Iterator[None]:
    """Steps inside skip CarRacing's frame drawing: the observation is the last drawn frame (frame skip).

    The physics, the tiles' rewards and the episode's end do not depend on the drawing; other envs are untouched.
    """
    env = _carracing(gym_env)
    if env is None or not callable(getattr(type(env), "_render", None)) or not hasattr(env, "state"):
        yield
        return
    env._render = lambda *args, **kwargs: env.state.copy()  # an instance attribute over the class method
    try:
        yield
    finally:
        del env._render
