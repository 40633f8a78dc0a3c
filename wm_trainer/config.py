"""The wm-trainer configuration: one typed section per stage plus the toolkit's ``debug:``.

Loaded with ``yaml.safe_load`` only (through ``extensions.schema``), with ``include:``,
``--set a.b=c`` overrides and ``--float64``; errors name the file, key path and line.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional

import yaml

from extensions.config import DebugConfig
from extensions.schema import ConfigError, Source, apply_override, field, from_dict, parse_override, read_yaml, to_dict


@dataclasses.dataclass
class ExperimentConfig:
    """Run identity and output location."""

    name: str = field("run", help="run name; outputs go to <out_dir>/<name>")
    out_dir: str = field("runs", help="parent folder of run directories (relative to the working directory)")
    seed: int = field(0, min=0, help="master random seed")
    device: int = field(-1, min=-1, help="-1 = CPU, N = CUDA device N (needs the cuda extra)")
    ops: Literal["fast", "chainer"] = field("fast", help="fast CPU kernels, or Chainer's stock functions")


@dataclasses.dataclass
class EnvConfig:
    """Which environment, and its episode cap."""

    id: str = field("VizdoomTakeCover-v1", help="VizdoomTakeCover-v1 or CarRacing-v3")
    max_steps: int = field(2100, min=1, help="episode cap in environment steps (paper: 2100 for Doom)")
    frame_skip: int = field(1, min=1, help="hold each action for this many env steps, C and M seeing only the last "
                            "(the paper: 1); every step cap and the score still count env steps; real mode only")


@dataclasses.dataclass
class CollectConfig:
    """Random-policy rollouts that V and M learn from."""

    episodes: int = field(10000, min=1, help="number of random-policy episodes to collect")
    repeat_prob: float = field(0.9, min=0.0, max=1.0, help="probability of repeating the previous action")
    repeat_probs: list[float] = field(default_factory=list, min=0.0, max=1.0,
                                      help="per-episode repeat probabilities, episode i takes entry i mod len "
                                           "(empty = repeat_prob for all): quick switching in M's data too")
    max_steps: int = field(0, min=0, help="cap per collected episode (0 = env.max_steps)")
    compress: bool = field(False, help="zlib-compress episode files: ~3x less disk, slower frame loading")


@dataclasses.dataclass
class VaeConfig:
    """V: the convolutional VAE."""

    z_dim: int = field(64, min=1, help="latent size (paper: 64 Doom, 32 CarRacing)")
    kl_tolerance: float = field(0.5, min=0.0, help="free bits: KL is max(KL, kl_tolerance * z_dim)")
    lr: float = field(1e-4, min=0.0, help="Adam learning rate")
    batch_size: int = field(100, min=1, help="frames per batch")
    epochs: float = field(1.0, min=0.0, help="passes over the collected frames")
    max_iterations: int = field(0, min=0, help="stop after this many iterations (0 = no cap)")
    loader_memory_mb: int = field(512, min=1, help="memory budget of the shuffled frame loader")
    recon_every: int = field(500, min=0, help="TensorBoard reconstruction grid every N iterations (0 = off)")
    snapshot_every: int = field(1000, min=1, help="trainer snapshot (for resume) every N iterations")
    encode_batch: int = field(1000, min=1, help="frames per batch when encoding episodes")


@dataclasses.dataclass
class MdnRnnConfig:
    """M: the MDN-RNN."""

    hidden: int = field(512, min=1, help="LSTM units (paper: 512 Doom, 256 CarRacing)")
    mixtures: int = field(5, min=1, help="Gaussians per z dimension (per_dim) or over the whole z (joint)")
    mixture: Literal["per_dim", "joint"] = field(
        "per_dim", help="one mixture per z dimension, sampled dimension by dimension (the paper's), or one mixture "
                        "over the whole z, so that a sampled change (a fireball appearing) moves every dim at once")
    seq_len: int = field(100, min=2, help="truncated-BPTT sequence length")
    batch_size: int = field(100, min=1, help="sequences per batch")
    lr: float = field(1e-3, min=0.0, help="Adam learning rate")
    grad_clip: float = field(1.0, min=0.0, help="global gradient-norm clip (0 = off)")
    iterations: int = field(4000, min=1, help="training iterations")
    done_head: bool = field(True, help="predict episode end (Doom); positives weighted by done_weight")
    done_weight: float = field(10.0, min=0.0, help="weight of positive examples in the done loss")
    snapshot_every: int = field(500, min=1, help="trainer snapshot (for resume) every N iterations")


@dataclasses.dataclass
class ControllerConfig:
    """C and CMA-ES."""

    mode: Literal["real", "dream"] = field("dream", help="where fitness is measured: real env or M's dream")
    population: int = field(64, min=2, help="CMA-ES population size")
    episodes_per_candidate: int = field(16, min=1, help="episodes averaged per candidate")
    sigma0: float = field(0.1, min=0.0, help="CMA-ES initial step size")
    generations: int = field(200, min=1, help="CMA-ES generations")
    target_score: Optional[float] = field(None, help="stop once the mean fitness of the best reaches this")
    max_minutes: float = field(0.0, min=0.0, help="stop once C has trained this long, summed over resumes (the "
                               "generation under way finishes; a larger value resumes a stopped run; 0 = no limit)")
    temperature: float = field(1.15, min=0.0, help="dream sampling temperature (paper Doom: 1.15)")
    max_steps: int = field(0, min=0, help="cap of the episodes C trains on, dreamed or real (0 = env.max_steps); "
                           "evaluation always plays env.max_steps")
    patience: int = field(0, min=0, help="real mode: a training episode ends after this many steps in a row without "
                          "a positive reward (CarRacing: no new tile, the car is off the track or stopped), so "
                          "hopeless candidates cost little; evaluation never ends early (0 = off)")
    select_every: int = field(25, min=0, help="score the CMA-ES mean every N generations (in the dream; real mode: see "
                              "select_episodes) and keep the best (paper: 25; the last generation, or the one a "
                              "spent time budget ends on, is always scored; 0 = last only)")
    select_rollouts: int = field(1024, min=1, help="dream rollouts that score each selected mean (paper: 1024)")
    select_episodes: int = field(0, min=0, help="real mode: every select_every generations (and at the last) the "
                                 "CMA-ES mean plays this many whole real episodes on fixed training tracks, never "
                                 "the evaluation's, and the best-scoring mean is kept (0 = keep the last mean)")
    eval_every: int = field(25, min=0, help="play the kept controller in the real env every N generations, "
                            "for the log only: the real game never chooses C (0 = off)")
    eval_episodes: int = field(16, min=1, help="real episodes for the periodic evaluation")
    keep: Literal["selected", "mean"] = field(
        "selected", help="final controller: the best-scored mean (paper), or the last generation's mean")
    dream_done: Literal["threshold", "sample"] = field(
        "threshold", help="dream episode end: done logit > 0 (paper), or drawn each step from the done head's "
                          "probability with its positive weighting undone")
    dream_calibrate: bool = field(
        False, help="before C trains, shift M's done logit until the collection policy lives as long in the dream "
                    "as in its real episodes (a dream easier than the game is exploited); dream mode only")
    inputs: Literal["auto", "zh", "zch"] = field(
        "auto", help="what C reads: [z, h], or [z, c, h] (auto = the paper's: Doom zch, CarRacing zh)")
    bias: Literal["auto", "yes", "no"] = field(
        "auto", help="whether C has a bias (auto = the paper's: Doom no, CarRacing yes)")


@dataclasses.dataclass
class EvaluateConfig:
    """Final evaluation in the real environment."""

    episodes: int = field(100, min=1, help="real episodes for the final score")
    gif_steps: int = field(300, min=1, help="frames in the agent and dream GIFs")


@dataclasses.dataclass
class ParallelConfig:
    """Where episodes run."""

    backend: Literal["local", "dask"] = field("local", help="local process pool or Dask distributed")
    workers: int = field(0, min=0, help="worker processes (0 = number of cores)")
    envs_per_worker: int = field(4, min=1, help="environments each worker steps in lockstep")
    address: Optional[str] = field(None, help="Dask scheduler, e.g. tcp://host:8786 (none = LocalCluster)")


@dataclasses.dataclass
class ToyConfig:
    """The MDN toy: the inverse of x = y + 0.3 sin(2 pi y) + noise."""

    samples: int = field(2500, min=10, help="training points")
    noise: float = field(0.05, min=0.0, help="std of the noise added to x")
    mixtures: int = field(3, min=1, help="Gaussians in the MDN")
    hidden: int = field(64, min=1, help="hidden units of both networks")
    iterations: int = field(3000, min=1, help="training iterations per network")
    batch_size: int = field(250, min=1, help="points per batch")
    lr: float = field(5e-3, min=0.0, help="Adam learning rate")


@dataclasses.dataclass
class Config:
    """A whole run: one section per stage."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig, help="run identity")
    env: EnvConfig = field(default_factory=EnvConfig, help="environment")
    collect: CollectConfig = field(default_factory=CollectConfig, help="random rollouts")
    vae: VaeConfig = field(default_factory=VaeConfig, help="V")
    mdnrnn: MdnRnnConfig = field(default_factory=MdnRnnConfig, help="M")
    controller: ControllerConfig = field(default_factory=ControllerConfig, help="C")
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, help="final evaluation")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="workers")
    toy: ToyConfig = field(default_factory=ToyConfig, help="MDN toy")
    debug: DebugConfig = field(default_factory=DebugConfig, help="the toolkit's switches")

    @property
    def run_dir(self) -> Path:
        """The folder every stage of this run reads and writes."""
        return Path(self.experiment.out_dir) / self.experiment.name


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                float64: bool = False) -> Config:
    """Load, merge includes, apply ``--set`` overrides and ``--float64``, and validate."""
    if path is None:
        data, source = {}, Source("<defaults>")
    else:
        data, source = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        try:
            apply_override(data, key, value, source)
        except ConfigError as e:
            raise ConfigError(e.detail, file="--set", path=key) from None
    if float64:
        apply_override(data, "debug.float64", True, source)
    return from_dict(Config, data, source=source)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg: Config, folder: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a run's outputs (atomically)."""
    from .base.storage import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(folder / name, dump_config(cfg))
