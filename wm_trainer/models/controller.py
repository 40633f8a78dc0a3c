"""C: the linear controller a = tanh(W x + b), x = [z, h] or [z, c, h], batched over agents with per-agent weights.

CMA-ES searches over the flat parameter vector [W.ravel(), b] (b only with ``bias``); ``act_batch`` runs a
whole population (one weight row per agent) with one batched matmul. The paper's Doom controller sees
[z, c, h] without a bias (1,088 parameters at z 64, hidden 512); its CarRacing one [z, h] with a bias (867).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import chainer
import numpy as np

from extensions.serializers import NpzLoadError, SafeNpz

from ..base.errors import UserError
from ..base.storage import atomic_savez

Inputs = Literal["zh", "zch"]


class Controller:
    """Linear policy over [z, h] or [z, c, h] with a tanh squashing; actions in the controller space [-1, 1]."""

    def __init__(self, z_dim: int, hidden: int, action_dim: int, params: np.ndarray | None = None, *,
                 inputs: Inputs = "zh", bias: bool = True):
        if inputs not in ("zh", "zch"):
            raise ValueError(f"controller inputs must be 'zh' or 'zch', got {inputs!r}")
        self.z_dim, self.hidden, self.action_dim = int(z_dim), int(hidden), int(action_dim)
        self.inputs, self.bias = inputs, bool(bias)
        self.n_inputs = self.z_dim + self.hidden * (2 if inputs == "zch" else 1)
        self.n_params = self.action_dim * self.n_inputs + (self.action_dim if self.bias else 0)
        self.params = np.zeros(self.n_params, np.float32) if params is None else self._check(params)

    def _check(self, params: np.ndarray) -> np.ndarray:
        params = chainer.backend.get_array_module(params).asarray(params, np.float32)
        if params.shape[-1] != self.n_params:
            raise ValueError(f"controller expects {self.n_params} parameters per agent, got shape {params.shape}")
        return params

    def unflatten(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Flat vector(s) (..., n_params) -> W (..., A, inputs) and b (..., A), or None without a bias."""
        params = self._check(params)
        lead = params.shape[:-1]
        split = self.action_dim * self.n_inputs
        W = params[..., :split].reshape(*lead, self.action_dim, self.n_inputs)
        return W, (params[..., split:] if self.bias else None)

    def flatten(self, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """W (..., A, inputs) and b (..., A) (None without a bias) -> flat vector(s) (..., n_params)."""
        W = np.asarray(W, np.float32)
        lead = W.shape[:-2]
        parts = [W.reshape(*lead, -1)]
        if self.bias:
            parts.append(np.asarray(b, np.float32).reshape(*lead, -1))
        return np.concatenate(parts, axis=-1)

    def features(self, z: Any, h: Any, c: Any = None) -> Any:
        """The controller's input rows (B, n_inputs): [z, h], or [z, c, h] (the paper's Doom order)."""
        xp = chainer.backend.get_array_module(z)
        parts = [xp.asarray(z, np.float32)]
        if self.inputs == "zch":
            if c is None:
                raise ValueError("this controller reads M's cell state c: pass c as well as z and h")
            parts.append(xp.asarray(c, np.float32))
        parts.append(xp.asarray(h, np.float32))
        x = xp.concatenate(parts, axis=1)
        if x.shape[1] != self.n_inputs:
            raise ValueError(f"controller expects inputs ({self.inputs}) of width {self.n_inputs}, got {x.shape[1]}")
        return x

    def act_batch(self, params: np.ndarray, z: np.ndarray, h: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        """Actions (B, A) for B agents; ``params`` is (B, n_params) (one row per agent) or (n_params,) shared.

        NumPy arrays, or CuPy arrays all on one GPU (the dream's on a GPU), and the actions come back alike.
        ``c`` (M's cell state, (B, hidden)) is needed by a ``'zch'`` controller and ignored otherwise.
        """
        xp = chainer.backend.get_array_module(z)
        x = self.features(z, h, c)
        W, b = self.unflatten(params)
        if W.ndim == 2:
            y = x @ W.T
        else:
            if W.shape[0] != x.shape[0]:
                raise ValueError(f"{W.shape[0]} weight rows for {x.shape[0]} agents")
            y = xp.matmul(W, x[:, :, None])[:, :, 0]
        return xp.tanh(y if b is None else y + b)

    def act(self, z: np.ndarray, h: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        """Actions (B, A) with this controller's own parameters for every agent."""
        return self.act_batch(self.params, np.atleast_2d(z), np.atleast_2d(h), None if c is None else np.atleast_2d(c))

    def save(self, path: str | os.PathLike) -> Path:
        """Write W, b (empty without a bias), the sizes and the input layout to an npz file, atomically."""
        W, b = self.unflatten(self.params)
        return atomic_savez(path, W=W, b=np.zeros(0, np.float32) if b is None else b, z_dim=self.z_dim,
                            hidden=self.hidden, action_dim=self.action_dim, inputs=np.array(self.inputs),
                            bias=np.array(self.bias))

    @classmethod
    def load(cls, path: str | os.PathLike, expect: tuple[int, int, int] | None = None) -> Controller:
        """Read a controller written by :meth:`save` with pickling off; a missing or damaged file, or one whose
        (z_dim, hidden, action_dim) differ from ``expect`` (the run's V, M and env), is a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no controller here; run `wm-trainer train-controller` first")
        try:
            with SafeNpz(path) as f:
                arrays = {k: f[k] for k in ("W", "b", "z_dim", "hidden", "action_dim")}
                inputs = str(f["inputs"]) if "inputs" in f else "zh"
                bias = bool(f["bias"]) if "bias" in f else True
        except NpzLoadError as e:
            raise UserError(f"{e}; not a readable controller file") from None
        try:
            sizes = [int(arrays[k]) for k in ("z_dim", "hidden", "action_dim")]
            ctrl = cls(*sizes, inputs=inputs, bias=bias)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: key 'z_dim', 'hidden', 'action_dim' or 'inputs': {e}") from None
        if expect is not None and tuple(expect) != (ctrl.z_dim, ctrl.hidden, ctrl.action_dim):
            raise UserError(f"{path}: a controller for z_dim {ctrl.z_dim}, hidden {ctrl.hidden}, action_dim "
                            f"{ctrl.action_dim}; this run's V, M and env need {expect[0]}, {expect[1]}, {expect[2]}")
        expected = {"W": (ctrl.action_dim, ctrl.n_inputs), "b": (ctrl.action_dim,) if bias else None}
        for key, shape in expected.items():
            value = arrays[key]
            if value.dtype.kind not in "biuf" or (shape is not None and value.shape != shape):
                raise UserError(f"{path}: key {key!r}: {value.dtype} {value.shape}, expected float32 {shape}")
        ctrl.params = ctrl.flatten(arrays["W"], arrays["b"] if bias else None)
        return ctrl


def paper_layout(env_id: str) -> tuple[Inputs, bool]:
    """The paper's controller for ``env_id``: Doom [z, c, h] without a bias, CarRacing [z, h] with one."""
    from ..games.spec import DOOM_ID

    return ("zch", False) if env_id == DOOM_ID else ("zh", True)


def build_controller(cfg: Any, action_dim: int) -> Controller:
    """C sized from the config: vae.z_dim, mdnrnn.hidden, controller.inputs/bias ('auto' = the paper's)."""
    cc = cfg.controller
    inputs, bias = paper_layout(cfg.env.id)
    if cc.inputs != "auto":
        inputs = cc.inputs
    if cc.bias != "auto":
        bias = cc.bias == "yes"
    return Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, action_dim, inputs=inputs, bias=bias)
