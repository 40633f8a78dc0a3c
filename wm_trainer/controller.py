"""C: the linear controller a = tanh(W [z, h] + b), batched over agents with per-agent weights.

CMA-ES searches over the flat parameter vector [W.ravel(), b]; ``act_batch`` runs a whole
population (one weight row per agent) with one batched matmul.
"""
from __future__ import annotations

import os
from pathlib import Path

import chainer
import numpy as np

from .errors import UserError
from .storage import atomic_savez


class Controller:
    """Linear policy over [z, h] with a tanh squashing; the action lives in the controller space [-1, 1]."""

    def __init__(self, z_dim: int, hidden: int, action_dim: int, params: np.ndarray | None = None):
        self.z_dim, self.hidden, self.action_dim = int(z_dim), int(hidden), int(action_dim)
        self.n_inputs = self.z_dim + self.hidden
        self.n_params = self.action_dim * self.n_inputs + self.action_dim
        self.params = np.zeros(self.n_params, np.float32) if params is None else self._check(params)

    def _check(self, params: np.ndarray) -> np.ndarray:
        params = chainer.backend.get_array_module(params).asarray(params, np.float32)
        if params.shape[-1] != self.n_params:
            raise ValueError(f"controller expects {self.n_params} parameters per agent, got shape {params.shape}")
        return params

    def unflatten(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat vector(s) (..., n_params) -> W (..., A, z+h) and b (..., A)."""
        params = self._check(params)
        lead = params.shape[:-1]
        split = self.action_dim * self.n_inputs
        W = params[..., :split].reshape(*lead, self.action_dim, self.n_inputs)
        b = params[..., split:]
        return W, b

    def flatten(self, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        """W (..., A, z+h) and b (..., A) -> flat vector(s) (..., n_params)."""
        W, b = np.asarray(W, np.float32), np.asarray(b, np.float32)
        lead = W.shape[:-2]
        return np.concatenate([W.reshape(*lead, -1), b.reshape(*lead, -1)], axis=-1)

    def act_batch(self, params: np.ndarray, z: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Actions (B, A) for B agents; ``params`` is (B, n_params) (one row per agent) or (n_params,) shared.

        NumPy arrays, or CuPy arrays all on one GPU (the dream's on a GPU), and the actions come back alike.
        """
        xp = chainer.backend.get_array_module(z)
        x = xp.concatenate([xp.asarray(z, np.float32), xp.asarray(h, np.float32)], axis=1)
        if x.shape[1] != self.n_inputs:
            raise ValueError(f"controller expects z+h of width {self.n_inputs}, got {x.shape[1]}")
        W, b = self.unflatten(params)
        if W.ndim == 2:
            return xp.tanh(x @ W.T + b)
        if W.shape[0] != x.shape[0]:
            raise ValueError(f"{W.shape[0]} weight rows for {x.shape[0]} agents")
        return xp.tanh(xp.matmul(W, x[:, :, None])[:, :, 0] + b)

    def act(self, z: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Actions (B, A) with this controller's own parameters for every agent."""
        return self.act_batch(self.params, np.atleast_2d(z), np.atleast_2d(h))

    def save(self, path: str | os.PathLike) -> Path:
        """Write W, b and the sizes to an npz file, atomically."""
        W, b = self.unflatten(self.params)
        return atomic_savez(path, W=W, b=b, z_dim=self.z_dim, hidden=self.hidden, action_dim=self.action_dim)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Controller:
        """Read a controller written by :meth:`save`; a missing or damaged file is a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no controller here; run `wm-trainer train-controller` first")
        try:
            with np.load(path, allow_pickle=False) as f:
                W, b = f["W"], f["b"]
                ctrl = cls(int(f["z_dim"]), int(f["hidden"]), int(f["action_dim"]))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: not a readable controller file ({e})") from None
        ctrl.params = ctrl.flatten(W, b)
        return ctrl
