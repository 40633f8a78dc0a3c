"""Data-parallel V and M on ChainerMN: which process this is, its share of the batch and the GPU it uses.

``mpiexec -n N wm-trainer train-vae -c CONFIG`` starts N processes; each reads its share of the episodes,
trains on ``batch / N`` examples per iteration and ChainerMN's multi-node optimizer averages the gradients,
so an iteration sees the config's batch. Rank 0 alone writes snapshots, logs, TensorBoard and weights.
Without mpiexec (or with one process) nothing here imports mpi4py or chainermn.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import chainer
import numpy as np

import extensions as ext

from ..base.errors import UserError

# what mpiexec sets in each process it starts: MPICH/Hydra (PMI), Open MPI, PMIx launchers
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_processes() -> int:
    """How many processes mpiexec started for this job (1 when run without it)."""
    for name in _SIZE_VARIABLES[:3]:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


@dataclasses.dataclass
class World:
    """This process's place among the job's processes (one process: rank 0 of 1, no communicator)."""

    rank: int = 0
    size: int = 1
    intra_rank: int = 0  # rank among the processes on this machine: which GPU it takes
    communicator: Any = None

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def share(self, batch_size: int, key: str) -> int:
        """This process's part of the global batch ``batch_size`` (config key ``key``); UserError if uneven."""
        if batch_size % self.size:
            raise UserError(f"{key}: {batch_size} does not divide among the {self.size} MPI processes; use a "
                            f"multiple of {self.size}")
        return batch_size // self.size

    def device(self, index: int) -> int:
        """The device this process uses for ``experiment.device`` ``index``: GPU index + rank on this machine."""
        return index if index < 0 or self.size == 1 else index + self.intra_rank

    def seed(self, seed: int) -> int:
        """The seed of this process's random draws (the config's seed itself on rank 0)."""
        return seed if self.rank == 0 else int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def optimizer(self, optimizer: chainer.Optimizer) -> Any:
        """``optimizer`` set up on its model, wrapped in ChainerMN's multi-node optimizer when there are several
        processes; the weights are rank 0's on every process and the first iteration trains."""
        if self.communicator is None:
            return optimizer
        import chainermn

        multi = chainermn.create_multi_node_optimizer(optimizer, self.communicator)
        ext.start_multi_node(multi)
        return multi

    def gather(self, obj: Any) -> list | None:
        """Every process's ``obj`` on rank 0, None elsewhere (one process: ``[obj]``)."""
        if self.communicator is None:
            return [obj]
        return self.communicator.mpi_comm.gather(obj, root=0)

    def abort(self, code: int) -> None:
        """End every process of the job (one failing alone would leave the others waiting in an all-reduce)."""
        if self.communicator is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            self.communicator.mpi_comm.Abort(code)


_WORLD: World | None = None


def world(device: int = -1) -> World:
    """The job's World, made once: ChainerMN's communicator when mpiexec started several processes."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    n = launched_processes()
    if n <= 1:
        _WORLD = World()
        return _WORLD
    try:
        import chainermn
        import mpi4py  # noqa: F401
    except ImportError as e:
        raise UserError(f"mpiexec started {n} processes but {e.name} is missing: pip install -e '.[mpi]'") from e
    name = "pure_nccl" if device >= 0 else "naive"  # naive hands GPU pointers to MPI: only CUDA-aware MPI takes them
    try:
        communicator = chainermn.create_communicator(name)
    except Exception as e:  # noqa: BLE001 - no NCCL in CuPy, an MPI that cannot start: one line, not a traceback
        raise UserError(f"ChainerMN communicator '{name}' for {n} processes: {type(e).__name__}: {e}") from e
    _WORLD = World(int(communicator.rank), int(communicator.size), int(communicator.intra_rank), communicator)
    return _WORLD


def current() -> World:
    """The World made by ``world`` (one process if none was)."""
    return _WORLD if _WORLD is not None else World()


class RankStates(chainer.training.Extension):
    """Keeps every process's own state in rank 0's snapshots: its iterator's position, the updater's per-process
    state (``serialize_rank_state``, if it has one) and NumPy's global RNG; a resume gives each its own back.

    At each snapshot iteration (``trigger``, the snapshot's) every process hands its state to rank 0, before
    rank 0's snapshot extension (priority -100) writes it.
    """

    priority = chainer.training.PRIORITY_READER

    def __init__(self, world: World, snapshot_due: Any):
        self.world, self.snapshot_due = world, snapshot_due
        self.states: list[dict[str, np.ndarray]] | None = None

    def _own(self, trainer: chainer.training.Trainer) -> dict[str, np.ndarray]:
        out = chainer.serializers.DictionarySerializer()
        trainer.updater.get_iterator("main").serialize(out["iterator"])
        own = getattr(trainer.updater, "serialize_rank_state", None)
        if own is not None:
            own(out["updater"])
        _, keys, pos, has_gauss, cached = np.random.get_state()
        out("rng_keys", keys)
        out("rng_rest", np.array([pos, has_gauss, cached], np.float64))
        return {k: np.asarray(v) for k, v in out.target.items()}

    def __call__(self, trainer: chainer.training.Trainer) -> None:
        if self.snapshot_due(trainer):
            self.states = self.world.gather(self._own(trainer))

    def initialize(self, trainer: chainer.training.Trainer) -> None:
        """Remember the trainer: the snapshot's autoload (priority -100, after this) restores through it."""
        self.trainer = trainer

    def serialize(self, serializer: Any) -> None:
        """Write every process's state (rank 0), or take back this process's own from a loaded snapshot."""
        if isinstance(serializer, chainer.serializer.Serializer):
            for r, state in enumerate(self.states or []):
                for key, value in state.items():
                    serializer(f"rank{r}/{key}", value)
            return
        trainer = getattr(self, "trainer", None)
        prefix = f"rank{self.world.rank}/"
        try:
            keys = serializer(prefix + "rng_keys", np.zeros(624, np.uint32))
        except KeyError:  # a snapshot of another number of processes, or of one: the run goes on as seeded
            return
        rest = serializer(prefix + "rng_rest", np.zeros(3, np.float64))
        np.random.set_state(("MT19937", np.asarray(keys, np.uint32), int(rest[0]), int(rest[1]), float(rest[2])))
        if trainer is None:
            return
        trainer.updater.get_iterator("main").serialize(_Prefixed(serializer, prefix + "iterator/"))
        own = getattr(trainer.updater, "serialize_rank_state", None)
        if own is not None:
            own(_Prefixed(serializer, prefix + "updater/"))


class _Prefixed(chainer.serializer.Deserializer):
    """A deserializer reading ``prefix + key`` from another one (a process's own part of a snapshot)."""

    def __init__(self, base: Any, prefix: str):
        self.base, self.prefix = base, prefix

    def __getitem__(self, key: str) -> _Prefixed:
        return _Prefixed(self.base, f"{self.prefix}{key}/")

    def __call__(self, key: str, value: Any) -> Any:
        return self.base(self.prefix + key, value)
