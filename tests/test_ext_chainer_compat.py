"""extensions.chainer_compat: what lets Chainer 7.8.1 import and run on Python 3.12+, NumPy 2 and setuptools 81+."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from pathlib import Path

import chainer
import chainer.functions as F
import numpy as np
import pytest

from extensions import chainer_compat


def _hide_module(monkeypatch, name: str) -> dict:
    """Make ``name`` (and its submodules) look not installed; returns what was in ``sys.modules``."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == name or k.startswith(name + ".")}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda spec_name, *a: None if spec_name == name else real_find_spec(spec_name, *a))
    return saved


def _restore_modules(name: str, saved: dict) -> None:
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_stand_in_numpy_distutils_when_numpy_has_none(monkeypatch):
    saved = _hide_module(monkeypatch, "numpy.distutils")
    had_attr, attr = "distutils" in vars(np), vars(np).get("distutils")
    try:
        assert chainer_compat.shield_numpy_distutils() is True
        system_info = importlib.import_module("numpy.distutils.system_info")  # what chainer's check imports
        assert system_info.get_info("blas_opt") == {}
        import numpy.distutils.system_info as again

        assert again is system_info and np.distutils.system_info is system_info
        assert chainer_compat.shield_numpy_distutils() is False  # once is enough
    finally:
        _restore_modules("numpy.distutils", saved)
        if had_attr:
            np.distutils = attr
        elif "distutils" in vars(np):
            delattr(np, "distutils")


@pytest.mark.skipif(not (Path(np.__file__).parent / "distutils").is_dir(), reason="NumPy has no distutils here")
def test_stand_in_numpy_distutils_when_numpys_own_cannot_import():
    """NumPy 1.26's distutils beside setuptools 74+ (no ``distutils.msvccompiler``): the stand-in takes its place."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules)
             if k == "numpy.distutils" or k.startswith("numpy.distutils.")}
    had_attr, attr = "distutils" in vars(np), vars(np).get("distutils")
    sys.modules["numpy.distutils.system_info"] = None  # its import raises ImportError, as it does there
    try:
        assert chainer_compat.shield_numpy_distutils() is True
        system_info = importlib.import_module("numpy.distutils.system_info")
        assert (system_info.__doc__ or "").startswith("Stand-in") and system_info.get_info("blas_opt") == {}
    finally:
        _restore_modules("numpy.distutils", saved)
        if had_attr:
            np.distutils = attr
        elif "distutils" in vars(np):
            delattr(np, "distutils")


def test_nothing_is_replaced_where_numpy_has_distutils():
    module = sys.modules.get("numpy.distutils")
    if module is not None and (module.__doc__ or "").startswith("Stand-in"):  # Python 3.12+ or NumPy 2
        assert importlib.util.find_spec("numpy.distutils") is not None  # answers, as for a real module
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
    adam = chainer.optimizers.Adam(eps=1e-8)
    adam.setup(model)
    rule = model.W.update_rule
    chainer_compat.check_adam_eps(rule, np.float32)
    # eps 1e-8 is 0 in float16; Chainer 7.8.1's message then reads a .name a scalar type lacks
    with pytest.raises((ValueError, AttributeError)):
        chainer_compat.check_adam_eps(rule, np.float16)


def test_stand_in_pkg_resources_answers_what_chainer_asks(monkeypatch):
    saved = _hide_module(monkeypatch, "pkg_resources")
    try:
        assert chainer_compat.shield_pkg_resources() is True
        import pkg_resources

        assert pkg_resources.__doc__.startswith("Stand-in")
        assert importlib.util.find_spec is not None and pkg_resources.__spec__.name == "pkg_resources"
        version = importlib.metadata.version("numpy")
        assert pkg_resources.get_distribution("numpy").version == version
        assert pkg_resources.require("numpy")[0].version == version
        assert pkg_resources.require("numpy>=1.26,<99")[0].version == version
        with pytest.raises(pkg_resources.VersionConflict):
            pkg_resources.require("numpy>=99")
        with pytest.raises(pkg_resources.DistributionNotFound):
            pkg_resources.require("no-such-distribution-wm>=1")
        assert chainer_compat.shield_pkg_resources() is False  # once is enough
    finally:
        _restore_modules("pkg_resources", saved)


def test_chainer_version_check_runs_on_the_stand_in(monkeypatch):
    """Chainer's own ``_environment_check`` warns on a version conflict and stays quiet otherwise."""
    saved = _hide_module(monkeypatch, "pkg_resources")
    try:
        chainer_compat.shield_pkg_resources()
        check = importlib.import_module("chainer._environment_check")
        monkeypatch.setattr(check, "pkg_resources", sys.modules["pkg_resources"])
        monkeypatch.setenv("CHAINER_WARN_VERSION_MISMATCH", "1")
        dep = {"name": "NumPy", "packages": ["no-such-distribution-wm", "numpy"], "help": "-"}
        monkeypatch.setattr(chainer._version, "_optional_dependencies", [dict(dep, specifier=">=99")])
        with pytest.warns(UserWarning, match="may not be compatible"):
            check.check()
        monkeypatch.setattr(chainer._version, "_optional_dependencies", [dict(dep, specifier=">=1")])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check.check()
    finally:
        _restore_modules("pkg_resources", saved)


