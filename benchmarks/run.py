"""``make bench``: every figure of the benchmarks issue, measured alternately in one run, as ratios.

Writes ``benchmarks/results/<date>.json`` and ``benchmarks/results/latest.md`` and prints the
markdown table. ``--quick`` shrinks repeats (for a smoke run); ``--only a,b`` picks sections.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import chainer
import numpy as np

from benchmarks.harness import Comparison, compare_rates, machine_info
from benchmarks.stepper import TrainerStepper, make_trainer
from wm_trainer.ops import make_adam

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("toolkit", "float64", "torch", "dream", "realenv", "carracing", "loader")


# ---------------------------------------------------------------- nets used by several sections
def _toy_side(out: str, debug: dict | None, dtype=np.float32):
    """The MDN toy net (64 hidden, K=3, batch 250) under a trainer: plain or with the toolkit."""
    from wm_trainer.toy import MDNNet, make_data

    x, y = make_data(2500, 0.05, np.random.default_rng(0))
    model = MDNNet(64, 3)
    it = chainer.iterators.SerialIterator(chainer.datasets.TupleDataset(x.astype(dtype), y.astype(dtype)), 250)
    return model, it, None, None


def _vae_side(out: str, debug: dict | None, dtype=np.float32):
    """The paper's ConvVAE (z 32), batch 100 of random frames."""
    from wm_trainer.models.vision import ConvVAE, frames_converter

    frames = np.random.default_rng(0).integers(0, 256, size=(1000, 64, 64, 3), dtype=np.uint8)
    it = chainer.iterators.SerialIterator(frames, 100)
    model = ConvVAE(32)
    return model, it, (lambda batch, device=None: frames_converter(np.stack(batch), device)), model.loss


def _mdnrnn_side(out: str, debug: dict | None, dtype=np.float32):
    """M (LSTM 256, z 32, a 3, K 5), batch 100 windows of 100 steps from synthetic latents."""
    from wm_trainer.data.latents import LatentSet, SequenceIterator, sequence_converter
    from wm_trainer.models.memory import MDNRNN

    rng = np.random.default_rng(0)
    eps = [{"mu": rng.standard_normal((300, 32)).astype(np.float32),
            "logvar": np.full((300, 32), -4.0, np.float32),
            "actions": rng.uniform(-1, 1, (300, 3)).astype(np.float32),
            "rewards": np.zeros(300, np.float32), "dones": np.eye(1, 300, 299, dtype=bool)[0]} for _ in range(20)]
    it = SequenceIterator(LatentSet(eps), 100, 100, seed=0)
    return MDNRNN(32, 3, 256, 5, done_head=False), it, sequence_converter, None


NETS = {"mdn-toy": (_toy_side, 50, 250, "examples"), "convvae": (_vae_side, 2, 100, "images"),
        "mdnrnn": (_mdnrnn_side, 2, 100 * 100, "timesteps")}


def _make_stepper(net: str, kind: str, out: str, float64: bool = False) -> TrainerStepper:
    """A stepper for ``net``: ``plain`` StandardUpdater, ``stats`` (guard + per-param stats every iteration,
    no histograms) or ``hist`` (the same + histograms every 100)."""
    import extensions as ext
    from wm_trainer.training.mdnrnn_updater import MDNRNNUpdater

    ext.set_float64(float64)
    np.random.seed(0)
    build = NETS[net][0]
    model, it, converter, loss_func = build(out, None)
    opt = make_adam()
    opt.setup(model)
    kwargs = {"converter": converter} if converter else {}
    if loss_func is not None:
        kwargs["loss_func"] = loss_func
    if kind == "plain":
        if net == "mdnrnn":
            class PlainM(chainer.training.updaters.StandardUpdater):
                def update_core(self):
                    batch = self.converter(self.get_iterator("main").next(), self.device)
                    opt = self.get_optimizer("main")
                    opt.update(opt.target.loss, **batch)
            updater = PlainM(it, opt, device=-1, **kwargs)
        else:
            # the same device argument as the toolkit's side (-1: its converter sends batches to the CPU)
            updater = chainer.training.updaters.StandardUpdater(it, opt, device=-1, **kwargs)
        trainer = make_trainer(updater, out)
    else:
        debug = ext.DebugConfig.from_dict({
            "float64": float64,
            "gradients": {"every": 1, "histograms_every": 100 if kind == "hist" else 0},
            "tensorboard": {"logdir": os.path.join(out, "tb") if kind == "hist" else False}})
        cls = MDNRNNUpdater if net == "mdnrnn" else ext.GradientLoggingUpdater
        updater = cls(it, opt, device=-1, debug=debug, **kwargs)
        trainer = make_trainer(updater, out)
        ext.install(trainer, debug)
    return TrainerStepper(trainer)


