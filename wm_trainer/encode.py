"""``wm-trainer encode``: every episode's frames -> V's (mu, logvar), saved with actions, rewards and dones.

One ``latents/ep_NNNNNN.npz`` per episode, written atomically, so a file that exists is complete.
Each records which V encoded it (size and mtime of ``vae.npz``): a re-run skips the files made by
the current V and redoes the others (e.g. after V was retrained). Frames go through V in batches
of ``vae.encode_batch``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import chainer
import numpy as np
from tqdm import tqdm

from .base.errors import UserError
from .base.storage import RunPaths, atomic_savez
from .data import episodes
from .models.vision import ConvVAE, frames_converter, load_vae


def encode_frames(vae: ConvVAE, frames: np.ndarray, batch: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) float32 (T, z) for uint8 frames (T, 64, 64, 3), in batches of ``batch``."""
    mus, logvars = [], []
    cpu = chainer.backend.CpuDevice()
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        for i in range(0, len(frames), batch):
            mu, logvar = vae.encode(frames_converter(frames[i:i + batch], device))
            mus.append(cpu.send(mu.array).astype(np.float32))
            logvars.append(cpu.send(logvar.array).astype(np.float32))
    if not mus:
        z = np.zeros((0, vae.z_dim), np.float32)
        return z, z.copy()
    return np.concatenate(mus), np.concatenate(logvars)


def vae_fingerprint(path: Path) -> str:
    """Identifies one V weights file: its size and modification time."""
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _encoded_by(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as d:
            return "vae" in d.files and str(d["vae"]) == fingerprint
    except Exception:  # noqa: BLE001 - an unreadable output is simply redone
        return False


def _load(src: Path) -> dict | episodes.CorruptEpisode:
    """One episode's arrays, or the error that says why it cannot be read."""
    try:
        return episodes.load_episode(src, ("frames", "actions", "rewards", "dones"))
    except episodes.CorruptEpisode as e:
        return e


def encode_episodes(cfg) -> list[Path]:
    """Encode every readable collected episode not yet encoded; returns every latents file now present."""
    from .training.trainer import resolve_device

    paths = RunPaths(cfg.run_dir)
    sources = episodes.list_episodes(paths.episodes)
    if not sources:
        raise UserError(f"{paths.episodes}: no collected episodes; run `wm-trainer collect -c <config>` first")
    device = resolve_device(cfg.experiment.device)
    vae = load_vae(paths.vae_model, cfg.vae.z_dim, cfg.vae.kl_tolerance)
    vae.to_device(device)
    fingerprint = vae_fingerprint(paths.vae_model)
    todo = [p for p in sources if not _encoded_by(paths.latents / p.name, fingerprint)]
    bar = tqdm(total=len(todo), desc="encode", unit="ep", dynamic_ncols=True, disable=None)
    frames_done = 0
    with ThreadPoolExecutor(1) as reader:  # the next episode is read while V encodes this one
        pending = reader.submit(_load, todo[0]) if todo else None
        for i, src in enumerate(todo):
            ep = pending.result()
            pending = reader.submit(_load, todo[i + 1]) if i + 1 < len(todo) else None
            bar.update(1)
            if isinstance(ep, episodes.CorruptEpisode):
                episodes.warn_corrupt(ep)
                continue
            mu, logvar = encode_frames(vae, ep["frames"], cfg.vae.encode_batch, device)
            atomic_savez(paths.latents / src.name, mu=mu, logvar=logvar,
                         actions=np.asarray(ep["actions"], np.float32),
                         rewards=np.asarray(ep["rewards"], np.float32),
                         dones=np.asarray(ep["dones"], bool), vae=np.str_(fingerprint))
            frames_done += len(mu)
            bar.set_postfix(frames=frames_done)
    bar.close()
    return [paths.latents / p.name for p in sources if _encoded_by(paths.latents / p.name, fingerprint)]


def main(cfg, args) -> int:
    """CLI entry: encode and say where the latents went."""
    out = encode_episodes(cfg)
    print(f"encoded {len(out)} episodes -> {RunPaths(cfg.run_dir).latents}")
    return 0
