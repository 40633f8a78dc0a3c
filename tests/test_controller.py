"""C: the tanh-linear map, per-agent batched weights, flat <-> (W, b), and atomic save/load."""
import numpy as np
import pytest

from wm_trainer.controller import Controller
from wm_trainer.errors import UserError


def test_flat_vector_round_trips_through_w_and_b():
    c = Controller(z_dim=4, hidden=6, action_dim=3)
    assert c.n_params == 3 * 10 + 3
    p = np.arange(c.n_params, dtype=np.float32)
    W, b = c.unflatten(p)
    assert W.shape == (3, 10) and b.shape == (3,)
    np.testing.assert_array_equal(b, [30, 31, 32])
    np.testing.assert_array_equal(c.flatten(W, b), p)


def test_act_batch_uses_each_agents_own_weights():
    rng = np.random.default_rng(0)
    c = Controller(z_dim=4, hidden=6, action_dim=2)
    params = rng.normal(size=(5, c.n_params)).astype(np.float32)
    z, h = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
    a = c.act_batch(params, z, h)
    assert a.shape == (5, 2) and np.all(np.abs(a) <= 1)
    for i in range(5):
        W, b = c.unflatten(params[i])
        np.testing.assert_allclose(a[i], np.tanh(W @ np.concatenate([z[i], h[i]]) + b), rtol=1e-5, atol=1e-6)
    shared = c.act_batch(params[0], z, h)
    np.testing.assert_allclose(shared[0], a[0], rtol=1e-6)
    with pytest.raises(ValueError, match="weight rows"):
        c.act_batch(params[:3], z, h)


def test_save_and_load(tmp_path):
    c = Controller(3, 5, 1, params=np.linspace(-1, 1, 9))
    c.save(tmp_path / "controller.npz")
    d = Controller.load(tmp_path / "controller.npz")
    assert (d.z_dim, d.hidden, d.action_dim) == (3, 5, 1)
    np.testing.assert_array_equal(d.params, c.params)
    with np.load(tmp_path / "controller.npz", allow_pickle=False) as f:
        assert f["W"].shape == (1, 8) and f["b"].shape == (1,)
    with pytest.raises(UserError, match="train-controller"):
        Controller.load(tmp_path / "missing.npz")
