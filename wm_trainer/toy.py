"""The Chainer MDN blog post's toy: invert x = y + 0.3 sin(2 pi y) + noise, where one x has up to three y.

An MSE network learns the average of the branches; an MDN learns the distribution. Both
train under ``chainer.training.Trainer`` through the toolkit, so ``debug:`` and
``--float64`` apply. Writes data.png, mse.png, mdn.png and metrics.json to the run folder.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

import extensions as ext

from .base.storage import atomic_write_json
from .config import Config, ToyConfig
from .models.mdn import MDNHead, mdn_nll, mdn_sample

BRANCH_TOLERANCE = 0.1


def make_data(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) column vectors: y uniform on [0, 1], x = y + 0.3 sin(2 pi y) + N(0, noise^2)."""
    y = rng.uniform(0.0, 1.0, size=(n, 1))
    x = y + 0.3 * np.sin(2 * np.pi * y) + rng.normal(0.0, noise, size=(n, 1))
    return x.astype(np.float32), y.astype(np.float32)


def true_branches(x: float, grid: int = 20001) -> np.ndarray:
    """Every y in [0, 1] with y + 0.3 sin(2 pi y) = x (the noiseless inverse), by sign changes on a fine grid."""
    y = np.linspace(0.0, 1.0, grid)
    f = y + 0.3 * np.sin(2 * np.pi * y) - x
    idx = np.nonzero(np.signbit(f[:-1]) != np.signbit(f[1:]))[0]
    return y[idx] - f[idx] * (y[idx + 1] - y[idx]) / (f[idx + 1] - f[idx])


class MSENet(chainer.Chain):
    """x -> y regression trained with mean squared error."""

    def __init__(self, hidden: int):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(1, hidden)
            self.l2 = L.Linear(hidden, 1)

    def predict(self, x):
        """The predicted y for each x."""
        return self.l2(F.tanh(self.l1(x)))

    def forward(self, x, y):
        """Mean squared error; reported as ``loss``."""
        loss = F.mean_squared_error(self.predict(x), y)
        chainer.report({"loss": loss}, self)
        return loss


class MDNNet(chainer.Chain):
    """x -> mixture of K Gaussians over y."""

    def __init__(self, hidden: int, mixtures: int):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(1, hidden)
            self.head = MDNHead(hidden, 1, mixtures)

    def params_for(self, x):
        """(logits, mu, log_std) of the mixture for each x."""
        return self.head(F.tanh(self.l1(x)))

    def forward(self, x, y):
        """Mean negative log-likelihood; reported as ``loss``."""
        loss = mdn_nll(*self.params_for(x), y)
        chainer.report({"loss": loss}, self)
        return loss


