"""V: the paper's convolutional VAE (64x64x3 frames <-> z), its loss and its input converter.

Encoder Conv 32/64/128/256 (k4 s2, ReLU) -> Linear mu, Linear logvar from the 2x2x256 map;
decoder Linear(z, 1024) -> (1024, 1, 1) -> Deconv 128 k5, 64 k5, 32 k6, 3 k6 (s2, ReLU
between, sigmoid out). Loss: summed squared error per image plus the free-bits KL
max(KL, kl_tolerance * z_dim), both averaged over the batch. Inputs are NCHW in [0, 1].
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from ..base.storage import load_weights
from ..ops import conv_layer, deconv_layer, reconstruction_error

ENCODER_CHANNELS = (32, 64, 128, 256)
DECODER_LAYERS = ((128, 5), (64, 5), (32, 6), (3, 6))  # (out channels, kernel), stride 2 each


class ConvVAE(chainer.Chain):
    """The World Models ConvVAE; z_dim=32 gives 4,348,547 parameters."""

    def __init__(self, z_dim: int = 32, kl_tolerance: float = 0.5):
        super().__init__()
        self.z_dim = z_dim
        self.kl_tolerance = kl_tolerance
        with self.init_scope():
            in_ch = 3
            for i, ch in enumerate(ENCODER_CHANNELS):
                setattr(self, f"conv{i}", conv_layer(in_ch, ch, 4, 2, relu=True))
                in_ch = ch
            self.mu = L.Linear(2 * 2 * 256, z_dim)
            self.logvar = L.Linear(2 * 2 * 256, z_dim)
            self.dec_in = L.Linear(z_dim, 1024)
            in_ch = 1024
            for i, (ch, k) in enumerate(DECODER_LAYERS):
                setattr(self, f"deconv{i}", deconv_layer(in_ch, ch, k, 2, relu=i < len(DECODER_LAYERS) - 1))
                in_ch = ch

    def encode(self, x) -> tuple[chainer.Variable, chainer.Variable]:
        """(mu, logvar), each (N, z_dim), for frames x (N, 3, 64, 64) in [0, 1]."""
        h = x
        for i in range(len(ENCODER_CHANNELS)):
            h = getattr(self, f"conv{i}")(h)  # ReLU included
        h = F.reshape(h, (h.shape[0], -1))
        return self.mu(h), self.logvar(h)

    def decode_logits(self, z) -> chainer.Variable:
        """Pre-sigmoid decodings (N, 3, 64, 64)."""
        h = F.reshape(self.dec_in(z), (z.shape[0], 1024, 1, 1))
        for i in range(len(DECODER_LAYERS)):
            h = getattr(self, f"deconv{i}")(h)  # ReLU included, except on the last
        return h

    def decode(self, z) -> chainer.Variable:
        """Frames (N, 3, 64, 64) in [0, 1] for latents z (N, z_dim)."""
        return F.sigmoid(self.decode_logits(z))

    def sample_z(self, mu, logvar) -> chainer.Variable:
        """Reparameterised sample mu + exp(logvar / 2) * eps, eps from the array module's global RNG."""
        xp = self.xp
        eps = xp.random.standard_normal(mu.shape).astype(mu.dtype)
        return mu + F.exp(0.5 * logvar) * eps

    def loss(self, x) -> chainer.Variable:
        """Summed squared error per image + max(KL, kl_tolerance * z_dim), batch means; reports loss/rec/kl."""
        mu, logvar = self.encode(x)
        logits = self.decode_logits(self.sample_z(mu, logvar))
        n = x.shape[0]
        rec = reconstruction_error(logits, x) / n
        kl = -0.5 * F.sum(1.0 + logvar - mu * mu - F.exp(logvar)) / n
        floor = self.xp.asarray(self.kl_tolerance * self.z_dim, dtype=kl.dtype)
        kl_term = F.maximum(kl, chainer.Variable(floor))
        loss = rec + kl_term
        chainer.reporter.report({"loss": loss, "rec": rec, "kl": kl}, self)
        return loss

    forward = loss


def frames_converter(batch, device=None):
    """uint8 NHWC frames -> NCHW floats in [0, 1] of chainer's current dtype, on ``device``."""
    if isinstance(batch, (list, tuple)):
        batch = np.stack([np.asarray(b) for b in batch])
    x = np.asarray(batch)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (N, 64, 64, 3), got {x.shape}")
    dtype = chainer.get_dtype()
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=dtype)
    x *= dtype.type(1.0 / 255.0)
    return chainer.dataset.to_device(device, x)


def to_uint8_frames(x) -> np.ndarray:
    """NCHW floats in [0, 1] (array or Variable, any device) -> uint8 NHWC on the host."""
    a = x.array if isinstance(x, chainer.Variable) else x
    a = chainer.backend.CpuDevice().send(a)
    return np.clip(np.rint(a.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def load_vae(path, z_dim: int, kl_tolerance: float = 0.5) -> ConvVAE:
    """A ConvVAE with weights from ``path`` (RunPaths.vae_model); UserError if missing or mismatched."""
    return load_weights(path, ConvVAE(z_dim, kl_tolerance),
                        missing="V's weights are missing; run `wm-trainer train-vae` first",
                        mismatch=f"cannot load V's weights for vae.z_dim={z_dim}")
