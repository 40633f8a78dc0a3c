"""The whole-sequence LSTM's per-step element-wise work as one CUDA kernel each way (CuPy), for M on a GPU.

:mod:`wm_trainer.ops.lstm` runs the recurrence as one GEMM and about nine NumPy passes per step forward
(sixteen backward); on a GPU each pass is a kernel launch whose host-side cost exceeds its work. Here
each step is one GEMM and one fused kernel, forward and backward, with the arithmetic in the CPU
code's order, and the step inputs and outputs move in and out of the ``xh`` buffer in one copy each.
Importing this module imports no CuPy.
"""
from __future__ import annotations

import functools

# (i is the kernels' element index, so the gates are ga, gi, gf, go)
# gates in: pre-activations (i, f, o pre-halved); out: activated, kept for backward; c, tanh(c) and h out
_FORWARD = """
ga = tanh(ga);
gi = tanh(gi) * (T)0.5 + (T)0.5;
gf = tanh(gf) * (T)0.5 + (T)0.5;
go = tanh(go) * (T)0.5 + (T)0.5;
c = ga * gi + gf * c_prev;
tc = tanh(c);
h = go * tc;
"""

# one step back: gh (incoming dL/dh, plus the sequence output's gradient ghs), gc in place; gate gradients out
_BACKWARD = """
const T ghe = gh + ghs;
T tmp = tc * tc;
tmp = (T)1 - tmp;
tmp *= go;
tmp *= ghe;
gc += tmp;
da = (gc * gi) * ((T)1 - ga * ga);
di = (gc * ga) * (gi - gi * gi);
df = (gc * c_prev) * (gf - gf * gf);
dout = (ghe * tc) * (go - go * go);
gc *= gf;
"""


@functools.cache
def _kernels():
    import cupy

    forward = cupy.ElementwiseKernel("T c_prev", "T ga, T gi, T gf, T go, T c, T tc, T h", _FORWARD, "wm_lstm_forward")
    backward = cupy.ElementwiseKernel("T ga, T gi, T gf, T go, T c_prev, T tc, T gh, T ghs", "T gc, T da, T di, T df, "
                                      "T dout", _BACKWARD, "wm_lstm_backward")
    return forward, backward


def forward_part(x, h0, c0, w_fwd, hs_out) -> tuple:
    """:func:`wm_trainer.ops.lstm._forward_part` on CuPy arrays (always keeps what backward needs).

    ``xh`` is time-major here, (T + 1, I + H + 1, N): each step's GEMM operand is contiguous, and
    ``cupy.dot`` into a contiguous output costs a quarter of ``cupy.matmul`` on a strided one (measured
    on an H100 host: 44 against 196 us a call, far above the GEMM's own time at these sizes).
    """
    import cupy

    n, t_len, n_in = x.shape
    hid = h0.shape[1]
    k = w_fwd.shape[1]
    dtype = x.dtype
    kernel = _kernels()[0]
    xh = cupy.empty((t_len + 1, k, n), dtype)
    xh[:t_len, :n_in] = x.transpose(1, 2, 0)
    xh[t_len, :n_in] = 0
    xh[0, n_in:n_in + hid] = h0.T
    xh[:, k - 1] = 1
    gates = cupy.empty((t_len, 4 * hid, n), dtype)
    cs = cupy.empty((t_len + 1, hid, n), dtype)
    tanh_c = cupy.empty((t_len, hid, n), dtype)
    cs[0] = c0.T
    for t in range(t_len):
        g = gates[t]
        cupy.dot(w_fwd, xh[t], out=g)
        kernel(cs[t], g[:hid], g[hid:2 * hid], g[2 * hid:3 * hid], g[3 * hid:], cs[t + 1], tanh_c[t],
               xh[t + 1, n_in:n_in + hid])
    hs_out[...] = xh[1:, n_in:n_in + hid].transpose(2, 0, 1)
    return cupy.ascontiguousarray(cs[t_len].T), (xh, gates, cs, tanh_c)


def backward_part(saved, w_cat, w_h_t, g_hs, g_h_last, g_c_last, g_x_out) -> tuple:
    """:func:`wm_trainer.ops.lstm._backward_part` on CuPy arrays (gate gradients time-major, as ``xh``)."""
    import cupy

    xh, gates, cs, tanh_c = saved
    t_len, hid, n = tanh_c.shape
    n_in = w_cat.shape[1] - hid - 1
    dtype = tanh_c.dtype
    kernel = _kernels()[1]
    gh = cupy.zeros((hid, n), dtype) if g_h_last is None else cupy.ascontiguousarray(g_h_last.T, dtype=dtype)
    gc = cupy.zeros((hid, n), dtype) if g_c_last is None else cupy.ascontiguousarray(g_c_last.T, dtype=dtype)
    ghs = cupy.zeros((), dtype) if g_hs is None else cupy.ascontiguousarray(g_hs.transpose(1, 2, 0), dtype=dtype)
    d_gates = cupy.empty((t_len, 4 * hid, n), dtype)
    for t in range(t_len - 1, -1, -1):
        g = gates[t]
        dg = d_gates[t]
        kernel(g[:hid], g[hid:2 * hid], g[2 * hid:3 * hid], g[3 * hid:], cs[t], tanh_c[t], gh,
               ghs if g_hs is None else ghs[t], gc, dg[:hid], dg[hid:2 * hid], dg[2 * hid:3 * hid], dg[3 * hid:])
        cupy.dot(w_h_t, dg, out=gh)
    if g_x_out is not None:  # g_x[b, t] = sum_r d_gates[t, r, b] W[r, :I]
        g_x_out[...] = cupy.tensordot(d_gates, w_cat[:, :n_in], axes=([1], [0])).transpose(1, 0, 2)
    g_w = cupy.tensordot(d_gates, xh[:t_len], axes=([0, 2], [0, 2]))  # sum over steps and samples
    return g_w, cupy.ascontiguousarray(gh.T), cupy.ascontiguousarray(gc.T)
