"""2-D convolution for the CPU as GEMMs over strided NHWC windows, block by block of images.

Arrays keep Chainer's NCHW *shape* but the outputs live in NHWC *memory* (a transposed view), so
the next layer gets its NHWC input for free. For each block of images (about ``BLOCK_BYTES`` of
temporaries) the window rows (output pixels x (ky, kx, channel)) are gathered with one strided copy
and multiplied by the weights while still in cache, with bias and ReLU in the same pass; blocks are
spread over the ops threads. The input gradient is a phase-split GEMM when the kernel is a multiple
of the stride (else kh*kw strided adds), the weight gradient per-block partial GEMMs. On GPU arrays
or for options this kernel does not cover (dilation, groups, cover_all, mixed dtypes)
:func:`convolution_2d` calls Chainer's own function.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
from chainer import function_node
from numpy.lib.stride_tricks import as_strided

from wm_trainer.ops.activation import relu_grad
from wm_trainer.ops.scratch import give_back, scratch, take
from wm_trainer.ops.threads import run_blocks, run_chunks

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))


def pair(v) -> tuple[int, int]:
    """``v`` or ``(v, v)`` as a pair of ints."""
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def to_nhwc(x: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A C-contiguous NHWC copy of NCHW-shaped ``x`` (free when ``x`` already has NHWC memory)."""
    ph, pw = pad
    t = x.transpose(0, 2, 3, 1)
    if ph == 0 and pw == 0 and t.flags.c_contiguous:
        return t
    n, h, w, c = t.shape
    out = (np.empty if ph == 0 and pw == 0 else np.zeros)((n, h + 2 * ph, w + 2 * pw, c), dtype=x.dtype)
    run_chunks(lambda lo, hi: np.copyto(out[lo:hi, ph:ph + h, pw:pw + w, :], t[lo:hi]), n)
    return out


def windows(x_nhwc: np.ndarray, kh: int, kw: int, sy: int, sx: int, oh: int, ow: int) -> np.ndarray:
    """Read-only strided view (N, oh, ow, kh, kw, C) of every kernel window of a contiguous NHWC array."""
    s0, s1, s2, s3 = x_nhwc.strides
    n, c = x_nhwc.shape[0], x_nhwc.shape[3]
    return as_strided(x_nhwc, (n, oh, ow, kh, kw, c), (s0, s1 * sy, s2 * sx, s1, s2, s3), writeable=False)


BLOCK_BYTES = 1 << 20  # window rows per block: about an L2 cache's worth
MIN_BLOCK_ROWS = 512  # but GEMMs of at least this many rows (smaller ones spend their time packing weights)


