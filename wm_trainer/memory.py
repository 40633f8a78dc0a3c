"""M: the MDN-RNN (LSTM over [z_t, a_t] -> mixture over z_{t+1}, plus an optional done head).

Training data are random windows of ``seq_len`` steps from encoded episodes; z is sampled
from (mu, logvar) each time a window is served, as in the paper. Each window starts from a
zero LSTM state and gradients flow back through the whole window (truncated BPTT at the
window length). Losses: the MDN negative log-likelihood (sum of log densities over z dims,
logsumexp over mixtures) averaged over valid steps AND divided by z_dim -- the per-dimension
scale the paper's lr 1e-3 and clip 1.0 were tuned for -- plus, with ``done_head``, a
sigmoid cross-entropy whose positives are weighted by ``done_weight``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer.training.updaters import StandardUpdater

import extensions as ext

from . import episodes
from .errors import UserError
from .mdn import MDNHead, mdn_nll_packed
from .storage import load_weights

State = tuple  # (h, c): each (B, hidden)


class SeqLSTM(chainer.Chain):
    """An LSTM whose input projection is one matmul over the whole sequence (fastest on CPU).

    Weights as in ``L.LSTM``: ``upward`` (in -> 4H, with bias) and ``lateral`` (H -> 4H);
    gates interleaved per unit in ``F.lstm``'s order (a, i, f, o); forget-gate bias starts at 1.
    """

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        with self.init_scope():
            self.upward = L.Linear(in_size, 4 * hidden)
            self.lateral = L.Linear(hidden, 4 * hidden, nobias=True)
        self.upward.b.array.reshape(hidden, 4)[:, 2] = 1.0

    def initial_state(self, batch: int) -> State:
        """Zero (h, c) for ``batch`` sequences."""
        z = self.xp.zeros((batch, self.hidden), dtype=self.upward.W.dtype)
        return z, z.copy()

    def _cell(self, gates_in, state: State | None):
        if state is None:
            c = self.xp.zeros((gates_in.shape[0], self.hidden), dtype=gates_in.dtype)
            gates = gates_in
        else:
            h, c = state
            gates = gates_in + self.lateral(h)
        c, h = F.lstm(c, gates)
        return h, (h, c)

    def step(self, x, state: State | None) -> tuple[chainer.Variable, State]:
        """One step for a batch: x (B, in) -> (h (B, H), new state)."""
        return self._cell(self.upward(x), state)

    def forward_seq(self, xs, state: State | None = None) -> tuple[chainer.Variable, State]:
        """A whole batch of sequences: xs (B, T, in) -> (hs (B, T, H), final state)."""
        b, t, n = xs.shape
        xt = F.reshape(F.transpose(xs, (1, 0, 2)), (t * b, n))  # time-major: contiguous per-step slices
        proj = F.reshape(self.upward(xt), (t, b, 4 * self.hidden))
        hs = []
        for g in F.separate(proj, axis=0):
            h, state = self._cell(g, state)
            hs.append(h)
        return F.stack(hs, axis=1), state


def lstm_layer(in_size: int, hidden: int) -> chainer.Link:
    """The one place M's recurrent layer is built (so faster kernels can be switched in)."""
    from .ops import fast_ops_enabled
    from .ops.links import FastSequenceLSTM

    return FastSequenceLSTM(in_size, hidden) if fast_ops_enabled() else SeqLSTM(in_size, hidden)


def weighted_sigmoid_bce(logit, target, weight_pos: float, mask):
    """Masked mean of -[w * y * log s(x) + (1 - y) * log(1 - s(x))]."""
    y = target.astype(logit.dtype)
    per = weight_pos * y * F.softplus(-logit) + (1.0 - y) * F.softplus(logit)
    m = mask.astype(logit.dtype)
    return F.sum(per * m) / max(float(m.sum()), 1.0)


