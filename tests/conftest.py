"""Shared test setup: Chainer's float32 defaults around every test, and the test data several modules use."""
from __future__ import annotations

# isort: off
import wm_trainer  # noqa: F401  (applies the CuPy shims before chainer imports cupy)
import chainer
# isort: on
from pathlib import Path

import numpy as np
import pytest
import yaml


@pytest.fixture(autouse=True)
def _chainer_float32():
    """float64 mode and the ops switch are global in Chainer; a test that sets them must not leak them."""
    from extensions import set_float64

    set_float64(False)
    chainer.global_config.dtype = np.dtype(np.float32)
    chainer.global_config.wm_ops = "fast"
    yield
    set_float64(False)
    chainer.global_config.dtype = np.dtype(np.float32)
    chainer.global_config.wm_ops = "fast"


# ---- test data shared by several test modules (as fixtures: no test module imports another) ----------------------

TINY_DOOM = Path(__file__).resolve().parents[1] / "configs" / "tiny_doom.yaml"


def _synthetic_frames(n: int, seed: int) -> np.ndarray:
    """Frames with a coloured square moving over a plain background: easy structure for a tiny VAE."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 64, 64, 3), np.uint8)
    out[:] = rng.integers(0, 80, size=3, dtype=np.uint8)
    colour = rng.integers(120, 256, size=3, dtype=np.uint8)
    for t in range(n):
        x, y = (3 * t + seed * 7) % 48, (2 * t + seed * 11) % 48
        out[t, y:y + 16, x:x + 16] = colour
    return out


def _make_episodes(folder, n_episodes: int = 3, length: int = 20, action_dim: int = 1) -> None:
    """Tiny collected episodes of synthetic frames in the collector's format."""
    from wm_trainer.data.episodes import save_episode

    for i in range(n_episodes):
        rng = np.random.default_rng(i)
        dones = np.zeros(length, bool)
        dones[-1] = True
        save_episode(folder / f"ep_{i:06d}.npz", frames=_synthetic_frames(length, i),
                     actions=rng.uniform(-1, 1, (length, action_dim)).astype(np.float32),
                     rewards=np.ones(length, np.float32), dones=dones, seed=np.int64(i))


