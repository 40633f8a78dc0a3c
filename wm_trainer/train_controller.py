"""Train C with CMA-ES, its fitness measured in M's dream (one batched rollout) or in the real env.

Each generation: the population's fitness, then mean/best/worst and sigma to the progress bar,
TensorBoard (``controller/`` keys) and log.json/log.csv, then the CMA-ES state and the best
so far saved atomically as data, so a killed run resumes at the same generation. Every
``controller.eval_every`` generations the current best plays ``eval_episodes`` real episodes.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

import chainer
import numpy as np

from .cmaes import CMAES
from .config import Config
from .controller import Controller
from .envs import action_dim as env_action_dim
from .errors import UserError
from .storage import RunPaths, atomic_write_json, atomic_write_text

STATE_FILE = "cmaes.npz"
LOG_FIELDS = ("generation", "mean", "best", "worst", "sigma", "best_so_far", "eval_mean", "eval_std")


def _done_logit(mdnrnn: Any) -> Any:
    """h (B, hidden) -> M's done logits (B,), on the host; None when M has no done head."""
    if not getattr(mdnrnn, "has_done", False):
        return None
    cpu = chainer.backend.CpuDevice()
    w = np.asarray(cpu.send(mdnrnn.done.W.array), np.float32)[0]
    b = float(cpu.send(mdnrnn.done.b.array)[0])
    return lambda h: np.asarray(h, np.float32) @ w + b


def dream_fitness(mdnrnn: Any, ctrl: Controller, population: np.ndarray, episodes: int, initial_z: np.ndarray,
                  temperature: float, max_steps: int, seed: int, done_mode: str = "threshold",
                  device=None) -> np.ndarray:
    """Mean steps survived per candidate: all population x episodes agents in one batched dream rollout.

    The dream runs on ``device`` (a Chainer device; None: where M's weights are), and so do the controllers:
    on a GPU only the done flags (and h, for ``'sample'``) come to the host each step.
    ``done_mode='threshold'`` ends an agent when M's done logit is > 0 (DreamEnv's rule, the paper's);
    ``'sample'`` also ends it with probability sigmoid(done logit) each step, i.e. M's done head read as a
    per-step hazard -- the useful reading while M is too briefly trained to be sure of any single step.
    """
    from .dream import DreamEnv

    params = np.repeat(np.asarray(population, np.float32), episodes, axis=0)
    n = len(params)
    env = DreamEnv(mdnrnn, temperature=temperature, max_steps=max_steps, seed=seed, device=device,
                   host_outputs=False)
    params = env.device.send(params)
    z, h = env.reset(initial_z[:n])
    hazard = _done_logit(mdnrnn) if done_mode == "sample" else None
    rng = np.random.default_rng([seed, 1])
    returns = np.zeros(n, np.float64)
    alive = np.ones(n, bool)
    for _ in range(max_steps):
        a = ctrl.act_batch(params, z, h)
        z, h, reward, done = env.step(a)
        returns += np.where(alive, np.asarray(reward, np.float64), 0.0)
        alive &= ~np.asarray(done, bool)
        if hazard is not None:
            alive &= rng.random(n) >= 1.0 / (1.0 + np.exp(-hazard(chainer.backend.CpuDevice().send(h))))
        if not alive.any():
            break
    return returns.reshape(len(population), episodes).mean(axis=1)


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
        for key in ("mean", "best", "worst", "sigma", "best_so_far", "eval_mean"):
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


