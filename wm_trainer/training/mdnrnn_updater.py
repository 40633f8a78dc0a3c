"""M's updater: stateful truncated BPTT over the iterator's lanes, with the toolkit's gradients and guards.

The LSTM state is carried from one window of an episode to the next and is zero at the episode's start, as
in the dream; gradients flow back through each window only, as the paper's doomrnn trained its chunks.
"""
from __future__ import annotations

import chainer
import numpy as np
from chainer.training.updaters import StandardUpdater

import extensions as ext


class MDNRNNUpdater(ext.GradientLoggingMixin, StandardUpdater):
    """Stateful truncated BPTT: one window per lane per iteration, (h, c) carried from each window to the next.

    A lane's window starts from the (h, c) its previous window ended in -- held as a constant, so gradients
    stop at the window's start -- or from zero where the iterator's ``reset`` flags an episode start. The
    loss is ``MDNRNN.loss_and_state``; the toolkit's mixin logs the gradients and guards the update.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._carry: tuple | None = None  # (h, c) after each lane's last window
        self._final: tuple | None = None  # (h, c) of the iteration in progress

    def _zero_state(self) -> tuple:
        model = self.get_optimizer("main").target
        shape = (self.get_iterator("main").batch_size, model.hidden)
        z = model.xp.zeros(shape, dtype=chainer.get_dtype())
        return z, z.copy()

    def next_batch(self) -> dict:
        """The converted window batch, with the start state (h0, c0): carried, zero at episode starts."""
        in_arrays = super().next_batch()
        reset = in_arrays.pop("reset")
        h, c = self._carry if self._carry is not None else self._zero_state()
        xp = chainer.backend.get_array_module(h)
        keep = (~xp.asarray(reset))[:, None].astype(h.dtype)
        in_arrays["h0"], in_arrays["c0"] = h * keep, c * keep
        return in_arrays

    def compute_loss(self, in_arrays) -> chainer.Variable:
        """M's masked loss on one window batch; keeps the final state for the next window."""
        loss, (h, c) = self.get_optimizer("main").target.loss_and_state(**in_arrays)
        self._final = (h.array, c.array)
        return loss

    def update_core(self) -> None:
        """One iteration; the lanes then go on from the state it ended in."""
        super().update_core()
        self._carry = self._final

    def serialize(self, serializer) -> None:
        """StandardUpdater's state and the toolkit's, plus the carried LSTM state (so a resume is exact)."""
        super().serialize(serializer)
        self.serialize_rank_state(serializer)

    def serialize_rank_state(self, serializer) -> None:
        """The carried LSTM state alone: what differs between the processes of a data-parallel run."""
        cpu = chainer.backend.CpuDevice()
        h, c = (cpu.send(a) for a in (self._carry if self._carry is not None else self._zero_state()))
        try:
            h, c = serializer("carry_h", np.array(h)), serializer("carry_c", np.array(c))
        except KeyError:  # a snapshot without it: every lane restarts from zero
            return
        if isinstance(serializer, chainer.serializer.Deserializer):
            device = self.get_optimizer("main").target.device
            self._carry = (device.send(np.asarray(h)), device.send(np.asarray(c)))