def _write_config(tmp_path, name: str, **sections) -> str:
    """A tiny YAML config for a run under tmp_path; ``sections`` update its sections."""
    cfg = {
        "experiment": {"name": name, "out_dir": str(tmp_path), "seed": 3},
        "vae": {"z_dim": 4, "batch_size": 8, "max_iterations": 4, "snapshot_every": 2, "recon_every": 2,
                "loader_memory_mb": 1, "lr": 1e-3, "encode_batch": 7},
        "mdnrnn": {"hidden": 8, "mixtures": 2, "seq_len": 6, "batch_size": 4, "iterations": 3, "snapshot_every": 2},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _make_tiny_run(out_dir: Path, *overrides: str):
    """A run folder holding (untrained) tiny V and M, three short encoded episodes and their frames."""
    from wm_trainer.base.storage import RunPaths
    from wm_trainer.config import load_config
    from wm_trainer.data.episodes import episode_path, save_episode
    from wm_trainer.models.memory import build_mdnrnn
    from wm_trainer.models.vision import ConvVAE

    overrides = (f"experiment.out_dir={out_dir}",) + overrides
    cfg = load_config(TINY_DOOM, overrides)
    p = RunPaths(cfg.run_dir)
    p.root.mkdir(parents=True, exist_ok=True)
    np.random.seed(0)
    chainer.serializers.save_npz(str(p.vae_model), ConvVAE(cfg.vae.z_dim))
    chainer.serializers.save_npz(str(p.mdnrnn_model), build_mdnrnn(cfg, 1))
    rng = np.random.default_rng(0)
    for i in range(3):
        t = 12
        dones = np.arange(t) == t - 1
        p.latents.mkdir(exist_ok=True)
        np.savez(episode_path(p.latents, i),
                 mu=rng.normal(size=(t, cfg.vae.z_dim)).astype(np.float32),
                 logvar=np.full((t, cfg.vae.z_dim), -2.0, np.float32), actions=np.zeros((t, 1), np.float32),
                 rewards=np.ones(t, np.float32), dones=dones)
        p.episodes.mkdir(exist_ok=True)
        save_episode(episode_path(p.episodes, i), frames=rng.integers(0, 255, (t, 64, 64, 3), dtype=np.uint8),
                     actions=np.zeros((t, 1), np.float32), rewards=np.ones(t, np.float32), dones=dones,
                     seed=np.int64(i))
    return TINY_DOOM, cfg


def _two_mode_episodes(n: int, length: int, z_dim: int, seed: int) -> list[dict]:
    """Encoded episodes whose z_{t+1} is +1 or -1 (coin flip) plus small noise in every dim; logvar tiny."""
    rng = np.random.default_rng(seed)
    eps = []
    for _ in range(n):
        mu = rng.choice([-1.0, 1.0], size=(length, z_dim)) + 0.05 * rng.standard_normal((length, z_dim))
        dones = np.zeros(length, bool)
        dones[-1] = True
        eps.append({"mu": mu.astype(np.float32), "logvar": np.full((length, z_dim), -12.0, np.float32),
                    "actions": rng.uniform(-1, 1, (length, 1)).astype(np.float32), "dones": dones})
    return eps


def _latents_run(tmp_path, iterations: int, name: str = "run") -> str:
    """A config (path) for a run whose latents folder holds three two-mode episodes (z_dim 4), for M's stage."""
    from wm_trainer.base.storage import RunPaths, atomic_savez

    paths = RunPaths(tmp_path / name)
    for i, ep in enumerate(_two_mode_episodes(3, 20, 4, seed=0)):
        atomic_savez(paths.latents / f"ep_{i:06d}.npz", rewards=np.ones(20, np.float32), **ep)
    cfg = {
        "experiment": {"name": name, "out_dir": str(tmp_path), "seed": 5},
        "vae": {"z_dim": 4},
        "mdnrnn": {"hidden": 8, "mixtures": 2, "seq_len": 6, "batch_size": 4, "iterations": iterations,
                   "snapshot_every": 3, "done_head": True},
        "debug": {"gradients": {"histograms_every": 2}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _npz_arrays(path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by key."""
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def synthetic_frames():
    """``(n, seed) -> uint8 frames (n, 64, 64, 3)``: a coloured square moving over a plain background."""
    return _synthetic_frames


@pytest.fixture(scope="session")
def make_episodes():
    """``(folder, n_episodes=3, length=20, action_dim=1)``: writes tiny collected episodes into ``folder``."""
    return _make_episodes


@pytest.fixture(scope="session")
def write_config():
    """``(tmp_path, name, **sections) -> config path``: a tiny YAML config for a run under ``tmp_path``."""
    return _write_config


@pytest.fixture(scope="session")
def make_tiny_run():
    """``(out_dir, *overrides) -> (config path, Config)``: configs/tiny_doom.yaml with untrained V, M and data."""
    return _make_tiny_run


@pytest.fixture(scope="session")
def two_mode_episodes():
    """``(n, length, z_dim, seed) -> [episode dict]``: encoded episodes whose next z is +-1 by a coin flip."""
    return _two_mode_episodes


@pytest.fixture(scope="session")
def latents_run():
    """``(tmp_path, iterations, name="run") -> config path``: a run with encoded episodes, ready for M's stage."""
    return _latents_run


@pytest.fixture(scope="session")
def npz_arrays():
    """``path -> {key: array}``: every array of an .npz file."""
    return _npz_arrays


class _Plant:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _poison(path, marker, keys) -> None:
    """An npz whose every key holds a pickled object (0-d and 1-d object arrays by turns)."""
    arrays = {}
    for i, key in enumerate(keys):
        a = np.empty(() if i % 2 == 0 else (1,), dtype=object)
        a[...] = _Plant(marker)
        arrays[key] = a
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.fixture(scope="session")
def poison():
    """``(path, marker, keys)``: write an npz whose keys hold objects that create ``marker`` when unpickled."""
    return _poison


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> Path:
    """A tiny Doom run with every stage done (V, M, C, snapshots, CMA-ES state), run once through the CLI."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("trained")
    done = subprocess.run([sys.executable, "-m", "wm_trainer.cli", "pipeline", "-c", "configs/tiny_doom.yaml",
                           "--set", f"experiment.out_dir={out}"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return out