def saved_progress(path: Path) -> tuple[int, bool]:
    """(generations done, stopped at the target) of a saved CMA-ES state, without rebuilding it."""
    import json

    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
        return int(meta["es"]["countiter"]), bool(meta["extra"].get("done", False))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable CMA-ES state ({e}); delete it to start over") from None


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
    """Run CMA-ES for ``controller.generations`` (resuming a saved state); writes RunPaths.controller_model."""
    from tqdm import tqdm

    from .memory import load_mdnrnn
    from .vision import load_vae

    cc = cfg.controller
    paths = RunPaths(cfg.run_dir)
    folder = paths.controller_dir
    folder.mkdir(parents=True, exist_ok=True)
    adim = env_action_dim(cfg.env.id)
    vae = load_vae(paths.vae_model, cfg.vae.z_dim, cfg.vae.kl_tolerance)
    mdnrnn = load_mdnrnn(paths.mdnrnn_model, cfg, adim)
    ctrl = Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, adim)
    state_path = folder / STATE_FILE
    loaded = _load_state(state_path, ctrl.n_params, cfg)
    if loaded is None:
        opt, extra = CMAES(ctrl.n_params, cc.population, cc.sigma0, seed=cfg.experiment.seed), {}
    else:
        opt, extra = loaded
    log = _Log(folder, extra.get("log", []))
    best_x = np.asarray(extra["best_x"]) if "best_x" in extra else None
    best_f = float(extra.get("best_f", -np.inf))
    done = bool(extra.get("done", False))
    max_steps = cc.max_steps or cfg.env.max_steps

    own_executor = None
    if cc.mode == "real" or cc.eval_every:
        if executor is None:
            from .parallel import make_executor

            executor = own_executor = make_executor(cfg.parallel)
    initial_pool = _initial_latents(paths, cfg) if cc.mode == "dream" else None
    dream_device = None
    if cc.mode == "dream":
        from .train_vae import resolve_device

        dream_device = resolve_device(cfg.experiment.device)
    from .rollout import AgentWeights, Job, fitness_seeds, play

    weights = AgentWeights.from_models(vae, mdnrnn, np.zeros((1, ctrl.n_params), np.float32))
    bar = tqdm(total=cc.generations, initial=min(opt.generation, cc.generations), desc="train-controller",
               unit="gen", file=sys.stderr, dynamic_ncols=True)
    try:
        while not done and opt.generation < cc.generations:
            g = opt.generation
            X = opt.ask()
            if cc.mode == "dream":
                rng = np.random.default_rng([cfg.experiment.seed, g])
                idx = rng.integers(len(initial_pool), size=cc.population * cc.episodes_per_candidate)
                fit = dream_fitness(mdnrnn, ctrl, X, cc.episodes_per_candidate, initial_pool[idx],
                                    cc.temperature, max_steps, seed=cfg.experiment.seed * 100_003 + g,
                                    done_mode=cc.dream_done, device=dream_device)
            else:
                seeds = fitness_seeds(cfg.experiment.seed, g, cc.episodes_per_candidate)
                jobs = [Job(p, s) for p in range(cc.population) for s in seeds]
                rets = play(executor, weights.with_params(X), jobs, cfg)
                fit = rets.reshape(cc.population, cc.episodes_per_candidate).mean(axis=1)
            opt.tell(X, fit)
            if fit.max() > best_f:
                best_f, best_x = float(fit.max()), X[int(fit.argmax())].copy()
            row = {"generation": g + 1, "mean": float(fit.mean()), "best": float(fit.max()),
                   "worst": float(fit.min()), "sigma": opt.sigma, "best_so_far": best_f,
                   "eval_mean": None, "eval_std": None}
            if cc.eval_every and (g + 1) % cc.eval_every == 0:
                rets = play(executor, weights.with_params(best_x[None]),
                            [Job(0, s) for s in fitness_seeds(cfg.experiment.seed + 7, g, cc.eval_episodes)], cfg)
                row["eval_mean"], row["eval_std"] = float(rets.mean()), float(rets.std())
            done = cc.target_score is not None and row["best"] >= cc.target_score
            log.add(row)
            opt.save(state_path, extra={"log": log.rows, "best_x": best_x.tolist(), "best_f": best_f,
                                        "done": done})
            bar.update(1)
            bar.set_postfix(mean=f"{row['mean']:.1f}", best=f"{row['best']:.1f}", worst=f"{row['worst']:.1f}",
                            sigma=f"{opt.sigma:.3f}")
    finally:
        bar.close()
        log.close()
        if own_executor is not None:
            own_executor.shutdown()
    final = opt.mean if best_x is None else _final_params(opt, best_x, cfg)
    ctrl.params = np.asarray(final, np.float32)
    return ctrl.save(paths.controller_model)


def _final_params(opt: CMAES, best_x: np.ndarray, cfg: Config) -> np.ndarray:
    """The controller to keep: the CMA-ES mean (robust to lucky noisy draws) or the best candidate seen."""
    return opt.mean if cfg.controller.keep == "mean" else best_x


def _initial_latents(paths: RunPaths, cfg: Config) -> np.ndarray:
    from .dream import initial_latents

    n = max(1000, cfg.controller.population * cfg.controller.episodes_per_candidate)
    return np.asarray(initial_latents(paths.latents, n, np.random.default_rng(cfg.experiment.seed)), np.float32)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """CLI: ``wm-trainer train-controller -c CONFIG``."""
    path = train_controller(cfg)
    print(f"controller: {path}")
    return 0