def bench_toolkit(quick: bool, tmp: str) -> list[Comparison]:
    """Toolkit cost: plain vs guard+stats every iteration, and vs the same + histograms every 100."""
    out = []
    for net, (_, iters, items, unit) in NETS.items():
        plain = _make_stepper(net, "plain", os.path.join(tmp, net, "plain"))
        for kind, target, limit in (("stats", "<= 3% slower (ratio >= 0.97)", 0.97),
                                    ("hist", "<= 5% slower (ratio >= 0.95)", 0.95)):
            side = _make_stepper(net, kind, os.path.join(tmp, net, kind))
            # histograms every 100: the repeats of a "hist" side cover exactly 100 iterations (one histogram
            # step), and its target is judged on total time (amortised), not on the median pair
            amortised = kind == "hist"
            # more pairs where a call is short: the median of 10 pairs of 65 ms calls moved by +-3 %; V's pairs
            # spread +-15 % on a shared host, so 48 of them put its median within about +-1.5 %
            reps = 4 if quick else 10 if amortised else {"mdn-toy": 40, "convvae": 48, "mdnrnn": 30}[net]
            n = max(1, 100 // reps) if amortised else iters
            label = "guard+stats" if kind == "stats" else "guard+stats+hist/100"
            c = compare_rates(f"toolkit cost, {net}", "plain StandardUpdater", lambda plain=plain, n=n: plain.run(n),
                              label, lambda side=side, n=n: side.run(n), items_per_call=items * n,
                              unit=f"{unit}/s", calls=1, repeats=reps, target=target, target_ratio=limit,
                              amortised=amortised)
            out.append(c)
            side.close()
        plain.close()
    out.append(_bench_log_writes(quick, tmp))
    return out


def _bench_log_writes(quick: bool, tmp: str) -> Comparison:
    """One LogReport write after 1000 entries of the MDN toy's keys (loss, global norm, 7 stats x 4 parameters):
    Chainer's whole-log rewrite against ``extensions.LogReport``'s append (what ``install`` gives a trainer).
    Each call adds one entry to both logs."""
    import extensions as ext

    keys = ["main/loss", "grad/global_norm"] + [f"grad/p{i}/{s}" for i in range(4) for s in
                                                 ("norm", "mean", "std", "max_abs", "zero_frac", "nan", "inf")]
    rng = np.random.default_rng(0)
    entries = [{**dict(zip(keys, rng.standard_normal(len(keys)).tolist())), "epoch": i // 10, "iteration": i * 100,
                "elapsed_time": i * 0.13} for i in range(1, 1001)]

    class _Trainer:  # what LogReport's write reads of a trainer
        def __init__(self, out):
            os.makedirs(out, exist_ok=True)
            self.out = out

    def side(cls, name):
        report, trainer = cls(trigger=(1, "iteration")), _Trainer(os.path.join(tmp, "logwrite", name))
        report._log = list(entries)
        report._trigger = lambda _: True  # every call writes, one more entry each time
        trainer.is_before_training = False
        trainer.observation = {"main/loss": 0.5}
        trainer.updater = type("Updater", (), {"epoch": 100, "iteration": 100000})()
        trainer.elapsed_time = 1.0
        return lambda: report(trainer)

    return compare_rates("LogReport write after 1000 entries (toy's 33 keys)", "chainer LogReport (rewrites all)",
                         side(chainer.training.extensions.LogReport, "chainer"), "extensions.LogReport (appends)",
                         side(ext.LogReport, "ours"), items_per_call=1, unit="writes/s", calls=3 if quick else 10,
                         repeats=3 if quick else 9)


def bench_float64(quick: bool, tmp: str) -> list[Comparison]:
    """float64 vs float32 training of the same nets (plain updaters)."""
    out = []
    for net, (_, iters, items, unit) in NETS.items():
        f32 = _make_stepper(net, "stats", os.path.join(tmp, net, "f32"))
        f64 = _make_stepper(net, "stats", os.path.join(tmp, net, "f64"), float64=True)
        import extensions as ext

        def run32(s=f32, iters=iters):
            ext.set_float64(False)
            s.run(iters)

        def run64(s=f64, iters=iters):
            ext.set_float64(True)
            s.run(iters)

        out.append(compare_rates(f"float64 vs float32, {net}", "float32", run32, "float64", run64,
                                 items_per_call=items * iters, unit=f"{unit}/s", calls=1,
                                 repeats=3 if quick else 5))
        ext.set_float64(False)
    return out


def bench_torch(quick: bool, tmp: str) -> list[Comparison]:
    """Chainer (the package's own nets) vs PyTorch CPU: VAE train, encode, MDN-RNN train."""
    from benchmarks import bench_ops as bo

    if not bo.have_torch():
        raise RuntimeError("torch not available")
    import torch

    from wm_trainer.models.memory import MDNRNN
    from wm_trainer.models.vision import ConvVAE

    reps = 3 if quick else 9
    out = []
    x, eps = bo.vae_batch()
    np.random.seed(0)
    vae = ConvVAE(32)
    opt = make_adam(alpha=1e-4)
    opt.setup(vae)

    def chainer_vae():
        opt.update(vae.loss, x)

    tvae = bo.build_torch_vae()
    out.append(compare_rates("ConvVAE training (batch 100)", "PyTorch", bo.torch_vae_train_step(tvae, x, eps),
                             "Chainer", chainer_vae, items_per_call=len(x), unit="images/s", calls=2,
                             repeats=reps, target=">= 0.8x PyTorch", target_ratio=0.8))

    def chainer_encode():
        with chainer.no_backprop_mode(), chainer.using_config("train", False):
            vae.encode(x)

    out.append(compare_rates("ConvVAE encode (batch 100)", "PyTorch", bo.torch_encode_step(tvae, x),
                             "Chainer", chainer_encode, items_per_call=len(x), unit="images/s", calls=5,
                             repeats=reps))
    xs, target = bo.mdnrnn_batch()
    m = MDNRNN(32, 3, 256, 5, done_head=False)
    mopt = make_adam(alpha=1e-3)
    mopt.setup(m)
    mopt.add_hook(chainer.optimizer_hooks.GradientClipping(1.0))
    b, t = xs.shape[0], xs.shape[1]
    mask = np.ones((b, t), bool)

    def chainer_m():
        mopt.update(m.loss, xs[:, :, :32], xs[:, :, 32:], target, mask, mask, mask)

    tm = bo.build_torch_mdnrnn()
    out.append(compare_rates("MDN-RNN training (batch 100, seq 1000, hidden 256)", "PyTorch",
                             bo.torch_mdnrnn_train_step(tm, xs, target), "Chainer", chainer_m,
                             items_per_call=b * t, unit="timesteps/s", calls=1, repeats=reps,
                             target=">= 1.0x PyTorch", target_ratio=1.0))
    del torch
    return out


def bench_dream(quick: bool, tmp: str) -> list[Comparison]:
    """Dream throughput: 64 x 16 agents batched vs a per-agent loop over the same model."""
    from wm_trainer.models.memory import MDNRNN
    from wm_trainer.sim.dream import DreamEnv

    out = []
    for hidden, z_dim in ((256, 32), (512, 64)):
        np.random.seed(0)
        m = MDNRNN(z_dim, 1, hidden, 5, done_head=True)
        m.done.b.array[:] = -50.0  # never done: every step does the full work
        rng = np.random.default_rng(0)
        big = DreamEnv(m, temperature=1.15, max_steps=10 ** 9, seed=0)
        big.reset(rng.standard_normal((1024, z_dim)))
        a_big = rng.uniform(-1, 1, (1024, 1))
        singles = [DreamEnv(m, temperature=1.15, max_steps=10 ** 9, seed=i) for i in range(32)]
        for s in singles:
            s.reset(rng.standard_normal((1, z_dim)))
        a1 = a_big[:1]

        def batched(steps=5, big=big, a_big=a_big):
            for _ in range(steps):
                big.step(a_big)

        def loop(singles=singles, a1=a1):
            for s in singles:
                s.step(a1)

        out.append(compare_rates(f"dream rollout, hidden {hidden}, z {z_dim}", "per-agent loop (1 agent/step)",
                                 loop, "batched (1024 agents/step)", batched, items_per_call=1.0,
                                 unit="calls/s", calls=2, repeats=3 if quick else 5,
                                 target=">= 50x the per-agent loop", target_ratio=None))
        c = out[-1]
        # convert both sides to agent-steps/s
        c.a.values = [v * len(singles) for v in c.a.values]
        c.a.unit = "agent-steps/s"
        c.b.values = [v * 1024 * 5 for v in c.b.values]
        c.b.unit = "agent-steps/s"
        c.ratios = [b / a for a, b in zip(c.a.values, c.b.values)]
        c.ratio_meaning = "batched / per-agent (agent-steps/s)"
        c.met = sorted(c.ratios)[len(c.ratios) // 2] >= 50
    return out


def _vm_kb(field: str) -> int:
    """A ``/proc/self/status`` memory figure in KiB (VmHWM is this process image's peak; it resets at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _loader_child(folder: str, budget_mb: float, batches: int, q) -> None:
    from wm_trainer.data.frames import FrameLoader

    base = _vm_kb("VmRSS")
    loader = FrameLoader(folder, 100, memory_mb=budget_mb, seed=0)
    next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    loader.finalize()
    peak = _vm_kb("VmHWM")
    q.put({"frames_per_s": batches * 100 / dt, "peak_rss_mb": peak / 1024, "rss_before_loader_mb": base / 1024,
           "peak_growth_mb": (peak - base) / 1024})


def bench_loader(quick: bool, tmp: str) -> dict:
    """Frame-loader throughput and peak memory over an episode store larger than the loader's budget."""
    import multiprocessing as mp

    from wm_trainer.base.storage import atomic_savez

    folder = Path(tmp) / "episodes"
    rng = np.random.default_rng(0)
    n_eps, length = (40, 500) if quick else (120, 500)
    for i in range(n_eps):
        atomic_savez(folder / f"ep_{i:06d}.npz", frames=rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8),
                     actions=np.zeros((length, 1), np.float32), rewards=np.ones(length, np.float32),
                     dones=np.eye(1, length, length - 1, dtype=bool)[0], seed=np.int64(i))
    store_mb = n_eps * length * 64 * 64 * 3 / 2 ** 20
    budget = 64.0
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loader_child, args=(str(folder), budget, 300 if quick else 1000, q))
    p.start()
    res = q.get()
    p.join()
    res.update({"store_mb": store_mb, "budget_mb": budget})
    return res


