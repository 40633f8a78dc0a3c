"""M: the MDN-RNN's loss on two-mode data, the window iterator, the done loss, the BPTT updater, train-mdnrnn."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
import yaml

from wm_trainer import cli
from wm_trainer.latents import LatentSet, SequenceIterator, sequence_converter
from wm_trainer.mdnrnn_updater import MDNRNNUpdater
from wm_trainer.memory import MDNRNN, weighted_sigmoid_bce
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
            vals = [float(model.loss(**sequence_converter(next(it))).array) for _ in range(3)]
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


def test_lanes_read_each_episode_from_its_start_in_consecutive_windows_with_padding_masked():
    eps = _two_mode_episodes(2, 30, 3, seed=0)
    eps.append(_two_mode_episodes(1, 5, 3, seed=1)[0])  # shorter than a window
    data = LatentSet([dict(e, mu=e["mu"] + 100 * i) for i, e in enumerate(eps)])  # episode i's z near 100 i
    it = SequenceIterator(data, batch_size=16, seq_len=8, seed=3)
    first = next(it)
    assert first["z_in"].shape == (16, 8, 3) and first["a"].shape == (16, 8, 1) and first["z_next"].shape == (16, 8, 3)
    assert first["nll_mask"].shape == first["done"].shape == first["done_mask"].shape == (16, 8)
    assert first["reset"].all()  # every lane starts an episode at step 0
    np.testing.assert_array_equal(first["z_next"][:, :-1], first["z_in"][:, 1:])  # targets: the next inputs
    seen = {}
    for k in range(12):
        b = first if k == 0 else next(it)
        for lane in range(16):
            ep = int(it.lane_episode[lane])
            n = int(b["done_mask"][lane].sum())
            if b["reset"][lane]:
                seen[lane] = 0
            assert n == min(8, data.lengths[ep] - seen[lane])  # the window goes on where the last one stopped
            np.testing.assert_allclose(b["z_in"][lane, :n], data.mu[data.starts[ep] + seen[lane]:][:n], atol=1e-2)
            assert (b["z_in"][lane, n:] == 0).all() and (b["a"][lane, n:] == 0).all()
            assert b["nll_mask"][lane].sum() == n - (seen[lane] + n == data.lengths[ep])
            assert b["done"][lane].sum() == (seen[lane] + n == data.lengths[ep])  # the done on the last step
            seen[lane] += 8
            if seen[lane] < data.lengths[ep]:
                assert n == 8
    # a function of the seed: another iterator with the same seed serves the same batches, another seed not
    again, other = SequenceIterator(data, 16, 8, seed=3), SequenceIterator(data, 16, 8, seed=4)
    a0 = next(again)
    for k in first:
        np.testing.assert_array_equal(a0[k], first[k])
    assert not np.array_equal(next(other)["z_in"], first["z_in"])


def test_window_iterator_resumes_from_its_serialized_lanes():
    data = LatentSet(_two_mode_episodes(5, 23, 2, seed=0))
    it = SequenceIterator(data, batch_size=6, seq_len=7, seed=1)
    for _ in range(5):
        next(it)
    saved = chainer.serializers.DictionarySerializer()
    it.serialize(saved)
    saved = {k: np.array(v) for k, v in saved.target.items()}  # as a snapshot file holds them
    expected = [next(it) for _ in range(4)]
    resumed = SequenceIterator(data, batch_size=6, seq_len=7, seed=1)
    resumed.serialize(chainer.serializers.NpzDeserializer(saved))
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_updater_starts_each_window_from_the_state_its_episode_reached():
    """Stateful BPTT: a window's start state is the one the whole episode so far leads to; zero at a start."""
    from wm_trainer.config import Config
    data = LatentSet(_two_mode_episodes(3, 20, 2, seed=0))
    np.random.seed(0)
    model = MDNRNN(2, 1, hidden=8, mixtures=2, done_head=True)
    opt = chainer.optimizers.SGD(lr=0.0)  # weights fixed: the carried states stay comparable
    opt.setup(model)
    it = SequenceIterator(data, batch_size=4, seq_len=6, seed=2)
    updater = MDNRNNUpdater(it, opt, device=-1, debug=Config().debug, converter=sequence_converter)
    starts = []
    original = model.loss_and_state
    model.loss_and_state = lambda **kw: starts.append((kw["h0"].copy(), kw["z_in"].copy(), kw["a"].copy())) \
        or original(**kw)
    lanes = []
    for _ in range(7):
        lanes.append((it.lane_episode.copy(), it.lane_offset.copy()))
        updater.update()
    for k, (h0, _, _) in enumerate(starts):
        ep_before, off_before = lanes[k]
        for lane in range(4):
            restarted = k == 0 or off_before[lane] >= data.lengths[ep_before[lane]]
            if restarted:
                np.testing.assert_array_equal(h0[lane], 0.0)
                continue
            # replay this lane's episode from step 0 to the window start with a zero state: the same h
            ep, off = int(ep_before[lane]), int(off_before[lane])
            s0 = data.starts[ep]
            zs = np.concatenate([st[1][lane] for st in starts[k - off // 6:k]])[:off]
            acts = np.concatenate([st[2][lane] for st in starts[k - off // 6:k]])[:off]
            np.testing.assert_allclose(zs[:, 0], data.mu[s0:s0 + off, 0], atol=0.05)  # the same episode's steps
            with chainer.no_backprop_mode():
                hs, _ = model.rnn.forward_seq(F.concat((zs[None], acts[None]), axis=2))
            np.testing.assert_allclose(h0[lane], hs.array[0, -1], rtol=1e-5, atol=1e-6)


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
    b = sequence_converter(next(it))
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


def test_window_iterator_serves_every_step_of_an_episode_once_per_pass():
    """Each step (the done step included) is served once per read of its episode: the done share is 1/length."""
    data = LatentSet(_two_mode_episodes(3, 60, 2, seed=0))
    it = SequenceIterator(data, batch_size=50, seq_len=10, seed=0)
    batches = [next(it) for _ in range(60)]
    served_dones = sum(b["done"].sum() for b in batches)
    served_steps = sum(b["done_mask"].sum() for b in batches)
    assert served_dones == 50 * 10 and served_steps == 50 * 10 * 60
