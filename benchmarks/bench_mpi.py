"""V training on ChainerMN: 2 processes x 1 thread against 1 process x 2 threads, the same global batch.

``python -m benchmarks.bench_mpi [--batch 32] [--iterations 40] [--rounds 2]``: synthetic episodes, then
``wm-trainer train-vae`` alternately under ``mpiexec -n 2 -bind-to core`` (BLAS threads at 1) and alone
(BLAS threads 2, and 1 for reference). Throughput is taken between the first and the last LogReport entries
(elapsed_time), so start-up and the first iterations do not count. Writes benchmarks/results/mpi.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "mpi.json"


def make_run(root: Path, name: str, batch: int, iterations: int) -> Path:
    """A run folder of 8 synthetic episodes x 100 frames and its config."""
    from wm_trainer.data.episodes import save_episode

    episodes = root / name / "episodes"
    episodes.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        frames = rng.integers(0, 256, (100, 64, 64, 3), dtype=np.uint8)
        dones = np.zeros(100, bool)
        dones[-1] = True
        save_episode(episodes / f"ep_{i:06d}.npz", frames=frames, actions=np.zeros((100, 1), np.float32),
                     rewards=np.ones(100, np.float32), dones=dones, seed=np.int64(i))
    cfg = {"experiment": {"name": name, "out_dir": str(root), "seed": 0},
           "vae": {"batch_size": batch, "max_iterations": iterations, "snapshot_every": 10**6, "recon_every": 0},
           "debug": {"tensorboard": {"logdir": False}}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_once(config: Path, processes: int, threads: str, batch: int) -> float:
    """Images per second of one ``train-vae`` run (between its first and last log entries)."""
    run_dir = config.parent / config.stem
    shutil.rmtree(run_dir / "vae", ignore_errors=True)
    (run_dir / "vae.npz").unlink(missing_ok=True)
    trainer = [str(Path(sys.executable).parent / "wm-trainer"), "train-vae", "-c", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if processes > 1:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
        trainer = [mpiexec, "-n", str(processes), "-bind-to", "core", *trainer]
    subprocess.run(trainer, check=True, env=env, capture_output=True)
    log = json.loads((run_dir / "vae" / "log").read_text())
    first, last = log[0], log[-1]
    return (last["iteration"] - first["iteration"]) * batch / (last["elapsed_time"] - first["elapsed_time"])


def main(argv: list[str] | None = None) -> int:
    """Alternate the two sides, print and save images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    # the comparison, plus one process on one thread: what 2 threads in one process are up against
    sides = {"1 process x 2 threads": (1, "2"), "2 processes x 1 thread": (2, "1"), "1 process x 1 thread": (1, "1")}
    figures: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        config = make_run(Path(tmp), "bench", args.batch, args.iterations)
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))  # sides alternated, first side swapped
            for name in order:
                figures[name].append(run_once(config, *sides[name], args.batch))
                print(f"round {r + 1}: {name}: {figures[name][-1]:.1f} images/s", flush=True)
    medians = {name: statistics.median(figures[name]) for name in sides}
    one, two, single = medians.values()
    result = {"batch": args.batch, "iterations": args.iterations, "cpus": len(os.sched_getaffinity(0)),
              "load_average_after": os.getloadavg(), "images_per_s": figures, "median": medians,
              "ratio_2proc_over_1proc_2threads": two / one, "ratio_2proc_over_1proc_1thread": two / single}
    print(f"median images/s: {', '.join(f'{k} {v:.1f}' for k, v in medians.items())}; 2 processes / 1 process x 2 "
          f"threads {two / one:.2f}, / 1 process x 1 thread {two / single:.2f}")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
