"""Media for a run: a GIF of the agent in the real env, a GIF of a dream decoded by V, a V reconstruction grid."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .base.errors import UserError
from .base.storage import RunPaths, atomic_write_bytes, atomic_write_json
from .config import Config
from .games.spec import DOOM_ID
from .games.spec import action_dim as env_action_dim

AGENT_GIF = "agent.gif"
DREAM_GIF = "dream.gif"
RECON_PNG = "vae_reconstructions.png"
VAE_CHECK = "vae_check.json"  # Doom: how much of the fireballs V keeps (wm_trainer.models.vae_check)
MEDIA_FILES = (AGENT_GIF, DREAM_GIF, RECON_PNG)


def write_gif(path: Path, frames: list[np.ndarray], fps: int = 20) -> Path:
    """An animated, looping GIF of uint8 HxWx3 frames, written atomically."""
    import imageio.v3 as iio

    data = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return atomic_write_bytes(path, data)


def write_png(path: Path, image: np.ndarray) -> Path:
    """A PNG of a uint8 HxWx3 image, written atomically."""
    import imageio.v3 as iio

    return atomic_write_bytes(path, iio.imwrite("<bytes>", image, extension=".png"))


def _upscale(frames: np.ndarray, k: int = 2) -> np.ndarray:
    return frames.repeat(k, axis=-3).repeat(k, axis=-2)


def agent_frames(cfg: Config, weights, steps: int, seed: int) -> tuple[list[np.ndarray], float]:
    """Frames and return of one real episode of the agent, at most ``steps`` steps."""
    from .sim.rollout import Job, run_jobs

    (res,) = run_jobs(weights, [Job(0, seed)], cfg.env, steps, 1, record=True)
    return res.frames, res.ret


def dream_frames(vae, mdnrnn, ctrl, initial_z: np.ndarray, cfg: Config, steps: int, seed: int,
                 done_bias: float = 0.0) -> list[np.ndarray]:
    """One dream of the agent (batch of 1) decoded by V, at most ``steps`` frames, up to M's predicted end.

    ``done_bias``: the calibrated shift of M's done logit that C trained with (``train-controller``).
    """
    import functools

    from .games.spec import executed_action
    from .sim.dream import DreamEnv, decode_frames

    env = DreamEnv(mdnrnn, temperature=cfg.controller.temperature, max_steps=steps, seed=seed,
                   action_map=functools.partial(executed_action, cfg.env.id), done_mode=cfg.controller.dream_done,
                   done_bias=done_bias)
    z, h = env.reset(initial_z[None].astype(np.float32))
    zs = [np.asarray(z)]
    for _ in range(steps - 1):
        z, h, _, done = env.step(ctrl.act_batch(ctrl.params, z, h, env.cell()))
        zs.append(np.asarray(z))
        if np.asarray(done).all():
            break
    return list(decode_frames(vae, np.concatenate(zs)))


def reconstruction_grid(vae, frames: np.ndarray) -> np.ndarray:
    """Originals over their reconstructions (V's mean latents), one column per frame."""
    from .models.vae_check import reconstruct

    recon = reconstruct(vae, frames)
    rows = [np.concatenate(list(frames), axis=1), np.concatenate(list(recon), axis=1)]
    return np.concatenate(rows, axis=0)


def _sample_frames(folder: Path, n: int, rng: np.random.Generator, per_episode: int = 1) -> np.ndarray:
    """``n`` episodes' worth of random frames (``per_episode`` from each), from the collected episodes."""
    from .data.episodes import list_episodes, load_episode

    files = list_episodes(folder)
    if not files:
        raise UserError(f"{folder}: no episodes to reconstruct; run `wm-trainer collect` first")
    out = []
    for i in rng.choice(len(files), size=n, replace=len(files) < n):
        frames = load_episode(files[i], keys=["frames"])["frames"]
        out.append(frames[rng.integers(len(frames), size=per_episode)])
    return np.concatenate(out)


def _grid_frames(frames: np.ndarray, env_id: str, n: int = 8) -> np.ndarray:
    """``n`` frames for the reconstruction grid; in Doom half of them, where there are any, hold fireballs."""
    from .models.vae_check import frames_with_fireballs

    fire = frames_with_fireballs(frames)[: n // 2] if env_id == DOOM_ID else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(frames)), fire)[: n - len(fire)]
    return frames[np.concatenate([fire, rest])]


def render(cfg: Config) -> list[Path]:
    """Write the agent GIF, the dream GIF and the reconstruction grid to RunPaths.media."""
    from .models.controller import Controller
    from .models.memory import load_mdnrnn
    from .models.vision import load_vae
    from .sim.dream import calibrated_done_bias, initial_latents
    from .sim.rollout import AgentWeights, eval_seeds

    paths = RunPaths(cfg.run_dir)
    adim = env_action_dim(cfg.env.id)
    ctrl = Controller.load(paths.controller_model, (cfg.vae.z_dim, cfg.mdnrnn.hidden, adim))
    vae = load_vae(paths.vae_model, cfg.vae.z_dim, cfg.vae.kl_tolerance)
    mdnrnn = load_mdnrnn(paths.mdnrnn_model, cfg, adim)
    rng = np.random.default_rng(cfg.experiment.seed)
    steps = cfg.evaluate.gif_steps
    media = paths.media
    frames, _ = agent_frames(cfg, AgentWeights.from_models(vae, mdnrnn, ctrl.params[None], ctrl), steps,
                             eval_seeds(cfg.experiment.seed, 1)[0])
    written = [write_gif(media / AGENT_GIF, [_upscale(f) for f in frames])]
    z0 = np.asarray(initial_latents(paths.latents, 1, rng), np.float32)[0]
    dream = dream_frames(vae, mdnrnn, ctrl, z0, cfg, steps, seed=cfg.experiment.seed,
                         done_bias=calibrated_done_bias(paths.dream_calibration))
    written.append(write_gif(media / DREAM_GIF, [_upscale(f) for f in dream]))
    frames = _sample_frames(paths.episodes, 50, rng, per_episode=20)
    grid = reconstruction_grid(vae, _grid_frames(frames, cfg.env.id))
    written.append(write_png(media / RECON_PNG, _upscale(grid)))
    if cfg.env.id == DOOM_ID:
        from .models.vae_check import fireball_check

        written.append(atomic_write_json(media / VAE_CHECK, fireball_check(vae, frames)))
    return written


def main(cfg: Config, args: argparse.Namespace) -> int:
    """CLI: ``wm-trainer render -c CONFIG``."""
    for path in render(cfg):
        print(f"media: {path}")
    return 0
