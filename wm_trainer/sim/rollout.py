"""Real-environment episodes for many agents: V encode, M step and C act batched over lockstepped envs.

A task is a list of episodes (agent row, seed). The worker that runs it steps up to
``parallel.envs_per_worker`` environments in lockstep; every step it encodes all their frames
with V in one batch, runs C with each env's own agent weights (one batched matmul) and M's
LSTM step for all of them at once. When an episode ends, its env takes the task's next
episode. Weights travel to workers once per generation as an :class:`AgentWeights` bundle.
"""
from __future__ import annotations

import dataclasses
import multiprocessing.util
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import chainer
import numpy as np

from ..games.spec import EnvSpec, env_spec
from ..models.controller import Controller

_MODEL_CACHE: dict[str, tuple[Any, Any]] = {}  # bundle token -> (vae, mdnrnn), per worker process
_ENV_CACHE: dict[tuple, list] = {}  # (env id, max steps) -> idle envs, per worker process


@dataclasses.dataclass
class AgentWeights:
    """Everything a worker needs to rebuild V, M and C: sizes plus plain numpy weight arrays."""

    z_dim: int
    action_dim: int
    hidden: int
    mixtures: int
    done_head: bool
    vae: dict[str, np.ndarray]
    mdnrnn: dict[str, np.ndarray]
    params: np.ndarray  # (P, n_params) controller rows, one per agent (candidate)
    ctrl_inputs: str = "zh"  # the controller's layout (Controller's ``inputs`` and ``bias``)
    ctrl_bias: bool = True
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # identifies V and M's arrays

    @classmethod
    def from_models(cls, vae: chainer.Link, mdnrnn: chainer.Link, params: np.ndarray,
                    ctrl: Controller | None = None) -> AgentWeights:
        """Bundle trained V and M with a population of controller parameter rows (``ctrl``: their layout)."""
        layout = {} if ctrl is None else {"ctrl_inputs": ctrl.inputs, "ctrl_bias": ctrl.bias}
        return cls(z_dim=vae.z_dim, action_dim=mdnrnn.action_dim, hidden=mdnrnn.hidden, mixtures=mdnrnn.mixtures,
                   done_head=mdnrnn.has_done, vae=_arrays(vae), mdnrnn=_arrays(mdnrnn),
                   params=np.atleast_2d(np.asarray(params, np.float32)), **layout)

    def controller(self) -> Controller:
        """A controller of this bundle's layout (its parameters are the rows in ``params``)."""
        return Controller(self.z_dim, self.hidden, self.action_dim, inputs=self.ctrl_inputs, bias=self.ctrl_bias)

    def with_params(self, params: np.ndarray) -> AgentWeights:
        """The same V and M (workers keep their built copies) with new controller rows."""
        return dataclasses.replace(self, params=np.atleast_2d(np.asarray(params, np.float32)))

    def models(self) -> tuple[Any, Any]:
        """(V, M) rebuilt from the arrays; built once per worker process for each token."""
        key = self.token
        if key not in _MODEL_CACHE:
            from ..models.memory import MDNRNN
            from ..models.vision import ConvVAE

            vae = ConvVAE(self.z_dim)
            _load_arrays(vae, self.vae)
            mdn = MDNRNN(self.z_dim, self.action_dim, self.hidden, self.mixtures, self.done_head)
            _load_arrays(mdn, self.mdnrnn)
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = (vae, mdn)
        return _MODEL_CACHE[key]


def _arrays(link: chainer.Link) -> dict[str, np.ndarray]:
    return {name: np.asarray(chainer.backend.CpuDevice().send(p.array)) for name, p in link.namedparams()}


def _load_arrays(link: chainer.Link, arrays: dict[str, np.ndarray]) -> None:
    for name, p in link.namedparams():
        p.array[...] = arrays[name]


@dataclasses.dataclass(frozen=True)
class Job:
    """One episode: which agent row plays it, and the env seed."""

    row: int
    seed: int


@dataclasses.dataclass
class EpisodeResult:
    """The return and length of one episode (and its frames when recorded)."""

    row: int
    seed: int
    ret: float
    steps: int
    frames: list | None = None


def _take_env(spec: EnvSpec, max_steps: int):
    from ..games.real import make_env

    if not _ENV_CACHE:  # first env of this process: close them all when it exits (pool workers included)
        multiprocessing.util.Finalize(None, close_envs, exitpriority=100)
    pool = _ENV_CACHE.setdefault((spec, max_steps), [])
    return pool.pop() if pool else make_env(spec, max_steps)


def _give_env(spec: EnvSpec, max_steps: int, env) -> None:
    _ENV_CACHE.setdefault((spec, max_steps), []).append(env)


def close_envs() -> None:
    """Close every cached environment of this process."""
    for envs in _ENV_CACHE.values():
        for env in envs:
            env.close()
    _ENV_CACHE.clear()


