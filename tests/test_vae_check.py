"""V's fireball check: recall of fireball pixels in reconstructions, on frames that hold fireballs."""
from __future__ import annotations

import numpy as np

from wm_trainer.models.vae_check import fireball_check, fireball_mask, frames_with_fireballs


class _StubVAE:
    """encode -> the frame itself; decode -> the frame (``keep``) or the frame with its fireballs painted wall."""

    def __init__(self, keep: bool):
        self.keep = keep

    def encode(self, x):
        return x, None

    def decode(self, x):
        if self.keep:
            return x
        y = x.copy()
        fire = (y[:, 0] > 200 / 255) & (y[:, 1] > 150 / 255) & (y[:, 2] < 150 / 255)
        for ch, v in enumerate((0.6, 0.45, 0.3)):
            y[:, ch][fire] = v
        return y


def _frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = np.full((6, 64, 64, 3), (90, 85, 80), np.uint8) + rng.integers(0, 10, (6, 64, 64, 3)).astype(np.uint8)
    frames[1:4, 30:34, 20:24] = (240, 190, 80)  # a fireball in frames 1-3
    frames[5, 10, 10] = (240, 190, 80)  # one stray pixel: too few to count
    return frames


def test_fireball_pixels_are_found_and_counted_per_frame():
    frames = _frames()
    assert fireball_mask(frames).sum() == 3 * 16 + 1
    np.testing.assert_array_equal(frames_with_fireballs(frames), [1, 2, 3])


def test_a_v_that_loses_fireballs_has_recall_zero_and_one_that_keeps_them_recall_one():
    frames = _frames()
    kept = fireball_check(_StubVAE(keep=True), frames)
    lost = fireball_check(_StubVAE(keep=False), frames)
    assert kept["frames"] == 6 and kept["frames_with_fireballs"] == 3
    assert kept["fireball_recall"] == 1.0 and kept["mse_fireball_pixels"] < 1e-4
    assert lost["fireball_recall"] == 0.0 and lost["mse_fireball_pixels"] > 0.05
    assert lost["mse_all_pixels"] < 0.01  # the overall error barely shows what was lost
