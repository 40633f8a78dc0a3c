"""``wm-trainer train-vae``: V on the collected frames under a Chainer Trainer built with the toolkit.

Resumes from the newest snapshot in ``<run>/vae`` (snapshots every ``vae.snapshot_every``
iterations and at the end); TensorBoard gets the reporter's scalars, the toolkit's gradient
statistics and, every ``vae.recon_every`` iterations, a grid of originals above decodings.
The final weights go to ``<run>/vae.npz`` atomically. The trainer helpers it shares
with ``train_mdnrnn`` (device, tqdm progress, global-RNG snapshotting) live in :mod:`wm_trainer.training.trainer`.
"""
from __future__ import annotations

import math
from pathlib import Path

import chainer
import numpy as np
from chainer import training

import extensions as ext

from . import ops
from .base.errors import UserError
from .base.storage import RunPaths
from .data import episodes, frames
from .models.vision import ConvVAE, frames_converter, to_uint8_frames
from .training import distributed
from .training.trainer import add_common_extensions, resolve_device, save_weights


def sample_frames(folder: Path, n: int, seed: int) -> np.ndarray:
    """Up to n frames (uint8 NHWC) spread over the first readable episodes, for reconstruction grids."""
    out: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for _, ep in episodes.iter_valid_episodes(episodes.list_episodes(folder)[:n], keys=("frames",)):
        f = ep["frames"]
        if len(f):
            out.append(f[rng.integers(len(f))])
        if len(out) >= n:
            break
    return np.stack(out) if out else np.zeros((0, 64, 64, 3), np.uint8)


class ReconstructionGrid(training.Extension):
    """TensorBoard image: a row of originals above the row of their decodings (of mu)."""

    priority = training.PRIORITY_READER

    def __init__(self, model: ConvVAE, originals: np.ndarray, device):
        self.model, self.originals, self.device = model, originals, device

    def __call__(self, trainer) -> None:
        writer = ext.get_writer(trainer)
        if writer is None or not len(self.originals):
            return
        with chainer.no_backprop_mode(), chainer.using_config("train", False):
            mu, _ = self.model.encode(frames_converter(self.originals, self.device))
            decoded = to_uint8_frames(self.model.decode(mu))
        grid = np.concatenate([self.originals, decoded])
        ext.add_image_grid(writer, "vae/reconstruction", grid, trainer.updater.iteration)


def vae_iterations(cfg, n_frames: int) -> int:
    """epochs * frames / batch, at least 1, capped by vae.max_iterations when that is > 0."""
    v = cfg.vae
    iters = max(1, math.ceil(v.epochs * n_frames / v.batch_size))
    return min(iters, v.max_iterations) if v.max_iterations > 0 else iters


def train_vae(cfg) -> Path:
    """Train V (resuming if snapshots exist) and write its weights to RunPaths.vae_model."""
    paths = RunPaths(cfg.run_dir)
    n_frames = frames.count_frames(paths.episodes) if paths.episodes.is_dir() else 0
    if n_frames == 0:
        raise UserError(f"{paths.episodes}: no collected frames; run `wm-trainer collect -c <config>` first")
    ext.set_float64(cfg.debug.float64)
    world = distributed.world(cfg.experiment.device)  # mpiexec -n N: N processes share each batch
    batch = world.share(cfg.vae.batch_size, "vae.batch_size")
    np.random.seed(cfg.experiment.seed)  # the initial weights: the same on every process
    device = resolve_device(world.device(cfg.experiment.device))
    model = ConvVAE(cfg.vae.z_dim, cfg.vae.kl_tolerance)
    model.to_device(device)
    np.random.seed(world.seed(cfg.experiment.seed))  # V's eps; a resumed run restores the state from its snapshot
    loader = frames.FrameLoader(paths.episodes, batch, memory_mb=cfg.vae.loader_memory_mb,
                                seed=cfg.experiment.seed, shard=(world.rank, world.size))
    optimizer = ops.make_adam(alpha=cfg.vae.lr)
    optimizer.setup(model)
    optimizer = world.optimizer(optimizer)
    updater = ext.GradientLoggingUpdater(loader, optimizer, device=device, debug=cfg.debug,
                                         converter=frames_converter, loss_func=model.loss)
    total = vae_iterations(cfg, n_frames)
    trainer = training.Trainer(updater, (total, "iteration"), out=str(paths.vae_dir))
    ext.install(trainer, cfg.debug)
    add_common_extensions(trainer, total=total, snapshot_every=cfg.vae.snapshot_every, desc="train-vae",
                          world=world)
    if cfg.vae.recon_every > 0 and world.writes:
        originals = sample_frames(paths.episodes, 8, cfg.experiment.seed)
        trainer.extend(ReconstructionGrid(model, originals, device), trigger=(cfg.vae.recon_every, "iteration"),
                       name="reconstruction")
    try:
        trainer.run(show_loop_exception_msg=False)
    finally:
        loader.finalize()
    return save_weights(paths.vae_model, model) if world.writes else paths.vae_model


def main(cfg, args) -> int:
    """CLI entry: train V and say where the weights went."""
    out = train_vae(cfg)
    if distributed.current().writes:
        print(f"V weights -> {out}")
    return 0
