"""Train C with CMA-ES, its fitness measured in M's dream (one batched rollout) or in the real env.

Each generation: the population's fitness, then mean/best/worst and sigma to the progress bar,
TensorBoard (``controller/`` keys) and log.json/log.csv, then the CMA-ES state and the kept
controller saved atomically as data, so a killed run resumes at the same generation. The kept
controller is the best-scored CMA-ES mean (the paper's selection): scored in the dream, or in real
mode on fixed training tracks (``controller.select_episodes``); every ``controller.eval_every``
generations it plays ``eval_episodes`` real episodes, for the log only.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base.errors import UserError
from .base.storage import RunPaths, atomic_write_json, atomic_write_text
from .config import Config
from .games.spec import action_dim as env_action_dim
from .models.controller import Controller, build_controller
from .training.cmaes import CMAES, read_state

STATE_FILE = "cmaes.npz"
LOG_FIELDS = ("generation", "mean", "best", "worst", "sigma", "select_score", "select_std", "kept_generation",
              "eval_mean", "eval_std", "env_steps", "select_steps")


def dream_returns(mdnrnn: Any, ctrl: Controller, params: np.ndarray | None = None, initial_z: np.ndarray | None = None,
                  temperature: float = 1.0, max_steps: int = 2100, seed: int = 0, done_mode: str = "threshold",
                  device=None, action_map: Callable | None = None, policy: Callable | None = None,
                  done_bias: float = 0.0) -> np.ndarray:
    """Steps survived (n,) by n dreamed agents, agent i with controller row ``params[i]``, in one batched rollout.

    The dream runs on ``device`` (a Chainer device; None: where M's weights are), and so do the controllers:
    on a GPU only the done flags come to the host each step. ``action_map`` turns C's outputs into the
    actions the game executes before M sees them; ``done_mode`` and ``done_bias`` are
    :class:`~wm_trainer.sim.dream.DreamEnv`'s.
    ``policy(z, h, c) -> actions`` (host arrays), given instead of ``params``, plays in C's place.
    """
    from .sim.dream import DreamEnv

    n = len(initial_z) if params is None else len(params)
    env = DreamEnv(mdnrnn, temperature=temperature, max_steps=max_steps, seed=seed, device=device,
                   host_outputs=policy is not None, action_map=action_map, done_mode=done_mode,
                   done_bias=done_bias)
    if policy is None:
        params = env.device.send(np.asarray(params, np.float32))
        policy = functools.partial(ctrl.act_batch, params)
    z, h = env.reset(initial_z[:n])
    reads_c = ctrl.inputs == "zch"
    c = env.cell() if reads_c else None
    returns = np.zeros(n, np.float64)
    for _ in range(max_steps):
        z, h, reward, done = env.step(policy(z, h, c))
        returns += reward  # 0 for agents already done
        if done.all():
            break
        if reads_c:
            c = env.cell()
    return returns


def collection_policy_dream(dream: Callable, env_id: str, initial_z: np.ndarray, repeat_probs: Sequence[float],
                            seed: int, **dream_kwargs) -> np.ndarray:
    """Steps survived in the dream by the random collection policy, agent i repeating w.p. ``repeat_probs[i % n]``.

    The policies' draws depend on ``seed`` alone, not on what M dreams, so two calls with the same seed play
    the same action sequences (a change of ``done_bias`` then only moves where each dream ends).
    """
    from .games.real import random_policy

    n, k = len(initial_z), len(repeat_probs)
    policies = [random_policy(env_id, np.random.default_rng([seed, i]), repeat_probs[i % k]) for i in range(n)]
    return dream(policy=lambda z, h, c: np.stack([p() for p in policies]), initial_z=initial_z, seed=seed,
                 **dream_kwargs)


# The collection policy living this many times longer in M's dream than in the game marks a world model
# whose dream C exploits: on this project's demo-sized runs, every one at 1.57 or more failed to transfer.
EXPLOITABLE_DREAM = 1.5


def dream_calibration(dreamed: np.ndarray, real_lengths: dict[int, int], repeat_probs: Sequence[float],
                      max_steps: int, done_bias: float = 0.0) -> dict:
    """The random collection policy in the dream beside its real episodes (both capped at ``max_steps``).

    M learnt from that policy's episodes, so it should last about as long in the dream as in the game; a
    dream it survives much longer in is easier than the game, and a controller trained there exploits it.
    ``dreamed`` is :func:`collection_policy_dream`'s steps survived (dreamed at ``done_bias``); episode i
    (real, by index, and dreamed) plays with ``repeat_probs[i % len]``, and each probability is also
    reported alone.
    """
    k = len(repeat_probs)
    index = np.fromiter(real_lengths, np.int64, len(real_lengths))
    real = np.minimum(np.fromiter(real_lengths.values(), np.float64, len(real_lengths)), max_steps)

    def summary(d: np.ndarray, r: np.ndarray) -> dict:
        return {"dream_rollouts": int(len(d)), "dream_mean": float(d.mean()), "dream_std": float(d.std()),
                "real_episodes": int(len(r)), "real_mean": float(r.mean()) if len(r) else None,
                "real_std": float(r.std()) if len(r) else None,
                "dream_over_real": float(d.mean() / max(r.mean(), 1e-9)) if len(r) else None}

    by_policy = [{"repeat_prob": float(repeat_probs[j]),
                  **summary(dreamed[j::k], real[index % k == j])} for j in range(k)]
    names = ", ".join(f"{p:g}" for p in repeat_probs)
    return {"policy": f"random, repeat w.p. {names}" + (" (episode i takes entry i mod n)" if k > 1 else ""),
            "cap": max_steps, "done_bias": float(done_bias), **summary(dreamed, real), "by_repeat_prob": by_policy}


def calibrate_done_bias(survival: Callable[[float], float], target: float, *, rel_tol: float = 0.01,
                        max_evals: int = 16, limit: float = 16.0) -> tuple[float, float]:
    """The done-logit bias b at which ``survival(b)`` (mean dreamed steps, non-increasing in b) meets ``target``.

    Brackets from b = 0 by doubling steps (at most +-``limit``), then bisects until the survival is within
    ``rel_tol`` of the target or ``max_evals`` dreams have run. Returns (b, survival(b)); at a bracket's end
    that cannot reach the target, that end.
    """
    tol = rel_tol * max(target, 1.0)
    evals = {0.0: survival(0.0)}
    if abs(evals[0.0] - target) <= tol:
        return 0.0, evals[0.0]
    sign = 1.0 if evals[0.0] > target else -1.0  # too easy: raise the logit; too hard: lower it
    near, far = 0.0, sign
    while True:
        evals[far] = survival(far)
        if abs(evals[far] - target) <= tol:
            return far, evals[far]
        if (evals[far] - target) * sign < 0 or abs(far) >= limit or len(evals) >= max_evals:
            break
        near, far = far, far * 2.0
    if (evals[far] - target) * sign > 0:  # the bracket's end still misses: the closest reachable
        return far, evals[far]
    while len(evals) < max_evals:
        mid = 0.5 * (near + far)
        evals[mid] = survival(mid)
        if abs(evals[mid] - target) <= tol:
            return mid, evals[mid]
        if (evals[mid] - target) * sign > 0:
            near = mid
        else:
            far = mid
    best = min((near, far), key=lambda b: abs(evals[b] - target))
    return best, evals[best]


class _Log:
    """Per-generation rows to log.json and log.csv (rewritten atomically) and TensorBoard."""

    def __init__(self, folder: Path, rows: list[dict]):
        self.folder, self.rows = folder, rows
        self.writer = None
        try:
            from extensions import open_writer
        except ImportError:
            from tensorboardX import SummaryWriter as open_writer
        self.writer = open_writer(str(folder / "tb"))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        g = row["generation"]
        for key in ("mean", "best", "worst", "sigma", "select_score", "eval_mean"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"controller/{key}", row[key], g)
        self.writer.flush()
        atomic_write_json(self.folder / "log.json", self.rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.folder / "log.csv", buf.getvalue())

    def close(self) -> None:
        self.writer.close()


def budget_spent(cc: Any, trained_s: float) -> bool:
    """Whether ``trained_s`` seconds of training use up ``controller.max_minutes`` (never, where it is 0)."""
    return cc.max_minutes > 0 and trained_s >= 60.0 * cc.max_minutes


def saved_progress(path: Path) -> tuple[int, bool, float]:
    """(generations done, stopped at the target, seconds trained) of a saved CMA-ES state, without rebuilding it."""
    meta, _ = read_state(path)
    try:
        extra = meta["extra"]
        return int(meta["es"]["countiter"]), bool(extra.get("done", False)), float(extra.get("trained_s", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: key 'meta': no generation count ({e}); delete it to start over") from None


def _load_state(path: Path, n_params: int, cfg: Config) -> tuple[CMAES, dict] | None:
    if not path.is_file():
        return None
    opt, extra = CMAES.load(path)
    if opt.n_params != n_params or opt.population != cfg.controller.population:
        raise UserError(f"{path}: saved CMA-ES has {opt.n_params} parameters x population {opt.population}, "
                        f"this config needs {n_params} x {cfg.controller.population}; "
                        f"delete {path.parent} to start over")
    return opt, extra


def train_controller(cfg: Config, executor: Any = None) -> Path:
    """Run CMA-ES for ``controller.generations`` (resuming a saved state); writes RunPaths.controller_model.

    In dream mode the kept controller is chosen in the dream alone: every ``controller.select_every``
    generations (and at the last) the CMA-ES mean plays ``controller.select_rollouts`` dream rollouts on fixed
    start states and seeds, and the best-scoring mean is kept; training stops early once a mean survives to
    the dream's cap. Real episodes (``eval_every``) only report how the kept controller plays. In real mode
    with ``controller.select_episodes``, the mean plays that many whole episodes on the same training tracks
    at each selection instead (never the evaluation's tracks). A spent time budget's last generation is scored.
    Every scored mean is also written as a controller file (``RunPaths.scored_controller``).
    """
    from tqdm import tqdm

    from .games.spec import executed_action
    from .models.memory import load_mdnrnn
    from .models.vision import load_vae

    cc = cfg.controller
    if cc.mode == "dream" and cfg.env.frame_skip > 1:
        raise UserError(f"env.frame_skip: {cfg.env.frame_skip} needs controller.mode real (a dream step is one "
                        "env step, so the dream's caps would not count what the game's do)")
    paths = RunPaths(cfg.run_dir)
    folder = paths.controller_dir
    folder.mkdir(parents=True, exist_ok=True)
    adim = env_action_dim(cfg.env.id)
    vae = load_vae(paths.vae_model, cfg.vae.z_dim, cfg.vae.kl_tolerance)
    mdnrnn = load_mdnrnn(paths.mdnrnn_model, cfg, adim)
    ctrl = build_controller(cfg, adim)
    state_path = folder / STATE_FILE
    loaded = _load_state(state_path, ctrl.n_params, cfg)
    if loaded is None:
        opt, extra = CMAES(ctrl.n_params, cc.population, cc.sigma0, seed=cfg.experiment.seed), {}
    else:
        opt, extra = loaded
    log = _Log(folder, extra.get("log", []))
    kept = _Kept.from_extra(extra)
    done = bool(extra.get("done", False))
    max_steps = cc.max_steps or cfg.env.max_steps

    dream = None
    if cc.mode == "dream":
        from .training.trainer import resolve_device

        initial_pool = _initial_latents(paths, cfg)
        dream = functools.partial(dream_returns, mdnrnn, ctrl, temperature=cc.temperature, max_steps=max_steps,
                                  done_mode=cc.dream_done, device=resolve_device(cfg.experiment.device),
                                  action_map=functools.partial(executed_action, cfg.env.id))
        select_rng = np.random.default_rng([cfg.experiment.seed, 2])
        select_z = initial_pool[select_rng.integers(len(initial_pool), size=cc.select_rollouts)]
        dream = functools.partial(dream, done_bias=_dream_done_bias(dream, paths, cfg, select_z, max_steps))
    from .sim.rollout import AgentWeights, Job, Played, fitness_seeds, play, select_seeds

    weights = AgentWeights.from_models(vae, mdnrnn, np.zeros((1, ctrl.n_params), np.float32), ctrl)
    own_executor = None  # made after the setup: the try below is what shuts it down
    if (cc.mode == "real" or cc.eval_every) and executor is None:
        from .base.parallel import make_executor

        executor = own_executor = make_executor(cfg.parallel)
    trained_s = float(extra.get("trained_s", 0.0))  # C's wall time in earlier runs of this state
    started = time.monotonic()

    def spent() -> float:
        return trained_s + time.monotonic() - started

    def out_of_time() -> bool:  # not saved as 'done': a larger controller.max_minutes resumes the run
        return budget_spent(cc, spent())
    bar = tqdm(total=cc.generations, initial=min(opt.generation, cc.generations), desc="train-controller",
               unit="gen", file=sys.stderr, dynamic_ncols=True)
    stop = budget_spent(cc, trained_s)  # spent by earlier runs; else this run plays at least one generation
    failed = True  # until the loop ends normally: an exception, Ctrl-C or SIGTERM drops the workers' queued episodes
    try:
        while not done and opt.generation < cc.generations and not stop:
            g = opt.generation
            X = opt.ask()
            env_steps = None
            if dream is not None:
                rng = np.random.default_rng([cfg.experiment.seed, g])
                idx = rng.integers(len(initial_pool), size=cc.population * cc.episodes_per_candidate)
                rets = dream(np.repeat(X, cc.episodes_per_candidate, axis=0), initial_pool[idx],
                             seed=cfg.experiment.seed * 100_003 + g)
            else:
                seeds = fitness_seeds(cfg.experiment.seed, g, cc.episodes_per_candidate)
                jobs = [Job(p, s) for p in range(cc.population) for s in seeds]
                played = Played(executor, weights.with_params(X), jobs, cfg, cap=cc.max_steps, patience=cc.patience)
                rets = played.result()
                env_steps = int(played.steps.sum())
            fit = rets.reshape(cc.population, cc.episodes_per_candidate).mean(axis=1)
            opt.tell(X, fit)
            row = {"generation": g + 1, "mean": float(fit.mean()), "best": float(fit.max()),
                   "worst": float(fit.min()), "sigma": opt.sigma, "select_score": None, "select_std": None,
                   "kept_generation": None, "eval_mean": None, "eval_std": None,
                   "env_steps": env_steps, "select_steps": None}
            stop = out_of_time()
            last = g + 1 == cc.generations or stop
            select_now = last or (cc.select_every and (g + 1) % cc.select_every == 0)
            if dream is None and select_now and cc.select_episodes:
                # real mode: the mean on the same training tracks at every selection, played whole
                jobs = [Job(0, s) for s in select_seeds(cfg.experiment.seed, cc.select_episodes)]
                played = Played(executor, weights.with_params(opt.mean[None]), jobs, cfg)
                scores = played.result()
                row["select_score"], row["select_std"] = float(scores.mean()), float(scores.std())
                row["select_steps"] = int(played.steps.sum())
                kept.offer(opt.mean, row["select_score"], g + 1)
            if dream is not None and select_now:
                # the same start states and seeds at every selection: each mean meets the same dreams
                scores = dream(np.repeat(opt.mean[None], cc.select_rollouts, axis=0), select_z,
                               seed=cfg.experiment.seed * 100_003 + 99_991)
                row["select_score"], row["select_std"] = float(scores.mean()), float(scores.std())
                kept.offer(opt.mean, row["select_score"], g + 1)
                done = row["select_score"] >= max_steps  # the mean survives every dream: nothing left to learn
            if row["select_score"] is not None:  # every scored mean, kept or not, in either mode
                _save_scored(ctrl, opt.mean, paths.scored_controller(g + 1))
            row["kept_generation"] = kept.generation
            if cc.eval_every and ((g + 1) % cc.eval_every == 0 or last or done):
                # how the kept controller plays the real game: reported, never used to choose it
                played = kept.params if kept.params is not None else opt.mean
                rets = play(executor, weights.with_params(np.asarray(played)[None]),
                            [Job(0, s) for s in fitness_seeds(cfg.experiment.seed + 7, g, cc.eval_episodes)], cfg)
                row["eval_mean"], row["eval_std"] = float(rets.mean()), float(rets.std())
            done = done or (cc.target_score is not None and row["best"] >= cc.target_score)
            log.add(row)
            opt.save(state_path, extra={"log": log.rows, **kept.to_extra(), "done": done, "trained_s": spent()})
            bar.update(1)
            stop = stop or out_of_time()  # ran out while scoring or evaluating this generation
            bar.set_postfix(mean=f"{row['mean']:.1f}", best=f"{row['best']:.1f}",
                            kept=f"{kept.score:.1f}" if kept.params is not None else "-", sigma=f"{opt.sigma:.3f}")
        if not done and opt.generation < cc.generations and out_of_time():
            print(f"train-controller: stopped after generation {opt.generation}: {spent() / 60:.1f} min of "
                  f"controller.max_minutes={cc.max_minutes:g} used", file=sys.stderr)
        failed = False
    finally:
        bar.close()
        log.close()
        if own_executor is not None:
            own_executor.shutdown(cancel=failed)
    final = opt.mean if cc.keep == "mean" or kept.params is None else kept.params
    ctrl.params = np.asarray(final, np.float32)
    return ctrl.save(paths.controller_model)


def _save_scored(ctrl: Controller, mean: np.ndarray, path: Path) -> None:
    """Write a scored CMA-ES mean as a controller file, so that any of them can be evaluated or rendered later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ctrl.params = np.asarray(mean, np.float32)
    ctrl.save(path)


def _dream_done_bias(dream: Callable, paths: RunPaths, cfg: Config, select_z: np.ndarray, max_steps: int) -> float:
    """Calibrate the dream once per run (``controller.dream_calibrate``) and report it; the bias C trains with.

    The collection policy plays the selection's start states in the dream beside its real episodes; with
    calibration on, M's done logit is shifted until it lives as long in the dream as in the game. A resumed
    run reads the bias back from ``dream_calibration.json``.
    """
    from .data.latents import latent_lengths
    from .sim.dream import calibrated_done_bias

    if paths.dream_calibration.is_file():
        return calibrated_done_bias(paths.dream_calibration)
    cc = cfg.controller
    probs = cfg.collect.repeat_probs or [cfg.collect.repeat_prob]
    lengths = latent_lengths(paths.latents)
    seed = cfg.experiment.seed * 100_003 + 99_989
    dreams = {0.0: collection_policy_dream(dream, cfg.env.id, select_z, probs, seed)}  # bias -> steps survived

    def survival(bias: float) -> float:
        if bias not in dreams:
            dreams[bias] = collection_policy_dream(dream, cfg.env.id, select_z, probs, seed, done_bias=bias)
        return float(dreams[bias].mean())

    cal = report = dream_calibration(dreams[0.0], lengths, probs, max_steps)
    exploitable = cal["dream_over_real"] is not None and cal["dream_over_real"] >= EXPLOITABLE_DREAM
    if cc.dream_calibrate:
        bias, _ = calibrate_done_bias(survival, cal["real_mean"])
        report = dream_calibration(dreams[bias], lengths, probs, max_steps, done_bias=bias)
        report["uncalibrated"] = {k: cal[k] for k in ("dream_mean", "dream_std", "dream_over_real")}
        report["calibration_dreams"] = {f"{b:g}": float(d.mean()) for b, d in sorted(dreams.items())}
    report["exploitable"] = exploitable  # judged on M's own dream, before any calibration
    atomic_write_json(paths.dream_calibration, report)
    print(f"dream calibration: the collection policy survives {cal['dream_mean']:.0f} steps in M's dream, "
          f"{cal['real_mean']:.0f} in the game (x{cal['dream_over_real']:.2f}; cap {max_steps})"
          + (f"; done logit {report['done_bias']:+.3f}: {report['dream_mean']:.0f} steps in the dream C trains in"
             if cc.dream_calibrate else ""), file=sys.stderr)
    if exploitable:
        print(f"warning: M's dream is x{cal['dream_over_real']:.2f} easier than the game for the collection policy: "
              f"C will likely exploit M and not transfer (every demo-sized world model at x1.57 or more failed, "
              f"docs/results.md); more collect.episodes or mdnrnn.iterations may help", file=sys.stderr)
    return report["done_bias"]


class _Kept:
    """The controller chosen so far: its parameters, its selection score and the generation it comes from."""

    def __init__(self, params: np.ndarray | None = None, score: float = -np.inf, generation: int | None = None):
        self.params, self.score, self.generation = params, score, generation

    def offer(self, params: np.ndarray, score: float, generation: int) -> None:
        """Keep ``params`` if they score above the kept ones."""
        if score > self.score:
            self.params, self.score, self.generation = np.asarray(params, np.float64).copy(), score, generation

    def to_extra(self) -> dict:
        """As plain values for the CMA-ES state file."""
        if self.params is None:
            return {}
        return {"kept_x": self.params.tolist(), "kept_score": self.score, "kept_generation": self.generation}

    @classmethod
    def from_extra(cls, extra: dict) -> _Kept:
        """From a saved CMA-ES state's extras (none yet: nothing kept)."""
        if "kept_x" not in extra:
            return cls()
        return cls(np.asarray(extra["kept_x"], np.float64), float(extra["kept_score"]), int(extra["kept_generation"]))


def _initial_latents(paths: RunPaths, cfg: Config) -> np.ndarray:
    from .sim.dream import initial_latents

    cc = cfg.controller
    n = max(1000, cc.population * cc.episodes_per_candidate, cc.select_rollouts)
    return np.asarray(initial_latents(paths.latents, n, np.random.default_rng(cfg.experiment.seed)), np.float32)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """CLI: ``wm-trainer train-controller -c CONFIG``."""
    path = train_controller(cfg)
    print(f"controller: {path}")
    return 0
