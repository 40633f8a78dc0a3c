"""The compiled per-iteration loops (numba) against their NumPy twins, and the toolkit on either."""
from __future__ import annotations

import chainer
import numpy as np
import pytest

import extensions as ext
from extensions import kernels
from extensions.stats import gradient_summary

needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba not importable here")


@pytest.fixture(params=["compiled", "numpy"])
def kernel_kind(request):
    """Run a test on the compiled loops (skipped without numba) and on NumPy."""
    if request.param == "compiled" and not kernels.available():
        pytest.skip("numba not importable here")
    kernels.use(request.param == "compiled")
    yield request.param
    kernels.use(True)


def _segments(dtype):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(n).astype(dtype) for n in (1, 7, 64, 300)]
    parts[1][[0, 3]] = 0.0
    parts[2][5] = np.nan
    parts[2][6] = 0.0  # a zero beside a NaN is still counted
    parts[3][10] = -np.inf
    work = np.concatenate(parts)
    bounds = np.concatenate(([0], np.cumsum([p.size for p in parts]))).astype(np.int64)
    return parts, work, bounds


def _check_row(parts, row):
    """``row`` (global norm, then 7 statistics per part) against a float64 reference of ``parts``."""
    table = row[1:].reshape(-1, 7)
    for s, p in enumerate(parts):
        x = p.astype(np.float64).ravel()
        q = (x * x).sum()
        mean = x.sum() / x.size
        with np.errstate(invalid="ignore"):
            std = np.sqrt(max(q / x.size - mean * mean, 0.0)) if np.isfinite(q) else np.nan
        want = [np.sqrt(q), mean, std, np.abs(x).max(), np.count_nonzero(x == 0) / x.size,
                np.count_nonzero(np.isnan(x)), np.count_nonzero(np.isinf(x))]
        np.testing.assert_allclose(table[s], want, rtol=1e-12, atol=1e-15)  # NaN where the reference has one


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_table_matches_a_float64_reference(kernel_kind, dtype):
    parts, work, bounds = _segments(dtype)
    row = np.full(1 + 7 * len(parts), -1.0)
    total = kernels.segment_table(work, bounds, row)
    _check_row(parts, row)
    assert np.isnan(total) and np.isnan(row[0])  # a NaN in one segment makes the total non-finite
    finite = work[:bounds[2]]
    row2 = np.empty(1 + 7 * 2)
    expected = float((finite.astype(np.float64) ** 2).sum())
    assert kernels.segment_table(finite, bounds[:3], row2) == pytest.approx(expected, rel=1e-12)
    assert row2[0] == pytest.approx(np.sqrt(expected), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tuple_table_reads_each_array_in_place(kernel_kind, dtype):
    """The same statistics from a tuple of arrays of any shape and layout (2-D, Fortran order, strided) as from
    their gather."""
    parts, work, _ = _segments(dtype)
    arrays = (parts[0].reshape(1, 1), parts[1], np.asfortranarray(parts[2].reshape(8, 8)),
              np.repeat(parts[3], 2)[::2].reshape(30, 10))
    assert not arrays[2].flags.c_contiguous and not arrays[3].flags.contiguous
    row = np.full(1 + 7 * len(arrays), -1.0)
    total = kernels.tuple_table_for(dtype)(arrays, row)
    _check_row(arrays, row)
    assert np.isnan(total)
    finite = arrays[:2]
    row2 = np.empty(1 + 7 * 2)
    expected = float(sum((a.astype(np.float64) ** 2).sum() for a in finite))
    assert kernels.tuple_table_for(dtype)(finite, row2) == pytest.approx(expected, rel=1e-12)
    _check_row(finite, row2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_all_finite(kernel_kind, dtype):
    big = np.finfo(dtype).max
    assert kernels.all_finite(np.array([0.0, -big, big], dtype))  # huge but finite: no overflow, no warning
    for bad in (np.nan, np.inf, -np.inf):
        values = np.zeros(33, dtype)
        values[17] = bad
        assert not kernels.all_finite(values)
    assert kernels.all_finite(np.zeros(0, dtype))


def test_both_paths_give_the_same_gradient_summary():
    """The statistics the reporter gets do not depend on whether numba is there."""
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (4,), (200, 5), (1,))]
    grads[1][:] = 0.0
    names = ["a/W", "a/b", "c/W", "c/b"]
    results = []
    for compiled in ([True, False] if kernels.available() else [False]):
        kernels.use(compiled)
        try:
            results.append(gradient_summary(names, grads))
        finally:
            kernels.use(True)
    for summary in results:
        np.testing.assert_allclose(summary.table, results[0].table, rtol=1e-12)
        assert summary.stats["a/b"]["zero_frac"] == 1.0
        assert summary.global_norm == pytest.approx(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                                                                for g in grads)), rel=1e-12)


