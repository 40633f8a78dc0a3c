"""M: the MDN-RNN (LSTM over [z_t, a_t] -> mixture over z_{t+1}, plus an optional done head).

Training data are consecutive windows of ``seq_len`` steps that read each encoded episode
from its start; z is sampled from (mu, logvar) each time a window is served, as in the paper.
The LSTM state is carried from one window of an episode to the next and is zero at the
episode's start, as in the dream; gradients flow back through each window (stateful
truncated BPTT, as the paper's doomrnn trained its chunks). M's input action is the action the
env executes (``envs.executed_action``). Losses: the MDN negative log-likelihood (sum of log densities over z dims,
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

    def loss(self, z_in, a, z_next, nll_mask, done, done_mask, reset=None, h0=None, c0=None) -> chainer.Variable:
        """Masked per-dimension MDN NLL + weighted done BCE over (B, T) windows; reports loss/nll/done.

        The LSTM starts from (h0, c0) (each (B, hidden); zero when not given); ``reset`` is the iterator's
        episode-start flags, which the updater has already applied to (h0, c0).
        """
        return self.loss_and_state(z_in, a, z_next, nll_mask, done, done_mask, h0, c0)[0]

    def loss_and_state(self, z_in, a, z_next, nll_mask, done, done_mask, h0=None, c0=None) -> tuple:
        """(loss, (h, c) after the window's last step): :meth:`loss`, and the state a next window goes on from."""
        b, t, _ = z_in.shape
        state = None if h0 is None else (h0, c0)
        hs, final = self.rnn.forward_seq(F.concat((z_in, a), axis=2), state)
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
        return loss, final

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


def latent_lengths(folder) -> np.ndarray:
    """Steps of each readable encoded episode in ``folder`` (corrupt files skipped, as in training)."""
    files = list_latents(folder)
    return np.array([len(ep["dones"]) for _, ep in episodes.iter_valid_episodes(files, keys=("dones",))], np.int64)


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
    """Endless batches of consecutive ``seq_len`` windows: each of ``batch_size`` lanes reads whole episodes.

    Lane b reads its k-th episode (drawn from (seed, b, k)) from step 0 to its end in consecutive windows,
    then starts another. The batch's ``reset`` (B,) flags the lanes whose window starts an episode; the
    updater starts those from a zero LSTM state and the others from the state the lane's previous window
    ended in (stateful truncated BPTT), so M's state means at every step what it means in the dream, which
    starts each rollout at step 0 from a zero state and runs on. Every step of an episode, its done step
    included, is served once per pass over it. Steps past an episode's end are padding, masked out.
    z ~ N(mu, exp(logvar)) is drawn afresh for every window, as in the paper. The lanes are state:
    ``serialize`` keeps them, so a resumed run serves exactly the batches it would have.
    Yields dicts: z_in, a (B, T, .), z_next (B, T, z), nll_mask, done, done_mask (B, T), reset (B,).
    """

    def __init__(self, data: LatentSet, batch_size: int, seq_len: int, seed: int = 0):
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.iteration = 0
        self.lane_episode = np.full(batch_size, -1, np.int64)
        self.lane_offset = np.zeros(batch_size, np.int64)
        self.lane_count = np.zeros(batch_size, np.int64)

    def _start_episodes(self) -> np.ndarray:
        """Give a new episode to every lane that has finished its own; returns those lanes' flags."""
        ep, off = self.lane_episode, self.lane_offset
        reset = (ep < 0) | (off >= self.data.lengths[np.maximum(ep, 0)])
        for b in np.flatnonzero(reset):
            ep[b] = np.random.default_rng([self.seed, int(b), int(self.lane_count[b])]).integers(len(self.data))
            self.lane_count[b] += 1
            off[b] = 0
        return reset

    def window(self, episode: np.ndarray, start: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Windows of ``seq_len`` steps from step ``start[b]`` of ``episode[b]``, z drawn with ``rng``."""
        d, t = self.data, self.seq_len
        length = d.lengths[episode]
        offs = start[:, None] + np.arange(t + 1)[None, :]
        valid = offs < length[:, None]
        idx = d.starts[episode][:, None] + np.minimum(offs, length[:, None] - 1)
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
        reset = self._start_episodes()
        out = self.window(self.lane_episode, self.lane_offset, np.random.default_rng([self.seed, 1, self.iteration]))
        out["reset"] = reset
        self.lane_offset += self.seq_len
        self.iteration += 1
        return out

    @property
    def epoch_detail(self) -> float:
        """Steps served / steps in the data."""
        return self.iteration * self.batch_size * self.seq_len / max(int(self.data.lengths.sum()), 1)

    @property
    def epoch(self) -> int:
        return int(self.epoch_detail)

    @property
    def is_new_epoch(self) -> bool:
        if not self.iteration:
            return False
        per = self.batch_size * self.seq_len / max(int(self.data.lengths.sum()), 1)
        return int((self.iteration - 1) * per) != self.epoch

    def serialize(self, serializer) -> None:
        """The batch counter and each lane's episode, position and episode count."""
        self.iteration = int(serializer("iteration", self.iteration))
        try:
            for name in ("lane_episode", "lane_offset", "lane_count"):
                setattr(self, name, np.asarray(serializer(name, getattr(self, name)), np.int64))
        except KeyError:  # a snapshot without lanes: every lane starts a new episode
            pass


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
    """Stateful truncated BPTT over the iterator's lanes, with the toolkit's per-parameter gradients and guards.

    Each window starts from the LSTM state the lane's previous window ended in (no gradient flows back
    into it), or from zero where the iterator flags an episode start.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._carry: tuple | None = None  # (h, c) after each lane's last window
        self._final: tuple | None = None  # (h, c) of the iteration in progress

    def _zero_state(self) -> tuple:
        model = self.get_optimizer("main").target
        shape = (self.get_iterator("main").batch_size, model.hidden)
        z = model.xp.zeros(shape, dtype=chainer.get_dtype())
        return z, z.copy()

    def next_batch(self) -> dict:
        """The converted window batch, with the start state (h0, c0): carried, zero at episode starts."""
        in_arrays = super().next_batch()
        reset = in_arrays.pop("reset")
        h, c = self._carry if self._carry is not None else self._zero_state()
        xp = chainer.backend.get_array_module(h)
        keep = (~xp.asarray(reset))[:, None].astype(h.dtype)
        in_arrays["h0"], in_arrays["c0"] = h * keep, c * keep
        return in_arrays

    def compute_loss(self, in_arrays) -> chainer.Variable:
        """M's masked loss on one window batch; keeps the final state for the next window."""
        loss, (h, c) = self.get_optimizer("main").target.loss_and_state(**in_arrays)
        self._final = (h.array, c.array)
        return loss

    def update_core(self) -> None:
        """One iteration; the lanes then go on from the state it ended in."""
        super().update_core()
        self._carry = self._final

    def serialize(self, serializer) -> None:
        """StandardUpdater's state and the toolkit's, plus the carried LSTM state (so a resume is exact)."""
        super().serialize(serializer)
        cpu = chainer.backend.CpuDevice()
        h, c = (cpu.send(a) for a in (self._carry if self._carry is not None else self._zero_state()))
        try:
            h, c = serializer("carry_h", np.array(h)), serializer("carry_c", np.array(c))
        except KeyError:  # a snapshot without it: every lane restarts from zero
            return
        if isinstance(serializer, chainer.serializer.Deserializer):
            device = self.get_optimizer("main").target.device
            self._carry = (device.send(np.asarray(h)), device.send(np.asarray(c)))
