"""GPU columns: ConvVAE training images/s, MDN-RNN training timesteps/s and dream agent-steps/s, next to PyTorch.

Run as ``python -m benchmarks.bench_gpu [--repeats 5] [--seq 100] [--population 64 --episodes 16]``. Prints
"no GPU" (and why) and exits 0 when CuPy or a CUDA device is missing; PyTorch is imported only on a GPU run.
The Chainer side is the project's own code on CuPy (``wm_trainer.models.vision.ConvVAE``,
``wm_trainer.models.memory.MDNRNN``, and the dream as ``train-controller --device 0`` runs it: ``DreamEnv`` and the
per-agent controllers on the GPU); the PyTorch side is the same network (``benchmarks.bench_ops``) on the same GPU.
Paper scale: CarRacing V (z 32) at batch 100; M with LSTM 256 over [z 32, a 3], K 5, batch 100; the dream for the
whole CMA-ES generation (population x episodes agents) with Doom's M (z 64, LSTM 512). Every step ends with a
device->host read of its result, so times include the GPU work. Results go to ``benchmarks/results/gpu.json``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import Comparison, Figure, compare_rates, machine_info, time_call
from wm_trainer.base import gpu_compat
from wm_trainer.base.errors import UserError

VAE_BATCH, VAE_Z = 100, 32
M_BATCH, M_Z, M_ACTION, M_HIDDEN, M_MIXTURES = 100, 32, 3, 256, 5
DREAM_Z, DREAM_ACTION, DREAM_HIDDEN, DREAM_TAU = 64, 3, 512, 1.15
RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"


def no_gpu_reason() -> str | None:
    """Why there is no GPU run here (None when CuPy and a CUDA device are usable). Shims go on first."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install -e '.[cuda]')"
    gpu_compat.enable()  # before chainer's first import, so CUDA libraries from pip wheels are found
    problem = gpu_compat.cuda_problem()
    if problem is not None:
        return problem
    try:
        return None if gpu_compat.device_count() > 0 else "CuPy sees no CUDA device"
    except UserError as e:
        return str(e)


def torch_cuda():
    """The torch module when it can use CUDA here, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def gpu_info(torch) -> dict:
    """GPU name, CUDA runtime/driver, cuDNN as Chainer and PyTorch see them."""
    from chainer.backends import cuda

    rt = cuda.cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = {"gpu": name, "cupy": cuda.cupy.__version__, "cuda_runtime": rt.runtimeGetVersion(),
            "cuda_driver": rt.driverGetVersion(), "chainer_cudnn": gpu_compat.cudnn_version(),
            "setup": gpu_compat.describe(0)}
    if torch is not None:
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    torch_cudnn=torch.backends.cudnn.version())
    return info


# -- ConvVAE -------------------------------------------------------------------------------------------------
def chainer_vae_step(device, use_cudnn: str = "auto") -> Callable[[], float]:
    """One Adam(1e-4) step of the project's ConvVAE on ``device`` (batch 100 of random frames)."""
    import chainer
    import numpy as np

    from wm_trainer.models.vision import ConvVAE

    model = ConvVAE(z_dim=VAE_Z).to_device(device)
    opt = chainer.optimizers.Adam(alpha=1e-4)
    opt.setup(model)
    x = device.send(np.random.default_rng(0).random((VAE_BATCH, 3, 64, 64), dtype=np.float32))

    def step() -> float:
        with chainer.using_config("use_cudnn", use_cudnn):
            loss = model.loss(x)
            model.cleargrads()
            loss.backward()
            opt.update()
        return float(loss.array)
    return step


def torch_vae_step(torch) -> Callable[[], float]:
    """The PyTorch ConvVAE step on the GPU."""
    import numpy as np

    from benchmarks.bench_ops import build_torch_vae

    model = build_torch_vae(VAE_Z).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.from_numpy(np.random.default_rng(0).random((VAE_BATCH, 3, 64, 64), dtype=np.float32)).cuda()

    def step() -> float:
        opt.zero_grad()
        loss = model.loss(x, torch.randn(VAE_BATCH, VAE_Z, device="cuda"))
        loss.backward()
        opt.step()
        return loss.item()
    return step


