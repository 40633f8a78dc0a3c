"""Every stage in order -- collect, train-vae, encode, train-mdnrnn, train-controller, evaluate, render --
skipping those whose outputs are complete and newer than their inputs; each stage resumes its own partial work.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from .base.storage import RunPaths
from .config import Config


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named step: how to run it, and whether its outputs are already complete."""

    name: str
    run: Callable[[Config], object]
    outputs: Callable[[Config, RunPaths], list[Path]]
    complete: Callable[[Config, RunPaths], bool]


def _collect(cfg: Config) -> object:
    from .collect import collect_episodes

    return collect_episodes(cfg)


def _train_vae(cfg: Config) -> object:
    from .train_vae import train_vae

    return train_vae(cfg)


def _encode(cfg: Config) -> object:
    from .encode import encode_episodes

    return encode_episodes(cfg)


def _train_mdnrnn(cfg: Config) -> object:
    from .train_mdnrnn import train_mdnrnn

    return train_mdnrnn(cfg)


def _train_controller(cfg: Config) -> object:
    from .train_controller import train_controller

    return train_controller(cfg)


def _evaluate(cfg: Config) -> object:
    from .evaluate import evaluate, report_lines

    res = evaluate(cfg)
    for line in report_lines(res):
        print(line)
    return res


def _render(cfg: Config) -> object:
    from .render import render

    return render(cfg)


def _episodes(cfg: Config, p: RunPaths) -> list[Path]:
    from .data.episodes import list_episodes

    return list_episodes(p.episodes)


def _latents(cfg: Config, p: RunPaths) -> list[Path]:
    from .data.episodes import list_episodes

    return list_episodes(p.latents)


def _controller_done(cfg: Config, p: RunPaths) -> bool:
    from .train_controller import STATE_FILE, budget_spent, saved_progress

    if not p.controller_model.is_file():
        return False
    state = p.controller_dir / STATE_FILE
    if not state.is_file():
        return True
    generation, stopped, trained_s = saved_progress(state)
    return stopped or generation >= cfg.controller.generations or budget_spent(cfg.controller, trained_s)


def _eval_done(cfg: Config, p: RunPaths) -> bool:
    import json

    try:
        return json.loads(p.eval_json.read_text())["episodes"] == cfg.evaluate.episodes
    except (OSError, ValueError, KeyError):
        return False


def _media(cfg: Config, p: RunPaths) -> list[Path]:
    from .render import MEDIA_FILES

    return [p.media / name for name in MEDIA_FILES]


def _exist(files: list[Path]) -> bool:
    return bool(files) and all(f.is_file() for f in files)


STAGES: tuple[Stage, ...] = (
    Stage("collect", _collect, _episodes, lambda c, p: len(_episodes(c, p)) >= c.collect.episodes),
    Stage("train-vae", _train_vae, lambda c, p: [p.vae_model], lambda c, p: p.vae_model.is_file()),
    Stage("encode", _encode, _latents, lambda c, p: len(_latents(c, p)) >= len(_episodes(c, p)) > 0),
    Stage("train-mdnrnn", _train_mdnrnn, lambda c, p: [p.mdnrnn_model], lambda c, p: p.mdnrnn_model.is_file()),
    Stage("train-controller", _train_controller, lambda c, p: [p.controller_model], _controller_done),
    Stage("evaluate", _evaluate, lambda c, p: [p.eval_json], _eval_done),
    Stage("render", _render, _media, lambda c, p: _exist(_media(c, p))),
)


def _newest(files: list[Path]) -> float:
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def _oldest(files: list[Path]) -> float:
    return min((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def run_pipeline(cfg: Config, stages: tuple[Stage, ...] = STAGES) -> dict[str, str]:
    """Run or skip each stage in order; returns stage -> 'ran' | 'skipped'. A stage whose inputs are newer re-runs."""
    paths = RunPaths(cfg.run_dir)
    status: dict[str, str] = {}
    upstream_time = 0.0
    for i, stage in enumerate(stages, 1):
        outs = stage.outputs(cfg, paths)
        fresh = _exist(outs) and _oldest(outs) >= upstream_time
        if stage.complete(cfg, paths) and fresh:
            print(f"[{i}/{len(stages)}] {stage.name}: complete, skipped", flush=True)
            status[stage.name] = "skipped"
        else:
            print(f"[{i}/{len(stages)}] {stage.name}: running", flush=True)
            t0 = time.perf_counter()
            stage.run(cfg)
            print(f"[{i}/{len(stages)}] {stage.name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
            status[stage.name] = "ran"
        upstream_time = _newest(stage.outputs(cfg, paths))
    return status


def main(cfg: Config, args: argparse.Namespace) -> int:
    """CLI: ``wm-trainer pipeline -c CONFIG``."""
    t0 = time.perf_counter()
    run_pipeline(cfg)
    print(f"pipeline: finished in {time.perf_counter() - t0:.1f} s; outputs in {cfg.run_dir}")
    return 0
