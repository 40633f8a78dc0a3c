"""The dream: M as an environment for a whole population at once (one batched LSTM step per call).

Each ``step`` feeds M the action the environment would execute (``action_map``, e.g. Doom's -1/0/+1),
runs the LSTM and the MDN/done heads for all B agents with two matmuls on precomputed weights (gates
reordered gate-major, sigmoid folded into one tanh), samples the next z at temperature tau, and ends
agents whose done logit is > 0 -- the deterministic threshold the paper's doomrnn used (``if
logrestart[0] > 0: done = True``) -- or, with ``done_mode='sample'``, with probability
sigmoid(logit - log w), the done head's probability with its x w weighting of positives undone; and
agents that reach ``max_steps``. ``done_bias`` is added to the done logit in both modes (0: M as trained;
a calibrated value makes the dream as hard as the game for the collection policy).

Randomness is per agent and counter-based: agent b's numbers at step t are a hash of
(its seed, t, slot), so a batch of B agents reproduces B single-agent runs with the same
seeds exactly, whatever the batch composition (no Python loop over agents either).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import chainer
import numpy as np

from extensions.serializers import NpzLoadError, SafeNpz

from ..base.errors import UserError
from ..data.latents import list_latents
from ..models.memory import MDNRNN
from ..ops.threads import run_chunks

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic), in place (``tmp``: scratch)."""
    tmp = np.empty_like(x) if tmp is None else tmp
    for shift, mult in ((_S30, _M1), (_S27, _M2), (_S31, None)):
        np.right_shift(x, shift, out=tmp)
        x ^= tmp
        if mult is not None:
            x *= mult
    return x


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def agent_keys(seeds) -> np.ndarray:
    """Per-agent 64-bit stream keys from integer seeds."""
    s = np.asarray(seeds, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(s * _GOLDEN + _GOLDEN)


def counter_uniform(keys: np.ndarray, step: int, slots: int) -> np.ndarray:
    """Uniforms in (0, 1], shape (B, slots), float64 with 53 random bits: a pure function of (key_b, step, slot)."""
    counter = np.uint64(step) * np.uint64(slots) + np.arange(slots, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = keys[:, None] ^ (counter[None, :] * _GOLDEN)
        x = _mix64(x)
    return ((x >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 2.0**53)


def counter_uniform32(keys: np.ndarray, step: int, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 uniform arrays in (0, 1], each (pairs, B) (agents along the last axis), from one hash pass.

    Hash (key_b, step, i) gives 64 bits; its low and high 32-bit halves give one uniform each (24 bits:
    all a float32 in (0, 1] can hold). Like :func:`counter_uniform`, column b depends on key b alone.
    ``wm_trainer.sim.dream_cuda`` computes the same bits on a GPU.
    """
    counter = np.uint64(step) * np.uint64(pairs) + np.arange(pairs, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.bitwise_xor((counter * _GOLDEN)[:, None], keys[None, :])
        _mix64(x)
    halves = (x & _LOW32, x >> np.uint64(32))
    out = []
    for half in halves:
        half >>= np.uint64(8)  # < 2**24: exact in float32, and int32 converts fast
        u = half.astype(np.int32).astype(np.float32)
        u += 1.0
        u *= np.float32(2.0**-24)
        out.append(u)
    return out[0], out[1]


_LOW32 = np.uint64(0xFFFFFFFF)
_DONE_SALT = np.uint64(0xD1B54A32D192ED03)  # a separate stream for the sampled done (no shared counters)


def _splitter(size: int, min_chunk: int) -> Callable[[Callable[[int, int], object], int], None]:
    """Run ``fn(lo, hi)`` over slices of ``range(n)`` on ops' worker threads when the batch pays for the hand-off."""
    if size < 2 * _MIN_AGENTS_PER_THREAD:
        return lambda fn, n: fn(0, n)
    return lambda fn, n: run_chunks(fn, n, min_chunk=min_chunk)


_MIN_AGENTS_PER_THREAD = 128


class DreamEnv:
    """B dreamed episodes stepped together; done from M's done head (see the module) or ``max_steps``.

    M's weights are copied when the env is built (later changes to M need a new env), onto ``device``
    (default: where M's weights are, so an M on a GPU dreams on that GPU through CuPy); stepping is
    plain array code, so no graph is ever built, whatever Chainer's config. ``reset`` and ``step`` return
    NumPy arrays; with ``host_outputs=False`` z and h stay on the env's device instead (a GPU dream whose
    controllers run on the GPU too then moves only the done flags to the host each step). Actions may be
    NumPy arrays or arrays on the env's device.
    State is kept agent-minor, e.g. x = [z; a; h; 1] is (z + a + hidden + 1, B): every gate, unit
    block and mixture component is then one contiguous block, and the 1-row folds both biases
    into the two matmuls.
    """

    def __init__(self, mdnrnn: MDNRNN, *, temperature: float = 1.0, max_steps: int = 2100, seed: int = 0,
                 reward_per_step: float = 1.0, device=None, host_outputs: bool = True,
                 action_map: Callable | None = None, done_mode: str = "threshold", done_bias: float = 0.0):
        if done_mode not in ("threshold", "sample"):
            raise ValueError(f"done_mode must be 'threshold' or 'sample', got {done_mode!r}")
        self.m = mdnrnn
        self.action_map = action_map
        self.done_mode = done_mode
        # the done head was trained with positives weighted w: its logit is log(w p / (1 - p)), so p's logit
        # is the head's minus log w (what 'sample' draws from; 'threshold' keeps the paper's logit > 0)
        self._done_shift = math.log(mdnrnn.done_weight) if mdnrnn.has_done and mdnrnn.done_weight > 0 else 0.0
        self.done_bias = float(done_bias)
        self.host_outputs = bool(host_outputs)
        self.device = chainer.get_device(device) if device is not None else mdnrnn.device
        self.xp = self.device.xp
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
        # F.lstm interleaves gates per unit (a, i, f, o); reorder to blocks [a; i; f; o], bias as the last column
        order = np.arange(4 * H).reshape(H, 4).T.reshape(-1)
        w = np.concatenate([w_up, cpu.send(m.rnn.lateral.W.array), cpu.send(m.rnn.upward.b.array)[:, None]],
                           axis=1)[order]
        # sigmoid(x) = 0.5 * tanh(x / 2) + 0.5: halve the i, f, o rows so one tanh serves all gates
        w[H:] *= 0.5
        self._w_lstm = self.device.send(np.ascontiguousarray(w, dtype=self.dtype))
        heads_w = [cpu.send(m.mdn.linear.W.array)]
        heads_b = [cpu.send(m.mdn.linear.b.array)]
        if m.has_done:
            heads_w.append(cpu.send(m.done.W.array))
            heads_b.append(cpu.send(m.done.b.array))
        # MDNHead's rows are (dim j, part p, mixture k) -> j*3K + p*K + k; reorder to (p, k, j) so
        # each mixture component is a contiguous (z_dim, B) block and K-loops are cheap elementwise ops
        zd, K = self.z_dim, self.K
        jj, pp, kk = np.meshgrid(np.arange(zd), np.arange(3), np.arange(K), indexing="ij")
        perm = np.empty(3 * K * zd, dtype=np.int64)
        perm[(pp * K * zd + kk * zd + jj).ravel()] = (jj * 3 * K + pp * K + kk).ravel()
        if m.has_done:
            perm = np.append(perm, 3 * K * zd)
        w = np.concatenate([np.concatenate(heads_w, axis=0), np.concatenate(heads_b)[:, None]], axis=1)[perm]
        self.joint = m.joint
        if self.joint:  # one mixture for the whole z: every dim reads dim 0's logits (and one uniform picks)
            logits = w[:K * zd].reshape(K, zd, -1)
            logits[:] = logits[:, :1]
        self._w_head_m = self.device.send(np.ascontiguousarray(w, dtype=self.dtype))
        self._folded_tau: float | None = None

    def _fold_temperature(self) -> None:
        """Fold tau into the head: logits / tau, and log_std + log(sqrt(tau)) so exp gives sigma sqrt(tau)."""
        tau = max(self.temperature, 1e-6)
        L = self.K * self.z_dim
        w = self._w_head_m.copy()
        w[:L] /= tau
        w[2 * L:3 * L, -1] += 0.5 * math.log(tau)
        self._w_head = w
        self._folded_tau = self.temperature

    def _alloc(self, batch: int) -> None:
        zd, A, H = self.z_dim, self.action_dim, self.hidden
        self.batch = batch
        self._x = self.xp.zeros((zd + A + H + 1, batch), dtype=self.dtype)  # [z; a; h; 1]
        self._c = self.xp.zeros((H, batch), dtype=self.dtype)
        self._work: dict[int, dict[str, np.ndarray]] = {}

    def _buffers(self, n: int) -> dict[str, np.ndarray]:
        """Work arrays for n live agents, kept for the full batch and the most recent smaller n."""
        if n not in self._work:
            if len(self._work) > 1:
                self._work = {k: v for k, v in self._work.items() if k == self.batch}
            zd, H, K, xp = self.z_dim, self.hidden, self.K, self.xp
            self._work[n] = {
                "gates": xp.empty((4 * H, n), dtype=self.dtype),
                "head": xp.empty((self._w_head_m.shape[0], n), dtype=self.dtype),
            }
            if xp is np:  # the NumPy sampling's work arrays (dream_cuda's kernel needs none)
                self._work[n]["p"] = np.empty((K, zd, n), dtype=self.dtype)
                # flat index in the head buffer of (mixture 0's mean, dim j, agent b); + k zd n picks mixture k
                self._work[n]["mu_index"] = (K * zd + np.arange(zd))[:, None] * n + np.arange(n)[None, :]
        return self._work[n]

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
        keys = agent_keys(seeds)
        self._keys = self.device.send(keys)
        with np.errstate(over="ignore"):
            self._done_keys = _mix64(keys ^ _DONE_SALT)
        self._x.fill(0)
        self._x[-1] = 1.0
        self._c.fill(0)
        self._x[:self.z_dim] = self.device.send(np.ascontiguousarray(z0.T))
        self.t = 0
        self.done = np.zeros(b, dtype=bool)
        return self._out(self._x[:self.z_dim]), self._out(self._x[self.z_dim + self.action_dim:-1])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Advance every agent one step: returns (z, h, reward, done), each batched over agents (B, ...).

        Agents already done stay done with reward 0 and frozen z, h; only the live ones are computed
        (gathered into their own work arrays), so a mostly finished batch is cheap. z and h are fresh
        Fortran-ordered (B, dim) arrays (transposes of the agent-minor state: no transposing copy).
        """
        zd, A, H = self.z_dim, self.action_dim, self.hidden
        b = self.batch
        x = self._x
        actions = actions if isinstance(actions, self.xp.ndarray) else np.asarray(actions)
        if self.action_map is not None:
            actions = self.action_map(actions)
        x[zd:zd + A] = self.device.send(actions).astype(self.dtype, copy=False).reshape(b, A).T
        if self._folded_tau != self.temperature:
            self._fold_temperature()
        alive = ~self.done
        rows = None if alive.all() else np.flatnonzero(alive)
        self.t += 1
        done_logit = None
        if rows is None:
            done_logit = self._advance(x, self._c, self._keys)
        elif len(rows):
            at = self.device.send(rows)
            xs, cs = x[:, at], self._c[:, at]
            done_logit = self._advance(xs, cs, self._keys[at])
            x[:, at], self._c[:, at] = xs, cs
        ended = np.full(b if rows is None else len(rows), self.t >= self.max_steps)
        if done_logit is not None:
            logit = _host(done_logit).astype(np.float64) + self.done_bias
            if self.done_mode == "threshold":
                ended |= logit > 0
            else:
                keys = self._done_keys if rows is None else self._done_keys[rows]
                u = counter_uniform(keys, self.t, 1)[:, 0]
                ended |= u <= 1.0 / (1.0 + np.exp(self._done_shift - logit))
        reward = np.where(alive, self.reward_per_step, 0.0).astype(np.float32)
        if rows is None:
            self.done = ended
        else:
            self.done = self.done.copy()
            self.done[rows] = ended
        return self._out(x[:zd]), self._out(x[zd + A:zd + A + H]), reward, self.done.copy()

    def cell(self):
        """M's LSTM cell state c (B, hidden) after the last step: what a [z, c, h] controller reads."""
        return self._out(self._c)

    def _out(self, rows):
        """State rows (dim, B) as a fresh (B, dim) array: on the host, or on the device without ``host_outputs``."""
        return (_host(rows, copy=True) if self.host_outputs else rows.copy()).T

    def _advance(self, x: np.ndarray, c: np.ndarray, keys: np.ndarray) -> np.ndarray | None:
        """LSTM + heads + sampling for n agents' columns [z; a; h; 1] and cells c, in place; the done logits.

        The two matmuls run on all agents (BLAS threads); the elementwise work between and after them runs in
        slices of units / z dims over worker threads (numpy releases the GIL in ufunc loops).
        """
        zd, A, H, xp = self.z_dim, self.action_dim, self.hidden, self.xp
        n = x.shape[1]
        buf = self._buffers(n)
        g = buf["gates"]
        xp.dot(self._w_lstm, x, out=g)
        h_out = x[zd + A:zd + A + H]
        gpu = xp is not np  # on a GPU the elementwise work is two fused kernels: the same maths and random bits
        if gpu:
            from . import dream_cuda

            dream_cuda.cell(g, c, h_out, H)
        else:
            _splitter(n, 64)(lambda lo, hi: self._cell(g, c, h_out, lo, hi), H)
        y = buf["head"]
        xp.dot(self._w_head, x[zd + A:], out=y)
        if gpu:
            dream_cuda.sample(y, keys, self.t, self.K, x[:zd], joint=self.joint)
        else:
            u_pick, u_normal = counter_uniform32(keys, self.t, zd + zd % 2)
            if self.joint:
                u_pick = np.broadcast_to(u_pick[:1], u_pick.shape)
            _splitter(n, 8)(lambda lo, hi: self._sample(y, buf, u_pick, u_normal, x[:zd], lo, hi), (zd + 1) // 2)
        return y[-1] if self.m.has_done else None

    def _cell(self, g: np.ndarray, c: np.ndarray, h_out: np.ndarray, lo: int, hi: int) -> None:
        """Units lo:hi: gates (pre-activations, i, f, o pre-halved) -> new c (in place) and h (into ``h_out``)."""
        H = self.hidden
        a, i, f, o = (g[k * H + lo:k * H + hi] for k in range(4))
        c, h_out = c[lo:hi], h_out[lo:hi]
        for gate in (a, i, f, o):
            np.tanh(gate, out=gate)
        # with t = tanh(x / 2), sigmoid(x) = (1 + t) / 2: c = (a (1 + t_i) + (1 + t_f) c) / 2
        i += 1.0
        a *= i
        f += 1.0
        f *= c
        np.add(a, f, out=c)
        c *= 0.5
        np.tanh(c, out=h_out)
        o += 1.0
        o *= 0.5
        h_out *= o

    def _sample(self, y: np.ndarray, buf: dict, u_pick: np.ndarray, u_normal: np.ndarray, z_out: np.ndarray,
                lo: int, hi: int) -> None:
        """Box-Muller pairs lo:hi (dims j and j + half): mixture k ~ softmax(logits / tau) per (dim, agent),
        then z = mu_k + sigma_k sqrt(tau) eps (tau folded into the head's weights).

        ``u_pick`` picks the mixture by inverse CDF; ``u_normal`` rows j and j + half give the pair's normals.
        """
        K, zd = self.K, self.z_dim
        half = (zd + 1) // 2
        dims = [np.s_[lo:hi], np.s_[half + lo:min(half + hi, zd)]]
        n = y.shape[1]
        r = np.log(u_normal[lo:hi])
        r *= -2.0
        np.sqrt(r, out=r)
        theta = u_normal[half + lo:half + hi] * np.float32(2.0 * math.pi)
        eps = (r * np.cos(theta), r * np.sin(theta))
        logits = y[:K * zd].reshape(K, zd, n)
        p = buf["p"]
        flat = y.reshape(-1)
        for d, e in zip(dims, eps):
            lk = logits[:, d]
            pk = p[:, d]
            top = np.maximum(lk[0], lk[1]) if K > 1 else lk[0].copy()
            for k in range(2, K):
                np.maximum(top, lk[k], out=top)
            np.subtract(lk, top, out=pk)
            np.exp(pk, out=pk)
            for k in range(1, K):
                pk[k] += pk[k - 1]  # running sums: pk[k] is the CDF up to mixture k
            thresh = u_pick[d] * pk[K - 1]
            pick = np.zeros(thresh.shape, dtype=np.intp)
            for k in range(K - 1):
                pick += pk[k] < thresh  # ends as the first k with cdf_k >= thresh
            pick *= zd * n
            pick += buf["mu_index"][d]
            mu = flat.take(pick)
            pick += K * zd * n  # log_std block follows the means
            sigma = flat.take(pick)
            np.exp(sigma, out=sigma)
            sigma *= e[:len(sigma)]
            np.add(mu, sigma, out=z_out[d])


def _host(a, copy: bool = False) -> np.ndarray:
    """A NumPy or CuPy array on the host (a fresh array when ``copy``; a CuPy array's always is)."""
    if isinstance(a, np.ndarray):
        return a.copy() if copy else a
    return chainer.backend.CpuDevice().send(a)


def initial_latents(latents_folder, n: int, rng: np.random.Generator) -> np.ndarray:
    """n start latents (n, z) float32: z ~ N(mu, exp(logvar)) of the first frame of random encoded episodes."""
    files = list_latents(latents_folder)
    if not files:
        raise UserError(f"{latents_folder}: no encoded episodes for the dream's start states; "
                        "run `wm-trainer encode` first")
    chosen = rng.choice(len(files), size=min(n, len(files)), replace=False)
    mus, logvars = [], []
    for i in chosen:
        hint = "delete it and re-run `wm-trainer encode`"
        try:
            with SafeNpz(files[i]) as d:
                mu, logvar = d["mu"], d["logvar"]
        except NpzLoadError as e:
            raise UserError(f"{e}; {hint}") from None
        for key, a in (("mu", mu), ("logvar", logvar)):
            if a.dtype.kind != "f" or a.ndim != 2 or len(a) == 0 or a.shape != mu.shape:
                raise UserError(f"{files[i]}: key {key!r}: {a.dtype} {a.shape}, expected floats (frames, z) "
                                f"as mu; {hint}")
        mus.append(np.asarray(mu[0], np.float32))
        logvars.append(np.asarray(logvar[0], np.float32))
    pick = rng.integers(len(mus), size=n)
    mu, logvar = np.stack(mus)[pick], np.stack(logvars)[pick]
    return (mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape)).astype(np.float32)


def decode_frames(vae, z: np.ndarray, batch: int = 256) -> np.ndarray:
    """Decode latents (N, z) with V into uint8 frames (N, 64, 64, 3), e.g. for dream GIFs."""
    from ..models.vision import to_uint8_frames

    z = np.asarray(z, dtype=chainer.get_dtype())
    out = []
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        for i in range(0, len(z), batch):
            zb = vae.xp.asarray(z[i:i + batch])
            out.append(to_uint8_frames(vae.decode(zb)))
    if not out:
        return np.zeros((0, 64, 64, 3), np.uint8)
    return np.concatenate(out)


def calibrated_done_bias(path) -> float:
    """The done-logit bias ``train-controller`` trained C with, from its ``dream_calibration.json`` (0 if none)."""
    path = Path(path)
    if not path.is_file():
        return 0.0
    try:
        bias = float(json.loads(path.read_text()).get("done_bias", 0.0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a dream calibration ({e}); delete it and re-run train-controller") from None
    if not math.isfinite(bias):
        raise UserError(f"{path}: done_bias is {bias}; delete the file and re-run train-controller")
    return bias


__all__ = ["DreamEnv", "agent_keys", "calibrated_done_bias", "counter_uniform", "counter_uniform32", "decode_frames",
           "initial_latents"]

