"""Run-directory layout and atomic writes: a killed run never leaves a half-written file."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from extensions import NpzLoadError, chmod_like_open, load_npz


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each stage of a run reads and writes, under one run directory."""

    root: Path

    @property
    def episodes(self) -> Path:
        """Random-policy episodes, one ``ep_NNNNNN.npz`` per episode."""
        return self.root / "episodes"

    @property
    def vae_dir(self) -> Path:
        """V's trainer output (snapshots, log, TensorBoard)."""
        return self.root / "vae"

    @property
    def vae_model(self) -> Path:
        """V's final weights."""
        return self.root / "vae.npz"

    @property
    def latents(self) -> Path:
        """Encoded episodes (mu, logvar, actions, rewards, dones), one file per episode."""
        return self.root / "latents"

    @property
    def mdnrnn_dir(self) -> Path:
        """M's trainer output."""
        return self.root / "mdnrnn"

    @property
    def mdnrnn_model(self) -> Path:
        """M's final weights."""
        return self.root / "mdnrnn.npz"

    @property
    def controller_dir(self) -> Path:
        """CMA-ES state, per-generation log, TensorBoard."""
        return self.root / "controller"

    @property
    def dream_calibration(self) -> Path:
        """The collection policy in the dream beside the game, and the done-logit bias C trained with."""
        return self.controller_dir / "dream_calibration.json"

    def scored_controller(self, generation: int) -> Path:
        """The CMA-ES mean scored at a selection after ``generation`` generations, as a controller file."""
        return self.controller_dir / "scored" / f"gen_{generation:06d}.npz"

    @property
    def controller_model(self) -> Path:
        """The best controller's parameters."""
        return self.root / "controller.npz"

    @property
    def eval_json(self) -> Path:
        """Final evaluation: agent and random policy, mean and std."""
        return self.root / "eval.json"

    @property
    def media(self) -> Path:
        """GIFs and PNGs."""
        return self.root / "media"


def _atomic(path: Path, write) -> Path:
    """Write ``path`` through a temp file in its folder and a rename; the file gets the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            chmod_like_open(f.fileno())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` via a temp file in the same folder and a rename."""
    return _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (indented, for people to read)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_savez(path: str | os.PathLike, compress: bool = False, **arrays: Any) -> Path:
    """``np.savez`` atomically; the file appears complete or not at all."""
    save = np.savez_compressed if compress else np.savez
    return _atomic(Path(path), lambda f: save(f, **arrays))


def load_weights(path: str | os.PathLike, model: Any, *, missing: str, mismatch: str) -> Any:
    """Load ``save_npz`` weights into ``model`` with pickling off; a missing, damaged or mismatched file is a UserError.

    ``missing`` and ``mismatch`` finish the messages ("<path>: <missing>", "<path>: key 'k': <why>; <mismatch>").
    """
    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        load_npz(str(path), model)
    except NpzLoadError as e:
        raise UserError(f"{e}; {mismatch}") from None
    return model
