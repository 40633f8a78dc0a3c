"""V: the ConvVAE's size and loss, the frame converter, and `wm-trainer train-vae` (resume, float64, TensorBoard)."""
from __future__ import annotations

import chainer
import numpy as np
import pytest

from wm_trainer import cli
from wm_trainer.base.storage import RunPaths
from wm_trainer.models.vision import ConvVAE, frames_converter


def test_paper_vae_has_4348547_parameters(synthetic_frames):
    model = ConvVAE(32)
    assert sum(p.size for p in model.params()) == 4_348_547
    x = frames_converter(synthetic_frames(2, 0))
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 32)
    assert model.decode(mu).shape == (2, 3, 64, 64)


def test_frames_converter_scales_and_follows_the_global_dtype(synthetic_frames):
    frames = synthetic_frames(3, 1)
    x = frames_converter(frames)
    assert x.shape == (3, 3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, 2], frames[1, :, :, 2] / 255.0, rtol=1e-6)
    with chainer.using_config("dtype", np.dtype(np.float64)):
        assert frames_converter(frames).dtype == np.float64


def test_loss_is_reconstruction_plus_free_bits_kl(synthetic_frames):
    np.random.seed(0)
    model = ConvVAE(4, kl_tolerance=0.5)
    x = frames_converter(synthetic_frames(4, 2))
    reporter = chainer.reporter.Reporter()
    reporter.add_observer("v", model)
    obs: dict = {}
    with reporter.scope(obs):
        loss = model.loss(x)
    rec, kl = float(obs["v/rec"].array), float(obs["v/kl"].array)
    assert float(loss.array) == pytest.approx(rec + max(kl, 0.5 * 4), rel=1e-6)
    # with a floor above the KL, the KL term sends no gradient to the encoder's logvar head
    model.kl_tolerance = 1e6
    model.cleargrads()
    np.random.seed(0)
    model.loss(x).backward()
    g_floor = model.logvar.W.grad.copy()
    model.kl_tolerance = 0.0
    model.cleargrads()
    np.random.seed(0)
    model.loss(x).backward()
    assert not np.allclose(g_floor, model.logvar.W.grad)


def test_vae_loss_decreases_on_a_tiny_set(synthetic_frames):
    np.random.seed(0)
    model = ConvVAE(8)
    opt = chainer.optimizers.Adam(alpha=1e-3)
    opt.setup(model)
    x = frames_converter(np.concatenate([synthetic_frames(8, s) for s in range(2)]))
    losses = []
    for _ in range(25):
        model.cleargrads()
        loss = model.loss(x)
        loss.backward()
        opt.update()
        losses.append(float(loss.array))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def test_train_vae_cli_resumes_the_same_run_and_writes_tensorboard(tmp_path, monkeypatch, make_episodes, write_config,
                                                                   npz_arrays):
    from extensions import GradientLoggingUpdater

    for name in ("full", "part"):
        make_episodes(RunPaths(tmp_path / name).episodes)
    assert cli.main(["train-vae", "-c", write_config(tmp_path, "full")]) == 0
    part = write_config(tmp_path, "part", vae={"max_iterations": 2})
    assert cli.main(["train-vae", "-c", part]) == 0
    calls = []
    original = GradientLoggingUpdater.compute_loss
    monkeypatch.setattr(GradientLoggingUpdater, "compute_loss", lambda self, a: calls.append(1) or original(self, a))
    assert cli.main(["train-vae", "-c", part, "--set", "vae.max_iterations=4"]) == 0
    assert len(calls) == 2  # resumed at iteration 2
    a, b = npz_arrays(RunPaths(tmp_path / "full").vae_model), npz_arrays(RunPaths(tmp_path / "part").vae_model)
    assert a.keys() == b.keys() and len(a) == 2 * 11
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    vae_dir = RunPaths(tmp_path / "full").vae_dir
    log = (vae_dir / "log").read_text()
    assert '"main/rec"' in log and '"main/kl"' in log and "grad/" in log
    events = b"".join(p.read_bytes() for p in (vae_dir / "tb").glob("events*"))
    assert b"vae/reconstruction" in events


def test_train_vae_float64_switch(tmp_path, make_episodes, write_config, npz_arrays):
    make_episodes(RunPaths(tmp_path / "f64").episodes, n_episodes=1, length=8)
    cfg = write_config(tmp_path, "f64", vae={"max_iterations": 1, "recon_every": 0})
    assert cli.main(["train-vae", "-c", cfg, "--float64"]) == 0
    w = npz_arrays(RunPaths(tmp_path / "f64").vae_model)
    assert all(v.dtype == np.float64 for v in w.values())


def test_train_vae_without_episodes_says_run_collect(tmp_path, capsys, write_config):
    assert cli.main(["train-vae", "-c", write_config(tmp_path, "none")]) == 2
    err = capsys.readouterr().err
    assert "wm-trainer collect" in err and len(err.strip().splitlines()) == 1
