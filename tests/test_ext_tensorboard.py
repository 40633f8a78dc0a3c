"""TensorBoard output read back with tensorboard's EventAccumulator: scalars, NaN-safe histograms, images."""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import extensions as ext


def filled_buckets(h):
    """(left edge, right edge, count) of each non-empty bucket of a HistogramProto."""
    limits, counts = list(h.bucket_limit), list(h.bucket)
    return [(limits[i - 1] if i else None, limits[i], c) for i, c in enumerate(counts) if c]


def load(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


class Net(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(3, 4)
            self.l2 = L.Linear(4, 1)

    def forward(self, x, t):
        loss = F.mean_squared_error(self.l2(F.relu(self.l1(x))), t)
        chainer.reporter.report({"loss": loss}, self)
        return loss


def make(tmp_path, debug, iterations=4, bad_batch=None):
    rng = np.random.RandomState(0)
    x = rng.rand(20, 3).astype(np.float32)
    if bad_batch is not None:
        x[bad_batch * 5] = np.nan
    data = chainer.datasets.TupleDataset(x, rng.rand(20, 1).astype(np.float32))
    model = Net()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    updater = ext.GradientLoggingUpdater(chainer.iterators.SerialIterator(data, 5, shuffle=False), opt, -1)
    trainer = chainer.training.Trainer(updater, (iterations, "iteration"), out=str(tmp_path))
    ext.install(trainer, debug)
    return trainer


def test_scalars_and_histograms_from_a_trainer(tmp_path):
    trainer = make(tmp_path, {"gradients": {"histograms_every": 2}})
    writer = ext.get_writer(trainer)
    assert writer is not None
    ext.install(trainer, {"gradients": {"histograms_every": 2}})  # idempotent: one writer, one extension
    assert ext.get_writer(trainer) is writer
    trainer.run()
    acc = load(tmp_path / "tb")
    tags = acc.Tags()
    for tag in ("main/loss", "grad/global_norm", "grad/l1/W/norm", "grad/l2/b/max_abs", "grad/l1/W/nan"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4], tag
    norms = [e.value for e in acc.Scalars("grad/global_norm")]
    assert len(set(norms)) == 4  # a value per iteration
    assert set(tags["histograms"]) == {"grad/l1/W", "grad/l1/b", "grad/l2/W", "grad/l2/b",
                                       "param/l1/W", "param/l1/b", "param/l2/W", "param/l2/b"}
    assert [e.step for e in acc.Histograms("param/l1/W")] == [2, 4]
    assert acc.Histograms("param/l1/W")[0].histogram_value.num == 12


def test_histograms_with_nan_present_during_training(tmp_path):
    trainer = make(tmp_path, {"gradients": {"histograms_every": 1}, "nonfinite": {"policy": "skip"}}, bad_batch=1)
    trainer.run()
    acc = load(tmp_path / "tb")
    nan_counts = {e.step: e.value for e in acc.Scalars("grad/l1/W/nan")}
    assert nan_counts[2] > 0 and nan_counts[1] == 0 and nan_counts[3] == 0
    hist_steps = [e.step for e in acc.Histograms("grad/l2/W")]
    assert 1 in hist_steps and 3 in hist_steps
    assert [e.value for e in acc.Scalars("nonfinite/skipped")] == [1.0]


def test_add_histogram_safe_and_images(tmp_path):
    writer = ext.open_writer(tmp_path / "plain")  # no Trainer (e.g. CMA-ES)
    a = np.array([1.0, 2.0, np.nan, np.inf, -np.inf, 3.0], np.float32)
    assert ext.add_histogram_safe(writer, "w", a, 5) == {"nan": 1, "inf": 2}
    ext.add_histogram_safe(writer, "allnan", np.full(3, np.nan), 5)
    images = np.random.RandomState(0).rand(5, 8, 6, 3)
    grid = ext.add_image_grid(writer, "recon", images, 7)
    ext.add_image_grid(writer, "gray", (np.ones((4, 8, 8)) * 255).astype(np.uint8), 7)
    writer.close()
    acc = load(tmp_path / "plain")
    hist = acc.Histograms("w")[0].histogram_value
    assert (hist.num, hist.min, hist.max) == (3, 1.0, 3.0)
    assert "allnan" not in acc.Tags()["histograms"] and acc.Scalars("allnan/nan_count")[0].value == 3
    assert acc.Scalars("w/inf_count")[0].value == 2
    img = acc.Images("recon")[0]
    assert (img.step, img.height, img.width) == (7, 16, 18) and grid.shape == (16, 18, 3)
    assert grid.dtype == np.uint8 and grid[:8, :6].tolist() == (images[0] * 255 + 0.5).astype(np.uint8).tolist()
    assert (acc.Images("gray")[0].height, acc.Images("gray")[0].width) == (16, 16)


def test_tensorboard_off_and_custom_logdir(tmp_path):
    trainer = make(tmp_path / "off", {"tensorboard": {"logdir": False}}, iterations=1)
    assert ext.get_writer(trainer) is None
    trainer.run()
    assert not (tmp_path / "off" / "tb").exists()
    trainer = make(tmp_path / "custom", {"tensorboard": {"logdir": str(tmp_path / "elsewhere")}}, iterations=2)
    trainer.run()
    assert [e.step for e in load(tmp_path / "elsewhere").Scalars("main/loss")] == [1, 2]


def test_plain_updater_is_guarded_through_its_optimizer(tmp_path):
    model = Net()
    opt = chainer.optimizers.SGD(0.1)
    opt.setup(model)
    x = np.random.RandomState(0).rand(10, 3).astype(np.float32)
    it = chainer.iterators.SerialIterator(chainer.datasets.TupleDataset(x, x[:, :1]), 5)
    trainer = chainer.training.Trainer(chainer.training.updaters.StandardUpdater(it, opt, device=-1),
                                       (2, "iteration"), out=str(tmp_path))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Chainer's own updater goes through optimizer.update: nothing to warn of
        ext.install(trainer, {"gradients": {"histograms_every": 1}})
    trainer.run()
    acc = load(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("grad/l1/W/norm")] == [1, 2]
    assert "param/l2/W" in acc.Tags()["histograms"]


def test_scalar_events_are_protobufs_encoding():
    """The hand-serialised scalar events are byte for byte what protobuf writes for the same Event."""
    from tensorboardX.proto.event_pb2 import Event

    from extensions.tensorboard import encode_event, encode_scalars, scalar_summary

    values = {"a": 1.5, "b/ü": -2.0, "x" * 200: np.float32(3.25), "nan": float("nan"), "inf": -np.inf,
              "big": 1e40, "int": 7, "var": chainer.Variable(np.array(0.5, np.float32)), "flag": True,
              "vector": np.ones(3)}
    for step, walltime in ((0, 0.0), (1, 1.5), (300, 1.7e9), (2 ** 40, 12.0)):
        want = Event(wall_time=walltime, step=step, summary=scalar_summary(values)).SerializeToString()
        assert encode_event(encode_scalars(values), step, walltime) == want
    assert encode_scalars({"vector": np.ones(3)}) == b""


def test_gradient_statistics_encoded_as_rows_match_the_dict_encoding():
    """The updater's rows of statistics, encoded together at the flush, are the same bytes as the dict path,
    values beyond float32 (written as +-inf), NaN, -0.0 and float32 denormals included."""
    from extensions.tensorboard import encode_rows, encode_scalars

    g = np.array([[0.0, 3e30], [-4.0, np.nan]], np.float32)
    for summary in (ext.gradient_summary(["l1/W", "l1/b"], [g, None]),
                    ext.gradient_summary(["l1/W"], [np.array([1.0, -2.0, 0.0], np.float32)]),
                    ext.gradient_summary(["l1/W"], [np.array([1.0], np.float32)], with_stats=False)):
        tags, values = summary.report_items()
        assert dict(zip(tags, values)) == pytest.approx(summary.as_report(), nan_ok=True)
        keys, row = summary.report_array()
        assert keys == tags and row.tolist() == pytest.approx(values, nan_ok=True)
        assert encode_rows(tags, row[None]) == [encode_scalars(summary.as_report())]  # 3e30 squared: beyond float32
    tags = ("a", "b/c", "x" * 200)
    rows = np.array([[1.5, -1e39, 0.0], [np.nan, -0.0, 1e-45], [3.4028235e38, 1e39, -7.25]])
    assert encode_rows(tags, rows) == [encode_scalars(dict(zip(tags, r))) for r in rows.tolist()]


def test_staged_rows_reach_tensorboard_with_their_steps(tmp_path):
    """Rows staged at each iteration are written at the flush, each with its own step, beside the observation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from extensions.tensorboard import TensorBoardReport

    class Updater:
        iteration = 0

    class Trainer:
        updater = Updater()
        observation: dict = {}

    report = TensorBoardReport(ext.open_writer(tmp_path), batch=3)
    trainer = Trainer()
    for it in range(1, 8):
        trainer.updater.iteration = it
        trainer.observation = {"main/loss": float(it)}
        if it != 4:  # a row staged for another iteration is not written with this one
            report.stage((("grad/global_norm", "grad/l/W/norm"), np.array([10.0 * it, -1.0 * it])), it)
        else:
            report.stage((("grad/global_norm",), np.array([99.0])), 3)
        report(trainer)
    report.finalize()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    steps = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert steps["main/loss"] == [(i, float(i)) for i in range(1, 8)]
    assert steps["grad/global_norm"] == [(i, 10.0 * i) for i in range(1, 8) if i != 4]
    assert steps["grad/l/W/norm"] == [(i, -1.0 * i) for i in range(1, 8) if i != 4]


def test_histograms_match_tensorboardx_and_survive_huge_values(tmp_path):
    rng = np.random.RandomState(0)
    big = (rng.randn(50_000) * 1e-3).astype(np.float32)
    with_nan = big.copy()
    with_nan[:5] = np.nan
    reference = ext.open_writer(tmp_path / "ref")
    reference.add_histogram("big", big.astype(np.float64), 3)
    reference.close()
    writer = ext.open_writer(tmp_path / "ours")
    counts = ext.add_histograms_safe(writer, {"big": big, "nan": with_nan, "huge": np.array([1e30, -2e30, 5.0])}, 3)
    writer.close()
    assert counts == {"big": {"nan": 0, "inf": 0}, "nan": {"nan": 5, "inf": 0}, "huge": {"nan": 0, "inf": 0}}
    want = load(tmp_path / "ref").Histograms("big")[0].histogram_value
    acc = load(tmp_path / "ours")
    got = acc.Histograms("big")[0].histogram_value
    # the same histogram: runs of empty buckets are written as one (as TensorFlow does), so compare the
    # non-empty buckets with their left and right edges
    assert filled_buckets(got) == filled_buckets(want)
    assert len(got.bucket) < len(want.bucket)
    assert (got.num, got.min, got.max) == (want.num, want.min, want.max)
    assert got.sum == pytest.approx(want.sum) and got.sum_squares == pytest.approx(want.sum_squares, rel=1e-5)
    assert acc.Histograms("nan")[0].histogram_value.num == big.size - 5
    huge = acc.Histograms("huge")[0].histogram_value  # beyond tensorboardX's buckets: it used to fail here
    assert (huge.num, huge.min, huge.max) == (3, -2e30, 1e30) and sum(huge.bucket) == 3
    assert acc.Scalars("nan/nan_count")[0].value == 5


def test_records_written_in_one_piece_are_tensorboardx_records(tmp_path):
    """The flush frames its events itself and writes them at once: the same bytes as tensorboardX's RecordWriter."""
    from tensorboardX.record_writer import RecordWriter

    from extensions.tensorboard import tf_records

    payloads = [b"", b"x", bytes(range(256)) * 3, b"event" * 1000]
    path = tmp_path / "ref.tfevents"
    ref = RecordWriter(str(path))
    for p in payloads:
        ref.write(p)
    ref.close()
    assert tf_records(payloads) == path.read_bytes()