def test_pkg_resources_stand_in_only_where_setuptools_has_none():
    module = sys.modules["pkg_resources"]  # Chainer's import asked for it
    try:
        setuptools_files = importlib.metadata.files("setuptools") or []
    except importlib.metadata.PackageNotFoundError:
        setuptools_files = []
    has_real = any(str(f).replace("\\", "/") == "pkg_resources/__init__.py" for f in setuptools_files)
    assert (module.__doc__ or "").startswith("Stand-in") is not has_real
    assert chainer_compat.shield_pkg_resources() is False


def test_sctypes_as_numpy_1_had_them():
    sctypes = chainer_compat.numpy1_sctypes()
    assert sctypes["int"][:4] == [np.int8, np.int16, np.int32, np.int64]
    assert sctypes["uint"][:4] == [np.uint8, np.uint16, np.uint32, np.uint64]
    assert sctypes["float"][:3] == [np.float16, np.float32, np.float64]
    assert sctypes["complex"][:2] == [np.complex64, np.complex128]
    if not chainer_compat.NUMPY2:  # NumPy 1's own table is the reference
        assert sctypes == {k: list(v) for k, v in np.sctypes.items()}


def test_sctypes_restored_on_numpy_2_only(monkeypatch):
    assert np.sctypes == chainer_compat.numpy1_sctypes()
    if not chainer_compat.NUMPY2:
        assert chainer_compat.restore_numpy1_names() == []
        return
    monkeypatch.delattr(np, "sctypes")
    assert chainer_compat.restore_numpy1_names() == ["sctypes"]
    assert chainer_compat.restore_numpy1_names() == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_as_strided_reads_sctypes_at_import_and_in_backward(dtype):
    as_strided = importlib.import_module("chainer.functions.array.as_strided")
    assert as_strided.index_dtype[8] is np.int64
    x = chainer.Variable(np.arange(6, dtype=dtype))
    y = F.as_strided(x, (2, 2), (2, 1))  # strides in elements
    y.grad = np.ones((2, 2), dtype=dtype)
    y.backward()
    np.testing.assert_array_equal(x.grad, np.array([1, 1, 1, 1, 0, 0], dtype=dtype))


@pytest.mark.parametrize("mode,align_corners", [("bilinear", True), ("bilinear", False), ("nearest", False)])
def test_resize_images_without_numpy_float(mode, align_corners):
    module = importlib.import_module("chainer.functions.array.resize_images")
    assert module.numpy is np and not hasattr(np, "float")  # Chainer's module and NumPy itself are untouched
    x = chainer.Variable(np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2))
    y = F.resize_images(x, (3, 3), mode=mode, align_corners=align_corners)
    assert y.dtype == np.float32 and y.shape == (1, 2, 3, 3)
    if mode == "bilinear" and align_corners:
        np.testing.assert_allclose(y.array[0, 0], [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]])
    F.sum(y).backward()
    assert x.grad.dtype == np.float32 and x.grad.sum() == pytest.approx(18)


def test_with_numpy_names_scopes_extra_names_to_one_function():
    def reads_float() -> type:
        return numpy.float  # noqa: F821  (resolved in the patched function's own globals)

    patched = chainer_compat.with_numpy_names(reads_float, float=float)
    assert patched() is float and patched.__wrapped__ is reads_float
    assert patched.__globals__["numpy"].zeros is np.zeros
    assert "numpy" not in globals() and not hasattr(np, "float")


@pytest.mark.parametrize("dtype,padding,filled", [(np.uint8, -1, 255), (np.uint16, -1, 65535), (np.int8, 128, -128),
                                                  (np.int32, -1, -1), (np.float32, -1, -1.0)])