# -- MDN-RNN -------------------------------------------------------------------------------------------------
def chainer_mdnrnn_step(device, seq: int) -> Callable[[], float]:
    """One Adam(1e-3) step, global-norm clip 1.0, of the project's MDNRNN over (batch 100, seq) windows."""
    import chainer
    import numpy as np

    from wm_trainer.models.memory import MDNRNN

    model = MDNRNN(M_Z, M_ACTION, hidden=M_HIDDEN, mixtures=M_MIXTURES, done_head=False).to_device(device)
    opt = chainer.optimizers.Adam(alpha=1e-3)
    opt.setup(model)
    opt.add_hook(chainer.optimizer_hooks.GradientClipping(1.0))
    rng = np.random.default_rng(0)
    batch = {"z_in": rng.standard_normal((M_BATCH, seq, M_Z), dtype=np.float32),
             "a": rng.uniform(-1, 1, (M_BATCH, seq, M_ACTION)).astype(np.float32),
             "z_next": rng.standard_normal((M_BATCH, seq, M_Z), dtype=np.float32),
             "nll_mask": np.ones((M_BATCH, seq), bool), "done": np.zeros((M_BATCH, seq), np.float32),
             "done_mask": np.ones((M_BATCH, seq), bool)}
    batch = {k: device.send(v) for k, v in batch.items()}

    def step() -> float:
        loss = model.loss(**batch)
        model.cleargrads()
        loss.backward()
        opt.update()
        return float(loss.array)
    return step


