"""2-D transposed convolution (deconvolution) for the CPU: one GEMM, then kh*kw strided adds.

Same layout trick as :mod:`wm_trainer.ops.conv`: NCHW shapes, NHWC memory. Forward multiplies the
(N*H*W, Cin) input rows by the (Cin, kh*kw*Cout) weight matrix and scatter-adds the windows onto the
output; backward gathers the output gradient's windows with one strided copy and needs two GEMMs.
GPU arrays and options this kernel does not cover (dilation, groups, an ``outsize`` other than the
natural one, mixed dtypes) go to :func:`chainer.functions.deconvolution_2d`.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
from chainer import function_node

from wm_trainer.ops.conv import FLOAT_TYPES, im2row, nchw_view, pair, row2im_add, to_nhwc


class Deconvolution2DFast(function_node.FunctionNode):
    """y = deconv(x, W) + b on the CPU with W of shape (Cin, Cout, kh, kw) as in Chainer."""

    def __init__(self, stride: tuple[int, int], pad: tuple[int, int]):
        self.sy, self.sx = stride
        self.ph, self.pw = pad

    def forward_cpu(self, inputs):
        """Input rows times the weight matrix, scatter-added window by window."""
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        n, cin, h, w = x.shape
        _, cout, kh, kw = W.shape
        hf, wf = self.sy * (h - 1) + kh, self.sx * (w - 1) + kw
        self.x_rows = to_nhwc(x).reshape(n * h * w, cin)
        self.w_mat = np.ascontiguousarray(W.transpose(0, 2, 3, 1)).reshape(cin, kh * kw * cout)
        self.kh, self.kw = kh, kw
        cols = self.x_rows @ self.w_mat
        if h == 1 and w == 1:
            y = cols.reshape(n, kh, kw, cout)
        else:
            y = np.zeros((n, hf, wf, cout), dtype=x.dtype)
            row2im_add(y, cols.reshape(n, h, w, kh, kw, cout), kh, kw, self.sy, self.sx)
        if self.ph or self.pw:
            y = np.ascontiguousarray(y[:, self.ph:hf - self.ph, self.pw:wf - self.pw, :])
        if b is not None:
            y += b
        if not chainer.config.enable_backprop:
            self.x_rows = self.w_mat = None
        return nchw_view(y),

    def backward(self, indexes, grad_outputs):
        """Gradients as plain arrays (first order only: double backprop is not supported)."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fast deconvolution_2d has no double backprop; use experiment.ops=chainer")
        gy = grad_outputs[0].array
        n, cout = gy.shape[0], gy.shape[1]
        cin = self.x_rows.shape[1]
        h, w = self.inputs[0].shape[2], self.inputs[0].shape[3]
        gy_nhwc = to_nhwc(gy, (self.ph, self.pw))
        g_rows = im2row(gy_nhwc, self.kh, self.kw, self.sy, self.sx, h, w)
        grads = [None, None]
        if 0 in indexes:
            grads[0] = chainer.Variable(nchw_view((g_rows @ self.w_mat.T).reshape(n, h, w, cin)))
        if 1 in indexes:
            gw = (self.x_rows.T @ g_rows).reshape(cin, self.kh, self.kw, cout)
            grads[1] = chainer.Variable(np.ascontiguousarray(gw.transpose(0, 3, 1, 2)))
        if len(self.inputs) == 3:
            gb = gy_nhwc[:, self.ph:gy_nhwc.shape[1] - self.ph, self.pw:gy_nhwc.shape[2] - self.pw, :]
            grads.append(chainer.Variable(gb.sum(axis=(0, 1, 2))) if 2 in indexes else None)
        return tuple(grads)


def deconvolution_2d(x, W, b=None, stride=1, pad=0, outsize=None, dilate=1, groups: int = 1):
    """Drop-in for :func:`chainer.functions.deconvolution_2d`; the fast kernel on CPU, Chainer's otherwise."""
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
        return F.deconvolution_2d(x, W, b, stride, pad, outsize=outsize, dilate=dilate, groups=groups)
    args = (x, W) if b is None else (x, W, b)
    return Deconvolution2DFast((sy, sx), (ph, pw)).apply(args)[0]
