"""Micro-benchmark of the fast CPU kernels (``wm_trainer.ops``) against Chainer's stock functions and PyTorch.

Run as ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.bench_ops [--only vae,encode,mdnrnn]``
(``--threads 1 --cpu-time`` measures per-thread CPU time instead, which a busy shared machine disturbs less;
``--profile`` prints where the fast path's time goes, per Chainer function).
The nets are the paper's CarRacing V and M at batch 100, float32: the package's own ConvVAE on 64x64x3 frames
(z 32; ``experiment.ops`` chainer vs fast, ``chainer.optimizers.Adam`` vs ``ops.make_adam``'s FastAdam) and the
MDN-RNN (LSTM 256 over [z 32, a 3], sequence 1000, MDN head K 5). Sides are measured alternately (A B A B)
with the harness in :mod:`benchmarks.harness`; ratios are per pair, medians reported. Functions here are
reusable: ``build_*`` make the nets, ``*_step`` closures run one training step or one encode batch.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from benchmarks.harness import machine_info
from wm_trainer.ops.threads import set_threads

BATCH, Z, ACTION, HIDDEN, MIXTURES, SEQ = 100, 32, 3, 256, 5, 1000


def build_chainer_vae(fast: bool, z: int = Z) -> chainer.Chain:
    """The package's own ConvVAE (``wm_trainer.models.vision``) with fast (fused) or stock Chainer layers."""
    from wm_trainer import ops
    from wm_trainer.models.vision import ConvVAE

    before = getattr(chainer.global_config, "wm_ops", "fast")
    ops.select("fast" if fast else "chainer")
    try:
        return ConvVAE(z)
    finally:
        ops.select(before)


def build_torch_vae(z: int = Z):
    """The same ConvVAE in PyTorch (benchmark reference only)."""
    import torch
    from torch import nn

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 32, 4, 2), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                                     nn.Conv2d(64, 128, 4, 2), nn.ReLU(), nn.Conv2d(128, 256, 4, 2), nn.ReLU())
            self.mu, self.logvar, self.fc = nn.Linear(1024, z), nn.Linear(1024, z), nn.Linear(z, 1024)
            self.dec = nn.Sequential(nn.ConvTranspose2d(1024, 128, 5, 2), nn.ReLU(),
                                     nn.ConvTranspose2d(128, 64, 5, 2), nn.ReLU(),
                                     nn.ConvTranspose2d(64, 32, 6, 2), nn.ReLU(),
                                     nn.ConvTranspose2d(32, 3, 6, 2), nn.Sigmoid())

        def encode(self, x):
            h = self.enc(x).flatten(1)
            return self.mu(h), self.logvar(h)

        def loss(self, x, eps):
            mu, logvar = self.encode(x)
            y = self.dec(self.fc(mu + torch.exp(0.5 * logvar) * eps).view(-1, 1024, 1, 1))
            rec = ((y - x) ** 2).sum() / x.shape[0]
            kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum() / x.shape[0]
            return rec + torch.clamp(kl, min=0.5 * z)

    return TorchVAE()


