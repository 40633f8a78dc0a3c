"""M's data: the window iterator's lanes, its resume, and one pass over every step."""
from __future__ import annotations

import chainer
import numpy as np

from wm_trainer.data.latents import LatentSet, SequenceIterator


def test_lanes_read_each_episode_from_its_start_in_consecutive_windows_with_padding_masked(two_mode_episodes):
    eps = two_mode_episodes(2, 30, 3, seed=0)
    eps.append(two_mode_episodes(1, 5, 3, seed=1)[0])  # shorter than a window
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


def test_window_iterator_resumes_from_its_serialized_lanes(two_mode_episodes):
    data = LatentSet(two_mode_episodes(5, 23, 2, seed=0))
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


def test_window_iterator_serves_every_step_of_an_episode_once_per_pass(two_mode_episodes):
    """Each step (the done step included) is served once per read of its episode: the done share is 1/length."""
    data = LatentSet(two_mode_episodes(3, 60, 2, seed=0))
    it = SequenceIterator(data, batch_size=50, seq_len=10, seed=0)
    batches = [next(it) for _ in range(60)]
    served_dones = sum(b["done"].sum() for b in batches)
    served_steps = sum(b["done_mask"].sum() for b in batches)
    assert served_dones == 50 * 10 and served_steps == 50 * 10 * 60
