"""Re-running one training iteration exactly: saved RNG state, a silent reporter, a model kept intact.

A replay never changes what training sees afterwards: parameters, gradients and
persistents (e.g. BatchNorm statistics) are restored, hooks are removed, the reporter's
observation of the real iteration is not overwritten and the random state is put back.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import struct
from collections.abc import Callable, Iterator
from typing import Any

import chainer
import numpy as np

from . import chainer_compat as compat
from .dtype import cast_floats
from .stats import all_finite


def _cupy_in_use(xp: Any) -> bool:
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


_MT_BYTES = 624 * 4 + 4  # MT19937's C state: uint32 key[624], int pos
_AUG = struct.Struct("<i4xd")  # the legacy RandomState's cached Gaussian: int has_gauss, double gauss


def _legacy_tuple(raw: bytes) -> tuple:
    """``np.random.get_state()``'s tuple from the bytes ``_RawReader.read`` returned."""
    key = np.frombuffer(raw, dtype="<u4", count=624).astype(np.uint32)
    pos = int.from_bytes(raw[_MT_BYTES - 4:_MT_BYTES], "little", signed=True)
    has_gauss, gauss = _AUG.unpack_from(raw, _MT_BYTES)
    return ("MT19937", key, pos, has_gauss, gauss)


class _RawReader:
    """Reads NumPy's global RandomState (MT19937 key and position, cached Gaussian) as 2.5 KB of raw memory.

    ``np.random.get_state()`` copies the 624-word key one element at a time (30-60 us: more
    than the toolkit's whole per-iteration budget on a small net); a memory read costs ~1 us.
    The addresses come from the bit generator's documented ctypes interface and, for the
    cached Gaussian (no interface exposes it), from the RandomState's own pointer to its
    bit generator. ``create`` returns None unless every byte read provably matches
    ``get_state()`` (checked on set states, then the user's state is put back), so another
    NumPy layout falls back to ``get_state``.
    """

    def __init__(self, state_address: int, aug_address: int):
        self.state_address, self.aug_address = state_address, aug_address
        # live views of that memory (the tracker keeps the RandomState, hence the memory, alive)
        self._mt = np.frombuffer((ctypes.c_char * _MT_BYTES).from_address(state_address), dtype=np.uint8)
        self._aug = np.frombuffer((ctypes.c_char * _AUG.size).from_address(aug_address), dtype=np.uint8)
        # the position and the last three words of the key share a cache line or two; the cached Gaussian
        mt = memoryview((ctypes.c_char * _MT_BYTES).from_address(state_address)).cast("B")
        self._tail = mt[_MT_BYTES - 16:]
        self._gauss = memoryview((ctypes.c_char * _AUG.size).from_address(aug_address)).cast("B")
        self._last = b""
        self._last_tail = self._last_gauss = b""

    def read(self) -> bytes:
        """The current state as bytes: key, position, has_gauss, gauss."""
        return self._mt.tobytes() + self._aug.tobytes()

    def changed(self) -> bool:
        """Whether the state may differ from the last ``read_if_changed``: the position, the last three words of
        the key or the cached Gaussian differ.

        Draws only move the position forward until all 624 words are used, then regenerate every word
        and start again at 0; so those bytes unchanged mean no draw happened, unless a whole multiple
        of 624 draws left all three words as they were (odds 2**-96). An iteration that draws nothing
        leaves the 2.5 KB state out of cache, and reading it all costs about 9 us there, a tenth of
        the toolkit's budget on a small net; the probe reads two cache lines.
        """
        return not self._last or self._tail != self._last_tail or self._gauss != self._last_gauss

    def read_if_changed(self) -> bytes:
        """``read()``, answered from the last read when ``changed()`` says the state is as it was then."""
        if self.changed():
            self._last = self.read()
            self._last_tail = self._last[_MT_BYTES - 16:_MT_BYTES]
            self._last_gauss = self._last[_MT_BYTES:]
        return self._last

    @classmethod
    def create(cls, random_state: Any) -> _RawReader | None:
        """A verified reader for ``random_state`` (NumPy's legacy ``RandomState``), or None."""
        try:
            bit_generator = compat.bit_generator(random_state)
            if type(bit_generator).__name__ != "MT19937":
                return None
            state_address = bit_generator.ctypes.state_address
            base, size = id(random_state), type(random_state).__basicsize__
            memory = ctypes.string_at(base, size)
            # the aug state starts with a pointer to the RandomState's own bitgen_t, whose first
            # field points to the MT19937 state: find that pointer, the cached Gaussian follows it
            aug_address = None
            for offset in range(0, size - 8 - _AUG.size + 1, 8):
                target = int.from_bytes(memory[offset:offset + 8], "little") - base
                if 0 <= target <= size - 8 and int.from_bytes(memory[target:target + 8], "little") == state_address:
                    aug_address = base + offset + 8
                    break
            if aug_address is None:
                return None
            reader = cls(state_address, aug_address)
            saved = random_state.get_state()
            try:
                for probe in (saved[:3] + (1, 0.1234567890123), saved[:3] + (0, 0.0), saved):
                    random_state.set_state(probe)
                    got, want = _legacy_tuple(reader.read()), random_state.get_state()
                    if not (np.array_equal(got[1], want[1]) and got[2:] == tuple(want[2:])):
                        return None
            finally:
                random_state.set_state(saved)
            return reader
        except Exception:  # no ctypes interface, another layout: capture the slow way
            return None


