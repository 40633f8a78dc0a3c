"""An LSTM over a whole sequence as one Chainer FunctionNode (CPU), equivalent to stepping ``F.lstm``.

Parameters use ``L.LSTM``'s layout: ``W_x`` (4H, I) and ``b`` (4H,) of ``upward``, ``W_h`` (4H, H) of
``lateral``, gate rows interleaved per unit in ``F.lstm``'s order (a, i, f, o): row ``4*j + g``.
Inside, the rows are regrouped gate-major and the states kept feature-major (H, N) so every
element-wise pass runs on a contiguous slab; each step is one GEMM with the input projection and bias
folded in; backward runs the recurrence with one GEMM per step and gets the weight and input gradients
of the whole sequence from two large GEMMs at the end. On CuPy arrays the node runs as one part (no
host threads) with each step's element-wise work as one fused kernel (:mod:`wm_trainer.ops.lstm_cuda`).
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
from chainer import function_node

from wm_trainer.ops.conv import FLOAT_TYPES
from wm_trainer.ops.scratch import give_back, take
from wm_trainer.ops.threads import get_threads, run_chunks

try:
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # without it the sequence runs as one part on multi-threaded BLAS
    _threadpool_limits = None

MIN_PART_COLUMNS = 16


def interleaved_to_blocked(w: np.ndarray) -> np.ndarray:
    """Rows 4*j + g (per-unit gates a, i, f, o) -> rows g*H + j (gate blocks)."""
    h4, xp = w.shape[0], chainer.backend.get_array_module(w)
    return xp.ascontiguousarray(w.reshape((h4 // 4, 4) + w.shape[1:]).swapaxes(0, 1)).reshape(w.shape)


def blocked_to_interleaved(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`interleaved_to_blocked`."""
    h4, xp = w.shape[0], chainer.backend.get_array_module(w)
    return xp.ascontiguousarray(w.reshape((4, h4 // 4) + w.shape[1:]).swapaxes(0, 1)).reshape(w.shape)


def _forward_part(x, h0, c0, w_fwd, hs_out, keep: bool = True) -> tuple:
    """The recurrence for a slice of the batch; writes hs_out (n, T, H); returns (c_T, saved for backward).

    With ``keep`` the saved arrays come from the scratch pool (the node hands them back when its graph is
    gone): fresh pages for the few hundred MB a long sequence saves cost a tenth of a training step.
    """
    n, t_len, n_in = x.shape
    hid = h0.shape[1]
    dtype = x.dtype
    k = w_fwd.shape[1]
    if not isinstance(x, np.ndarray):
        from .lstm_cuda import forward_part

        return forward_part(x, h0, c0, w_fwd, hs_out)
    alloc = take if keep else np.empty
    xh = alloc((k, t_len + 1, n), dtype)
    xh[n_in:n_in + hid, 0] = h0.T
    xh[k - 1] = 1
    xh[:n_in, t_len] = 0
    gates = alloc((t_len, 4 * hid, n), dtype)
    cs = alloc((t_len + 1, hid, n), dtype)
    tanh_c = alloc((t_len, hid, n), dtype)
    cs[0] = c0.T
    tmp = np.empty((hid, n), dtype=dtype)
    for t in range(t_len):
        xh[:n_in, t] = x[:, t].T
        g = gates[t]
        np.matmul(w_fwd, xh[:, t], out=g)
        np.tanh(g, out=g)
        sig = g[hid:]
        sig *= 0.5
        sig += 0.5
        a, i, f, o = g[:hid], g[hid:2 * hid], g[2 * hid:3 * hid], g[3 * hid:]
        np.multiply(a, i, out=cs[t + 1])
        np.multiply(f, cs[t], out=tmp)
        cs[t + 1] += tmp
        np.tanh(cs[t + 1], out=tanh_c[t])
        h_t = xh[n_in:n_in + hid, t + 1]
        np.multiply(o, tanh_c[t], out=h_t)
        hs_out[:, t] = h_t.T
    return np.ascontiguousarray(cs[t_len].T), (xh, gates, cs, tanh_c)


def _backward_part(saved, w_cat, w_h_t, g_hs, g_h_last, g_c_last, g_x_out) -> tuple:
    """Backward through time for a slice of the batch; writes g_x_out if given; returns (g_w, g_h0, g_c0)."""
    if not isinstance(saved[0], np.ndarray):
        from .lstm_cuda import backward_part

        return backward_part(saved, w_cat, w_h_t, g_hs, g_h_last, g_c_last, g_x_out)
    xh, gates, cs, tanh_c = saved
    t_len, hid, n = tanh_c.shape
    n_in = w_cat.shape[1] - hid - 1
    dtype = tanh_c.dtype
    gh = np.zeros((hid, n), dtype=dtype) if g_h_last is None else np.ascontiguousarray(g_h_last.T, dtype=dtype)
    gc = np.zeros((hid, n), dtype=dtype) if g_c_last is None else np.ascontiguousarray(g_c_last.T, dtype=dtype)
    d_gates = take((4 * hid, t_len, n), dtype)
    deriv = np.empty((4 * hid, n), dtype=dtype)
    tmp = np.empty((hid, n), dtype=dtype)
    for t in range(t_len - 1, -1, -1):
        g = gates[t]
        a, i, f, o = g[:hid], g[hid:2 * hid], g[2 * hid:3 * hid], g[3 * hid:]
        if g_hs is not None:
            gh += g_hs[:, t].T
        np.multiply(tanh_c[t], tanh_c[t], out=tmp)  # gc += gh * o * (1 - tanh(c)^2)
        np.subtract(1, tmp, out=tmp)
        tmp *= o
        tmp *= gh
        gc += tmp
        np.multiply(g, g, out=deriv)  # 1 - a^2 for the tanh block, s (1 - s) for the sigmoid blocks
        np.subtract(1, deriv[:hid], out=deriv[:hid])
        np.subtract(g[hid:], deriv[hid:], out=deriv[hid:])
        dg = d_gates[:, t]
        for lo, u, v in ((0, gc, i), (hid, gc, a), (2 * hid, gc, cs[t]), (3 * hid, gh, tanh_c[t])):
            np.multiply(u, v, out=tmp)
            np.multiply(tmp, deriv[lo:lo + hid], out=dg[lo:lo + hid])
        gc *= f
        np.matmul(w_h_t, dg, out=gh)
    flat = d_gates.reshape(4 * hid, t_len * n)
    if g_x_out is not None:
        g_x_out[...] = (flat.T @ w_cat[:, :n_in]).reshape(t_len, n, n_in).transpose(1, 0, 2)
    g_w = flat @ xh[:, :t_len].reshape(xh.shape[0], t_len * n).T
    give_back(d_gates)
    return g_w, np.ascontiguousarray(gh.T), np.ascontiguousarray(gc.T)


def _batch_parts(n: int) -> list[tuple[int, int]]:
    """Independent batch slices, one per thread, each running its own recurrence with 1-thread BLAS."""
    parts = min(get_threads(), n // MIN_PART_COLUMNS) if _threadpool_limits is not None else 1
    parts = max(parts, 1)
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_parts(fn, parts: list[tuple[int, int]]) -> dict:
    """fn(lo, hi) for every part, concurrently (BLAS limited to one thread meanwhile); results by lo."""
    results: dict = {}
    if len(parts) == 1:
        results[parts[0][0]] = fn(*parts[0])
        return results

    def one(i0: int, i1: int) -> None:
        for lo, hi in parts[i0:i1]:
            results[lo] = fn(lo, hi)
    with _threadpool_limits(limits=1, user_api="blas"):
        run_chunks(one, len(parts))
    return results


class LSTMSequence(function_node.FunctionNode):
    """(x (N, T, I), h0 (N, H), c0 (N, H), W_x, W_h, b) -> (hs (N, T, H), h_T, c_T).

    Inside, everything is feature-major (features, N): the step input [x_t; h_{t-1}; 1] is column block t
    of one buffer ``xh`` (I+H+1, T+1, N), so each step is a single GEMM (4H, I+H+1) x (I+H+1, N) with the
    bias folded in, every gate block is a contiguous (H, N) slab for the element-wise work, and the weight
    gradient of the whole sequence is one GEMM over ``xh``'s (T*N) columns. With several threads the batch
    is split and each slice runs its own recurrence on its own core (element-wise work included).
    """

    def forward(self, inputs):
        """The recurrence: one GEMM and nine contiguous element-wise passes per step (NumPy or CuPy)."""
        x, h0, c0, w_x, w_h, b = inputs
        xp = chainer.backend.get_array_module(x)
        n, t_len, _ = x.shape
        hid = h0.shape[1]
        w_cat = xp.concatenate([interleaved_to_blocked(w_x), interleaved_to_blocked(w_h),
                                interleaved_to_blocked(b)[:, None]], axis=1)
        w_fwd = w_cat.copy()
        w_fwd[hid:] *= 0.5  # sigmoid(z) = 0.5 * tanh(z / 2) + 0.5: one tanh over all four gates
        hs = xp.empty((n, t_len, hid), dtype=x.dtype)
        self.parts = _batch_parts(n) if xp is np else [(0, n)]
        keep = chainer.config.enable_backprop
        res = _run_parts(lambda lo, hi: _forward_part(x[lo:hi], h0[lo:hi], c0[lo:hi], w_fwd, hs[lo:hi], keep),
                         self.parts)
        c_last = xp.concatenate([res[lo][0] for lo, _ in self.parts])
        if keep:
            self.w_cat, self.saved = w_cat, {lo: res[lo][1] for lo, _ in self.parts}
        return hs, hs[:, t_len - 1].copy(), c_last

    def __del__(self):
        # the saved sequence goes back to the pool only when the graph holding this node is gone
        for arrays in (getattr(self, "saved", None) or {}).values():
            for a in arrays:
                if isinstance(a, np.ndarray):  # CuPy's arrays go back to CuPy's own pool
                    give_back(a)

    def backward(self, indexes, grad_outputs):
        """Backward through time: one GEMM per step, then two whole-sequence GEMMs for weights and inputs."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fast lstm_sequence has no double backprop; use experiment.ops=chainer")
        g_hs, g_h_last, g_c_last = (None if g is None else g.array for g in grad_outputs)
        w_cat = self.w_cat
        xp = chainer.backend.get_array_module(w_cat)
        x_shape = self.inputs[0].shape
        hid = self.inputs[1].shape[1]
        n_in = x_shape[2]
        w_h_t = xp.ascontiguousarray(w_cat[:, n_in:n_in + hid].T)
        g_x = xp.empty(x_shape, dtype=w_cat.dtype) if 0 in indexes else None

        def part(lo: int, hi: int) -> tuple:
            return _backward_part(self.saved[lo], w_cat, w_h_t, None if g_hs is None else g_hs[lo:hi],
                                  None if g_h_last is None else g_h_last[lo:hi],
                                  None if g_c_last is None else g_c_last[lo:hi],
                                  None if g_x is None else g_x[lo:hi])
        res = _run_parts(part, self.parts)
        g_w = sum(res[lo][0] for lo, _ in self.parts)
        g_wx = blocked_to_interleaved(g_w[:, :n_in]) if 3 in indexes else None
        g_wh = blocked_to_interleaved(g_w[:, n_in:n_in + hid]) if 4 in indexes else None
        g_b = blocked_to_interleaved(g_w[:, -1]) if 5 in indexes else None
        g_h0 = xp.concatenate([res[lo][1] for lo, _ in self.parts]) if 1 in indexes else None
        g_c0 = xp.concatenate([res[lo][2] for lo, _ in self.parts]) if 2 in indexes else None
        return tuple(None if g is None else chainer.Variable(g) for g in (g_x, g_h0, g_c0, g_wx, g_wh, g_b))


def lstm_sequence_reference(x, h0, c0, w_x, w_h, b):
    """The same computation stepped with Chainer's stock ``F.linear`` and ``F.lstm`` (the fallback)."""
    t_len = x.shape[1]
    proj = F.reshape(F.linear(F.reshape(F.transpose(x, (1, 0, 2)), (t_len * x.shape[0], -1)), w_x, b),
                     (t_len, x.shape[0], -1))
    h, c, hs = h0, c0, []
    for g in F.separate(proj, axis=0):
        c, h = F.lstm(c, g + F.linear(h, w_h))
        hs.append(h)
    return F.stack(hs, axis=1), h, c


def lstm_sequence(x, h0, c0, w_x, w_h, b):
    """LSTM over x (N, T, I) from state (h0, c0): (hs (N, T, H), h_T, c_T); one node on NumPy or CuPy arrays of
    one float type, stepped with Chainer's functions otherwise (ChainerX, mixed types)."""
    arrays = [v.array if isinstance(v, chainer.Variable) else v for v in (x, h0, c0, w_x, w_h, b)]
    dtype, kind = arrays[0].dtype, type(arrays[0])
    supported = kind is np.ndarray or kind is chainer.backends.cuda.ndarray
    if supported and all(type(a) is kind and a.dtype == dtype for a in arrays) and dtype in FLOAT_TYPES \
            and x.shape[1] > 0:
        return tuple(LSTMSequence().apply((x, h0, c0, w_x, w_h, b)))
    return lstm_sequence_reference(x, h0, c0, w_x, w_h, b)
