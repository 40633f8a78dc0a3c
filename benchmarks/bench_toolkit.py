"""Focused toolkit-cost micro-benchmark: plain StandardUpdater vs the toolkit, one iteration at a time.

``python -m benchmarks.bench_toolkit [--nets mdn-toy,convvae,mdnrnn] [--pairs N]``

The sides are the very steppers of ``benchmarks.run`` (a Trainer with a LogReport each).
Single iterations alternate A B A B ..., so the ratio of the two medians tracks the toolkit's
own cost on a shared, noisy machine better than a few long calls do. A second table times
the toolkit's pieces in isolation on the same net (statistics, backup, post-update check,
RNG capture, reporter handling of the extra keys, TensorBoard encoding) so a regression can be
located. Timed alone in a loop their caches are hot: inside a real iteration each NumPy call costs
two to five times more.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import chainer
import numpy as np

from benchmarks.run import NETS, _make_stepper


def _median_us(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def compare(net: str, kind: str, pairs: int, tmp: str) -> dict:
    """Median per-iteration time of plain and of ``kind`` (stats|hist), alternating single iterations."""
    plain = _make_stepper(net, "plain", os.path.join(tmp, net, "plain"))
    side = _make_stepper(net, kind, os.path.join(tmp, net, kind))
    for _ in range(3):
        plain.run(1)
        side.run(1)
    ta, tb = [], []
    for _ in range(pairs):
        t0 = time.perf_counter_ns()
        plain.run(1)
        t1 = time.perf_counter_ns()
        side.run(1)
        t2 = time.perf_counter_ns()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    hist_ns = 0.0
    if kind == "hist":  # histograms every 100 iterations, amortised: one write of them, timed alone, / 100
        guard = side.trainer.updater._ext.guards["main"]
        _, names, params, _ = guard.param_table(guard.optimizer.target)
        hist_ns = _median_us(lambda: guard._histograms(names, params, 0), 3) * 1e3 / 100
    plain.close()
    side.close()
    ma, mb = statistics.median(ta), statistics.median(tb) + hist_ns
    return {"net": net, "side": kind, "plain_ms": ma / 1e6, "toolkit_ms": mb / 1e6, "ratio": ma / mb}


def pieces(net: str, tmp: str) -> dict:
    """Microseconds per iteration of each toolkit piece, timed alone on ``net`` after one real iteration."""
    from extensions.replay import RngTracker
    from extensions.stats import gradient_summary
    from extensions.tensorboard import encode_rows

    stepper = _make_stepper(net, "stats", os.path.join(tmp, net, "pieces"))
    stepper.run(2)
    updater = stepper.trainer.updater
    opt = updater.get_optimizer("main")
    guard = updater._ext.guards["main"]
    _, names, params, _ = guard.param_table(opt.target)
    grads = [p.grad for p in params]
    n = 50 if net == "mdn-toy" else 10
    summary = gradient_summary(names, grads)
    report = summary.as_report()
    tags, row = summary.report_array()
    rows = np.stack([row] * 50)
    summ = chainer.reporter.DictSummary()
    backup = guard.backup  # the updater's own: its plan is made
    tracker = RngTracker()
    out = {
        "stats": _median_us(lambda: gradient_summary(names, grads), n),
        "guard_only": _median_us(lambda: gradient_summary(names, grads, with_stats=False), n),
        "as_report": _median_us(summary.as_report, n),
        # a flush encodes 50 iterations' rows at once: the figure is per iteration
        "tensorboard_encode": _median_us(lambda: encode_rows(tags, rows), n) / len(rows),
        # arrays whose update rule saves them itself (wm-trainer's Adam) are left to that rule: not timed here
        "backup": _median_us(lambda: (backup.finish(params, opt), backup.settle()), n),
        "post_check": _median_us(lambda: backup.params_finite(params), n),
        "rng_capture": _median_us(lambda: tracker.capture(np), n),
        "logreport_keys": _median_us(lambda: summ.add(report), n),
        "keys": len(report),
        "params": int(sum(p.size for p in params)),
    }
    if updater.writer is None:
        from extensions.tensorboard import open_writer

        updater.writer = open_writer(os.path.join(tmp, net, "pieces", "tb"))
    out["histograms"] = _median_us(lambda: guard._histograms(names, params, 0), 3)
    stepper.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the alternating comparison and the piece timings for each net."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_toolkit", description=__doc__)
    p.add_argument("--nets", default=",".join(NETS), help="comma-separated nets of " + ", ".join(NETS))
    p.add_argument("--pairs", type=int, default=0, help="alternating pairs per comparison (0: per-net default)")
    p.add_argument("--no-pieces", action="store_true", help="skip the piece timings")
    args = p.parse_args(argv)
    chainer.global_config.show_warnings = False
    tmp = tempfile.mkdtemp(prefix="wm-bench-toolkit-")
    print("| net | side | plain ms/iter | toolkit ms/iter | ratio (plain/toolkit) |")
    print("|---|---|---|---|---|")
    for net in args.nets.split(","):
        pairs = args.pairs or {"mdn-toy": 600, "convvae": 16, "mdnrnn": 40}[net]
        for kind in ("stats", "hist"):
            r = compare(net, kind, pairs, tmp)
            print(f"| {net} | {kind} | {r['plain_ms']:.3f} | {r['toolkit_ms']:.3f} | {r['ratio']:.3f} |", flush=True)
    if not args.no_pieces:
        for net in args.nets.split(","):
            print(net, {k: round(v, 1) for k, v in pieces(net, tmp).items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