class _AgentBrain:
    """V + M + C for a batch of slots: actions from frames, then M's state advanced with (z, executed action).

    z is sampled from V's posterior, z = mu + sigma eps, as in the dream and in M's training data; M sees the
    action the env executes (``games.spec.executed_action``), as it does in the dream.
    """

    def __init__(self, weights: AgentWeights, env_id: str):
        self.vae, self.mdn = weights.models()
        self.ctrl = weights.controller()
        self.params = weights.params
        self.env_id = env_id

    def start(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero (h, c) for n slots."""
        h = np.zeros((n, self.mdn.hidden), np.float32)
        return h, h.copy()

    def act(self, frames: np.ndarray, rows: np.ndarray, state: tuple[np.ndarray, np.ndarray],
            rngs: Sequence[np.random.Generator]):
        """Actions (n, A) for the slots' frames (slot i's noise from ``rngs[i]``) and the advanced state."""
        from ..games.spec import executed_action
        from ..models.vision import frames_converter

        with chainer.using_config("train", False), chainer.no_backprop_mode():
            mu, logvar = self.vae.encode(frames_converter(frames))
            eps = np.stack([rng.standard_normal(self.vae.z_dim, dtype=np.float32) for rng in rngs])
            z = (mu.array + np.exp(0.5 * logvar.array) * eps).astype(np.float32)
            a = self.ctrl.act_batch(self.params[rows], z, state[0], state[1]).astype(np.float32)
            _, (h, c) = self.mdn.step(z, executed_action(self.env_id, a), state)
        return a, (np.asarray(h.array), np.asarray(c.array))


def run_jobs(weights: AgentWeights | None, jobs: Sequence[Job], env_cfg: Any, max_steps: int,
             n_envs: int, repeat_prob: float = 0.9, record: bool = False,
             on_step: Callable[[], None] | None = None, cap: int = 0, patience: int = 0) -> list[EpisodeResult]:
    """Play ``jobs`` on up to ``n_envs`` lockstepped envs; ``weights=None`` plays the random policy.

    ``env_cfg`` is the env id, an ``EnvSpec`` or ``cfg.env``; envs end episodes at ``max_steps``.
    For training episodes only: ``cap`` ends an episode sooner, and ``patience`` ends it after that many
    steps in a row without a positive reward (0 = neither). Steps are env steps, frame skip or not.
    """
    from ..games.real import random_policy

    jobs = list(jobs)
    spec = env_spec(env_cfg)  # what worker tasks get (no Config to unpickle), and the env cache's key
    brain = _AgentBrain(weights, spec.id) if weights is not None else None
    envs = [_take_env(spec, max_steps) for _ in range(min(n_envs, len(jobs)))]
    results: list[EpisodeResult | None] = [None] * len(jobs)
    slot_job = [-1] * len(envs)
    frames: list[np.ndarray | None] = [None] * len(envs)
    policies: list[Any] = [None] * len(envs)  # random policy, or the agent's sampling noise, per slot
    idle = [0] * len(envs)  # steps since the slot's last positive reward
    next_job = 0
    state = brain.start(len(envs)) if brain else None

    def start(slot: int) -> None:
        nonlocal next_job
        j = jobs[next_job]
        slot_job[slot] = next_job
        idle[slot] = 0
        results[next_job] = EpisodeResult(j.row, j.seed, 0.0, 0, [] if record else None)
        next_job += 1
        frames[slot] = envs[slot].reset(seed=j.seed)
        if record:
            results[slot_job[slot]].frames.append(frames[slot])
        if brain is None:
            policies[slot] = random_policy(spec.id, np.random.default_rng(j.seed), repeat_prob)
        else:
            policies[slot] = np.random.default_rng([j.seed, 0x5A])
            state[0][slot] = 0.0
            state[1][slot] = 0.0

    try:
        for s in range(len(envs)):
            start(s)
        while True:
            active = [s for s in range(len(envs)) if slot_job[s] >= 0]
            if not active:
                break
            if brain is None:
                actions = {s: policies[s]() for s in active}
            else:
                idx = np.asarray(active)
                rows = np.asarray([jobs[slot_job[s]].row for s in active])
                sub = (state[0][idx], state[1][idx])
                acts, (h, c) = brain.act(np.stack([frames[s] for s in active]), rows, sub,
                                         [policies[s] for s in active])
                state[0][idx], state[1][idx] = h, c
                actions = {s: acts[i] for i, s in enumerate(active)}
            for s in active:
                frame, reward, done = envs[s].step(actions[s])
                res = results[slot_job[s]]
                res.ret += reward
                taken = envs[s].steps - res.steps
                res.steps = envs[s].steps
                idle[s] = 0 if reward > 0 else idle[s] + taken
                frames[s] = frame
                if record:
                    res.frames.append(frame)
                if done or (cap and res.steps >= cap) or (patience and idle[s] >= patience):
                    slot_job[s] = -1
                    if next_job < len(jobs):
                        start(s)
            if on_step is not None:
                on_step()
    finally:
        for env in envs:
            _give_env(spec, max_steps, env)
    return results  # type: ignore[return-value]


def _task(weights: AgentWeights | None, jobs: list[Job], env_cfg: Any, max_steps: int, n_envs: int,
          repeat_prob: float, cap: int = 0, patience: int = 0, retries: int = 2) -> list[tuple[float, int]]:
    """Worker entry point: (return, steps) per job, in job order.

    An emulator that crashes mid-task (ViZDoom's "instance crash") takes only its episodes with it:
    this worker's envs are closed and the task's episodes replayed on fresh ones (same seeds, same results).
    """
    for attempt in range(retries + 1):
        try:
            return [(r.ret, r.steps) for r in run_jobs(weights, jobs, env_cfg, max_steps, n_envs, repeat_prob,
                                                            cap=cap, patience=patience)]
        except Exception as e:  # noqa: BLE001 - any env failure; re-raised after the last attempt
            _discard_envs()
            if attempt == retries:
                raise RuntimeError(f"episodes {[j.seed for j in jobs]} failed {retries + 1} times: "
                                   f"{type(e).__name__}: {e}") from e
    raise AssertionError("unreachable")


def _discard_envs() -> None:
    for envs in _ENV_CACHE.values():
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001, S110 - a crashed emulator may fail to close too
                pass
    _ENV_CACHE.clear()


_MAX_TASK_LANES = 4  # a task holds at most this many rounds of its lanes: a lost worker reruns little


def _chunks(jobs: list[Job], n_envs: int, n_workers: int) -> list[list[Job]]:
    """Jobs cut into about one task per worker, so each worker's envs take a next episode as one ends.

    Tasks of only ``n_envs`` jobs would each last as long as their longest episode while the other
    lanes idle; a task of many jobs keeps its lanes full until its queue runs out.
    """
    per_worker = -(-len(jobs) // max(1, n_workers))
    size = max(1, min(per_worker, _MAX_TASK_LANES * n_envs))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


class Played:
    """Episodes submitted to the workers and not yet gathered; ``result()`` waits for them."""

    def __init__(self, executor: Any, weights: AgentWeights | None, jobs: Sequence[Job], cfg: Any,
                 repeat_prob: float | None = None, cap: int = 0, patience: int = 0):
        self.jobs = list(jobs)
        self.steps = np.zeros(len(self.jobs), np.int64)  # each episode's length, filled by result()
        rp = float(cfg.collect.repeat_prob if repeat_prob is None else repeat_prob)
        per_task = cfg.parallel.envs_per_worker
        self._executor = executor
        self._handle = executor.broadcast(weights) if weights is not None else None
        self._chunks = _chunks(self.jobs, per_task, getattr(executor, "n_workers", 1) or 1)
        # plain values only: unpickling cfg.env would import wm_trainer.config (and the toolkit) in every worker
        spec = env_spec(cfg.env)
        self._futures = [executor.submit(_task, self._handle, chunk, spec, cfg.env.max_steps, per_task, rp, cap,
                                         patience) for chunk in self._chunks]

    def result(self, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(jobs),) returns in job order; ``progress(n)`` is called as each task's n episodes arrive."""
        out = np.zeros(len(self.jobs), np.float64)
        pos = 0
        try:
            for chunk, fut in zip(self._chunks, self._futures):
                rets = fut.result()
                out[pos:pos + len(chunk)] = [r for r, _ in rets]
                self.steps[pos:pos + len(chunk)] = [n for _, n in rets]
                pos += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        finally:
            if self._handle is not None:
                self._executor.release(self._handle)
                self._handle = None
        return out


def play(executor: Any, weights: AgentWeights | None, jobs: Sequence[Job], cfg: Any,
         progress: Callable[[int], None] | None = None, repeat_prob: float | None = None) -> np.ndarray:
    """Returns (len(jobs),) of episodes played by the executor's workers, weights broadcast once.

    ``weights=None`` plays the random policy, repeating its previous action with probability ``repeat_prob``
    (default ``collect.repeat_prob``, the sticky collection policy; 0 = a fresh uniform action every step).
    """
    return Played(executor, weights, jobs, cfg, repeat_prob).result(progress)


def eval_seeds(base_seed: int, n: int) -> list[int]:
    """Seeds of the n evaluation episodes: fixed per run seed, disjoint from fitness seeds."""
    return [10_000_000 + 1000 * base_seed + i for i in range(n)]


def select_seeds(base_seed: int, n: int) -> list[int]:
    """Seeds of the n real episodes that score each selected CMA-ES mean: fixed per run seed, disjoint from the rest."""
    return [20_000_000 + 1000 * base_seed + i for i in range(n)]


def fitness_seeds(base_seed: int, generation: int, n: int) -> list[int]:
    """Seeds for one generation's real-env fitness: shared by all candidates (common random numbers)."""
    return [1_000 * base_seed + 997 * generation + i for i in range(n)]
