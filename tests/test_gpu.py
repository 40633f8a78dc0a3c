"""V, M, the dream and the toolkit on a CUDA device (CuPy): each result checked against the same run on the CPU.

Every test here is marked ``gpu`` and skipped when CuPy or a CUDA device is missing; collecting this
file on a machine without CuPy imports nothing of CuPy.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

import extensions as ext
from wm_trainer.base import gpu_compat
from wm_trainer.base.errors import UserError
from wm_trainer.data.latents import LatentSet, SequenceIterator, sequence_converter
from wm_trainer.models.mdn import mdn_sample
from wm_trainer.models.memory import MDNRNN
from wm_trainer.models.vision import ConvVAE, frames_converter
from wm_trainer.sim.dream import DreamEnv
from wm_trainer.training.mdnrnn_updater import MDNRNNUpdater


def _no_gpu_reason() -> str | None:
    """Why these tests cannot run here (None when CuPy and a CUDA device are usable)."""
    if importlib.util.find_spec("cupy") is None:
        return "needs CuPy (pip install -e '.[cuda]') and a CUDA device"
    problem = gpu_compat.cuda_problem()
    if problem is not None:
        return problem
    try:
        count = gpu_compat.device_count()
    except UserError as e:
        return str(e)
    return None if count > 0 else "CuPy sees no CUDA device"


NO_GPU = _no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))]


@pytest.fixture
def gpu():
    """CUDA device 0 through the shims, as the stages get it."""
    return gpu_compat.use_device(0)


def host(a) -> np.ndarray:
    """Any array or Variable, as a NumPy array."""
    return chainer.backend.CpuDevice().send(getattr(a, "array", a))


def num(v) -> float:
    """A reported value (Python number, array or Variable on any device) as a float."""
    return float(v) if isinstance(v, (int, float)) else float(host(v))


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("use_cudnn", ["never", "auto"])
def test_vae_training_step_matches_cpu(gpu, use_cudnn):
    """One ConvVAE step; 'never' forces Chainer's im2col path (what runs when cuDNN is missing)."""
    np.random.seed(0)
    cpu_model = ConvVAE(z_dim=32)
    gpu_model = copy.deepcopy(cpu_model).to_device(gpu)
    frames = _frames(8)
    results = {}
    for name, model, device in (("cpu", cpu_model, None), ("gpu", gpu_model, gpu)):
        opt = chainer.optimizers.Adam(alpha=1e-4)
        opt.setup(model)
        x = frames_converter(frames, device)
        with chainer.using_config("use_cudnn", use_cudnn):
            mu, logvar = model.encode(x)
            rec = F.sum(F.squared_difference(model.decode(mu), x)) / len(frames)  # deterministic (no eps)
            model.cleargrads()
            rec.backward()
            grads = {n: None if p.grad is None else host(p.grad) for n, p in model.namedparams()}
            opt.update()
            loss = model.loss(x)  # the real loss, with the reparameterisation noise of each backend's RNG
        results[name] = (host(mu), host(logvar), float(host(rec)), grads, float(host(loss)))
    assert isinstance(gpu_model.conv0.W.array, chainer.backends.cuda.ndarray)
    (mu_c, lv_c, rec_c, g_c, loss_c), (mu_g, lv_g, rec_g, g_g, loss_g) = results["cpu"], results["gpu"]
    np.testing.assert_allclose(mu_g, mu_c, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(lv_g, lv_c, rtol=1e-3, atol=1e-4)
    assert rec_g == pytest.approx(rec_c, rel=1e-4)
    for n in g_c:
        if g_c[n] is None:  # logvar's Linear gets no gradient from the deterministic reconstruction
            assert g_g[n] is None
            continue
        # float32 sums in another order (cuBLAS against OpenBLAS), compounded through the 8 layers back to
        # conv0 (3e-4 measured on an H100); single elements near zero differ relatively, so each array is
        # compared by its relative error norm (a wrong gradient is off by order 1)
        err = np.linalg.norm(g_g[n] - g_c[n]) / max(np.linalg.norm(g_c[n]), 1e-12)
        assert err < 2e-3, (n, err)
    assert np.isfinite(loss_g) and loss_g == pytest.approx(loss_c, rel=0.2)


def _latents(n: int, length: int, z_dim: int, action_dim: int, seed: int = 0) -> LatentSet:
    rng = np.random.default_rng(seed)
    eps = []
    for _ in range(n):
        dones = np.zeros(length, bool)
        dones[-1] = True
        eps.append({"mu": rng.standard_normal((length, z_dim)).astype(np.float32),
                    "logvar": np.full((length, z_dim), -4.0, np.float32),
                    "actions": rng.uniform(-1, 1, (length, action_dim)).astype(np.float32), "dones": dones})
    return LatentSet(eps)


def test_mdnrnn_update_with_gradient_stats_matches_cpu(gpu):
    """One BPTT update through the toolkit's updater: loss and per-parameter gradient statistics as on the CPU."""
    np.random.seed(0)
    cpu_model = MDNRNN(8, 3, hidden=32, mixtures=5, done_head=True)
    gpu_model = copy.deepcopy(cpu_model).to_device(gpu)
    data = _latents(6, 30, 8, 3)
    observed = {}
    for name, model, device in (("cpu", cpu_model, -1), ("gpu", gpu_model, gpu)):
        opt = chainer.optimizers.Adam(alpha=1e-3)
        opt.setup(model)
        it = SequenceIterator(data, batch_size=4, seq_len=10, seed=3)
        updater = MDNRNNUpdater(it, opt, device=device, debug=ext.DebugConfig(), converter=sequence_converter)
        reporter = chainer.Reporter()
        reporter.add_observer("main", model)
        obs: dict = {}
        with reporter.scope(obs):
            updater.update()
        observed[name] = {k: num(v) for k, v in obs.items()}
    cpu, gpu_obs = observed["cpu"], observed["gpu"]
    assert gpu_obs["main/loss"] == pytest.approx(cpu["main/loss"], rel=1e-4)
    assert gpu_obs["grad/global_norm"] == pytest.approx(cpu["grad/global_norm"], rel=1e-3)
    stat_keys = [k for k in cpu if k.startswith("grad/") and k.endswith(("/norm", "/max_abs", "/zero_frac"))]
    assert len(stat_keys) >= 3 * 5
    for k in stat_keys:
        assert gpu_obs[k] == pytest.approx(cpu[k], rel=1e-3, abs=1e-7), k


def test_gradient_summary_and_histograms_of_gpu_arrays_with_nan_and_inf(gpu, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(1)
    a = rng.standard_normal((20, 5)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    a[3, 1], a[4, 2], b[0] = np.nan, np.inf, 0.0
    names = ["l1/W", "l1/b", "l2/W"]
    cpu = ext.gradient_summary(names, [a, b, None])
    dev = ext.gradient_summary(names, [gpu.send(a), gpu.send(b), None])
    assert not dev.finite and dev.missing == ["l2/W"]
    assert dev.nonfinite == cpu.nonfinite == {"l1/W": (1, 1)}
    for name in ("l1/W", "l1/b"):
        for key, value in cpu.stats[name].items():
            if np.isfinite(value):
                assert dev.stats[name][key] == pytest.approx(value, rel=1e-5), (name, key)
            else:
                assert not np.isfinite(dev.stats[name][key])

    writer = ext.open_writer(tmp_path)
    counts = ext.add_histogram_safe(writer, "grad/l1/W", gpu.send(a), 1)
    writer.close()
    assert counts == {"nan": 1, "inf": 1}
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "grad/l1/W" in acc.Tags()["histograms"]
    assert acc.Histograms("grad/l1/W")[0].histogram_value.num == a.size - 2


class _Overflow(chainer.Chain):
    """Linear -> 'blow' (exp: overflows float32 for inputs > 88, finite in float64) or 'bad' (log of negatives)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        with self.init_scope():
            self.l1 = L.Linear(4, 4, initialW=np.eye(4, dtype=np.float32), initial_bias=0.0)
            self.blow = _Elementwise(kind)

    def forward(self, x):
        return F.sum(self.blow(self.l1(x)))


class _Elementwise(chainer.Link):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, h):
        return F.exp(h) if self.kind == "exp" else F.log(h)


@pytest.mark.parametrize("kind, verdict", [("exp", "precision"), ("log", "bug")])
def test_nonfinite_localisation_and_float64_replay_on_gpu(gpu, tmp_path, kind, verdict):
    """The guard fires, the birth is pinned on Link 'blow', and the float64 replay gives the same verdict as on CPU."""
    x = np.full((2, 4), 100.0 if kind == "exp" else -1.0, np.float32)
    errors = {}
    for name, device in (("cpu", -1), ("gpu", gpu)):
        model = _Overflow(kind)
        if name == "gpu":
            model.to_device(gpu)
        opt = chainer.optimizers.SGD(lr=0.1)
        opt.setup(model)
        it = chainer.iterators.SerialIterator(list(x), batch_size=2, shuffle=False)
        updater = ext.GradientLoggingUpdater(it, opt, device=device, debug=ext.DebugConfig(),
                                             out=str(tmp_path / name))
        before = host(model.l1.W.array).copy()
        with pytest.raises(ext.NonFiniteError) as e:
            updater.update()
        np.testing.assert_array_equal(host(model.l1.W.array), before)  # weights untouched
        errors[name] = e.value
        assert e.value.report_path and os.path.exists(e.value.report_path)
    for err in errors.values():
        assert err.link == "blow" and err.where == "forward" and err.verdict == verdict
    assert errors["gpu"].function == errors["cpu"].function


@pytest.mark.parametrize("joint", [False, True])
def test_dream_on_gpu_matches_the_cpu_dream(gpu, joint):
    """DreamEnv with M on the GPU dreams there (CuPy arrays) and follows the CPU dream step for step."""
    import cupy

    np.random.seed(0)
    cpu_model = MDNRNN(8, 3, hidden=32, mixtures=5, done_head=True, joint=joint)
    gpu_model = copy.deepcopy(cpu_model).to_device(gpu)
    pop = 64
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((pop, 8)).astype(np.float32)

    env_cpu, env_gpu = DreamEnv(cpu_model, temperature=1.15, seed=5), DreamEnv(gpu_model, temperature=1.15, seed=5)
    assert env_gpu.xp is cupy and env_cpu.xp is np
    seeds = np.arange(pop)
    env_cpu.reset(z0, seeds)
    env_gpu.reset(z0, seeds)
    assert isinstance(env_gpu._x, cupy.ndarray)
    for t in range(10):
        actions = rng.uniform(-1, 1, (pop, 3)).astype(np.float32)
        z_c, h_c, r_c, d_c = env_cpu.step(actions)
        z_g, h_g, r_g, d_g = env_gpu.step(actions)
        assert all(isinstance(a, np.ndarray) for a in (z_g, h_g, r_g, d_g))
        np.testing.assert_allclose(z_g, z_c, rtol=1e-4, atol=1e-5, err_msg=f"step {t + 1}")
        np.testing.assert_allclose(h_g, h_c, rtol=1e-4, atol=1e-5, err_msg=f"step {t + 1}")
        np.testing.assert_array_equal(d_g, d_c)
        np.testing.assert_array_equal(r_g, r_c)

    # train-controller's dream: DreamEnv and the per-agent controllers on the GPU, the same fitness as on the CPU
    from wm_trainer.models.controller import Controller
    from wm_trainer.train_controller import dream_returns

    ctrl = Controller(8, 32, 3)
    population = 0.5 * rng.standard_normal((16, ctrl.n_params)).astype(np.float32)
    fit = {name: dream_returns(model, ctrl, np.repeat(population, 2, axis=0), np.repeat(z0[:16], 2, axis=0), 1.15,
                               30, seed=4).reshape(16, 2).mean(axis=1)
           for name, model in (("cpu", cpu_model), ("gpu", gpu_model))}
    np.testing.assert_array_equal(fit["gpu"], fit["cpu"])
    assert 1 < fit["cpu"].mean() < 30  # some agents end early, so the comparison says something

    # the same M stepped through Chainer's own functions on the GPU agrees with the dream's fused step
    with chainer.no_backprop_mode():
        h, _ = gpu_model.step(gpu.send(z0), gpu.send(actions), None)
        logits, mu, log_std, done = gpu_model.predict(h)
        z_next = mdn_sample(logits, mu, log_std, tau=1.15, rng=np.random.default_rng(0))
    env_cpu.reset(z0, seeds)
    _, h_c, _, d_c = env_cpu.step(actions)
    assert isinstance(h.array, chainer.backends.cuda.ndarray)
    np.testing.assert_allclose(host(h), h_c, rtol=1e-4, atol=1e-5)
    assert z_next.shape == (pop, 8) and np.isfinite(host(z_next)).all()
    logit = host(done)
    clear = np.abs(logit) > 1e-4  # float rounding may flip a logit within a hair of the threshold
    np.testing.assert_array_equal((logit > 0)[clear], d_c[clear])


def test_cli_stages_with_device_0_train_on_the_gpu(tmp_path, make_episodes, write_config):
    """`--device 0` on train-vae, encode, train-mdnrnn and train-controller: the user's way onto the GPU."""
    from wm_trainer import cli
    from wm_trainer.base.storage import RunPaths
    from wm_trainer.encode import encode_frames
    from wm_trainer.models.vision import load_vae

    paths = RunPaths(tmp_path / "gpu")
    make_episodes(paths.episodes, n_episodes=3, length=20, action_dim=1)  # Doom's one action
    cfg = write_config(tmp_path, "gpu", vae={"recon_every": 2},
                       controller={"mode": "dream", "population": 4, "episodes_per_candidate": 2, "generations": 1,
                                   "eval_every": 0},
                       env={"id": "VizdoomTakeCover-v1", "max_steps": 20})
    for stage in ("train-vae", "encode", "train-mdnrnn", "train-controller"):
        assert cli.main([stage, "-c", cfg, "--device", "0"]) == 0, stage
    assert gpu_compat.describe(0).startswith("GPU 0: ")  # the line use_device prints once per process
    for f in (paths.vae_model, paths.mdnrnn_model, paths.controller_model):
        assert f.is_file(), f
    with np.load(paths.vae_model) as w:
        assert all(np.isfinite(w[k]).all() for k in w.files)
    # the latents the GPU wrote are what the CPU computes from the same weights
    with np.load(sorted(paths.latents.glob("ep_*.npz"))[0]) as d, \
            np.load(sorted(paths.episodes.glob("ep_*.npz"))[0]) as e:
        mu_cpu = encode_frames(load_vae(paths.vae_model, 4), e["frames"], batch=7)[0]
        np.testing.assert_allclose(d["mu"], mu_cpu, rtol=1e-3, atol=1e-4)


def test_lstm_sequence_node_on_gpu_matches_stepped_f_lstm_and_gradients_check(gpu):
    """M's whole-sequence LSTM runs as one node on CuPy arrays, equal to stepping F.lstm, with exact gradients."""
    from chainer import gradient_check

    from wm_trainer.ops.lstm import LSTMSequence, lstm_sequence, lstm_sequence_reference

    rng = np.random.default_rng(0)
    shapes = [(3, 4, 5), (3, 6), (3, 6), (24, 5), (24, 6), (24,)]
    args = [gpu.send(rng.standard_normal(s)) for s in shapes]
    fast = lstm_sequence(*args)
    assert isinstance(fast[0].creator, LSTMSequence) and isinstance(fast[0].array, chainer.backends.cuda.ndarray)
    for a, b in zip(fast, lstm_sequence_reference(*args)):
        np.testing.assert_allclose(host(a), host(b), rtol=1e-10, atol=1e-12)
    gys = [gpu.send(rng.standard_normal(o.shape)) for o in fast]
    gradient_check.check_backward(lambda *a: LSTMSequence().apply(a), args, gys, dtype=np.float64)
