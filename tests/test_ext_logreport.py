"""extensions.LogReport: the same log file as Chainer's LogReport, written one entry at a time."""
from __future__ import annotations

import json
import math
import os

import chainer
import chainer.links as L
import numpy as np
import pytest
from chainer import training

import extensions as ext
from extensions.logreport import LogReport


def _trainer(out, log_report, iterations=12, extra=None):
    """A tiny classifier trainer whose observation also gets ``extra(iteration)``'s values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    y = rng.integers(0, 2, 40).astype(np.int32)
    model = L.Classifier(L.Linear(3, 2))
    opt = chainer.optimizers.SGD()
    opt.setup(model)
    it = chainer.iterators.SerialIterator(chainer.datasets.TupleDataset(x, y), 8, shuffle=False)
    trainer = training.Trainer(training.updaters.StandardUpdater(it, opt), (iterations, "iteration"), out=str(out))
    if extra is not None:
        @training.make_extension(trigger=(1, "iteration"), priority=training.PRIORITY_WRITER)
        def report_extra(tr):
            chainer.reporter.report(extra(tr.updater.iteration))
        trainer.extend(report_extra)
    trainer.extend(log_report, name="log_report")
    return trainer


def _extra(i):
    return {"grad/a/norm": float(i) / 3, "grad/a/nan": math.nan if i % 4 == 0 else 0.0,
            "grad/a/max_abs": math.inf if i == 6 else 1e-30 * i}


def _post(entry):
    entry["nested"] = {"list": [1, 2, {"deep": "x\ny"}], "empty": {}}


@pytest.mark.parametrize("kwargs", [{}, {"postprocess": _post}, {"keys": ["main/loss", "grad/a/nan"]}])
def test_same_file_as_chainer_after_every_write(tmp_path, kwargs):
    """Run the same training under Chainer's LogReport and ours: after each write the files are equal byte for byte."""
    chainer_out, ours_out = tmp_path / "chainer", tmp_path / "ours"
    a = _trainer(chainer_out, training.extensions.LogReport(trigger=(2, "iteration"), **kwargs), extra=_extra)
    b = _trainer(ours_out, LogReport(trigger=(2, "iteration"), **kwargs), extra=_extra)
    a.run()
    b.run()
    # elapsed_time differs between the two runs: compare with ours' entries dumped by json itself
    ours = (ours_out / "log").read_bytes()
    assert ours == json.dumps(b.get_extension("log_report").log, indent=4).encode()
    assert len(json.loads(ours)) == len(a.get_extension("log_report").log) == 6
    assert [set(e) for e in json.loads(ours)] == [set(e) for e in json.loads((chainer_out / "log").read_text())]


def test_appends_in_place_and_rewrites_a_file_changed_by_someone_else(tmp_path):
    """Writes after the first append (the file grows by one entry, its start is untouched); a file changed or
    removed in between is written whole again."""
    report = LogReport(trigger=(1, "iteration"))
    trainer = _trainer(tmp_path, report, iterations=3, extra=_extra)
    trainer.run()
    path = tmp_path / "log"
    log = report.log
    assert path.read_bytes() == json.dumps(log, indent=4).encode()
    first = json.dumps(log[:1], indent=4).encode()[:-2]  # the first entry, without the closing "\n]"
    assert path.read_bytes().startswith(first)

    # someone truncates the file: the next write must not append to what is left
    path.write_text("[]")
    report._write(str(tmp_path), "log")
    assert path.read_bytes() == json.dumps(log, indent=4).encode()
    os.remove(path)
    report._write(str(tmp_path), "log")
    assert path.read_bytes() == json.dumps(log, indent=4).encode()


def test_a_loaded_snapshot_is_written_whole(tmp_path):
    """After a snapshot is loaded (log replaced, same length as before) the next write is the loaded log plus one."""
    report = LogReport(trigger=(1, "iteration"))
    trainer = _trainer(tmp_path / "a", report, iterations=4, extra=_extra)
    trainer.run()
    snap = str(tmp_path / "snap.npz")
    chainer.serializers.save_npz(snap, report)
    other = LogReport(trigger=(1, "iteration"))
    trainer2 = _trainer(tmp_path / "a", other, iterations=4, extra=lambda i: {"other": 1.0})
    trainer2.run()  # writes its own 4 entries to the same file
    chainer.serializers.load_npz(snap, other)
    assert other._ext_written is None
    other.log.append({"iteration": 99})
    other._write(str(tmp_path / "a"), "log")
    assert (tmp_path / "a" / "log").read_bytes() == json.dumps(report.log + [{"iteration": 99}], indent=4).encode()


def test_file_name_format_per_entry(tmp_path):
    """A name formatted from the entry gives one file per write, each the whole log so far (as Chainer's)."""
    report = LogReport(trigger=(2, "iteration"), filename="log_{iteration}")
    _trainer(tmp_path, report, iterations=4, extra=_extra).run()
    assert len(json.loads((tmp_path / "log_2").read_text())) == 1
    assert len(json.loads((tmp_path / "log_4").read_text())) == 2


def test_install_leaves_the_users_log_reports_as_they_are(tmp_path):
    """``install`` changes no extension's class: Chainer's LogReport stays Chainer's and writes Chainer's file."""
    before = training.extensions.LogReport(trigger=(1, "iteration"))
    trainer = _trainer(tmp_path, before, iterations=3, extra=_extra)
    ext.install(trainer, {"tensorboard": {"logdir": False}})
    trainer.run()
    assert type(before) is training.extensions.LogReport
    assert (tmp_path / "log").read_bytes() == json.dumps(before.log, indent=4).encode()