def images_per_block(bytes_per_image: int, rows_per_image: int) -> int:
    """How many images a block of the blocked kernels takes: about BLOCK_BYTES of temporaries, and at least
    MIN_BLOCK_ROWS GEMM rows (or columns)."""
    return max(1, BLOCK_BYTES // bytes_per_image, -(-MIN_BLOCK_ROWS // rows_per_image))


def conv_rows_gemm(x_nhwc: np.ndarray, w_mat: np.ndarray, b: np.ndarray | None, relu: bool,
                   kh: int, kw: int, sy: int, sx: int, oh: int, ow: int,
                   rows_out: np.ndarray | None) -> np.ndarray:
    """y (N*oh*ow, out) = window rows @ w_mat (+ b, ReLU), built block by block of images so each block's rows
    are still in cache for its GEMM and its output for the bias and ReLU.

    ``rows_out`` (N*oh*ow, kh*kw*C) keeps every window row (for the weight gradient); without it the rows live
    in a per-thread block buffer only. With several threads, threads take blocks as they free up.
    """
    n, c = x_nhwc.shape[0], x_nhwc.shape[3]
    per_image, k = oh * ow, kh * kw * c
    y = np.empty((n * per_image, w_mat.shape[1]), dtype=x_nhwc.dtype)
    win = windows(x_nhwc, kh, kw, sy, sx, oh, ow)
    step = images_per_block(per_image * k * x_nhwc.itemsize, per_image)

    def block(i: int, j: int) -> None:  # images i:j
        r0, r1 = i * per_image, j * per_image
        if rows_out is not None:
            rows = rows_out[r0:r1]
        else:
            rows = scratch("conv.block_rows", (min(step, n) * per_image, k), x_nhwc.dtype)[:r1 - r0]
        np.copyto(rows.reshape(j - i, oh, ow, kh, kw, c), win[i:j])
        out = y[r0:r1]
        np.matmul(rows, w_mat, out=out)
        if b is not None:
            out += b
        if relu:
            np.maximum(out, 0, out=out)
    run_blocks(block, n, step)
    return y


def row2im_add(out_nhwc: np.ndarray, rows: np.ndarray, kh: int, kw: int, sy: int, sx: int) -> None:
    """Scatter-add window rows (N, oh, ow, kh, kw, C) back onto ``out_nhwc`` (N, H, W, C): kh*kw strided adds."""
    oh, ow = rows.shape[1], rows.shape[2]

    def chunk(lo: int, hi: int) -> None:
        for i in range(kh):
            for j in range(kw):
                dst = out_nhwc[lo:hi, i:i + sy * (oh - 1) + 1:sy, j:j + sx * (ow - 1) + 1:sx, :]
                np.add(dst, rows[lo:hi, :, :, i, j, :], out=dst)
    run_chunks(chunk, out_nhwc.shape[0])


def nchw_view(y_nhwc: np.ndarray) -> np.ndarray:
    """NCHW-shaped view of an NHWC array (no copy)."""
    return y_nhwc.transpose(0, 3, 1, 2)


class Convolution2DFast(function_node.FunctionNode):
    """y = conv(x, W) + b (then ReLU when ``relu``) on the CPU, NCHW shapes, NHWC memory, one GEMM per pass."""

    def __init__(self, stride: tuple[int, int], pad: tuple[int, int], relu: bool = False):
        self.sy, self.sx = stride
        self.ph, self.pw = pad
        self.relu = relu

    def forward_cpu(self, inputs):
        """Window matrix times the (kh*kw*C, out) weight matrix."""
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        n, c, h, w = x.shape
        out_c, _, kh, kw = W.shape
        oh = (h + 2 * self.ph - kh) // self.sy + 1
        ow = (w + 2 * self.pw - kw) // self.sx + 1
        self.x_shape, self.kh, self.kw = x.shape, kh, kw
        self.w_mat = np.ascontiguousarray(W.transpose(2, 3, 1, 0)).reshape(kh * kw * c, out_c)
        keep = chainer.config.enable_backprop
        self.rows = take((n * oh * ow, kh * kw * c), x.dtype) if keep else None
        y = conv_rows_gemm(to_nhwc(x, (self.ph, self.pw)), self.w_mat, b, self.relu, kh, kw, self.sy, self.sx,
                           oh, ow, self.rows)
        if not keep:
            self.w_mat = None
        elif self.relu:
            self.retain_outputs((0,))
        return nchw_view(y.reshape(n, oh, ow, out_c)),

    def __del__(self):
        # the window rows go back to the pool only when the graph holding this node is gone
        rows = getattr(self, "rows", None)
        if rows is not None:
            give_back(rows)

    def _grad_w(self, gy2: np.ndarray, per_image: int) -> np.ndarray:
        """rows.T @ gy2 as per-block partial GEMMs over threads (1-thread BLAS), summed in block order."""
        n, k = gy2.shape[0] // per_image, self.rows.shape[1]
        step = images_per_block(per_image * k * gy2.itemsize, per_image)
        parts: dict[int, np.ndarray] = {}

        def block(i: int, j: int) -> None:  # images i:j
            parts[i] = self.rows[i * per_image:j * per_image].T @ gy2[i * per_image:j * per_image]
        run_blocks(block, n, step)
        ordered = [parts[i] for i in sorted(parts)]
        return sum(ordered[1:], ordered[0])

    def _grad_x_by_phase(self, gy_nhwc: np.ndarray, hp: int, wp: int) -> np.ndarray:
        """Input gradient (N, hp, wp, C) when the kernel is a multiple of the stride, as a compute-bound GEMM.

        Input pixel (sy*Y + p, sx*X + q) gets taps (sy*a + p, sx*b + q) from output pixel (Y - a, X - b):
        gather the A x B windows of the zero-padded output gradient (one strided copy), multiply by the
        (A*B*Cout, sy*sx*C) tap matrix, and interleave the sy*sx phase images.
        """
        sy, sx, kh, kw = self.sy, self.sx, self.kh, self.kw
        a_n, b_n = kh // sy, kw // sx
        n, oh, ow, out_c = gy_nhwc.shape
        c = self.w_mat.shape[0] // (kh * kw)
        hq, wq = oh + a_n - 1, ow + b_n - 1
        w6 = self.w_mat.reshape(a_n, sy, b_n, sx, c, out_c)[::-1, :, ::-1]
        taps = np.ascontiguousarray(w6.transpose(0, 2, 5, 1, 3, 4)).reshape(a_n * b_n * out_c, sy * sx * c)
        gx = np.empty((n, hp, wp, c), dtype=gy_nhwc.dtype)
        step = images_per_block(hq * wq * a_n * b_n * out_c * gy_nhwc.itemsize, hq * wq)

        def block(i: int, j: int) -> None:  # images i:j, the block's temporaries in cache
            size = min(step, n)
            pad_buf = scratch("conv.grad_pad", (size, oh + 2 * (a_n - 1), ow + 2 * (b_n - 1), out_c), gy_nhwc.dtype)
            rows_buf = scratch("conv.grad_rows", (size * hq * wq, a_n * b_n * out_c), gy_nhwc.dtype)
            ph_buf = scratch("conv.grad_phases", (size * hq * wq, sy * sx * c), gy_nhwc.dtype)
            pad_buf.fill(0)  # the interior is overwritten below, the border stays zero
            m = j - i
            pad = pad_buf[:m]
            np.copyto(pad[:, a_n - 1:a_n - 1 + oh, b_n - 1:b_n - 1 + ow], gy_nhwc[i:j])
            rows = rows_buf[:m * hq * wq]  # columns (a', b', cout) with a' = A - 1 - a
            np.copyto(rows.reshape(m, hq, wq, a_n, b_n, out_c), windows(pad, a_n, b_n, 1, 1, hq, wq))
            phases = np.matmul(rows, taps, out=ph_buf[:m * hq * wq]).reshape(m, hq, wq, sy, sx, c)
            inner = gx[i:j, :hq * sy, :wq * sx].reshape(m, hq, sy, wq, sx, c)
            np.copyto(inner, phases.transpose(0, 1, 3, 2, 4, 5))
            gx[i:j, hq * sy:] = 0
            gx[i:j, :, wq * sx:] = 0
        run_blocks(block, n, step)
        return gx

    def backward(self, indexes, grad_outputs):
        """Gradients as plain arrays (first order only: double backprop is not supported)."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fast convolution_2d has no double backprop; use experiment.ops=chainer")
        gy = grad_outputs[0].array
        n, c, h, w = self.x_shape
        out_c, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
        kh, kw = self.kh, self.kw
        if self.relu:  # the ReLU's mask, in the output's NHWC memory
            gy = relu_grad(gy, self.get_retained_outputs()[0].array, "conv.relu_grad")
        gy2 = to_nhwc(gy).reshape(n * oh * ow, out_c)
        grads = []
        if 0 in indexes:
            hp, wp = h + 2 * self.ph, w + 2 * self.pw
            if kh % self.sy == 0 and kw % self.sx == 0:
                gx = self._grad_x_by_phase(gy2.reshape(n, oh, ow, out_c), hp, wp)
            else:
                g_rows = (gy2 @ self.w_mat.T).reshape(n, oh, ow, kh, kw, c)
                gx = np.zeros((n, hp, wp, c), dtype=gy.dtype)
                row2im_add(gx, g_rows, kh, kw, self.sy, self.sx)
            gx = gx[:, self.ph:self.ph + h, self.pw:self.pw + w, :]
            grads.append(chainer.Variable(nchw_view(gx)))
        else:
            grads.append(None)
        if 1 in indexes:
            gw = self._grad_w(gy2, oh * ow).reshape(kh, kw, c, out_c)
            grads.append(chainer.Variable(np.ascontiguousarray(gw.transpose(3, 2, 0, 1))))
        else:
            grads.append(None)
        if len(self.inputs) == 3:
            grads.append(chainer.Variable(np.ones(gy2.shape[0], gy2.dtype) @ gy2) if 2 in indexes else None)
        return tuple(grads)


def fast_conv_supported(x, W, b, stride, pad, cover_all: bool, dilate, groups: int) -> bool:
    """Whether :class:`Convolution2DFast` covers this call (CPU numpy arrays, one dtype, plain options)."""
    arrays = [v.array if isinstance(v, chainer.Variable) else v for v in (x, W, b) if v is not None]
    if not all(type(a) is np.ndarray for a in arrays):
        return False
    dtype = arrays[0].dtype
    return (dtype in FLOAT_TYPES and all(a.dtype == dtype for a in arrays) and arrays[0].ndim == 4
            and not cover_all and pair(dilate) == (1, 1) and groups == 1)


def convolution_2d(x, W, b=None, stride=1, pad=0, cover_all: bool = False, dilate=1, groups: int = 1,
                   relu: bool = False):
    """Drop-in for :func:`chainer.functions.convolution_2d` (``relu=True``: then ``F.relu``, fused).

    The fast kernel on CPU, Chainer's functions otherwise.
    """
    if not fast_conv_supported(x, W, b, stride, pad, cover_all, dilate, groups):
        y = F.convolution_2d(x, W, b, stride, pad, cover_all=cover_all, dilate=dilate, groups=groups)
        return F.relu(y) if relu else y
    args = (x, W) if b is None else (x, W, b)
    return Convolution2DFast(pair(stride), pair(pad), relu).apply(args)[0]