@dataclasses.dataclass
class RngState:
    """The random state an iteration started from: NumPy's global RNG, and CuPy's seed if in use.

    NumPy's state is kept as ``get_state()``'s tuple (``numpy_state``) or, when captured by an
    ``RngTracker``, as the raw bytes it is rebuilt from (``raw``).
    """

    numpy_state: tuple | None = None
    cupy_seed: int | None = None
    raw: bytes | None = None

    @classmethod
    def capture(cls, xp: Any = np, seeder: np.random.Generator | None = None) -> RngState:
        """Save NumPy's global state; on CuPy reseed its global RNG from ``seeder`` and remember the seed.

        CuPy's generator state cannot be read back, so each iteration on a GPU starts from a
        recorded seed drawn from ``seeder`` (the updater's own generator, not NumPy's global one).
        """
        state = cls(np.random.get_state())
        state.reseed_cupy(xp, seeder)
        return state

    def reseed_cupy(self, xp: Any, seeder: np.random.Generator | None) -> None:
        """On CuPy, reseed its global RNG from ``seeder`` and remember the seed (no-op otherwise)."""
        if _cupy_in_use(xp) and seeder is not None:
            self.cupy_seed = int(seeder.integers(2 ** 63 - 1))
            xp.random.seed(self.cupy_seed)

    def legacy_state(self) -> tuple | None:
        """NumPy's state as ``np.random.get_state()`` returned it (None if not captured)."""
        if self.numpy_state is None and self.raw is not None:
            self.numpy_state = _legacy_tuple(self.raw)
        return self.numpy_state

    def restore(self) -> None:
        """Put the random generators back to this state."""
        state = self.legacy_state()
        if state is not None:
            np.random.set_state(state)
        if self.cupy_seed is not None:
            from chainer.backends import cuda

            cuda.cupy.random.seed(self.cupy_seed)


class RngTracker:
    """``RngState.capture`` for every iteration at the cost of a memory read (see ``_RawReader``)."""

    def __init__(self) -> None:
        self._random_state: Any = None
        self._reader: _RawReader | None = None
        self._last: RngState | None = None

    def capture(self, xp: Any = np, seeder: np.random.Generator | None = None) -> RngState:
        """The random state now, as ``RngState.capture(xp, seeder)`` would save it."""
        random_state = compat.global_random_state()
        if random_state is not self._random_state:
            self._random_state, self._last = random_state, None
            self._reader = _RawReader.create(random_state) if random_state is not None else None
        reader = self._reader
        if reader is None:
            state = RngState(np.random.get_state())
        elif xp is np and self._last is not None and not reader.changed():  # no draw since: the same state
            return self._last
        else:
            state = RngState(raw=reader.read_if_changed())
        if xp is not np:
            state.reseed_cupy(xp, seeder)
        self._last = state if xp is np and reader is not None else None
        return state


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
        for name in sorted(compat.persistent_names(sub)):
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
