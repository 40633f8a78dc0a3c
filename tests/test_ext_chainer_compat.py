"""extensions.chainer_compat: what lets ``import chainer`` work on Python 3.12+, where NumPy has no distutils."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np

from extensions import chainer_compat


def test_stand_in_numpy_distutils_when_numpy_has_none(monkeypatch):
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("numpy.distutils")}
    had_attr = "distutils" in vars(np)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numpy.distutils" else real_find_spec(name, *a))
    try:
        assert chainer_compat.shield_numpy_distutils() is True
        system_info = importlib.import_module("numpy.distutils.system_info")  # what chainer's check imports
        assert system_info.get_info("blas_opt") == {}
        import numpy.distutils.system_info as again

        assert again is system_info and np.distutils.system_info is system_info
        assert chainer_compat.shield_numpy_distutils() is False  # once is enough
    finally:
        for k in [k for k in sys.modules if k.startswith("numpy.distutils")]:
            del sys.modules[k]
        sys.modules.update(saved)
        if not had_attr and "distutils" in vars(np):
            delattr(np, "distutils")


def test_nothing_is_replaced_where_numpy_has_distutils():
    if importlib.util.find_spec("numpy.distutils") is None:  # Python 3.12+: the stand-in is what is there
        assert sys.modules["numpy.distutils"].__doc__.startswith("Stand-in")
        return
    assert chainer_compat.shield_numpy_distutils() is False
    assert not (importlib.import_module("numpy.distutils").__doc__ or "").startswith("Stand-in")


def test_installed_versions_are_ones_the_compat_module_knows():
    """Every private internal the toolkit reads is in chainer_compat, written against these versions: a new
    release fails here until someone has checked those internals and added it to ``KNOWN_VERSIONS``."""
    unknown = chainer_compat.check_versions()
    assert not unknown, f"extensions.chainer_compat has not been checked against: {'; '.join(unknown)}"


def test_compat_reaches_what_it_names():
    import chainer

    model = chainer.links.Linear(2, 1)
    opt = chainer.optimizers.SGD()
    opt.setup(model)
    opt.add_hook(chainer.optimizer_hooks.WeightDecay(1e-4))
    pre, post = chainer_compat.hook_dicts(opt)
    assert list(pre) == ["WeightDecay"] and not post
    assert chainer_compat.loss_scale(opt) is None
    assert not chainer_compat.update_vetoed(opt)
    chainer_compat.veto_update(opt)
    assert chainer_compat.update_vetoed(opt)
    chainer_compat.clear_veto(opt)
    assert not chainer_compat.update_vetoed(opt)


def test_an_unknown_version_is_named(monkeypatch):
    """A release the module was not checked against fails loudly, by name; a known series passes."""
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "99.0" if name == "tensorboardX" else real(name))
    assert chainer_compat.check_versions() == [
        f"tensorboardX 99.0 (known: {', '.join(chainer_compat.KNOWN_VERSIONS['tensorboardX'])})"]
    assert chainer_compat._known("2.1.3", ("2.1",)) and not chainer_compat._known("2.10.0", ("2.1",))


def test_tensorboardx_internals_write_records_the_public_reader_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from extensions import tensorboard as tb

    writer = tb.open_writer(str(tmp_path))
    ev = chainer_compat.events_writer(writer)
    assert ev is not None and chainer_compat.file_writer(writer) is chainer_compat.file_writer(writer)
    summary = tb._pb().Summary(value=[tb._pb().Summary.Value(tag="x", simple_value=2.5)]).SerializeToString()
    chainer_compat.write_records(ev, tb.tf_records([tb.encode_event(summary, 7, 1.0)]), 1)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(7, 2.5)]


def test_snapshot_and_npy_internals(tmp_path):
    import io

    import chainer

    assert issubclass(chainer_compat.snapshot_base(), chainer.training.Extension)
    for name in ("snapshot_iter_10", "snapshot_iter_30", "other"):
        (tmp_path / name).write_bytes(b"")
    assert chainer_compat.find_latest_snapshot("snapshot_iter_{.updater.iteration}", str(tmp_path)) == \
        "snapshot_iter_30"
    raw = io.BytesIO()
    np.save(raw, np.zeros((2, 3), np.float32))
    raw.seek(0)
    version = np.lib.format.read_magic(raw)
    shape, fortran, dtype = chainer_compat.read_npy_header(raw, version)
    assert shape == (2, 3) and not fortran and dtype == np.float32


def test_global_random_state_is_what_numpy_random_draws_from():
    state = chainer_compat.global_random_state()
    np.random.seed(3)
    a = np.random.rand()
    state.seed(3)
    assert np.random.rand() == a
