"""The dream's elementwise work as two CUDA kernels (CuPy), for :class:`~wm_trainer.sim.dream.DreamEnv` on a GPU.

On the CPU, DreamEnv's step between and after its two matmuls is some sixty NumPy calls over worker
threads; on a GPU each would be a kernel launch of its own, and the launches, not the arithmetic, would
set the pace. Here the LSTM cell is one kernel and the sampling (counter-based random numbers, mixture
pick, Box-Muller normal) another, with the same maths, the same operation order and the same random
bits as the NumPy step (:meth:`DreamEnv._cell`, :meth:`DreamEnv._sample`, :func:`counter_uniform32`),
so a GPU dream follows the CPU dream up to float rounding. Importing this module imports no CuPy.
"""
from __future__ import annotations

import functools
import math

import numpy as np

_MIX = r"""
__device__ inline unsigned long long wm_mix64(unsigned long long x) {
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27; x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}
// hash (key, counter) -> 64 bits, as counter_uniform32: (counter * golden) ^ key, then splitmix64's finaliser
__device__ inline unsigned long long wm_hash(unsigned long long key, unsigned long long counter) {
    return wm_mix64((counter * 0x9E3779B97F4A7C15ULL) ^ key);
}
// 32 random bits -> float32 uniform in (0, 1]: their top 24 bits, + 1, times 2^-24 (exact, as in NumPy)
__device__ inline float wm_uniform(unsigned long long bits32) {
    return ((float)(int)(bits32 >> 8) + 1.0f) * 5.9604644775390625e-08f;
}
"""

# the i, f, o rows are pre-halved: sigmoid(x) = (1 + tanh(x / 2)) / 2, so every gate is one tanh
_CELL = """
T ta = tanh(ga), ti = tanh(gi), tf = tanh(gf), to = tanh(go);
c = (ta * (ti + (T)1) + (tf + (T)1) * c) * (T)0.5;
h = tanh(c) * ((to + (T)1) * (T)0.5);
"""

# element i = (dim j, agent b) of z (zd, n); y is the head's output (3 K zd [+ 1], n) in (part, mixture, dim) rows
_SAMPLE = """
const int j = i / n, b = i % n, p = j < halfz ? j : j - halfz;
const unsigned long long key = keys[b];
const float u_pick = wm_uniform(wm_hash(key, base + (joint ? 0 : j)) & 0xFFFFFFFFULL);
float r = logf(wm_uniform(wm_hash(key, base + p) >> 32));
r *= -2.0f;
r = sqrtf(r);
const float theta = wm_uniform(wm_hash(key, base + halfz + p) >> 32) * two_pi;
const float eps = j < halfz ? r * cosf(theta) : r * sinf(theta);
T top = y[j * n + b];
for (int k = 1; k < K; ++k) top = max(top, y[(k * zd + j) * n + b]);
T total = 0;
for (int k = 0; k < K; ++k) total += exp(y[(k * zd + j) * n + b] - top);
const T thresh = (T)u_pick * total;
int pick = 0;
T cdf = 0;
for (int k = 0; k < K - 1; ++k) {
    cdf += exp(y[(k * zd + j) * n + b] - top);
    pick += cdf < thresh;  // ends as the first k with cdf_k >= thresh
}
T sigma = exp(y[((2 * K + pick) * zd + j) * n + b]);
sigma *= (T)eps;
z = y[((K + pick) * zd + j) * n + b] + sigma;
"""


@functools.cache
def _kernels():
    import cupy

    cell = cupy.ElementwiseKernel("T ga, T gi, T gf, T go", "T c, T h", _CELL, "wm_dream_cell")
    sample = cupy.ElementwiseKernel(
        "raw T y, raw uint64 keys, uint64 base, int32 zd, int32 n, int32 K, int32 halfz, float32 two_pi, "
        "int32 joint",
        "T z", _SAMPLE, "wm_dream_sample", preamble=_MIX)
    return cell, sample


def cell(gates, c, h_out, hidden: int) -> None:
    """LSTM cell for all agents: gates (4H, n) = [a; i; f; o] pre-activations -> c (H, n) in place, h into h_out."""
    a, i, f, o = (gates[k * hidden:(k + 1) * hidden] for k in range(4))
    _kernels()[0](a, i, f, o, c, h_out)


def sample(y, keys, step: int, mixtures: int, z_out, joint: bool = False) -> None:
    """z ~ the head's mixture (tau folded in) for every (dim, agent), into ``z_out`` (zd, n), with the random bits
    of ``counter_uniform32(keys, step, pairs)`` (``joint``: dim 0's pick uniform for every dim)."""
    zd, n = z_out.shape
    half = (zd + 1) // 2
    base = np.uint64(step) * np.uint64(2 * half)
    _kernels()[1](y, keys, base, np.int32(zd), np.int32(n), np.int32(mixtures), np.int32(half),
                  np.float32(2.0 * math.pi), np.int32(joint), z_out)