def vae_batch(seed: int = 0, batch: int = BATCH, z: int = Z) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random frames in [0, 1] and the reparameterisation noise."""
    rng = np.random.default_rng(seed)
    return rng.random((batch, 3, 64, 64), dtype=np.float32), rng.standard_normal((batch, z), dtype=np.float32)


def chainer_vae_train_step(model: chainer.Chain, x: np.ndarray, fast: bool) -> Callable[[], float]:
    """A closure running one Adam(1e-4) training step of ``model.loss(x)`` (what ``opt.update(model.loss, x)``
    does); ``fast`` uses :class:`wm_trainer.ops.adam.FastAdam`, else ``chainer.optimizers.Adam``."""
    from wm_trainer.ops.adam import FastAdam

    opt = (FastAdam if fast else chainer.optimizers.Adam)(1e-4)
    opt.setup(model)

    def step() -> float:
        loss = model.loss(x)
        model.cleargrads()
        loss.backward()
        opt.update()
        return float(loss.array)
    return step


def torch_vae_train_step(model, x: np.ndarray, eps: np.ndarray) -> Callable[[], float]:
    """A closure running one Adam(1e-4) training step of the PyTorch VAE."""
    import torch

    opt = torch.optim.Adam(model.parameters(), 1e-4)
    tx, te = torch.from_numpy(x), torch.from_numpy(eps)

    def step() -> float:
        opt.zero_grad()
        loss = model.loss(tx, te)
        loss.backward()
        opt.step()
        return float(loss)
    return step


def chainer_encode_step(model: chainer.Chain, x: np.ndarray) -> Callable[[], object]:
    """A closure encoding one batch without a graph."""
    def step():
        with chainer.no_backprop_mode(), chainer.using_config("train", False):
            return model.encode(x)[0].array
    return step


def torch_encode_step(model, x: np.ndarray) -> Callable[[], object]:
    """A closure encoding one batch in PyTorch without autograd."""
    import torch

    tx = torch.from_numpy(x)

    def step():
        with torch.no_grad():
            return model.encode(tx)[0]
    return step


def have_torch() -> bool:
    """Whether PyTorch is importable (it is a benchmark-only reference)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class ChainerMDNRNN(chainer.Chain):
    """LSTM over [z, a] + the project's MDN head and NLL; ``fast`` picks ops.lstm_sequence or stepped F.lstm."""

    def __init__(self, z: int = Z, action: int = ACTION, hidden: int = HIDDEN, mixtures: int = MIXTURES,
                 fast: bool = True):
        super().__init__()
        from wm_trainer.models.mdn import MDNHead

        self.fast, self.hidden = fast, hidden
        with self.init_scope():
            self.rnn = L.LSTM(z + action, hidden)
            self.mdn = MDNHead(hidden, z, mixtures)

    def loss(self, x, target):
        """Mean MDN NLL of target (N, T, z) given inputs x (N, T, z + a)."""
        from wm_trainer.ops import mdn_loss
        from wm_trainer.ops.lstm import lstm_sequence, lstm_sequence_reference

        n, t, _ = x.shape
        h0 = np.zeros((n, self.hidden), x.dtype)
        run = lstm_sequence if self.fast else lstm_sequence_reference
        hs, _, _ = run(x, h0, h0.copy(), self.rnn.upward.W, self.rnn.lateral.W, self.rnn.upward.b)
        hs = F.reshape(hs, (n * t, self.hidden))
        if self.fast:  # as wm_trainer.models.memory.MDNRNN.loss: the head's packed output, no split
            return mdn_loss.mdn_nll_packed(self.mdn.packed(hs), target.reshape(n * t, -1), self.mdn.mixtures)
        return mdn_loss.stock_mdn_nll(*self.mdn(hs), target.reshape(n * t, -1))


