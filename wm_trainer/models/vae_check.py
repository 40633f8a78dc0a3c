"""Does V keep what the agent must dodge? Reconstruction of Take Cover's fireballs, measured on real frames.

A fireball pixel is bright yellow (R > 200, G > 150, B < 150): nothing else in Take Cover's scene is (the
walls peak near R 170). On frames holding at least ``min_pixels`` of them we measure the squared error on
those pixels beside the error on all pixels, and the recall: the share of fireball pixels that V's
reconstruction (from the posterior mean) still draws as fireball-coloured (R > 170, G > 120, B < 170).
A V that blurs fireballs into the wall scores a recall near 0, whatever its overall error.
"""
from __future__ import annotations

import chainer
import numpy as np


def fireball_mask(frames: np.ndarray) -> np.ndarray:
    """(N, 64, 64) bool: the fireball pixels of uint8 frames (N, 64, 64, 3)."""
    f = np.asarray(frames)
    return (f[..., 0] > 200) & (f[..., 1] > 150) & (f[..., 2] < 150)


def _fireball_like(frames: np.ndarray) -> np.ndarray:
    f = np.asarray(frames)
    return (f[..., 0] > 170) & (f[..., 1] > 120) & (f[..., 2] < 170)


def reconstruct(vae, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """V's reconstructions (uint8, like ``frames``) from the posterior means."""
    from .vision import frames_converter, to_uint8_frames

    out = []
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for i in range(0, len(frames), batch):
            mu, _ = vae.encode(frames_converter(frames[i:i + batch]))
            out.append(to_uint8_frames(vae.decode(mu)))
    return np.concatenate(out) if out else np.zeros_like(frames)


def fireball_check(vae, frames: np.ndarray, min_pixels: int = 4) -> dict:
    """Errors and fireball recall of V on ``frames`` (N, 64, 64, 3) uint8; frames without fireballs count once."""
    frames = np.asarray(frames)
    mask = fireball_mask(frames)
    with_fire = mask.reshape(len(frames), -1).sum(1) >= min_pixels
    out = {"frames": int(len(frames)), "frames_with_fireballs": int(with_fire.sum())}
    if not len(frames):
        return out
    recon = reconstruct(vae, frames)
    err = ((recon.astype(np.float64) - frames) / 255.0) ** 2  # (N, 64, 64, 3)
    out["mse_all_pixels"] = float(err.mean())
    if with_fire.any():
        m = mask & with_fire[:, None, None]
        out["mse_fireball_pixels"] = float(err[m].mean())
        out["fireball_recall"] = float(_fireball_like(recon)[m].mean())
    return out


def frames_with_fireballs(frames: np.ndarray, min_pixels: int = 4) -> np.ndarray:
    """Indices of the frames holding at least ``min_pixels`` fireball pixels."""
    return np.flatnonzero(fireball_mask(frames).reshape(len(frames), -1).sum(1) >= min_pixels)