class MDNRNN(chainer.Chain):
    """LSTM over [z_t, a_t] predicting a K-mixture over each dim of z_{t+1} (and, optionally, done)."""

    def __init__(self, z_dim: int, action_dim: int, hidden: int = 256, mixtures: int = 5,
                 done_head: bool = False, done_weight: float = 10.0):
        super().__init__()
        self.z_dim, self.action_dim, self.hidden = z_dim, action_dim, hidden
        self.mixtures, self.done_weight = mixtures, done_weight
        self.has_done = done_head
        with self.init_scope():
            self.rnn = lstm_layer(z_dim + action_dim, hidden)
            self.mdn = MDNHead(hidden, z_dim, mixtures)
            if done_head:
                self.done = L.Linear(hidden, 1)

    def initial_state(self, batch: int) -> State:
        """Zero LSTM state for ``batch`` agents."""
        return self.rnn.initial_state(batch)

    def step(self, z, a, state: State | None) -> tuple[chainer.Variable, State]:
        """One batched step: z (B, z_dim), a (B, A) -> (h (B, hidden), new state)."""
        return self.rnn.step(F.concat((z, a), axis=1), state)

    def predict(self, h) -> tuple:
        """Mixture (logits, mu, log_std), each (B, z_dim, K), and done logits (B,) or None."""
        logits, mu, log_std = self.mdn(h)
        done = F.reshape(self.done(h), (-1,)) if self.has_done else None
        return logits, mu, log_std, done

    def loss(self, z_in, a, z_next, nll_mask, done, done_mask) -> chainer.Variable:
        """Masked per-dimension MDN NLL + weighted done BCE over (B, T) windows; reports loss/nll/done."""
        b, t, _ = z_in.shape
        hs, _ = self.rnn.forward_seq(F.concat((z_in, a), axis=2))
        hs = F.reshape(hs, (b * t, self.hidden))
        per_row = mdn_nll_packed(self.mdn.packed(hs), z_next.reshape(b * t, self.z_dim), self.mixtures,
                                 reduce="no")
        mask = nll_mask.reshape(-1).astype(per_row.dtype)
        nll = F.sum(per_row * mask) / (max(float(mask.sum()), 1.0) * self.z_dim)
        loss = nll
        report = {"nll": nll}
        if self.has_done:
            done_loss = weighted_sigmoid_bce(F.reshape(self.done(hs), (-1,)), done.reshape(-1),
                                             self.done_weight, done_mask.reshape(-1))
            loss = loss + done_loss
            report["done"] = done_loss
        report["loss"] = loss
        chainer.reporter.report(report, self)
        return loss

    forward = loss


def build_mdnrnn(cfg, action_dim: int) -> MDNRNN:
    """M sized from the config (vae.z_dim, mdnrnn.hidden/mixtures/done_head/done_weight)."""
    m = cfg.mdnrnn
    return MDNRNN(cfg.vae.z_dim, action_dim, m.hidden, m.mixtures, m.done_head, m.done_weight)


def load_mdnrnn(path, cfg, action_dim: int) -> MDNRNN:
    """M with weights from ``path`` (RunPaths.mdnrnn_model); UserError if missing or mismatched."""
    return load_weights(path, build_mdnrnn(cfg, action_dim),
                        missing="M's weights are missing; run `wm-trainer train-mdnrnn` first",
                        mismatch="cannot load M's weights with this config (vae.z_dim, mdnrnn.hidden, "
                                 "mdnrnn.mixtures, mdnrnn.done_head)")


def list_latents(folder) -> list[Path]:
    """Encoded episode files (``ep_NNNNNN.npz``) in ``folder``, in index order."""
    return episodes.list_episodes(folder)


