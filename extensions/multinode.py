"""The toolkit under ChainerMN: one NaN/Inf decision for every process of a multi-node optimizer.

ChainerMN's multi-node optimizer (``chainermn.create_multi_node_optimizer``) runs, in its ``update``: forward,
backward, the all-reduce that averages the gradients of all processes, then the wrapped optimizer's
``update``, whose 'pre' hooks -- the guard -- see the averaged gradient, the same on every process. The
gradient part of the guard's decision is therefore already common to all processes; the loss is not (each
process has its own batch). So the guard adds one all-gather of two bytes per process (loss non-finite here,
averaged gradient non-finite here) after the gradient all-reduce: every process then skips or raises at the
same iteration, and no process is left alone in the next all-reduce. On a failure the processes exchange
what each found (its loss, its own gradients' NaN/Inf counts, where the value was born) and rank 0 alone
writes the report and the last good state.

Nothing here imports mpi4py or chainermn: the communicator the multi-node optimizer holds is used as it is,
so a run without ChainerMN pays nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import chainer_compat as compat


class Collective:
    """The guard's exchanges between the processes of one ChainerMN communicator."""

    def __init__(self, communicator: Any):
        self.communicator = communicator
        self.mpi = communicator.mpi_comm
        self.rank = int(communicator.rank)
        self.size = int(communicator.size)
        self._send = np.zeros(2, np.int8)
        self._recv = np.zeros((self.size, 2), np.int8)

    def flags(self, loss_bad: bool, grads_bad: bool) -> np.ndarray:
        """Every process's (loss non-finite, gradient non-finite), shape (size, 2): one all-gather of 2 bytes each."""
        self._send[0], self._send[1] = loss_bad, grads_bad
        self.mpi.Allgather(self._send, self._recv)
        return self._recv.copy()

    def gather(self, obj: Any) -> list | None:
        """Every process's ``obj`` on rank 0 (None elsewhere)."""
        return self.mpi.gather(obj, root=0)

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        return self.mpi.bcast(obj, root=0)


def collective_of(optimizer: Any) -> Collective | None:
    """A ``Collective`` for a ChainerMN multi-node optimizer of more than one process; None for any other."""
    communicator = compat.multi_node_communicator(optimizer)
    if communicator is None or int(communicator.size) < 2:
        return None
    return Collective(communicator)


def is_multi_node(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ChainerMN multi-node optimizer (one process or more)."""
    return compat.multi_node_communicator(optimizer) is not None


def rank_of(optimizer: Any) -> int:
    """This process's rank in the multi-node optimizer's communicator; 0 for any other optimizer."""
    communicator = compat.multi_node_communicator(optimizer)
    return 0 if communicator is None else int(communicator.rank)


def start(optimizer: Any) -> None:
    """Give every process rank 0's weights and make the multi-node optimizer's first update an update.

    ChainerMN's multi-node optimizer spends its first ``update`` (and the first after a resume) on broadcasting
    the weights, dropping that iteration's gradients; call this once the model is set up (and after loading a
    snapshot) so every iteration trains, as a one-process run does.
    """
    communicator = compat.multi_node_communicator(optimizer)
    if communicator is None:
        return
    target = optimizer.target
    if any(p.array is None for p in target.params(include_uninit=True)):
        return  # lazily initialised parameters: leave the broadcast to the optimizer's first update
    communicator.bcast_data(target)
    compat.mark_multi_node_synced(optimizer)