def bench_realenv(quick: bool, tmp: str) -> dict:
    """Real-env evaluation throughput vs the raw random-policy step rate (the ceiling)."""
    from benchmarks.bench_realenv import measure

    return measure(quick)


def bench_carracing(quick: bool, tmp: str) -> dict:
    """Real-env CMA-ES throughput on CarRacing per worker, and the paper's setting in worker-hours from it."""
    from benchmarks.bench_carracing import measure

    return measure(quick)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _other_row(name: str, v: dict) -> str:
    """A table row for a section measured as a dict (real-env evaluation, loader) rather than a comparison."""
    if name == "realenv" and "target" in v:
        t = v["target"]
        ev = v[t["variant"]]
        raw = v["raw_2_processes"]["steps_per_s"]["median"]
        met = "yes" if t["met"] else "**no**"
        envs = v["lockstep_envs_per_worker"]
        return (f"| real-env evaluation, Doom, 2 workers x {envs} lockstep envs ({v['model']}) "
                f"| raw random policy, 2 processes: {_fmt(raw)} env-steps/s | agent: "
                f"{_fmt(ev['steps_per_s']['median'])} env-steps/s, {ev['episodes_per_s']['median']:.2f} episodes/s "
                f"| {t['ratio_median']:.3f} | >= 0.80 of raw | {met} |")
    if name == "carracing" and "paper_setting" in v:
        rates, paper = v["steps_per_s_per_worker"], v["paper_setting"]
        best = rates[v["best"]]["median"]
        road = f" ({v['raw_vs_stock_road']:.2f}x gymnasium's own road drawing)" if "raw_vs_stock_road" in v else ""
        if "frame_skip2_vs_1" in v:
            road += f"; agent with frame skip 2: {v['frame_skip2_vs_1']:.2f}x the env steps/s"
        return (f"| real-env CMA-ES, CarRacing, 1 worker ({v['model']}) | raw random policy: "
                f"{_fmt(rates['raw']['median'])} env-steps/s{road} | agent, {v['best'].split('_')[1]}: {_fmt(best)} "
                f"env-steps/s; the paper's {paper['env_steps']:.2e} steps = {_fmt(paper['worker_hours'])} "
                f"worker-hours | {v['best_vs_raw']:.3f} | (a cost estimate) | |")
    if name == "loader" and "frames_per_s" in v:
        met = "yes" if v["peak_growth_mb"] <= v["budget_mb"] else "**no**"
        return (f"| frame loader, {v['store_mb']:.0f} MB store, {v['budget_mb']:.0f} MB budget | | "
                f"{_fmt(v['frames_per_s'])} frames/s, peak memory +{v['peak_growth_mb']:.1f} MB | | "
                f"peak memory growth <= budget | {met} |")
    return f"| {name} | {json.dumps(v)} | | | | |"


