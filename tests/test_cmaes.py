"""CMA-ES: improves a toy fitness, and a saved-then-loaded optimiser continues exactly where it stopped."""
import json

import numpy as np
import pytest

from wm_trainer.base.errors import UserError
from wm_trainer.training.cmaes import CMAES


def sphere(X: np.ndarray) -> np.ndarray:
    """Fitness to maximise: minus the squared distance to (0.5, ..., 0.5)."""
    return -np.sum((X - 0.5) ** 2, axis=1)


def test_improves_sphere_in_a_few_generations():
    opt = CMAES(n_params=10, population=12, sigma0=0.1, seed=1)
    start = sphere(opt.mean[None])[0]
    for _ in range(40):
        X = opt.ask()
        assert X.shape == (12, 10)
        opt.tell(X, sphere(X))
    assert opt.generation == 40
    assert sphere(opt.mean[None])[0] > 0.2 * start  # from -2.5: at least 80% closer
    assert opt.best[1] >= sphere(opt.mean[None])[0] - 0.05


@pytest.mark.parametrize("n_params", [12, 150])  # 150 switches pycma to its TPA step-size rule
def test_resume_after_kill_reproduces_the_same_generations(tmp_path, n_params):
    straight = CMAES(n_params, population=8, sigma0=0.1, seed=7)
    asked = []
    for _ in range(3):
        X = straight.ask()
        asked.append(X)
        straight.tell(X, sphere(X))

    first = CMAES(n_params, population=8, sigma0=0.1, seed=7)
    for _ in range(2):
        X = first.ask()
        first.tell(X, sphere(X))
    first.save(tmp_path / "cmaes.npz", extra={"generation_log": [1, 2]})
    del first  # the "kill"

    resumed, extra = CMAES.load(tmp_path / "cmaes.npz")
    assert extra == {"generation_log": [1, 2]}
    assert resumed.generation == 2
    X = resumed.ask()
    np.testing.assert_array_equal(X, asked[2])
    resumed.tell(X, sphere(X))
    np.testing.assert_array_equal(resumed.mean, straight.mean)
    assert resumed.sigma == straight.sigma
    assert resumed.best[1] == straight.best[1]


def test_state_is_data_not_pickle(tmp_path):
    opt = CMAES(5, population=6, sigma0=0.2, seed=0)
    X = opt.ask()
    opt.tell(X, sphere(X))
    opt.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        assert {"x0", "rng_key", "es/mean", "es/sm.C", "es/pc", "es/adapt_sigma.ps"} <= set(f.files)
    assert meta["es"]["countiter"] == 1 and meta["es"]["countevals"] == 6


def test_damaged_state_is_a_user_error(tmp_path):
    bad = tmp_path / "s.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(UserError, match="s.npz"):
        CMAES.load(bad)