def test_environment_switch_turns_the_compiled_loops_off(monkeypatch):
    monkeypatch.setenv("EXTENSIONS_KERNELS", "numpy")
    kernels.use(True)
    try:
        assert not kernels.available()
    finally:
        monkeypatch.delenv("EXTENSIONS_KERNELS")
        kernels.use(True)


def test_toolkit_rolls_back_a_small_net_on_either_path(tmp_path, kernel_kind):
    """A step that overflows is caught and undone bit for bit, with the compiled loops or NumPy's."""
    np.random.seed(0)
    model = chainer.links.Classifier(chainer.Sequential(chainer.links.Linear(6, 8), chainer.functions.relu,
                                                        chainer.links.Linear(8, 3)))
    opt = chainer.optimizers.Adam(1e-3)
    opt.setup(model)
    rng = np.random.RandomState(0)
    data = chainer.datasets.TupleDataset(rng.randn(40, 6).astype(np.float32), rng.randint(0, 3, 40).astype(np.int32))
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data, 10), opt, -1, out=str(tmp_path),
                                         debug=ext.DebugConfig.from_dict({"nonfinite": {"policy": "skip"}}))
    for _ in range(3):
        updater.update()
    before = {n: (p.array.copy(), p.update_rule.state["m"].copy(), p.update_rule.t) for n, p in model.namedparams()}
    opt.alpha = 1e39
    updater.update()
    assert updater.skipped == 1 and updater.last_failure.where == "update"
    for n, p in model.namedparams():
        np.testing.assert_array_equal(p.array, before[n][0])
        np.testing.assert_array_equal(p.update_rule.state["m"], before[n][1])
        assert p.update_rule.t == before[n][2]


def test_backup_follows_new_update_rules(tmp_path):
    """``optimizer.setup`` again gives every parameter a new rule (no state yet): the copy is planned anew,
    and a failed update afterwards restores the new rules' state and counters."""
    np.random.seed(0)
    model = chainer.Sequential(chainer.links.Linear(5, 4))
    opt = chainer.optimizers.Adam(1e-3)
    opt.setup(model)
    data = chainer.datasets.TupleDataset(np.random.randn(20, 5).astype(np.float32))
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data, 5), opt, -1, out=str(tmp_path),
                                         loss_func=lambda x: chainer.functions.sum(model(x) ** 2),
                                         debug=ext.DebugConfig.from_dict({"nonfinite": {"policy": "skip"}}))
    updater.update()
    updater.update()
    old_rules = [p.update_rule for p in model.params()]
    opt2 = chainer.optimizers.Adam(1e-3)
    opt2.setup(model)
    opt2.use_auto_new_epoch = True  # as StandardUpdater sets for its own optimizers
    updater._optimizers["main"] = opt2
    updater.update()
    updater.update()
    rules = [p.update_rule for p in model.params()]
    assert all(a is not b for a, b in zip(rules, old_rules))
    saved = updater._ext.guards["main"].backup.arrays
    assert all(any(r.state["v"] is a for a in saved) for r in rules)
    before = [(p.array.copy(), p.update_rule.state["v"].copy(), p.update_rule.t) for p in model.params()]
    opt2.alpha = 1e39
    updater.update()
    assert updater.skipped == 1
    for p, (w, v, t) in zip(model.params(), before):
        np.testing.assert_array_equal(p.array, w)
        np.testing.assert_array_equal(p.update_rule.state["v"], v)
        assert p.update_rule.t == t


@needs_numba
def test_compiled_histograms_match_numpys():
    """One compiled pass over many arrays gives the buckets ``np.histogram`` gives each, values on the bucket
    edges (the last one included), zeros, NaN and Inf included; finite values beyond the buckets go the NumPy way."""
    from extensions.tensorboard import _DEFAULT_BINS, _host_histograms, histogram_values

    rng = np.random.default_rng(2)
    edges = _DEFAULT_BINS[[0, 1, 700, 749, 750, 751, 900, -2, -1]]
    arrays = {"w": rng.standard_normal((30, 20)).astype(np.float32) * 1e-3,
              "edges": np.concatenate([edges, -edges[:5], [0.0, 0.0]]),
              "bad": np.array([1.0, np.nan, np.inf, -np.inf, -2.5], np.float32),
              "allnan": np.full(4, np.nan, np.float32),
              "huge": np.array([1e30, 1.0])}
    done = _host_histograms(arrays)
    assert set(done) == {"w", "edges", "bad", "allnan"}  # "huge" is left to np.histogram's 30 uniform buckets
    for tag, (values, counts) in done.items():
        want_values, want_counts = histogram_values(tag, arrays[tag])
        assert counts == want_counts
        assert [v.tag for v in values] == [v.tag for v in want_values]
        for got, want in zip(values, want_values):
            if got.HasField("histo"):
                g, w = got.histo, want.histo
                assert list(g.bucket) == list(w.bucket) and list(g.bucket_limit) == list(w.bucket_limit)
                assert (g.min, g.max, g.num) == (w.min, w.max, w.num)
                assert g.sum == pytest.approx(w.sum, rel=1e-9)
                assert g.sum_squares == pytest.approx(w.sum_squares, rel=1e-5)
            else:
                assert got.simple_value == want.simple_value


