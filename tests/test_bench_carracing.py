"""The CarRacing throughput benchmark measures real steps and turns them into the paper's cost."""
from __future__ import annotations

import pytest

pytest.importorskip("Box2D")


def test_carracing_bench_counts_steps_and_prices_the_paper_setting(monkeypatch):
    from benchmarks import bench_carracing as bc
    from benchmarks.run import _other_row

    w = bc._weights(0, 2)
    assert bc.agent_rate(w, 2, 5, 0) > 0 and bc.agent_rate(w, 2, 6, 0, frame_skip=2) > 0
    assert bc.raw_rate(0.2) > 0 and bc.raw_rate(0.2, stock=True) > 0

    monkeypatch.setattr(bc, "raw_rate", lambda seconds, seed=0, stock=False: 500.0 if stock else 1000.0)
    monkeypatch.setattr(bc, "agent_rate", lambda weights, n, steps, seed, frame_skip=1: 100.0 * n * frame_skip)
    res = bc.measure(quick=True)
    assert res["best"] == "agent_16env" and res["best_vs_raw"] == pytest.approx(1.6)
    assert res["raw_vs_stock_road"] == pytest.approx(2.0) and res["frame_skip2_vs_1"] == pytest.approx(2.0)
    paper = res["paper_setting"]
    assert paper["env_steps"] == 64 * 16 * 1000 * 1800
    assert paper["worker_hours"] == pytest.approx(paper["env_steps"] / 1600.0 / 3600)
    assert "worker-hours" in _other_row("carracing", res)


def test_benchmarks_import_chainer_only_after_the_compat_shims():
    import subprocess
    import sys
    from pathlib import Path

    code = "import benchmarks.run, benchmarks.bench_carracing, benchmarks.bench_toolkit"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