class LatentSet:
    """Every encoded episode concatenated in memory: mu/logvar as float16 (half the RAM), actions, dones.

    float16 keeps the paper-scale worst case (10k episodes x 2100 steps x z 64 x 2) near 5 GB;
    its ~1e-3 relative precision is far below the sampling noise exp(logvar / 2).
    """

    def __init__(self, episodes: Sequence[dict]):
        if not episodes:
            raise ValueError("no episodes")
        self.lengths = np.array([len(e["mu"]) for e in episodes], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.mu = np.concatenate([e["mu"] for e in episodes]).astype(np.float16)
        self.logvar = np.concatenate([e["logvar"] for e in episodes]).astype(np.float16)
        self.actions = np.concatenate([np.asarray(e["actions"], np.float32).reshape(len(e["mu"]), -1)
                                       for e in episodes])
        self.dones = np.concatenate([np.asarray(e["dones"], bool) for e in episodes])
        self.z_dim = self.mu.shape[1]
        self.action_dim = self.actions.shape[1]

    @classmethod
    def from_folder(cls, folder) -> LatentSet:
        """Load every encoded episode in ``folder``; corrupt files are skipped with a warning naming them."""
        folder = Path(folder)
        files = list_latents(folder)
        if not files:
            raise UserError(f"{folder}: no encoded episodes; run `wm-trainer encode` first")
        eps = [ep for _, ep in episodes.iter_valid_episodes(files, keys=("mu", "logvar", "actions", "dones"))
               if len(ep["mu"])]
        if not eps:
            raise UserError(f"{folder}: no readable encoded episodes; re-run `wm-trainer encode`")
        return cls(eps)

    def __len__(self) -> int:
        return len(self.lengths)


class SequenceIterator(chainer.dataset.Iterator):
    """Endless batches of random ``seq_len`` windows with z ~ N(mu, exp(logvar)) drawn afresh.

    Batch i depends only on (seed, i), so a resumed run serves exactly the batches it would have.
    Yields dicts: z_in, a (B, T, .), z_next (B, T, z), nll_mask, done, done_mask (B, T).
    A window starts at any step of its episode with equal probability, so every step past the first
    ``seq_len`` -- the last one, whose done is the target and which has no next z, included -- is
    served equally often (starts limited to ``length - seq_len`` served an episode's end 1/seq_len as
    often, and M's done head never saw enough deaths to learn them); steps past the end are padding, masked out.
    """

    def __init__(self, data: LatentSet, batch_size: int, seq_len: int, seed: int = 0):
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.iteration = 0

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """The i-th batch (pure function of seed and i)."""
        d, b, t = self.data, self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, i])
        ep = rng.integers(len(d), size=b)
        length = d.lengths[ep]
        start = (rng.random(b) * length).astype(np.int64)
        offs = start[:, None] + np.arange(t + 1)[None, :]
        valid = offs < length[:, None]
        idx = d.starts[ep][:, None] + np.minimum(offs, length[:, None] - 1)
        mu = d.mu[idx].astype(np.float32)
        std = np.exp(0.5 * d.logvar[idx].astype(np.float32))
        z = mu + std * rng.standard_normal(mu.shape, dtype=np.float32)
        z *= valid[:, :, None]
        v_in = valid[:, :t]
        return {
            "z_in": z[:, :t],
            "a": d.actions[idx[:, :t]] * v_in[:, :, None],
            "z_next": np.ascontiguousarray(z[:, 1:]),
            "nll_mask": valid[:, 1:],
            "done": d.dones[idx[:, :t]] & v_in,
            "done_mask": v_in,
        }

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.iteration)
        self.iteration += 1
        return out

    @property
    def epoch_detail(self) -> float:
        """Windows served / episodes."""
        return self.iteration * self.batch_size / len(self.data)

    @property
    def epoch(self) -> int:
        return int(self.epoch_detail)

    @property
    def is_new_epoch(self) -> bool:
        return int((self.iteration - 1) * self.batch_size / len(self.data)) != self.epoch if self.iteration else False

    def serialize(self, serializer) -> None:
        """Only the batch counter is state."""
        self.iteration = int(serializer("iteration", self.iteration))


def sequence_converter(batch: dict, device=None) -> dict:
    """Send a window batch to ``device``, floats in chainer's current dtype (float64 mode included)."""
    dtype = chainer.get_dtype()
    out = {}
    for k, v in batch.items():
        if v.dtype.kind == "f":
            v = v.astype(dtype, copy=False)
        out[k] = chainer.dataset.to_device(device, v)
    return out


class MDNRNNUpdater(ext.GradientLoggingMixin, StandardUpdater):
    """Truncated BPTT over served windows, with the toolkit's per-parameter gradients and NaN guards."""

    def compute_loss(self, in_arrays) -> chainer.Variable:
        """M's masked loss on one window batch."""
        return self.get_optimizer("main").target.loss(**in_arrays)
