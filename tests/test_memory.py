"""M: the MDN-RNN's loss on two-mode data, the window iterator, the done loss, the BPTT updater, train-mdnrnn."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
import yaml

from wm_trainer import cli
from wm_trainer.memory import MDNRNN, LatentSet, SequenceIterator, sequence_converter, weighted_sigmoid_bce
from wm_trainer.storage import RunPaths, atomic_savez


def _two_mode_episodes(n: int, length: int, z_dim: int, seed: int) -> list[dict]:
    """z_{t+1} is +1 or -1 (coin flip) plus small noise in every dim; mu exact, logvar tiny."""
    rng = np.random.default_rng(seed)
    eps = []
    for _ in range(n):
        mu = rng.choice([-1.0, 1.0], size=(length, z_dim)) + 0.05 * rng.standard_normal((length, z_dim))
        dones = np.zeros(length, bool)
        dones[-1] = True
        eps.append({"mu": mu.astype(np.float32), "logvar": np.full((length, z_dim), -12.0, np.float32),
                    "actions": rng.uniform(-1, 1, (length, 1)).astype(np.float32), "dones": dones})
    return eps


def _train(model: MDNRNN, it: SequenceIterator, iterations: int) -> list[float]:
    opt = chainer.optimizers.Adam(alpha=1e-2)
    opt.setup(model)
    losses = []
    for _ in range(iterations):
        batch = sequence_converter(next(it))
        model.cleargrads()
        loss = model.loss(**batch)
        loss.backward()
        opt.update()
        losses.append(float(loss.array))
    return losses


def _held_out_nll(model: MDNRNN, it: SequenceIterator) -> float:
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        obs = chainer.reporter.Reporter()
        with obs.scope(obs.observation):
            obs.add_observer("m", model)
            vals = [float(model.loss(**sequence_converter(it.batch(i))).array) for i in range(3)]
    return float(np.mean(vals))


def test_mdnrnn_learns_two_modes_and_beats_single_gaussian():
    data = LatentSet(_two_mode_episodes(40, 40, 2, seed=0))
    fresh = SequenceIterator(LatentSet(_two_mode_episodes(10, 40, 2, seed=1)), batch_size=32, seq_len=10, seed=9)
    results = {}
    for k in (5, 1):
        np.random.seed(0)
        model = MDNRNN(2, 1, hidden=16, mixtures=k, done_head=False)
        losses = _train(model, SequenceIterator(data, batch_size=16, seq_len=10, seed=1), 200)
        results[k] = _held_out_nll(model, fresh)
        if k == 5:
            assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    # a Gaussian fit to +-1 has per-dim NLL ~1.4; two narrow modes get well below 0
    assert results[1] > 1.2
    assert results[5] < results[1] - 1.0, results


def test_window_iterator_masks_padding_and_is_a_function_of_seed_and_index():
    eps = _two_mode_episodes(2, 30, 3, seed=0)
    eps.append(_two_mode_episodes(1, 5, 3, seed=1)[0])  # shorter than a window
    data = LatentSet(eps)
    it = SequenceIterator(data, batch_size=64, seq_len=8, seed=3)
    b = it.batch(0)
    assert b["z_in"].shape == (64, 8, 3) and b["a"].shape == (64, 8, 1) and b["z_next"].shape == (64, 8, 3)
    assert b["nll_mask"].shape == b["done"].shape == b["done_mask"].shape == (64, 8)
    # short-episode windows: 5 valid inputs, 4 valid targets, the done on the 5th input
    short = b["done_mask"].sum(1) == 5
    assert short.any()
    assert (b["nll_mask"][short].sum(1) == 4).all()
    assert (b["done"][short].sum(1) == 1).all() and b["done"][short][:, 4].all()
    assert (b["z_in"][short][:, 5:] == 0).all()
    # targets are the next step's inputs
    np.testing.assert_array_equal(b["z_next"][:, :-1], b["z_in"][:, 1:])
    for k in b:
        np.testing.assert_array_equal(b[k], it.batch(0)[k])
    first = next(it)
    np.testing.assert_array_equal(first["z_in"], b["z_in"])
    assert not np.array_equal(next(it)["z_in"], b["z_in"])
    # z is sampled around mu each time: fresh noise, same centre
    wide = LatentSet([dict(e, logvar=np.zeros_like(e["logvar"])) for e in eps])
    z1 = SequenceIterator(wide, 64, 8, seed=3).batch(0)["z_in"]
    z2 = SequenceIterator(wide, 64, 8, seed=4).batch(0)["z_in"]
    assert not np.allclose(z1, z2)


def test_weighted_done_loss_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(12).astype(np.float32)
    y = rng.random(12) < 0.3
    mask = np.ones(12, bool)
    mask[-2:] = False
    got = float(weighted_sigmoid_bce(chainer.Variable(x), y, 10.0, mask).array)
    s = 1 / (1 + np.exp(-x.astype(np.float64)))
    per = -(10.0 * y * np.log(s) + (1 - y) * np.log(1 - s))
    assert got == pytest.approx(per[:10].mean(), rel=1e-5)


def test_done_head_learns_episode_ends():
    data = LatentSet(_two_mode_episodes(4, 12, 2, seed=0))
    np.random.seed(0)
    model = MDNRNN(2, 1, hidden=16, mixtures=2, done_head=True, done_weight=10.0)
    it = SequenceIterator(data, batch_size=16, seq_len=12, seed=0)
    _train(model, it, 60)
    b = sequence_converter(it.batch(999))
    with chainer.no_backprop_mode():
        hs, _ = model.rnn.forward_seq(F.concat((b["z_in"], b["a"]), axis=2))
        logit = model.predict(F.reshape(hs, (-1, 16)))[3].array.reshape(16, 12)
    pos, neg = logit[b["done"]], logit[b["done_mask"] & ~b["done"]]
    assert pos.mean() > neg.mean() + 1.0


# ---- under the toolkit's Trainer, through the CLI -------------------------------------------------------------

def _latents_run(tmp_path, iterations: int, name: str = "run") -> str:
    paths = RunPaths(tmp_path / name)
    for i, ep in enumerate(_two_mode_episodes(3, 20, 4, seed=0)):
        atomic_savez(paths.latents / f"ep_{i:06d}.npz", rewards=np.ones(20, np.float32), **ep)
    cfg = {
        "experiment": {"name": name, "out_dir": str(tmp_path), "seed": 5},
        "vae": {"z_dim": 4},
        "mdnrnn": {"hidden": 8, "mixtures": 2, "seq_len": 6, "batch_size": 4, "iterations": iterations,
                   "snapshot_every": 3, "done_head": True},
        "debug": {"gradients": {"histograms_every": 2}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _weights(path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_train_mdnrnn_cli_resumes_the_same_run(tmp_path, monkeypatch):
    from wm_trainer.memory import MDNRNNUpdater

    full = _latents_run(tmp_path, 6, "full")
    assert cli.main(["train-mdnrnn", "-c", full]) == 0
    part = _latents_run(tmp_path, 4, "part")
    assert cli.main(["train-mdnrnn", "-c", part]) == 0  # "killed" after 4 iterations (snapshot at 4)
    calls = []
    original = MDNRNNUpdater.compute_loss
    monkeypatch.setattr(MDNRNNUpdater, "compute_loss", lambda self, a: calls.append(1) or original(self, a))
    assert cli.main(["train-mdnrnn", "-c", part, "--set", "mdnrnn.iterations=6"]) == 0  # resumes at 4
    assert len(calls) == 2
    a = _weights(RunPaths(tmp_path / "full").mdnrnn_model)
    b = _weights(RunPaths(tmp_path / "part").mdnrnn_model)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    log = (RunPaths(tmp_path / "part").mdnrnn_dir / "log").read_text()
    assert '"iteration": 6' in log and '"main/nll"' in log and '"main/done"' in log


def test_bptt_updater_reports_per_parameter_gradients(tmp_path):
    ext = pytest.importorskip("extensions")
    assert hasattr(ext, "GradientLoggingMixin")
    from wm_trainer.config import load_config
    from wm_trainer.memory import MDNRNNUpdater

    cfg = load_config(_latents_run(tmp_path, 2))
    data = LatentSet.from_folder(RunPaths(cfg.run_dir).latents)
    model = MDNRNN(4, 1, hidden=8, mixtures=2, done_head=True)
    opt = chainer.optimizers.Adam()
    opt.setup(model)
    updater = MDNRNNUpdater(SequenceIterator(data, 4, 6), opt, device=-1, debug=cfg.debug,
                            converter=sequence_converter)
    reporter = chainer.reporter.Reporter()
    reporter.add_observer("main", model)
    obs: dict = {}
    with reporter.scope(obs):
        updater.update()
    grad_keys = [k for k in obs if "grad" in k]
    assert any("rnn/lateral/W" in k for k in grad_keys), sorted(obs)
    assert any("mdn/linear/b" in k for k in grad_keys), sorted(obs)
    assert "main/loss" in obs and np.isfinite(float(chainer.as_array(obs["main/loss"])))


def test_train_mdnrnn_without_latents_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": {"name": "empty", "out_dir": str(tmp_path)}}))
    assert cli.main(["train-mdnrnn", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "wm-trainer encode" in err and len(err.strip().splitlines()) == 1


def test_train_mdnrnn_float64_switch(tmp_path):
    cfg = _latents_run(tmp_path, 2, "f64")
    assert cli.main(["train-mdnrnn", "-c", cfg, "--float64"]) == 0
    with np.load(RunPaths(tmp_path / "f64").mdnrnn_model) as d:
        assert d.files and all(d[k].dtype == np.float64 for k in d.files)


def test_window_iterator_serves_episode_ends_as_often_as_middles():
    """Every step after the first seq_len (the done step included) lands in a window about equally often."""
    eps = _two_mode_episodes(3, 60, 2, seed=0)
    data = LatentSet(eps)
    t = 10
    it = SequenceIterator(data, batch_size=4000, seq_len=t, seed=0)
    b = it.batch(0)
    served_dones = b["done"].sum()
    served_steps = b["done_mask"].sum()
    # 1 done per 60 steps: the done share of served steps is about 1/60, not ~1/(60 * seq_len)
    assert 0.8 / 60 < served_dones / served_steps < 1.25 / 60
    assert b["done"][:, 0].any() and (b["done_mask"].sum(1) == t).mean() > 0.7