def _train(model: chainer.Chain, x: np.ndarray, y: np.ndarray, toy: ToyConfig, debug: ext.DebugConfig,
           out: Path, seed: int, label: str) -> None:
    optimizer = chainer.optimizers.Adam(alpha=toy.lr)
    optimizer.setup(model)
    data = chainer.datasets.TupleDataset(x, y)
    it = chainer.iterators.SerialIterator(data, toy.batch_size, shuffle=True)
    updater = ext.GradientLoggingUpdater(it, optimizer, -1, debug=debug)
    trainer = chainer.training.Trainer(updater, (toy.iterations, "iteration"), out=str(out))
    ext.install(trainer, debug)
    log_every = max(1, toy.iterations // 10)
    trainer.extend(ext.LogReport(trigger=(log_every, "iteration")))
    trainer.extend(chainer.training.extensions.ProgressBar(
        training_length=(toy.iterations, "iteration"), update_interval=max(1, toy.iterations // 100)))
    print(f"training the {label} network ({toy.iterations} iterations)")
    trainer.run(show_loop_exception_msg=False)


def _gaussian_nll(residual: np.ndarray, var: float) -> float:
    return float(np.mean(0.5 * math.log(2 * math.pi * var) + residual ** 2 / (2 * var)))


def data_near_branch(x: np.ndarray, y: np.ndarray) -> float:
    """Share of real (noisy) points within the tolerance of a noiseless branch: the best a model can score."""
    near = [len(b := true_branches(a)) > 0 and np.abs(b - c).min() < BRANCH_TOLERANCE for a, c in zip(x[:, 0], y[:, 0])]
    return float(np.mean(near))


def _coverage(model: MDNNet, toy: ToyConfig, rng: np.random.Generator, dtype) -> dict:
    """Share of samples near a true branch, and share of true branches that receive samples."""
    xs = np.linspace(-0.1, 1.1, 49, dtype=np.float64)
    per_x = 200
    near, hit, branches = 0, 0, 0
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        xin = np.repeat(xs, per_x)[:, None].astype(dtype)
        samples = mdn_sample(*model.params_for(xin), tau=1.0, rng=rng)[:, 0].reshape(len(xs), per_x)
    for x, s in zip(xs, samples):
        b = true_branches(x)
        if len(b) == 0:
            continue
        dist = np.abs(s[:, None] - b[None, :])
        near += int((dist.min(axis=1) < BRANCH_TOLERANCE).sum())
        hit += int((dist.min(axis=0) < BRANCH_TOLERANCE).sum())
        branches += len(b)
    total = per_x * sum(1 for x in xs if len(true_branches(x)))
    return {"samples_near_branch": near / max(total, 1), "branches_covered": hit / max(branches, 1),
            "tolerance": BRANCH_TOLERANCE}


def _plot(path: Path, x: np.ndarray, y: np.ndarray, red: tuple[np.ndarray, np.ndarray] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.scatter(x, y, s=2, alpha=0.35, color="tab:blue", label="data")
    if red is not None:
        ax.scatter(red[0], red[1], s=2, alpha=0.5, color="red", label="model")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.legend(loc="upper left", markerscale=4)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def run_toy(cfg: Config) -> dict:
    """Train both networks on the toy problem; write plots and metrics.json; return the metrics."""
    toy, debug, out = cfg.toy, cfg.debug, cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)
    ext.set_float64(debug.float64)
    dtype = np.float64 if debug.float64 else np.float32
    rng = np.random.default_rng(cfg.experiment.seed)
    np.random.seed(cfg.experiment.seed)
    x, y = make_data(toy.samples, toy.noise, rng)
    x_test, y_test = make_data(max(500, toy.samples // 5), toy.noise, rng)

    mse = MSENet(toy.hidden)
    _train(mse, x, y, toy, debug, out / "mse", cfg.experiment.seed, "MSE")
    mdn = MDNNet(toy.hidden, toy.mixtures)
    _train(mdn, x, y, toy, debug, out / "mdn", cfg.experiment.seed, f"MDN (K={toy.mixtures})")

    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        fit_var = float(np.mean((mse.predict(x.astype(dtype)).array - y) ** 2))
        pred_test = mse.predict(x_test.astype(dtype)).array
        mdn_test = float(mdn_nll(*mdn.params_for(x_test.astype(dtype)), y_test.astype(dtype)).array)
        samples = mdn_sample(*mdn.params_for(x_test.astype(dtype)), tau=1.0, rng=rng)
    metrics = {
        "mdn_nll_test": mdn_test,
        "mse_nll_test": _gaussian_nll(pred_test - y_test, fit_var),
        "mse_residual_var": fit_var,
        "mixtures": toy.mixtures,
        "param_dtypes": sorted({p.dtype.name for net in (mse, mdn) for p in net.params()}),
        **_coverage(mdn, toy, rng, dtype),
        "data_near_branch": data_near_branch(x_test, y_test),
    }
    metrics["nll_gap"] = metrics["mse_nll_test"] - metrics["mdn_nll_test"]
    _plot(out / "data.png", x, y, None, "toy data: x = y + 0.3 sin(2 pi y) + noise")
    _plot(out / "mse.png", x, y, (x_test[:, 0], pred_test[:, 0]), "MSE network: the average of the branches")
    _plot(out / "mdn.png", x, y, (x_test[:, 0], samples[:, 0]), f"MDN samples (K={toy.mixtures})")
    atomic_write_json(out / "metrics.json", metrics)
    print(f"held-out NLL: MDN {metrics['mdn_nll_test']:.3f} vs MSE-as-Gaussian {metrics['mse_nll_test']:.3f}; "
          f"samples near a branch {metrics['samples_near_branch']:.1%} "
          f"(held-out data: {metrics['data_near_branch']:.1%}), "
          f"branches covered {metrics['branches_covered']:.1%}; outputs in {out}")
    return metrics


def main(cfg: Config, args: argparse.Namespace | None = None) -> int:
    """CLI entry: ``wm-trainer mdn-toy -c configs/mdn_toy.yaml``."""
    run_toy(cfg)
    return 0
