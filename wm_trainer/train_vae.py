"""``wm-trainer train-vae``: V on the collected frames under a Chainer Trainer built with the toolkit.

Resumes from the newest snapshot in ``<run>/vae`` (snapshots every ``vae.snapshot_every``
iterations and at the end); TensorBoard gets the reporter's scalars, the toolkit's gradient
statistics and, every ``vae.recon_every`` iterations, a grid of originals above decodings.
The final weights go to ``<run>/vae.npz`` atomically. The trainer helpers here (device,
tqdm progress, global-RNG snapshotting) serve ``train_mdnrnn`` too.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import chainer
import numpy as np
from chainer import training
from tqdm import tqdm

import extensions as ext

from . import episodes, frames, gpu_compat, ops
from .errors import UserError
from .storage import RunPaths, atomic_write_bytes
from .vision import ConvVAE, frames_converter, to_uint8_frames

SNAPSHOT_NAME = "snapshot_iter_{.updater.iteration}"


def resolve_device(index: int) -> chainer.backend.Device:
    """-1 -> CPU, N -> CUDA device N through the CuPy shims (UserError when CuPy or the GPU is missing)."""
    return gpu_compat.use_device(index)


class TqdmProgress(training.Extension):
    """A tqdm bar (stderr) over the iterations, with the latest reported ``loss``."""

    trigger = (1, "iteration")
    priority = training.PRIORITY_READER

    def __init__(self, total: int, desc: str, key: str = "main/loss"):
        self.total, self.desc, self.key = total, desc, key
        self._bar = None

    def __call__(self, trainer) -> None:
        if self._bar is None:  # opened at the first call: after a snapshot's autoload, so resumes start mid-bar
            self._bar = tqdm(total=self.total, initial=trainer.updater.iteration, desc=self.desc, unit="it",
                             dynamic_ncols=True, disable=None)
        self._bar.update(trainer.updater.iteration - self._bar.n)
        loss = trainer.observation.get(self.key)
        if loss is not None:
            self._bar.set_postfix(loss=f"{float(chainer.as_array(loss)):.4g}", refresh=False)

    def finalize(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class GlobalRNGState(training.Extension):
    """Saves numpy's global RNG (V's reparameterisation noise) in snapshots, so a resumed run is the same run."""

    trigger = (1, "iteration")
    priority = training.PRIORITY_READER

    def __call__(self, trainer) -> None:
        """Nothing to do per iteration; the state travels through ``serialize``."""

    def serialize(self, serializer) -> None:
        """Write or restore ``np.random``'s MT19937 state."""
        if isinstance(serializer, chainer.serializer.Serializer):
            _, keys, pos, has_gauss, cached = np.random.get_state()
            serializer("keys", keys)
            serializer("pos", int(pos))
            serializer("has_gauss", int(has_gauss))
            serializer("cached", float(cached))
        else:
            try:
                keys = serializer("keys", np.zeros(624, np.uint32))
            except KeyError:  # snapshot from before this extension existed
                return
            state = ("MT19937", keys, serializer("pos", 0), serializer("has_gauss", 0), serializer("cached", 0.0))
            np.random.set_state(state)


def snapshot_trigger(every: int, total: int) -> Callable[[training.Trainer], bool]:
    """Fire every ``every`` iterations and at the last one, so a finished run can be extended."""
    def fire(trainer) -> bool:
        it = trainer.updater.iteration
        return it % every == 0 or it >= total
    return fire


def save_npz_fast(file, obj) -> None:
    """``save_npz`` without zlib: float weights barely compress, and compressing V's 50 MB costs seconds."""
    chainer.serializers.save_npz(file, obj, compression=False)


def save_weights(path, model: chainer.Link) -> Path:
    """A model's final weights to ``path`` atomically (uncompressed npz, loadable with ``load_npz``)."""
    buf = io.BytesIO()
    save_npz_fast(buf, model)
    return atomic_write_bytes(path, buf.getvalue())


def add_common_extensions(trainer: training.Trainer, *, total: int, snapshot_every: int, desc: str,
                          log_every: int = 10) -> None:
    """Auto-resuming snapshots, the log, the global-RNG state and the progress bar."""
    trainer.extend(GlobalRNGState(), name="global_rng")
    trainer.extend(ext.snapshot(savefun=save_npz_fast, filename=SNAPSHOT_NAME, autoload=True, n_retains=2),
                   trigger=snapshot_trigger(snapshot_every, total), name="snapshot")
    trainer.extend(ext.LogReport(trigger=(max(1, min(log_every, total)), "iteration")), name="log")
    trainer.extend(TqdmProgress(total, desc), name="progress")


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
    np.random.seed(cfg.experiment.seed)  # V's eps; a resumed run restores the state from its snapshot
    device = resolve_device(cfg.experiment.device)
    model = ConvVAE(cfg.vae.z_dim, cfg.vae.kl_tolerance)
    model.to_device(device)
    loader = frames.FrameLoader(paths.episodes, cfg.vae.batch_size, memory_mb=cfg.vae.loader_memory_mb,
                                seed=cfg.experiment.seed)
    optimizer = ops.make_adam(alpha=cfg.vae.lr)
    optimizer.setup(model)
    updater = ext.GradientLoggingUpdater(loader, optimizer, device=device, debug=cfg.debug,
                                         converter=frames_converter, loss_func=model.loss)
    total = vae_iterations(cfg, n_frames)
    trainer = training.Trainer(updater, (total, "iteration"), out=str(paths.vae_dir))
    ext.install(trainer, cfg.debug)
    add_common_extensions(trainer, total=total, snapshot_every=cfg.vae.snapshot_every, desc="train-vae")
    if cfg.vae.recon_every > 0:
        originals = sample_frames(paths.episodes, 8, cfg.experiment.seed)
        trainer.extend(ReconstructionGrid(model, originals, device), trigger=(cfg.vae.recon_every, "iteration"),
                       name="reconstruction")
    try:
        trainer.run(show_loop_exception_msg=False)
    finally:
        loader.finalize()
    return save_weights(paths.vae_model, model)


def main(cfg, args) -> int:
    """CLI entry: train V and say where the weights went."""
    out = train_vae(cfg)
    print(f"V weights -> {out}")
    return 0
