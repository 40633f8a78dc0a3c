"""`wm-trainer encode`: shapes, resume, corrupt files; then the chain train-vae -> encode -> train-mdnrnn -> dream."""
from __future__ import annotations

import chainer
import numpy as np
import pytest

from wm_trainer import cli
from wm_trainer.base.storage import RunPaths
from wm_trainer.config import load_config
from wm_trainer.encode import encode_frames
from wm_trainer.models.memory import load_mdnrnn
from wm_trainer.models.vision import load_vae
from wm_trainer.sim.dream import DreamEnv, decode_frames, initial_latents


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, make_episodes, write_config):
    """A tiny run with 3 episodes (one of 13 frames) and a V trained for 2 iterations."""
    tmp = tmp_path_factory.mktemp("enc")
    paths = RunPaths(tmp / "run")
    make_episodes(paths.episodes, n_episodes=2, length=20, action_dim=3)
    # a third, shorter episode, saved under the next index
    make_episodes(tmp / "extra", n_episodes=3, length=13, action_dim=3)
    (tmp / "extra" / "ep_000002.npz").rename(paths.episodes / "ep_000002.npz")
    cfg = write_config(tmp, "run", vae={"max_iterations": 2, "recon_every": 0})
    assert cli.main(["train-vae", "-c", cfg]) == 0
    return cfg, paths


def test_encode_writes_mu_logvar_with_actions_and_is_resumable(trained_run):
    cfg, paths = trained_run
    assert cli.main(["encode", "-c", cfg]) == 0
    files = sorted(paths.latents.glob("ep_*.npz"))
    assert [f.name for f in files] == ["ep_000000.npz", "ep_000001.npz", "ep_000002.npz"]
    with np.load(files[2]) as d:
        assert d["mu"].shape == d["logvar"].shape == (13, 4)
        assert d["mu"].dtype == d["logvar"].dtype == np.float32
        assert d["actions"].shape == (13, 3) and d["rewards"].shape == (13,) and d["dones"].dtype == bool
        assert d["dones"][-1] and not d["dones"][:-1].any()
        mu = d["mu"]
    # the same numbers as encoding the frames directly, whatever the batch split
    with np.load(paths.episodes / "ep_000002.npz") as e:
        frames = e["frames"]
    vae = load_vae(paths.vae_model, 4)
    np.testing.assert_allclose(encode_frames(vae, frames, batch=100)[0], mu, rtol=1e-4, atol=1e-5)
    # resume: existing outputs are kept, a missing one is redone
    stamp = files[0].stat().st_mtime_ns
    files[1].unlink()
    assert cli.main(["encode", "-c", cfg]) == 0
    assert files[0].stat().st_mtime_ns == stamp and files[1].is_file()
    # a retrained V (new weights file) makes every episode stale
    paths.vae_model.write_bytes(paths.vae_model.read_bytes())
    assert cli.main(["encode", "-c", cfg]) == 0
    assert files[0].stat().st_mtime_ns != stamp


def test_encode_skips_a_corrupt_episode_by_name(trained_run, tmp_path, make_episodes):
    cfg, paths = trained_run
    other = load_config(cfg, [f"experiment.out_dir={tmp_path}"])
    new = RunPaths(other.run_dir)
    make_episodes(new.episodes, n_episodes=2, length=6)
    (new.episodes / "ep_000001.npz").write_bytes(b"PK\x03\x04 truncated")
    new.vae_model.parent.mkdir(parents=True, exist_ok=True)
    new.vae_model.write_bytes(paths.vae_model.read_bytes())
    with pytest.warns(RuntimeWarning, match="ep_000001.npz"):
        assert cli.main(["encode", "-c", cfg, "--set", f"experiment.out_dir={tmp_path}"]) == 0
    assert [p.name for p in new.latents.glob("ep_*.npz")] == ["ep_000000.npz"]


def test_encode_without_vae_says_train_vae(tmp_path, capsys, make_episodes, write_config):
    make_episodes(RunPaths(tmp_path / "novae").episodes, n_episodes=1, length=4)
    assert cli.main(["encode", "-c", write_config(tmp_path, "novae")]) == 2
    err = capsys.readouterr().err
    assert "train-vae" in err and len(err.strip().splitlines()) == 1


def test_chain_train_mdnrnn_then_dream(trained_run):
    cfg, paths = trained_run
    assert cli.main(["encode", "-c", cfg]) == 0
    assert cli.main(["train-mdnrnn", "-c", cfg]) == 0
    config = load_config(cfg)
    m = load_mdnrnn(paths.mdnrnn_model, config, action_dim=3)
    assert m.has_done and m.z_dim == 4
    env = DreamEnv(m, temperature=1.15, max_steps=5, seed=0)
    z, h = env.reset(initial_latents(paths.latents, 7, np.random.default_rng(0)))
    total = np.zeros(7)
    for _ in range(5):
        z, h, r, done = env.step(np.tanh(z[:, :3]))
        total += r
    assert done.all() and (total >= 1).all() and (total <= 5).all()
    frames = decode_frames(load_vae(paths.vae_model, 4), z)
    assert frames.shape == (7, 64, 64, 3) and frames.dtype == np.uint8
    assert chainer.config.train  # the dream did not leave train mode switched off
