"""The dream: M as an environment for a whole population at once (one batched LSTM step per call).

Each ``step`` runs the LSTM and the MDN/done heads for all B agents with two matmuls on
precomputed weights (gates reordered gate-major, sigmoid folded into one tanh), samples the
next z at temperature tau, and ends agents whose done logit is > 0 (sigmoid > 0.5) -- the
deterministic threshold the paper's doomrnn used (``if logrestart[0] > 0: done = True``),
so done is a property of the dreamed state, and tau alone sets the dream's randomness --
or that reach ``max_steps``.

Randomness is per agent and counter-based: agent b's numbers at step t are a hash of
(its seed, t, slot), so a batch of B agents reproduces B single-agent runs with the same
seeds exactly, whatever the batch composition (no Python loop over agents either).
"""
from __future__ import annotations

import math

import chainer
import numpy as np

from .errors import UserError
from .memory import MDNRNN, list_latents

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic), in place."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def agent_keys(seeds) -> np.ndarray:
    """Per-agent 64-bit stream keys from integer seeds."""
    s = np.asarray(seeds, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(s * _GOLDEN + _GOLDEN)


def counter_uniform(keys: np.ndarray, step: int, slots: int) -> np.ndarray:
    """Uniforms in (0, 1], shape (B, slots): a pure function of (key_b, step, slot)."""
    counter = np.uint64(step) * np.uint64(slots) + np.arange(slots, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = keys[:, None] ^ (counter[None, :] * _GOLDEN)
        x = _mix64(x)
    return ((x >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 2.0**53)


class DreamEnv:
    """B dreamed episodes stepped together; done from M's done head (logit > 0) or ``max_steps``.

    M's weights are copied to host numpy arrays when the env is built (later changes to M need a
    new env); stepping is plain numpy, so no graph is ever built, whatever Chainer's config.
    """

    def __init__(self, mdnrnn: MDNRNN, *, temperature: float = 1.0, max_steps: int = 2100, seed: int = 0,
                 reward_per_step: float = 1.0):
        self.m = mdnrnn
        self.temperature = float(temperature)
        self.max_steps = int(max_steps)
        self.reward_per_step = float(reward_per_step)
        self._rng = np.random.default_rng(seed)
        self.z_dim, self.action_dim, self.hidden = mdnrnn.z_dim, mdnrnn.action_dim, mdnrnn.hidden
        self.K = mdnrnn.mixtures
        self._prepare_weights()
        self.batch = 0

    def _prepare_weights(self) -> None:
        m, H = self.m, self.hidden
        cpu = chainer.backend.CpuDevice()
        w_up = cpu.send(m.rnn.upward.W.array)
        self.dtype = w_up.dtype
        # F.lstm interleaves gates per unit (a, i, f, o); reorder to blocks [a | i | f | o].
        order = np.arange(4 * H).reshape(H, 4).T.reshape(-1)
        w = np.concatenate([w_up, cpu.send(m.rnn.lateral.W.array)], axis=1).T[:, order]
        b = cpu.send(m.rnn.upward.b.array)[order]
        # sigmoid(x) = 0.5 * tanh(x / 2) + 0.5: halve the i, f, o columns so one tanh serves all gates
        w = w.copy()
        w[:, H:] *= 0.5
        b = b * np.concatenate([np.ones(H), np.full(3 * H, 0.5)]).astype(self.dtype)
        self._w_lstm = np.ascontiguousarray(w, dtype=self.dtype)
        self._b_lstm = b.astype(self.dtype)
        heads_w = [cpu.send(m.mdn.linear.W.array)]
        heads_b = [cpu.send(m.mdn.linear.b.array)]
        if m.has_done:
            heads_w.append(cpu.send(m.done.W.array))
            heads_b.append(cpu.send(m.done.b.array))
        # MDNHead's columns are (dim j, part p, mixture k) -> j*3K + p*K + k; reorder to (p, k, j) so
        # each mixture component is a contiguous (B, z_dim) block and K-loops are cheap elementwise ops
        zd, K = self.z_dim, self.K
        jj, pp, kk = np.meshgrid(np.arange(zd), np.arange(3), np.arange(K), indexing="ij")
        perm = np.empty(3 * K * zd, dtype=np.int64)
        perm[(pp * K * zd + kk * zd + jj).ravel()] = (jj * 3 * K + pp * K + kk).ravel()
        if m.has_done:
            perm = np.append(perm, 3 * K * zd)
        self._w_head = np.ascontiguousarray(np.concatenate(heads_w, axis=0).T[:, perm], dtype=self.dtype)
        self._b_head = np.concatenate(heads_b)[perm].astype(self.dtype)

    def _alloc(self, batch: int) -> None:
        zd, A, H = self.z_dim, self.action_dim, self.hidden
        self.batch = batch
        self._x = np.zeros((batch, zd + A + H), dtype=self.dtype)  # [z | a | h]
        self._gates = np.empty((batch, 4 * H), dtype=self.dtype)
        self._head = np.empty((batch, self._w_head.shape[1]), dtype=self.dtype)
        self._c = np.zeros((batch, H), dtype=self.dtype)

    def reset(self, initial_z: np.ndarray, seeds=None) -> tuple[np.ndarray, np.ndarray]:
        """Start B agents from ``initial_z`` (B, z_dim); per-agent ``seeds`` (B,) or drawn from the env's seed.

        Returns (z, h): the start latents and a zero hidden state, (B, z_dim) and (B, hidden).
        """
        z0 = np.asarray(initial_z, dtype=self.dtype)
        if z0.ndim != 2 or z0.shape[1] != self.z_dim:
            raise ValueError(f"initial_z must be (B, {self.z_dim}), got {z0.shape}")
        b = len(z0)
        if seeds is None:
            seeds = self._rng.integers(0, 2**62, size=b)
        seeds = np.asarray(seeds)
        if seeds.shape != (b,):
            raise ValueError(f"seeds must have shape ({b},), got {seeds.shape}")
        if b != self.batch:
            self._alloc(b)
        self._keys = agent_keys(seeds)
        self._x.fill(0)
        self._c.fill(0)
        self._x[:, :self.z_dim] = z0
        self.t = 0
        self.done = np.zeros(b, dtype=bool)
        return z0.copy(), np.zeros((b, self.hidden), dtype=self.dtype)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Advance every agent one step: returns (z, h, reward, done), each batched over agents.

        Agents already done stay done with reward 0 and frozen z, h; only the live ones are computed
        (gathered into the leading rows of the work buffers), so a mostly finished batch is cheap.
        """
        zd, A = self.z_dim, self.action_dim
        b = self.batch
        x = self._x
        x[:, zd:zd + A] = np.asarray(actions, dtype=self.dtype).reshape(b, A)
        alive = ~self.done
        rows = None if alive.all() else np.flatnonzero(alive)
        self.t += 1
        if rows is None:
            h, c, z, done_logit = self._advance(x, self._c, self._keys)
            self._c = c
            x[:, :zd], x[:, zd + A:] = z, h
        elif len(rows):
            h, c, z, done_logit = self._advance(x[rows], self._c[rows], self._keys[rows])
            self._c[rows] = c
            x[rows, :zd], x[rows, zd + A:] = z, h
        ended = np.full(b if rows is None else len(rows), self.t >= self.max_steps)
        if self.m.has_done and (rows is None or len(rows)):
            ended |= done_logit > 0
        reward = np.where(alive, self.reward_per_step, 0.0).astype(np.float32)
        if rows is None:
            self.done = ended
        else:
            self.done = self.done.copy()
            self.done[rows] = ended
        return x[:, :zd].copy(), x[:, zd + A:].copy(), reward, self.done.copy()

    def _advance(self, x: np.ndarray, c: np.ndarray, keys: np.ndarray):
        """LSTM + heads + sampling for n agents' rows [z | a | h] and cells c: (h, c, z, done logit)."""
        zd, H, K = self.z_dim, self.hidden, self.K
        n = len(x)
        g = self._gates[:n]
        # one matmul for [z, a, h]; gates a | i | f | o, with i, f, o pre-halved so tanh gives all four
        np.dot(x, self._w_lstm, out=g)
        g += self._b_lstm
        np.tanh(g, out=g)
        sig = g[:, H:]
        sig *= 0.5
        sig += 0.5
        c_new = g[:, :H] * g[:, H:2 * H]
        c_new += g[:, 2 * H:3 * H] * c
        h_new = np.tanh(c_new)
        h_new *= g[:, 3 * H:]
        # heads: the mixture as (3, K, z) blocks, then the done logit
        y = np.dot(h_new, self._w_head, out=self._head[:n])
        y += self._b_head
        mix = y[:, :zd * 3 * K].reshape(n, 3, K, zd)
        z_new = self._sample(mix[:, 0], mix[:, 1], mix[:, 2], keys)
        return h_new, c_new, z_new, y[:, -1]

    def _sample(self, logits: np.ndarray, mu: np.ndarray, log_std: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Per (agent, dim): mixture from softmax(logits / tau), then mu + exp(log_std) sqrt(tau) eps.

        Inputs are (B, K, z_dim); loops run over the K mixtures only.
        """
        K, zd = logits.shape[1], logits.shape[2]
        tau = max(self.temperature, 1e-6)
        u = counter_uniform(keys, self.t, 3 * zd).astype(self.dtype)
        top = logits.max(axis=1)
        p = np.exp((logits - top[:, None, :]) * (1.0 / tau))
        thresh = u[:, :zd] * p.sum(axis=1)
        cum = np.zeros_like(thresh)
        mu_k = mu[:, K - 1].copy()
        ls_k = log_std[:, K - 1].copy()
        chosen = np.zeros(thresh.shape, dtype=bool)
        for k in range(K - 1):
            cum += p[:, k]
            pick = (cum >= thresh) & ~chosen
            np.copyto(mu_k, mu[:, k], where=pick)
            np.copyto(ls_k, log_std[:, k], where=pick)
            chosen |= pick
        # Box-Muller from two more uniforms
        eps = np.sqrt(-2.0 * np.log(u[:, zd:2 * zd])) * np.cos((2.0 * math.pi) * u[:, 2 * zd:])
        return mu_k + np.exp(ls_k) * (math.sqrt(tau) * eps)


def initial_latents(latents_folder, n: int, rng: np.random.Generator) -> np.ndarray:
    """n start latents (n, z) float32: z ~ N(mu, exp(logvar)) of the first frame of random encoded episodes."""
    files = list_latents(latents_folder)
    if not files:
        raise UserError(f"{latents_folder}: no encoded episodes for the dream's start states; "
                        "run `wm-trainer encode` first")
    chosen = rng.choice(len(files), size=min(n, len(files)), replace=False)
    mus, logvars = [], []
    for i in chosen:
        try:
            with np.load(files[i]) as d:
                mus.append(np.asarray(d["mu"][0], np.float32))
                logvars.append(np.asarray(d["logvar"][0], np.float32))
        except Exception as e:  # noqa: BLE001 - name the bad file
            raise UserError(f"{files[i]}: unreadable encoded episode ({type(e).__name__}: {e}); "
                            "delete it and re-run `wm-trainer encode`") from None
    pick = rng.integers(len(mus), size=n)
    mu, logvar = np.stack(mus)[pick], np.stack(logvars)[pick]
    return (mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape)).astype(np.float32)


def decode_frames(vae, z: np.ndarray, batch: int = 256) -> np.ndarray:
    """Decode latents (N, z) with V into uint8 frames (N, 64, 64, 3), e.g. for dream GIFs."""
    from .vision import to_uint8_frames

    z = np.asarray(z, dtype=chainer.get_dtype())
    out = []
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        for i in range(0, len(z), batch):
            zb = vae.xp.asarray(z[i:i + batch])
            out.append(to_uint8_frames(vae.decode(zb)))
    if not out:
        return np.zeros((0, 64, 64, 3), np.uint8)
    return np.concatenate(out)


__all__ = ["DreamEnv", "agent_keys", "counter_uniform", "decode_frames", "initial_latents"]
