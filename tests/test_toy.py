"""The MDN toy end to end through the CLI on a small budget."""
from __future__ import annotations

import json

from wm_trainer.cli import main


def test_mdn_toy_beats_mse_and_covers_branches(tmp_path):
    argv = ["mdn-toy", "-c", "configs/mdn_toy.yaml",
            "--set", f"experiment.out_dir={tmp_path}", "--set", "toy.iterations=1000",
            "--set", "toy.samples=1500", "--set", "debug.gradients.histograms_every=200"]
    assert main(argv) == 0
    run = tmp_path / "mdn_toy"
    for name in ("data.png", "mse.png", "mdn.png", "metrics.json", "config.yaml"):
        assert (run / name).stat().st_size > 0, name
    m = json.loads((run / "metrics.json").read_text())
    # the MSE net, read as a Gaussian, cannot explain three branches; the MDN can
    assert m["mse_nll_test"] - m["mdn_nll_test"] > 0.5, m
    # samples land near the true branches about as often as the noisy data itself does
    assert m["samples_near_branch"] > m["data_near_branch"] - 0.08, m
    assert m["branches_covered"] > 0.9, m
    assert (run / "mdn" / "tb").is_dir()


def test_mdn_toy_float64(tmp_path):
    argv = ["mdn-toy", "-c", "configs/mdn_toy.yaml", "--float64",
            "--set", f"experiment.out_dir={tmp_path}", "--set", "toy.iterations=50", "--set", "toy.samples=200"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "mdn_toy" / "metrics.json").read_text())
    assert metrics["param_dtypes"] == ["float64"]  # what both trained networks hold, not the flag


def test_ops_switch_reaches_the_models(tmp_path):
    import chainer

    from wm_trainer.models.vision import ConvVAE
    from wm_trainer.ops import fast_ops_enabled

    argv = ["mdn-toy", "-c", "configs/mdn_toy.yaml", "--set", "experiment.ops=chainer",
            "--set", f"experiment.out_dir={tmp_path}", "--set", "toy.iterations=5", "--set", "toy.samples=50"]
    assert main(argv) == 0
    assert not fast_ops_enabled()
    from wm_trainer.ops.links import FastConvolution2D

    conv = ConvVAE(32).conv1
    assert isinstance(conv, chainer.links.Convolution2D) and not isinstance(conv, FastConvolution2D)
