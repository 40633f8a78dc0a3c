"""Score the trained agent and, in the same run and on the same seeds, two random baselines, in the real env.

``random``: the sticky collection policy (repeat the previous action with probability ``collect.repeat_prob``).
``random_iid``: a fresh uniformly random action every step (repeat probability 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .base.storage import RunPaths, atomic_write_json
from .config import Config
from .games.spec import action_dim as env_action_dim


def margin(agent: np.ndarray, baseline: np.ndarray) -> dict:
    """The agent's lead over a baseline played on the same seeds, and that lead in standard errors.

    The standard error is that of the difference of the two means, sqrt(s_a^2 / n + s_b^2 / n) with sample
    standard deviations: 3 or more says the agent beats the baseline beyond run-to-run luck.
    """
    agent, baseline = np.asarray(agent, np.float64), np.asarray(baseline, np.float64)
    lead = float(agent.mean() - baseline.mean())
    ddof = 1 if len(agent) > 1 else 0
    se = float(np.sqrt(agent.var(ddof=ddof) / len(agent) + baseline.var(ddof=ddof) / len(baseline)))
    return {"lead": lead, "standard_error": se, "standard_errors": lead / se if se > 0 else None}


def report_lines(res: dict) -> list[str]:
    """eval.json's content as the lines the CLI prints: each policy's mean ± std, then the agent's margin."""
    lines = []
    for who in ("agent", "random", "random_iid"):
        if who not in res:
            continue
        label = f" ({res[who]['policy']})" if "policy" in res[who] else ""
        lines.append(f"{who}: {res[who]['mean']:.1f} ± {res[who]['std']:.1f}{label}")
    m = res.get("margin_vs_random")
    if m is None:
        return lines
    ses = "no spread to compare" if m["standard_errors"] is None else f"{m['standard_errors']:+.1f} standard errors"
    lines.append(f"agent - random (sticky): {m['lead']:+.1f} ({ses})")
    return lines


def _summary(returns: np.ndarray) -> dict:
    return {"mean": float(returns.mean()), "std": float(returns.std()), "min": float(returns.min()),
            "max": float(returns.max()), "returns": [float(r) for r in returns]}


def eval_path(cfg: Config, controller: str | Path | None = None, agent_only: bool = False) -> Path:
    """Where ``evaluate`` writes: the run's eval.json for the whole evaluation of its kept controller, else
    ``<controller file>.eval.json`` beside the controller file scored."""
    paths = RunPaths(cfg.run_dir)
    if controller is None and not agent_only:
        return paths.eval_json
    return Path(controller or paths.controller_model).with_suffix(".eval.json")


def evaluate(cfg: Config, episodes: int | None = None, executor: Any = None, controller: str | Path | None = None,
             agent_only: bool = False) -> dict:
    """N real episodes each for the agent and both random baselines; writes and returns eval.json's content.

    ``controller``: another controller file of the run to score (e.g. a CMA-ES mean in ``controller/scored/``);
    ``agent_only`` leaves out the random baselines. Either writes ``<controller file>.eval.json`` beside the
    file scored (``eval_path``), never the run's eval.json.
    """
    from tqdm import tqdm

    from .base.parallel import executor_scope
    from .models.controller import Controller
    from .models.memory import load_mdnrnn
    from .models.vision import load_vae
    from .sim.rollout import AgentWeights, Job, Played, eval_seeds

    n = int(episodes or cfg.evaluate.episodes)
    paths = RunPaths(cfg.run_dir)
    adim = env_action_dim(cfg.env.id)
    ctrl = Controller.load(paths.controller_model if controller is None else Path(controller),
                           (cfg.vae.z_dim, cfg.mdnrnn.hidden, adim))
    vae = load_vae(paths.vae_model, cfg.vae.z_dim, cfg.vae.kl_tolerance)
    mdnrnn = load_mdnrnn(paths.mdnrnn_model, cfg, adim)
    weights = AgentWeights.from_models(vae, mdnrnn, ctrl.params[None], ctrl)
    seeds = eval_seeds(cfg.experiment.seed, n)
    jobs = [Job(0, s) for s in seeds]
    with executor_scope(cfg.parallel, executor) as executor:
        with tqdm(total=(1 if agent_only else 3) * n, desc="evaluate", unit="ep", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            # all queued at once: the random episodes fill workers the agent's last long episodes leave idle
            played = [Played(executor, weights, jobs, cfg)]
            if not agent_only:
                played += [Played(executor, None, jobs, cfg), Played(executor, None, jobs, cfg, repeat_prob=0.0)]
            returns = [p.result(progress=bar.update) for p in played]
    result = {"env": cfg.env.id, "episodes": n, "max_steps": cfg.env.max_steps, "frame_skip": cfg.env.frame_skip,
              "seeds": seeds,
              "controller_mode": cfg.controller.mode, "controller": str(controller or paths.controller_model),
              "agent": _summary(returns[0])}
    if not agent_only:
        agent, rand, rand_iid = returns
        result.update({
            "random": {**_summary(rand), "policy": f"sticky: repeat previous action w.p. {cfg.collect.repeat_prob}"},
            "random_iid": {**_summary(rand_iid), "policy": "i.i.d.: uniform new action every step"},
            "margin_vs_random": margin(agent, rand)})
    atomic_write_json(eval_path(cfg, controller, agent_only), result)
    return result


def main(cfg: Config, args: argparse.Namespace) -> int:
    """CLI: ``wm-trainer evaluate -c CONFIG [--episodes N] [--controller FILE] [--agent-only]``; prints the
    scores as mean ± std."""
    controller, agent_only = getattr(args, "controller", None), bool(getattr(args, "agent_only", False))
    res = evaluate(cfg, getattr(args, "episodes", None), controller=controller, agent_only=agent_only)
    print(f"{res['env']}, {res['episodes']} episodes")
    for line in report_lines(res):
        print(line)
    print(f"eval: {eval_path(cfg, controller, agent_only)}")
    return 0
