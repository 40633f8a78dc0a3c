"""M's updater: stateful truncated BPTT (the carried start state) and the toolkit's per-parameter gradients."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np

from wm_trainer.base.storage import RunPaths
from wm_trainer.data.latents import LatentSet, SequenceIterator, sequence_converter
from wm_trainer.models.memory import MDNRNN
from wm_trainer.training.mdnrnn_updater import MDNRNNUpdater


def test_updater_starts_each_window_from_the_state_its_episode_reached(two_mode_episodes):
    """Stateful BPTT: a window's start state is the one the whole episode so far leads to; zero at a start."""
    from wm_trainer.config import Config
    data = LatentSet(two_mode_episodes(3, 20, 2, seed=0))
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


def test_bptt_updater_reports_per_parameter_gradients(tmp_path, latents_run):
    from wm_trainer.config import load_config

    cfg = load_config(latents_run(tmp_path, 2))
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