def test_pad_sequence_wraps_out_of_range_padding_as_numpy_1(dtype, padding, filled):
    xs = [np.zeros((2, 3), dtype=dtype), np.ones((1, 3), dtype=dtype)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy 1.24-1.26 warned here; NumPy 2 raised
        y = F.pad_sequence(xs, padding=padding).array
    assert y.dtype == dtype and y.shape == (2, 2, 3)
    np.testing.assert_array_equal(y[1, 1], np.full(3, filled, dtype=dtype))
    np.testing.assert_array_equal(y[1, 0], np.ones(3, dtype=dtype))


def test_numpy1_int_fill_is_numpys_own_cast():
    assert chainer_compat.numpy1_int_fill(-1, np.uint8) == np.array(-1).astype(np.uint8)
    assert chainer_compat.numpy1_int_fill(2**32 + 5, np.uint32) == 5
    assert chainer_compat.numpy1_int_fill(-1, np.int64) == -1 and chainer_compat.numpy1_int_fill(0.5, np.uint8) == 0.5


# NEP 50: a NumPy float64 scalar no longer takes a float32 array's dtype. Chainer casts its constants to the
# input's dtype (``x.dtype.type(value)``) and its optimizers update in place, so results stay float32.
F64 = np.float64
NUMPY_SCALAR_PATHS = {
    "x * s": lambda x: x * F64(0.5), "s - x": lambda x: F64(2) - x, "x / int64": lambda x: x / np.int64(3),
    "s / x": lambda x: F64(3) / x, "x ** s": lambda x: x ** F64(2), "s ** x": lambda x: F64(2) ** x,
    "clip": lambda x: F.clip(x, F64(0.2), F64(0.8)), "leaky_relu": lambda x: F.leaky_relu(x, slope=F64(0.1)),
    "elu": lambda x: F.elu(x, alpha=F64(1)), "huber_loss": lambda x: F.huber_loss(x, x * 0, delta=F64(1)),
    "dropout": lambda x: F.dropout(x, ratio=F64(0.5)), "normalize": lambda x: F.normalize(x, eps=F64(1e-5)),
    "batch_normalization": lambda x: F.batch_normalization(x, np.ones(4, np.float32), np.zeros(4, np.float32),
                                                           eps=F64(2e-5)),
    "clipped_relu": lambda x: F.clipped_relu(x, z=F64(0.5)), "softplus": lambda x: F.softplus(x, beta=F64(2)),
    "contrastive": lambda x: F.contrastive(x, x * 0.5, np.array([0, 1, 1], np.int32), margin=F64(1)),
    "gaussian_nll": lambda x: F.gaussian_nll(x, x, x), "mean_absolute_error": lambda x: F.mean_absolute_error(x, x * 0),
}


@pytest.mark.parametrize("path", sorted(NUMPY_SCALAR_PATHS))
def test_numpy_scalar_constants_keep_float32(path):
    x = chainer.Variable(np.random.default_rng(0).random((3, 4), dtype=np.float32) + 0.1)
    with chainer.using_config("train", True):
        y = NUMPY_SCALAR_PATHS[path](x)
        F.sum(y).backward()  # Chainer rejects a gradient whose dtype is not its variable's
    assert y.dtype == np.float32 and x.grad.dtype == np.float32


@pytest.mark.parametrize("name,make", [
    ("SGD", lambda: chainer.optimizers.SGD(lr=F64(0.1))),
    ("MomentumSGD", lambda: chainer.optimizers.MomentumSGD(F64(0.1))),
    ("Adam", lambda: chainer.optimizers.Adam(alpha=F64(1e-3), eps=F64(1e-8))),
    ("RMSprop", lambda: chainer.optimizers.RMSprop(lr=F64(0.01))),
    ("AdaGrad", lambda: chainer.optimizers.AdaGrad(F64(0.01))),
    ("AdaBound", lambda: chainer.optimizers.AdaBound()), ("MSVAG", lambda: chainer.optimizers.MSVAG()),
])
def test_numpy_scalar_hyperparameters_keep_float32(name, make):
    link = chainer.links.Linear(4, 2)
    optimizer = make()
    optimizer.setup(link)
    hooks = chainer.optimizer_hooks
    for hook in (hooks.WeightDecay(F64(1e-4)), hooks.GradientClipping(F64(1.0)), hooks.GradientNoise(F64(0.01))):
        optimizer.add_hook(hook)
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    for _ in range(2):
        link.cleargrads()
        F.sum(link(x)).backward()
        optimizer.update()
    for param in link.params():
        assert param.array.dtype == np.float32 and param.grad.dtype == np.float32, name
        states = [v for v in param.update_rule.state.values() if isinstance(v, np.ndarray)]
        assert all(v.dtype == np.float32 for v in states), name


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


def test_multi_node_optimizer_internals():
    """The communicator a ChainerMN multi-node optimizer holds, and its record of the broadcast parameters."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (the mpi extra)")
    import chainer
    import chainermn

    comm = chainermn.create_communicator("naive")  # one process: MPI starts as a singleton
    model = chainer.links.Linear(2, 1)
    opt = chainermn.create_multi_node_optimizer(chainer.optimizers.Adam(), comm)
    opt.setup(model)
    assert chainer_compat.multi_node_communicator(opt) is comm
    assert chainer_compat.multi_node_communicator(chainer.optimizers.Adam()) is None
    chainer_compat.mark_multi_node_synced(opt)
    assert not opt.is_changed(model)  # the next update averages and updates rather than broadcasting
