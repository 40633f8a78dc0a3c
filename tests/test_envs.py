"""Both environments through WorldEnv, the controller-space action mapping, and the random policy."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from wm_trainer import cli
from wm_trainer.base.errors import UserError
from wm_trainer.config import EnvConfig
from wm_trainer.games.real import make_env, random_policy
from wm_trainer.games.spec import (
    CARRACING_ID,
    DOOM_ID,
    DOOM_LEFT,
    DOOM_NOOP,
    DOOM_RIGHT,
    action_dim,
    carracing_action,
    doom_action,
    native_action,
)


def test_doom_mapping_thresholds():
    cases = {-1.0: DOOM_LEFT, -0.34: DOOM_LEFT, -0.33: DOOM_NOOP, 0.0: DOOM_NOOP, 0.33: DOOM_NOOP,
             0.34: DOOM_RIGHT, 1.0: DOOM_RIGHT}
    for a, expected in cases.items():
        assert doom_action(np.array([a], np.float32)) == expected, a
    assert native_action(DOOM_ID, np.array([-0.9])) == DOOM_LEFT


def test_carracing_mapping():
    np.testing.assert_allclose(carracing_action(np.array([-0.5, -1.0, -0.3])), [-0.5, 0.0, 0.0])
    np.testing.assert_allclose(carracing_action(np.array([0.25, 0.0, 0.4])), [0.25, 0.5, 0.4])
    np.testing.assert_allclose(carracing_action(np.array([1.0, 1.0, 1.0])), [1.0, 1.0, 1.0])
    out = carracing_action(np.array([3.0, 2.0, 5.0]))  # outside tanh range: clipped into the native box
    np.testing.assert_allclose(out, [1.0, 1.0, 1.0])
    assert out.dtype == np.float32


def test_unknown_env_is_a_one_line_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown environment 'Pong-v5'.*VizdoomTakeCover-v1"):
        make_env(EnvConfig(id="Pong-v5"))
    with pytest.raises(UserError):
        action_dim("Pong-v5")
    code = cli.main(["collect", "-c", _yaml(tmp_path), "--set", "env.id=Pong-v5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Pong-v5" in err


def _yaml(tmp_path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"experiment:\n  out_dir: {tmp_path}\n  name: run\ncollect:\n  episodes: 1\n")
    return str(path)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vizdoom.gymnasium_wrapper", None)  # import now fails as if not installed
    with pytest.raises(UserError, match="pip install 'vizdoom'"):
        make_env(EnvConfig(id=DOOM_ID))
    monkeypatch.setitem(sys.modules, "Box2D", None)
    with pytest.raises(UserError, match=r"pip install 'gymnasium\[box2d\]'"):
        make_env(EnvConfig(id=CARRACING_ID))


def test_doom_real_episode_and_buttons():
    with make_env(EnvConfig(id=DOOM_ID, max_steps=12)) as env:
        game = env.gym_env.unwrapped.game
        assert env.action_dim == 1
        assert [b.name for b in game.get_available_buttons()] == ["MOVE_LEFT", "MOVE_RIGHT"]
        frame = env.reset(seed=3)
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and frame.std() > 5
        pressed = {}
        for a in (-1.0, 0.0, 1.0, -0.2):
            frame, reward, done = env.step(np.array([a], np.float32))
            pressed[a] = [int(v) for v in game.get_last_action()]  # [MOVE_LEFT, MOVE_RIGHT]
            assert frame.shape == (64, 64, 3) and reward == 1.0 and not done
        assert pressed == {-1.0: [1, 0], 0.0: [0, 0], 1.0: [0, 1], -0.2: [0, 0]}
        steps = 4
        while not done:
            frame, reward, done = env.step(np.array([0.0], np.float32))
            steps += 1
        assert steps == 12  # the step cap ends the episode


def _rollout(env, seed: int, actions: np.ndarray) -> np.ndarray:
    frames = [env.reset(seed)]
    for a in actions:
        frames.append(env.step(a)[0])
    return np.stack(frames)


def test_doom_reset_is_deterministic_and_actions_matter():
    with make_env(EnvConfig(id=DOOM_ID, max_steps=100)) as env:
        left = np.full((15, 1), -1.0, np.float32)
        a = _rollout(env, 7, left)
        b = _rollout(env, 7, left)
        c = _rollout(env, 7, -left)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a[-1], c[-1])


def test_carracing_real_episode():
    with make_env(EnvConfig(id=CARRACING_ID, max_steps=8)) as env:
        assert env.action_dim == 3
        actions = np.tile(np.array([0.3, 0.5, -1.0], np.float32), (8, 1))
        a = _rollout(env, 11, actions[:7])
        assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
        frame, reward, done = env.step(actions[7])
        assert done and isinstance(reward, float)
        # the bottom HUD bar (black, rows 84..96 of the native frame) is cropped away
        assert a[0][-4:].mean() > 40
        np.testing.assert_array_equal(a, _rollout(env, 11, actions[:7]))


def _repeat_fraction(actions: np.ndarray) -> float:
    return float(np.mean(np.all(actions[1:] == actions[:-1], axis=1)))


def test_random_policy_doom():
    policy = random_policy(DOOM_ID, np.random.default_rng(0), repeat_prob=0.9)
    acts = np.stack([policy() for _ in range(6000)])
    assert acts.shape == (6000, 1) and acts.dtype == np.float32
    values, counts = np.unique(acts, return_counts=True)
    assert list(values) == [-1.0, 0.0, 1.0] and counts.min() > 1500
    # repeats with prob 0.9, and a fresh draw equals the old action 1/3 of the time
    assert abs(_repeat_fraction(acts) - (0.9 + 0.1 / 3)) < 0.02
    fresh = random_policy(DOOM_ID, np.random.default_rng(1), repeat_prob=0.0)
    assert abs(_repeat_fraction(np.stack([fresh() for _ in range(3000)])) - 1 / 3) < 0.04


def test_random_policy_carracing_never_all_zero():
    policy = random_policy(CARRACING_ID, np.random.default_rng(0), repeat_prob=0.0)
    acts = np.stack([policy() for _ in range(20000)])
    assert acts.shape == (20000, 3) and np.all(np.abs(acts) <= 1)
    native = np.stack([carracing_action(a) for a in acts])
    assert np.abs(native).max(axis=1).min() >= 0.05
    assert native[:, 1].std() > 0.2 and (native[:, 2] == 0).mean() > 0.5  # gas varies, brake mostly off
    sticky = random_policy(CARRACING_ID, np.random.default_rng(2), repeat_prob=0.9)
    assert abs(_repeat_fraction(np.stack([sticky() for _ in range(5000)])) - 0.9) < 0.02
    sticky.reset()
    assert sticky.previous is None
