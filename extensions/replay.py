"""Re-running one training iteration exactly: saved RNG state, a silent reporter, a model kept intact.

A replay never changes what training sees afterwards: parameters, gradients and
persistents (e.g. BatchNorm statistics) are restored, hooks are removed, the reporter's
observation of the real iteration is not overwritten and the random state is put back.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import chainer
import numpy as np

from .dtype import cast_floats
from .stats import all_finite


def _cupy_in_use(xp: Any) -> bool:
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


@dataclasses.dataclass
class RngState:
    """The random state an iteration started from: NumPy's global RNG, and CuPy's seed if in use."""

    numpy_state: tuple | None = None
    cupy_seed: int | None = None

    @classmethod
    def capture(cls, xp: Any = np, seeder: np.random.Generator | None = None) -> RngState:
        """Save NumPy's global state; on CuPy reseed its global RNG from ``seeder`` and remember the seed.

        CuPy's generator state cannot be read back, so each iteration on a GPU starts from a
        recorded seed drawn from ``seeder`` (the updater's own generator, not NumPy's global one).
        """
        state = cls(np.random.get_state())
        if _cupy_in_use(xp) and seeder is not None:
            state.cupy_seed = int(seeder.integers(2 ** 63 - 1))
            xp.random.seed(state.cupy_seed)
        return state

    def restore(self) -> None:
        """Put the random generators back to this state."""
        if self.numpy_state is not None:
            np.random.set_state(self.numpy_state)
        if self.cupy_seed is not None:
            from chainer.backends import cuda

            cuda.cupy.random.seed(self.cupy_seed)


@contextlib.contextmanager
def quiet_reporter() -> Iterator[None]:
    """Run code whose ``chainer.reporter.report`` calls must not reach the real observation."""
    try:
        reporter = chainer.reporter.get_current_reporter()
    except IndexError:  # outside any reporter scope: report() is already a no-op
        reporter = None
    if reporter is None:
        yield
        return
    with reporter.scope({}):
        yield


def _float_persistents(link: chainer.Link) -> list[tuple[chainer.Link, str, Any]]:
    out = []
    for sub in link.links():
        for name in sorted(sub._persistent):
            value = getattr(sub, name, None)
            if hasattr(value, "dtype") and getattr(value, "dtype", None) is not None and value.dtype.kind == "f":
                out.append((sub, name, value))
    return out


@contextlib.contextmanager
def preserved(link: chainer.Link, dtype: Any = None) -> Iterator[None]:
    """Keep ``link``'s parameters, gradients and persistents as they are; optionally cast them meanwhile.

    With ``dtype`` set, parameters and float persistents are replaced by cast copies for
    the duration of the block (a float64 replay) and the originals put back afterwards.
    """
    params = [(p, p.array, p.grad) for p in link.params(include_uninit=False)]
    persistents = [(sub, name, value.copy()) for sub, name, value in _float_persistents(link)]
    try:
        if dtype is not None:
            for p, array, _ in params:
                p.grad = None
                p.array = array.astype(dtype) if array.dtype.kind == "f" else array
            for sub, name, value in persistents:
                setattr(sub, name, value.astype(dtype))
        yield
    finally:
        for p, array, grad in params:
            p.array = array
            p.grad = grad
        for sub, name, value in persistents:
            setattr(sub, name, value)


@dataclasses.dataclass
class ReplayResult:
    """What a float64 replay found: ``precision``, ``bug`` or ``unknown``, and why."""

    verdict: str
    detail: str
    loss: float | None = None


def replay_float64(compute_loss: Callable[[Any], chainer.Variable], in_arrays: Any, link: chainer.Link,
                   rng: RngState | None) -> ReplayResult:
    """Replay one iteration on float64 copies of the weights and batch and say whether it stays finite."""
    dtypes = {p.array.dtype for p in link.params(include_uninit=False)}
    if dtypes and all(d == np.float64 for d in dtypes):
        return ReplayResult("bug", "the model already runs in float64, so this is not a float32 precision problem")
    arrays64 = cast_floats(in_arrays, np.float64)
    after = np.random.get_state()
    try:
        with preserved(link, np.float64), quiet_reporter(), chainer.using_config("dtype", np.dtype(np.float64)):
            if rng is not None:
                rng.restore()
            link.cleargrads()
            loss = compute_loss(arrays64)
            loss_value = float(chainer.backend.CpuDevice().send(loss.array).sum())
            if not np.isfinite(loss_value):
                return ReplayResult("bug", f"the loss is {loss_value} in float64 too", loss_value)
            loss.backward()
            grads = [p.grad for p in link.params(include_uninit=False)]
            if not all_finite(grads):
                return ReplayResult("bug", "the gradients are non-finite in float64 too", loss_value)
            return ReplayResult("precision", f"in float64 the loss ({loss_value:.6g}) and every gradient are "
                                "finite: float32 range or precision is the cause", loss_value)
    except Exception as e:  # the user's model may not run in float64 at all (hard-coded float32 constants)
        return ReplayResult("unknown", f"the float64 replay failed: {type(e).__name__}: {e}")
    finally:
        np.random.set_state(after)