@needs_numba
def test_a_numba_that_cannot_compile_falls_back_to_numpy_with_a_warning(monkeypatch):
    import numba

    def broken(*args, **kwargs):
        def wrap(fn):
            def fail(*a):
                raise numba.core.errors.TypingError("no such signature here")
            return fail
        return wrap

    monkeypatch.setattr(numba, "njit", broken)
    kernels.use(True)
    try:
        with pytest.warns(RuntimeWarning, match="numba could not compile"):
            assert not kernels.available()
        row = np.empty(8)
        assert kernels.segment_table(np.array([3.0, 4.0]), np.array([0, 2]), row) == 25.0 and row[0] == 5.0
    finally:
        monkeypatch.undo()
        kernels.use(True)


@needs_numba
def test_gradient_pass_falls_back_to_numpy_for_arrays_numba_cannot_compile():
    """A net's gradients turning float16 (numba has no float16 loops) warn once and get NumPy's statistics."""
    from extensions.stats import HostGradients

    kernels.use(True)
    grads = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.zeros(3, np.float32)]
    host = HostGradients.fitting(["a", "b"], grads)
    total, row = host.table(grads)
    half = [g.astype(np.float16) for g in grads]
    with pytest.warns(RuntimeWarning, match="NumPy from now on"):
        total16, row16 = host.table(half)
    assert total16 == pytest.approx(total, rel=1e-3)
    _check_row(half, row16)
    assert host.kernel is kernels.numpy_tuple_table


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_big_sums_in_one_pass_match_numpy_and_float64(dtype):
    """A big gradient's sum, sum of squares, max |x| (the largest magnitude negative here) and zero count (both
    signed zeros) from the one-pass loop equal a float64 reference and NumPy's chunked path; a NaN shows as
    max |x|, and a non-finite array goes to NumPy, which settles it."""
    from extensions.stats import BIG, _big_stats

    kernels.use(True)
    rng = np.random.default_rng(3)
    a = rng.standard_normal(3 * BIG + 5).astype(dtype)
    a[::7] = 0.0
    a[1] = -0.0
    a[100] = -9.5
    x = a.astype(np.float64)
    acc, sq, hi, zeros = kernels.big_sums(a)
    assert acc == pytest.approx(x.sum(), rel=1e-12) and sq == pytest.approx((x * x).sum(), rel=1e-12)
    assert hi == 9.5 and zeros == np.count_nonzero(x == 0)
    compiled = _big_stats(a)
    kernels.use(False)
    try:
        assert kernels.big_sums(a) is None
        np.testing.assert_allclose(_big_stats(a), compiled, rtol=1e-6)
    finally:
        kernels.use(True)
    b = a.copy()
    b[50] = np.nan
    assert np.isnan(kernels.big_sums(b)[2])
    b[50] = -np.inf
    assert kernels.big_sums(b)[2] == np.inf
    assert _big_stats(b)[2] == np.inf  # NumPy settles a non-finite array


def test_many_small_gradients_take_the_general_path():
    """A net with more than MAX_ARRAYS parameters gets no compiled pass of its own (its compile time grows with
    their number); the general path gives its statistics."""
    from extensions.stats import MAX_ARRAYS, HostGradients

    model = chainer.ChainList(*[chainer.links.Linear(2, 2) for _ in range(MAX_ARRAYS // 2 + 1)])
    names = [n.lstrip("/") for n, _ in model.namedparams()]
    grads = [np.full(p.shape, i + 1.0, np.float32) for i, (_, p) in enumerate(model.namedparams())]
    assert len(grads) > MAX_ARRAYS and HostGradients.fitting(names, grads) is None
    assert HostGradients.fitting(names[:MAX_ARRAYS], grads[:MAX_ARRAYS]) is not None
    summary = gradient_summary(names, grads)
    assert summary.stats[names[-1]]["norm"] == pytest.approx(len(grads) * np.sqrt(grads[-1].size))