def build_torch_mdnrnn(z: int = Z, action: int = ACTION, hidden: int = HIDDEN, mixtures: int = MIXTURES):
    """The same MDN-RNN in PyTorch (benchmark reference only)."""
    import torch
    from torch import nn

    class TorchMDNRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(z + action, hidden, batch_first=True)
            self.head = nn.Linear(hidden, z * mixtures * 3)

        def loss(self, x, target):
            hs, _ = self.rnn(x)
            y = self.head(hs.reshape(-1, hidden)).view(-1, z, 3 * mixtures)
            logits, mu, log_std = y.split(mixtures, dim=2)
            t = target.reshape(-1, z, 1)
            log_n = -0.5 * ((t - mu) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
            lp = torch.logsumexp(torch.log_softmax(logits, dim=2) + log_n, dim=2).sum(dim=1)
            return -lp.mean()

    return TorchMDNRNN()


def mdnrnn_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
    """Random [z, a] inputs (N, T, z + a) and next-z targets (N, T, z)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seq, Z + ACTION), dtype=np.float32),
            rng.standard_normal((batch, seq, Z), dtype=np.float32))


def chainer_mdnrnn_train_step(model: ChainerMDNRNN, x: np.ndarray, target: np.ndarray) -> Callable[[], float]:
    """A closure running one Adam(1e-3) step with global-norm clip 1.0 (the paper's M training)."""
    opt = chainer.optimizers.Adam(1e-3)
    opt.setup(model)
    opt.add_hook(chainer.optimizer_hooks.GradientClipping(1.0))

    def step() -> float:
        loss = model.loss(x, target)
        model.cleargrads()
        loss.backward()
        opt.update()
        return float(loss.array)
    return step


def torch_mdnrnn_train_step(model, x: np.ndarray, target: np.ndarray) -> Callable[[], float]:
    """The PyTorch counterpart of :func:`chainer_mdnrnn_train_step`."""
    import torch

    opt = torch.optim.Adam(model.parameters(), 1e-3)
    tx, tt = torch.from_numpy(x), torch.from_numpy(target)

    def step() -> float:
        opt.zero_grad()
        loss = model.loss(tx, tt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


def alternate_rates(fns: dict[str, Callable[[], object]], items: float, repeats: int,
                    cpu_time: bool = False) -> dict[str, list[float]]:
    """items/s of each closure, called in turn (A B C A B C ...) after one untimed warm-up round."""
    clock = time.process_time if cpu_time else time.perf_counter
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            rates[k].append(items / (clock() - t0))
    return rates


def summarize(name: str, unit: str, rates: dict[str, list[float]]) -> dict:
    """Median rate per side and median per-round ratios of the fast path to the others."""
    out = {"name": name, "unit": unit, "median": {k: statistics.median(v) for k, v in rates.items()},
           "best": {k: max(v) for k, v in rates.items()}, "runs": rates}
    for other in ("chainer", "torch"):
        if other in rates and "fast" in rates:
            out[f"fast/{other}"] = statistics.median(f / o for f, o in zip(rates["fast"], rates[other]))
            out[f"best fast/best {other}"] = max(rates["fast"]) / max(rates[other])
    return out


def bench_vae(repeats: int, cpu_time: bool, torch_ok: bool, encode: bool = False) -> dict:
    """ConvVAE training (or encoding) images/s: stock Chainer, fast ops, PyTorch."""
    x, eps = vae_batch()
    np.random.seed(0)
    stock, fast = build_chainer_vae(False), build_chainer_vae(True)
    fast.copyparams(stock)
    if encode:
        fns = {"chainer": chainer_encode_step(stock, x), "fast": chainer_encode_step(fast, x)}
    else:
        fns = {"chainer": chainer_vae_train_step(stock, x, False), "fast": chainer_vae_train_step(fast, x, True)}
    if torch_ok:
        tv = build_torch_vae()
        fns["torch"] = torch_encode_step(tv, x) if encode else torch_vae_train_step(tv, x, eps)
    name = "ConvVAE encode" if encode else "ConvVAE train"
    return summarize(name, "images/s", alternate_rates(fns, len(x), repeats, cpu_time))


def bench_mdnrnn(repeats: int, cpu_time: bool, torch_ok: bool, seq: int = SEQ) -> dict:
    """MDN-RNN training timesteps/s (batch x sequence per step): stepped Chainer, fast ops, PyTorch."""
    x, target = mdnrnn_batch(seq=seq)
    stock, fast = ChainerMDNRNN(fast=False), ChainerMDNRNN(fast=True)
    fast.copyparams(stock)
    fns = {"chainer": chainer_mdnrnn_train_step(stock, x, target), "fast": chainer_mdnrnn_train_step(fast, x, target)}
    if torch_ok:
        fns["torch"] = torch_mdnrnn_train_step(build_torch_mdnrnn(), x, target)
    return summarize("MDN-RNN train", "timesteps/s", alternate_rates(fns, x.shape[0] * x.shape[1], repeats, cpu_time))


class _ClockHook(chainer.FunctionHook):
    """Seconds per Chainer function label and first-input shape (so layers stay apart), forward and backward."""

    name = "ClockHook"

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.totals, self._t0, self._keys = clock, {}, [], []

    def _pre(self, key: str) -> None:
        self._keys.append(key)
        self._t0.append(self.clock())

    def _post(self) -> None:
        key = self._keys.pop()
        self.totals[key] = self.totals.get(key, 0.0) + self.clock() - self._t0.pop()

    def forward_preprocess(self, function, in_data):
        self._pre(f"{function.label} {tuple(in_data[0].shape)}")

    def backward_preprocess(self, function, in_data, out_grad):
        self._pre(f"{function.label} {tuple(function.inputs[0].shape)} (backward)")

    def forward_postprocess(self, function, in_data):
        self._post()

    def backward_postprocess(self, function, in_data, out_grad):
        self._post()


def profile_fast(seq: int = SEQ, cpu_time: bool = False, nets: tuple[str, ...] = ("vae", "mdnrnn"),
                 rounds: int = 3, top: int = 16) -> str:
    """Where one fast training step of each net spends its time, per Chainer function, input shape and
    direction (medians over ``rounds`` steps after a warm-up step)."""
    clock = time.process_time if cpu_time else time.perf_counter
    steps = []
    if "vae" in nets:
        x, _ = vae_batch()
        np.random.seed(0)
        vae_step = chainer_vae_train_step(build_chainer_vae(True), x, True)
        steps.append(("ConvVAE train step (fast ops, FastAdam)", vae_step))
    if "mdnrnn" in nets:
        xs, target = mdnrnn_batch(seq=seq)
        steps.append((f"MDN-RNN train step, seq {seq} (fast)",
                      chainer_mdnrnn_train_step(ChainerMDNRNN(fast=True), xs, target)))
    lines = []
    for name, fn in steps:
        fn()
        totals: dict[str, list[float]] = {}
        step_times = []
        for _ in range(rounds):
            with _ClockHook(clock) as hook:
                t0 = clock()
                fn()
                step_times.append(clock() - t0)
            for k, v in hook.totals.items():
                totals.setdefault(k, []).append(v)
        med = {k: statistics.median(v) for k, v in totals.items()}
        total = statistics.median(step_times)
        lines.append(f"{name}: {total * 1e3:.0f} ms {'CPU' if cpu_time else 'wall'}, "
                     f"{sum(med.values()) * 1e3:.0f} ms inside Chainer functions (the rest: optimizer, Python)")
        lines += [f"  {k:58s} {v * 1e3:8.1f} ms" for k, v in sorted(med.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen benchmarks, print a table and return the results."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_ops", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="vae,encode,mdnrnn", help="comma list of vae, encode, mdnrnn")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians are reported)")
    ap.add_argument("--seq", type=int, default=SEQ, help="MDN-RNN sequence length")
    ap.add_argument("--threads", type=int, default=0,
                    help="BLAS, torch and wm_trainer.ops threads (0 = library defaults)")
    ap.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall clock")
    ap.add_argument("--profile", action="store_true", help="print a per-function profile of the fast path")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    torch_ok = have_torch()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        set_threads(args.threads)
        if torch_ok:
            import torch

            torch.set_num_threads(args.threads)
    results = {"machine": machine_info(), "threads": args.threads or "default",
               "clock": "cpu" if args.cpu_time else "wall", "benchmarks": []}
    only = {s.strip() for s in args.only.split(",")}
    if "vae" in only:
        results["benchmarks"].append(bench_vae(args.repeats, args.cpu_time, torch_ok))
    if "encode" in only:
        results["benchmarks"].append(bench_vae(args.repeats, args.cpu_time, torch_ok, encode=True))
    if "mdnrnn" in only:
        results["benchmarks"].append(bench_mdnrnn(args.repeats, args.cpu_time, torch_ok, args.seq))
    for r in results["benchmarks"]:
        med = "  ".join(f"{k} {v:,.0f}" for k, v in r["median"].items())
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in r.items() if "fast/" in k)
        print(f"{r['name']:16s} {r['unit']:12s} {med}   {ratios}")
    if args.profile:
        nets = tuple(n for n in ("vae", "mdnrnn") if n in only) or ("vae", "mdnrnn")
        results["profile"] = profile_fast(args.seq, args.cpu_time, nets)
        print(results["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