def markdown(results: dict) -> str:
    """The results as a markdown table (ratios first: they are what transfers across machines)."""
    lines = ["| benchmark | A | B | ratio (median, min–max) | target | met |", "|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        r = c["ratio"]
        a, b = c["a"], c["b"]
        extra = f"; amortised {r['amortised']:.3f}" if "amortised" in r else ""
        met = {True: "yes", False: "**no**", None: ""}[c["met"]]
        lines.append(f"| {c['name']} | {a['name']}: {_fmt(a['median'])} {a['unit']} | {b['name']}: "
                     f"{_fmt(b['median'])} {b['unit']} | {r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}){extra} | "
                     f"{c['target']} | {met} |")
    for name, v in results.get("other", {}).items():
        lines.append(_other_row(name, v))
    for name, v in results.get("unavailable", {}).items():
        lines.append(f"| {name} | not available: {v} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sections, write JSON + markdown, print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller data (a smoke run)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    args = p.parse_args(argv)
    chainer.global_config.show_warnings = False
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
                     "comparisons": [], "other": {}, "unavailable": {}}
    tmp = tempfile.mkdtemp(prefix="wm-bench-")
    funcs = {"toolkit": bench_toolkit, "float64": bench_float64, "torch": bench_torch, "dream": bench_dream,
             "realenv": bench_realenv, "carracing": bench_carracing, "loader": bench_loader}
    try:
        for name in args.only.split(","):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                res = funcs[name](args.quick, os.path.join(tmp, name))
            except Exception as e:  # a missing optional part must not stop the other sections
                traceback.print_exc()
                results["unavailable"][name] = f"{type(e).__name__}: {e}"
                continue
            if isinstance(res, list):
                results["comparisons"].extend(c.to_dict() for c in res)
            else:
                results["other"][name] = res
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",")
    full = set(chosen) == set(SECTIONS) and not args.quick
    stamp = datetime.date.today().isoformat()
    if not full:  # a partial or quick run never replaces the full run's files
        stamp += "-" + ("quick-" if args.quick else "") + "-".join(chosen)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    if full:
        (RESULTS / "latest.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