def torch_mdnrnn_step(torch, seq: int) -> Callable[[], float]:
    """The PyTorch MDN-RNN step (cuDNN LSTM) on the GPU."""
    import numpy as np

    from benchmarks.bench_ops import build_torch_mdnrnn

    model = build_torch_mdnrnn(M_Z, M_ACTION, M_HIDDEN, M_MIXTURES).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((M_BATCH, seq, M_Z + M_ACTION), dtype=np.float32)).cuda()
    t = torch.from_numpy(rng.standard_normal((M_BATCH, seq, M_Z), dtype=np.float32)).cuda()

    def step() -> float:
        opt.zero_grad()
        loss = model.loss(x, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


# -- dream -----------------------------------------------------------------------------------------------------
def dream_env_step(device, agents: int, steps: int) -> Callable[[], float]:
    """``steps`` steps of the dream as ``train-controller`` runs it: ``DreamEnv`` on ``device`` (None: the CPU,
    NumPy) for the whole generation, with each agent's own controller (``act_batch``) on the same device."""
    import numpy as np

    from wm_trainer.models.controller import Controller
    from wm_trainer.models.memory import MDNRNN
    from wm_trainer.sim.dream import DreamEnv

    m = MDNRNN(DREAM_Z, DREAM_ACTION, hidden=DREAM_HIDDEN, mixtures=5, done_head=True)
    env = DreamEnv(m, temperature=DREAM_TAU, max_steps=10 ** 9, seed=0, device=device, host_outputs=False)
    ctrl = Controller(DREAM_Z, DREAM_HIDDEN, DREAM_ACTION)
    rng = np.random.default_rng(0)
    params = env.device.send(0.1 * rng.standard_normal((agents, ctrl.n_params)).astype(np.float32))
    z0 = rng.standard_normal((agents, DREAM_Z)).astype(np.float32)

    def run() -> float:
        z, h = env.reset(z0, np.arange(agents))
        done = None
        for _ in range(steps):
            z, h, _, done = env.step(ctrl.act_batch(params, z, h))
        return float((~done).sum())
    return run


def torch_dream_step(torch, agents: int, steps: int) -> Callable[[], float]:
    """The same dream in PyTorch on the GPU (LSTMCell, linear heads, batched per-agent controllers)."""
    from torch import nn

    K = 5
    cell = nn.LSTMCell(DREAM_Z + DREAM_ACTION, DREAM_HIDDEN).cuda()
    head = nn.Linear(DREAM_HIDDEN, DREAM_Z * 3 * K + 1).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    W = 0.1 * torch.randn(agents, DREAM_ACTION, DREAM_Z + DREAM_HIDDEN, device="cuda", generator=g)
    b = torch.zeros(agents, DREAM_ACTION, device="cuda")
    z0 = torch.randn(agents, DREAM_Z, device="cuda", generator=g)

    def run() -> float:
        with torch.no_grad():
            z = z0
            h = torch.zeros(agents, DREAM_HIDDEN, device="cuda")
            c = torch.zeros_like(h)
            alive = torch.ones(agents, dtype=torch.bool, device="cuda")
            for _ in range(steps):
                a = torch.tanh(torch.bmm(W, torch.cat([z, h], 1)[:, :, None])[:, :, 0] + b)
                h, c = cell(torch.cat([z, a], 1), (h, c))
                y = head(h)
                logits, mu, log_std = y[:, :-1].view(agents, DREAM_Z, 3 * K).split(K, dim=2)
                k = torch.multinomial(torch.softmax(logits.reshape(-1, K) / DREAM_TAU, dim=1), 1, generator=g)
                mu_k = mu.reshape(-1, K).gather(1, k).view(agents, DREAM_Z)
                sd_k = log_std.reshape(-1, K).gather(1, k).view(agents, DREAM_Z).exp()
                z = mu_k + sd_k * math.sqrt(DREAM_TAU) * torch.randn(agents, DREAM_Z, device="cuda", generator=g)
                alive &= y[:, -1] <= 0
            return float(alive.sum().item())
    return run


# -- driver ------------------------------------------------------------------------------------------------------
def single(name: str, label: str, fn: Callable[[], object], items: float, unit: str, repeats: int) -> Comparison:
    """A figure with no counterpart (PyTorch missing): both sides are the same measurement, ratio 1."""
    for _ in range(2):
        fn()
    rates = [items / time_call(fn, 1) for _ in range(repeats)]
    fig = Figure(label, unit, rates)
    return Comparison(name, fig, fig, [1.0] * len(rates), "no PyTorch on this GPU: Chainer+CuPy only")


def run(args: argparse.Namespace) -> dict:
    """Measure every GPU column; returns the results dict (also written to ``args.out``)."""
    import chainer

    device = gpu_compat.use_device(0)
    torch = torch_cuda()
    info = {**machine_info(), **gpu_info(torch), "date": datetime.date.today().isoformat()}
    agents = args.population * args.episodes
    rows: list[Comparison] = []

    def add(name, fn_chainer, fn_torch, items, unit, calls=1):
        if fn_torch is None:
            rows.append(single(name, "chainer+cupy", fn_chainer, items, unit, args.repeats))
        else:
            rows.append(compare_rates(name, "pytorch", fn_torch, "chainer+cupy", fn_chainer, items_per_call=items,
                                      unit=unit, calls=calls, repeats=args.repeats, warmup=2))
        print(_line(rows[-1]), flush=True)

    add("vae_train", chainer_vae_step(device), torch and torch_vae_step(torch), VAE_BATCH, "images/s", calls=5)
    if chainer.backends.cuda.cudnn_enabled:  # what cuDNN buys: the same step on Chainer's im2col path
        rows.append(compare_rates("vae_train_im2col", "chainer+cuDNN", chainer_vae_step(device), "chainer im2col",
                                  chainer_vae_step(device, "never"), items_per_call=VAE_BATCH, unit="images/s",
                                  calls=5, repeats=args.repeats, warmup=2))
        print(_line(rows[-1]), flush=True)
    add("mdnrnn_train", chainer_mdnrnn_step(device, args.seq), torch and torch_mdnrnn_step(torch, args.seq),
        M_BATCH * args.seq, "timesteps/s")
    add("dream", dream_env_step(device, agents, args.dream_steps),
        torch and torch_dream_step(torch, agents, args.dream_steps), agents * args.dream_steps, "agent-steps/s")
    rows.append(compare_rates("dream_vs_cpu", "DreamEnv on the CPU", dream_env_step(None, agents, args.dream_steps),
                              "DreamEnv on the GPU", dream_env_step(device, agents, args.dream_steps),
                              items_per_call=agents * args.dream_steps, unit="agent-steps/s", calls=1,
                              repeats=args.repeats, warmup=1))
    print(_line(rows[-1]), flush=True)
    result = {"machine": info, "settings": vars(args) | {"out": str(args.out), "agents": agents},
              "comparisons": [r.to_dict() for r in rows]}
    from wm_trainer.base.storage import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    return result


def _line(c: Comparison) -> str:
    d = c.to_dict()
    a, b = d["a"], d["b"]
    return (f"{c.name:18s} {a['name']:>22s} {a['median']:12.1f}  {b['name']:>16s} {b['median']:12.1f} "
            f"{b['unit']:14s} ratio {d['ratio']['median']:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.bench_gpu``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side (after warm-up)")
    p.add_argument("--seq", type=int, default=100, help="MDN-RNN window length (mdnrnn.seq_len)")
    p.add_argument("--population", type=int, default=64, help="CMA-ES population")
    p.add_argument("--episodes", type=int, default=16, help="dream episodes per candidate")
    p.add_argument("--dream-steps", type=int, default=50, help="dream steps timed per call")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = p.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"no GPU: {reason}")
        return 0
    res = run(args)
    print(f"{res['machine']['gpu']} ({res['machine']['setup']}), {res['machine']['date']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
