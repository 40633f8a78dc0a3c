"""2-D transposed convolution (deconvolution) for the CPU: one GEMM, then a few plane adds per output phase.

NCHW shapes over channel-major ("CNHW") memory: the GEMMs see (features, N*H*W) matrices and every
add or copy runs over contiguous image rows. See :class:`Deconvolution2DFast` for the phase split.
GPU arrays and options this kernel does not cover (dilation, groups, an ``outsize`` other than the
natural one, mixed dtypes) go to :func:`chainer.functions.deconvolution_2d`.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
from chainer import function_node
from numpy.lib.stride_tricks import as_strided

from wm_trainer.ops.activation import add_bias_relu, relu_grad
from wm_trainer.ops.conv import FLOAT_TYPES, images_per_block, pair
from wm_trainer.ops.scratch import scratch
from wm_trainer.ops.threads import run_blocks


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Deconvolution2DFast(function_node.FunctionNode):
    """y = deconv(x, W) + b on the CPU with W of shape (Cin, Cout, kh, kw) as in Chainer.

    Works channel-major ("CNHW" memory, NCHW shapes) and by output phase: with the kernel zero-padded to
    A*sy x B*sx, output pixel (sy*Y + p, sx*X + q) only receives taps (sy*a + p, sx*b + q) from input
    pixel (Y - a, X - b). So one GEMM (taps, Cin) x (Cin, pixels) gives every tap, A*B shifted adds
    assemble the phase images, and one strided copy per phase interleaves them (or, when that moves fewer
    bytes, the input's A*B windows are gathered and one GEMM gives the phases directly). Backward gathers
    the gradient's A*B shifted phase windows. Taps the zero padding of the kernel creates are left out of
    every GEMM. All of it runs block by block of images (temporaries in cache), blocks spread over threads.
    With ``relu`` the output is ``max(y, 0)`` and the backward masks the incoming gradient first.
    """

    def __init__(self, stride: tuple[int, int], pad: tuple[int, int], relu: bool = False):
        self.sy, self.sx = stride
        self.ph, self.pw = pad
        self.relu = relu

    def one_pixel(self, x_shape) -> bool:
        """A 1x1 input without padding: the output is just x times W's (Cin, Cout*kh*kw) matrix."""
        return x_shape[2] == 1 and x_shape[3] == 1 and self.ph == 0 and self.pw == 0

    def _backward_one_pixel(self, indexes, gy):
        x, W = self.get_retained_inputs()
        n, cin = x.shape[0], x.shape[1]
        gy2 = gy.reshape(n, -1)
        g_x = (gy2 @ W.array.reshape(cin, -1).T).reshape(x.shape) if 0 in indexes else None
        g_w = (x.array.reshape(n, cin).T @ gy2).reshape(W.shape) if 1 in indexes else None
        g_b = gy.sum(axis=(0, 2, 3)) if 2 in indexes and len(self.inputs) == 3 else None
        grads = (g_x, g_w, g_b)[:len(self.inputs)]
        return tuple(None if g is None else chainer.Variable(g) for g in grads)

    def _window_weights(self, W: np.ndarray, a_n: int, b_n: int) -> np.ndarray:
        """W (Cin, Cout, kh, kw) -> (sy*sx*Cout, A*B*Cin), columns (a', b', cin) with tap a' = A - 1 - a."""
        cin, cout, kh, kw = W.shape
        sy, sx = self.sy, self.sx
        wpad = np.zeros((cin, cout, a_n * sy, b_n * sx), dtype=W.dtype)
        wpad[:, :, :kh, :kw] = W
        w6 = wpad.reshape(cin, cout, a_n, sy, b_n, sx)[:, :, ::-1, :, ::-1, :]
        return np.ascontiguousarray(w6.transpose(3, 5, 1, 2, 4, 0)).reshape(sy * sx * cout, a_n * b_n * cin)

    def interleave(self, y: np.ndarray, ph_img: np.ndarray) -> None:
        """Write phase images (sy, sx, Cout, m, hp, wp) into y (Cout, m, oh, ow), cropping the padding:
        one strided copy per phase."""
        sy, sx = self.sy, self.sx
        oh, ow = y.shape[2], y.shape[3]
        for p in range(sy):
            y0 = (p - self.ph) % sy  # the first output row of phase p
            r0 = (y0 + self.ph - p) // sy
            rows = len(range(y0, oh, sy))
            for q in range(sx):
                x0 = (q - self.pw) % sx
                c0 = (x0 + self.pw - q) // sx
                cols = len(range(x0, ow, sx))
                np.copyto(y[:, :, y0::sy, x0::sx], ph_img[p, q, :, :, r0:r0 + rows, c0:c0 + cols])

    def deinterleave(self, ph_img: np.ndarray, gy: np.ndarray) -> None:
        """The mirror of :meth:`interleave`: gy (Cout, m, oh, ow) into phase images (sy, sx, Cout, m, hp, wp)
        (entries the crop removed are left as they are: zero them first when cropping)."""
        sy, sx = self.sy, self.sx
        oh, ow = gy.shape[2], gy.shape[3]
        for p in range(sy):
            y0 = (p - self.ph) % sy
            r0 = (y0 + self.ph - p) // sy
            rows = len(range(y0, oh, sy))
            for q in range(sx):
                x0 = (q - self.pw) % sx
                c0 = (x0 + self.pw - q) // sx
                cols = len(range(x0, ow, sx))
                np.copyto(ph_img[p, q, :, :, r0:r0 + rows, c0:c0 + cols], gy[:, :, y0::sy, x0::sx])

    def _forward_by_taps(self, x_cols: np.ndarray, taps: np.ndarray, tap_blocks: list, b: np.ndarray | None,
                         y: np.ndarray, n: int, h: int, w: int) -> None:
        """y (Cout, N, oh, ow) = the tap GEMM (taps x input columns), shifted adds into the phase images,
        interleaved (+ b, ReLU): block by block of images, each block's GEMM output and phases in cache."""
        sy, sx = self.sy, self.sx
        cout = y.shape[0]
        k, p_n = taps.shape[0], sy * sx * cout
        hp = h + max(a for a, *_ in tap_blocks)
        wp = w + max(bb for _, bb, *_ in tap_blocks)
        step = images_per_block(k * h * w * x_cols.itemsize, h * w)

        def block(i: int, j: int) -> None:  # images i:j
            size = min(step, n)
            g_buf = scratch("deconv.block_taps_out", (k * size * h * w,), x_cols.dtype)
            ph_buf = scratch("deconv.block_phases", (p_n * size * hp * wp,), x_cols.dtype)
            m = j - i
            g = g_buf[:k * m * h * w].reshape(k, m * h * w)
            np.matmul(taps, x_cols[:, i * h * w:j * h * w], out=g)
            ph6 = ph_buf[:p_n * m * hp * wp].reshape(sy, sx, cout, m, hp, wp)
            ph6.fill(0)
            for a, bb, pm, qm, r0 in tap_blocks:
                dst = ph6[:pm, :qm, :, :, a:a + h, bb:bb + w]
                np.add(dst, g[r0:r0 + pm * qm * cout].reshape(pm, qm, cout, m, h, w), out=dst)
            part = y[:, i:j]
            self.interleave(part, ph6)
            add_bias_relu(part, None if b is None else b[:, None, None, None], self.relu, threads=False)
        run_blocks(block, n, step)

    def _forward_by_windows(self, x: np.ndarray, W: np.ndarray, b: np.ndarray | None, y: np.ndarray,
                            a_n: int, b_n: int) -> None:
        """y (Cout, N, oh, ow) = (sy*sx*Cout, A*B*Cin) x windows of the zero-padded input, interleaved (+ b, ReLU).

        Block by block of images: each block's padded input, window columns and phase images stay in cache;
        with several threads, threads take blocks as they free up (BLAS on 1 thread).
        """
        n, cin, h, w = x.shape
        cout = W.shape[1]
        sy, sx = self.sy, self.sx
        hp, wp, h2, w2 = h + a_n - 1, w + b_n - 1, h + 2 * (a_n - 1), w + 2 * (b_n - 1)
        k, p_n = a_n * b_n * cin, sy * sx * cout
        w_ph = self._window_weights(W, a_n, b_n)
        x_c = x.transpose(1, 0, 2, 3)
        step = images_per_block(k * hp * wp * x.itemsize, hp * wp)

        def block(i: int, j: int) -> None:  # images i:j
            size = min(step, n)
            pad_buf = scratch("deconv.block_pad", (cin * size * h2 * w2,), x.dtype)
            cols_buf = scratch("deconv.block_cols", (k * size * hp * wp,), x.dtype)
            ph_buf = scratch("deconv.block_phases", (p_n * size * hp * wp,), x.dtype)
            m = j - i
            pad = pad_buf[:cin * m * h2 * w2].reshape(cin, m, h2, w2)
            pad.fill(0)
            np.copyto(pad[:, :, a_n - 1:a_n - 1 + h, b_n - 1:b_n - 1 + w], x_c[:, i:j])
            s0, s1, s2, s3 = pad.strides
            win = as_strided(pad, (a_n, b_n, cin, m, hp, wp), (s2, s3, s0, s1, s2, s3), writeable=False)
            cols = cols_buf[:k * m * hp * wp].reshape(a_n, b_n, cin, m, hp, wp)
            np.copyto(cols, win)
            ph = ph_buf[:p_n * m * hp * wp].reshape(p_n, m * hp * wp)
            np.matmul(w_ph, cols.reshape(k, m * hp * wp), out=ph)
            part = y[:, i:j]
            self.interleave(part, ph.reshape(sy, sx, cout, m, hp, wp))
            add_bias_relu(part, None if b is None else b[:, None, None, None], self.relu, threads=False)
        run_blocks(block, n, step)

    def tap_blocks(self, kh: int, kw: int, cout: int) -> tuple[list[tuple[int, int, int, int, int]], np.ndarray]:
        """The tap blocks that hold kernel taps (a kernel that is not a multiple of the stride pads with zeros).

        Returns ``(a, b, pm, qm, row0)`` per block - its rows (p < pm, q < qm, cout) start at ``row0`` of the
        pruned tap matrix - and the indices of those rows in :meth:`_tap_matrix`'s (a, b, p, q, cout) rows.
        """
        sy, sx = self.sy, self.sx
        a_n, b_n = _ceil_div(kh, sy), _ceil_div(kw, sx)
        blocks, rows, row0 = [], [], 0
        for a in range(a_n):
            pm = min(sy, kh - sy * a)
            for b in range(b_n):
                qm = min(sx, kw - sx * b)
                base = (a * b_n + b) * sy * sx * cout
                rows.append((base + (np.arange(pm)[:, None, None] * sx + np.arange(qm)[None, :, None]) * cout
                             + np.arange(cout)).ravel())
                blocks.append((a, b, pm, qm, row0))
                row0 += pm * qm * cout
        return blocks, np.concatenate(rows)

    def _tap_matrix(self, W: np.ndarray) -> np.ndarray:
        """W (Cin, Cout, kh, kw) -> (A*B*sy*sx*Cout, Cin), rows ordered (a, b, p, q, cout)."""
        cin, cout, kh, kw = W.shape
        sy, sx = self.sy, self.sx
        a_n, b_n = _ceil_div(kh, sy), _ceil_div(kw, sx)
        wp = np.zeros((cin, cout, a_n * sy, b_n * sx), dtype=W.dtype)
        wp[:, :, :kh, :kw] = W
        return np.ascontiguousarray(wp.reshape(cin, cout, a_n, sy, b_n, sx).transpose(2, 4, 3, 5, 1, 0)).reshape(
            a_n * b_n * sy * sx * cout, cin)

    def forward_cpu(self, inputs):
        """The tap or the window formulation (whichever moves fewer bytes), + b and ReLU in the same pass."""
        if self.one_pixel(inputs[0].shape):
            self.retain_inputs((0, 1))
        if self.relu and chainer.config.enable_backprop:
            self.retain_outputs((0,))
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        n, cin, h, w = x.shape
        _, cout, kh, kw = W.shape
        sy, sx = self.sy, self.sx
        a_n, b_n = _ceil_div(kh, sy), _ceil_div(kw, sx)
        hp, wp = h + a_n - 1, w + b_n - 1
        if self.one_pixel(x.shape):  # a 1x1 input (the decoder's first layer): one GEMM, no tap reordering
            y = (x.reshape(n, cin) @ W.reshape(cin, cout * kh * kw)).reshape(n, cout, kh, kw)
            add_bias_relu(y, None if b is None else b[:, None, None], self.relu)
            return y,
        x_cols = x.transpose(1, 0, 2, 3).reshape(cin, n * h * w)
        blocks, tap_rows = self.tap_blocks(kh, kw, cout)
        taps = self._tap_matrix(W)[tap_rows]  # backward's gather formulation needs it either way
        oh, ow = sy * (h - 1) + kh - 2 * self.ph, sx * (w - 1) + kw - 2 * self.pw
        y = np.empty((cout, n, oh, ow), dtype=x.dtype)
        if cin * hp * wp < 0.8 * sy * sx * cout * h * w:  # fewer bytes to move: gather the input's windows
            self._forward_by_windows(x, W, b, y, a_n, b_n)
        else:  # gather-free: one GEMM for every tap, then A*B shifted adds into the phases
            self._forward_by_taps(x_cols, taps, blocks, b, y, n, h, w)
        if chainer.config.enable_backprop:
            self.x_cols, self.taps, self.tap_rows = x_cols, taps, tap_rows
        return y.transpose(1, 0, 2, 3),

    def backward(self, indexes, grad_outputs):
        """Gradients as plain arrays (first order only: double backprop is not supported)."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fast deconvolution_2d has no double backprop; use experiment.ops=chainer")
        gy = grad_outputs[0].array
        if self.relu:  # the ReLU's mask, in the output's channel-major memory
            gy = relu_grad(gy, self.get_retained_outputs()[0].array, "deconv.relu_grad")
        n, cin, h, w = self.inputs[0].shape
        _, cout, kh, kw = self.inputs[1].shape
        if self.one_pixel(self.inputs[0].shape):
            return self._backward_one_pixel(indexes, gy)
        sy, sx = self.sy, self.sx
        a_n, b_n = _ceil_div(kh, sy), _ceil_div(kw, sx)
        hp, wp = h + a_n - 1, w + b_n - 1
        blocks, _ = self.tap_blocks(kh, kw, cout)
        p_n, k = sy * sx * cout, self.taps.shape[0]
        gy_c = gy.transpose(1, 0, 2, 3)
        cropped = (gy.shape[2], gy.shape[3]) != (hp * sy, wp * sx)
        want_x, want_w = 0 in indexes, 1 in indexes
        gx_c = np.empty((cin, n, h, w), dtype=gy.dtype) if want_x else None
        x_cols, taps_t = self.x_cols, self.taps.T
        step = images_per_block(k * h * w * gy.itemsize, h * w)
        g_taps_parts: dict[int, np.ndarray] = {}  # per block, summed in block order: the same for any threads

        def block(i: int, j: int) -> None:  # images i:j, the gathered gradient in cache
            size = min(step, n)
            ph_buf = scratch("deconv.block_grad_phases", (p_n * size * hp * wp,), gy.dtype)
            cols_buf = scratch("deconv.block_grad_cols", (k * size * h * w,), gy.dtype)
            m = j - i
            ph6 = ph_buf[:p_n * m * hp * wp].reshape(sy, sx, cout, m, hp, wp)
            if cropped:
                ph6.fill(0)
            self.deinterleave(ph6, gy_c[:, i:j])
            cols2 = cols_buf[:k * m * h * w].reshape(k, m * h * w)
            for a, b, pm, qm, r0 in blocks:  # the shifted windows of the taps that exist
                np.copyto(cols2[r0:r0 + pm * qm * cout].reshape(pm, qm, cout, m, h, w),
                          ph6[:pm, :qm, :, :, a:a + h, b:b + w])
            if want_x:
                np.matmul(taps_t, cols2, out=gx_c[:, i:j].reshape(cin, m * h * w))
            if want_w:
                g_taps_parts[i] = cols2 @ x_cols[:, i * h * w:j * h * w].T
        run_blocks(block, n, step)
        grads = [None, None]
        if want_x:
            grads[0] = chainer.Variable(gx_c.transpose(1, 0, 2, 3))
        if want_w:
            g_taps = np.zeros((a_n * b_n * p_n, cin), dtype=gy.dtype)
            parts = [g_taps_parts[i] for i in sorted(g_taps_parts)]
            g_taps[self.tap_rows] = sum(parts[1:], parts[0])
            g_taps = g_taps.reshape(a_n, b_n, sy, sx, cout, cin)
            g_w = g_taps.transpose(5, 4, 0, 2, 1, 3).reshape(cin, cout, a_n * sy, b_n * sx)[:, :, :kh, :kw]
            grads[1] = chainer.Variable(np.ascontiguousarray(g_w))
        if len(self.inputs) == 3:
            grads.append(chainer.Variable(gy.sum(axis=(0, 2, 3))) if 2 in indexes else None)
        return tuple(grads)


def deconvolution_2d(x, W, b=None, stride=1, pad=0, outsize=None, dilate=1, groups: int = 1, relu: bool = False):
    """Drop-in for :func:`chainer.functions.deconvolution_2d` (``relu=True``: then ``F.relu``, fused).

    The fast kernel on CPU, Chainer's functions otherwise.
    """
    arrays = [v.array if isinstance(v, chainer.Variable) else v for v in (x, W, b) if v is not None]
    sy, sx = pair(stride)
    ph, pw = pair(pad)
    ok = all(type(a) is np.ndarray for a in arrays) and pair(dilate) == (1, 1) and groups == 1
    if ok:
        dtype = arrays[0].dtype
        ok = dtype in FLOAT_TYPES and all(a.dtype == dtype for a in arrays) and arrays[0].ndim == 4
    if outsize is not None and all(v is None for v in outsize):
        outsize = None
    if ok and outsize is not None:
        natural = (sy * (arrays[0].shape[2] - 1) + arrays[1].shape[2] - 2 * ph,
                   sx * (arrays[0].shape[3] - 1) + arrays[1].shape[3] - 2 * pw)
        ok = tuple(outsize) == natural
    if not ok:
        y = F.deconvolution_2d(x, W, b, stride, pad, outsize=outsize, dilate=dilate, groups=groups)
        return F.relu(y) if relu else y
    args = (x, W) if b is None else (x, W, b)
    return Deconvolution2DFast((sy, sx), (ph, pw), relu).apply(args)[0]
