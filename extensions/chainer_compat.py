"""Chainer 7.8.1 on today's Python, NumPy and setuptools, and every private internal of other libraries we reach.

The shims run before the first ``import chainer``; the accessors (the second half) are the only place the toolkit
reads another library's private attributes.

Chainer 7.8.1 (2020) was written for NumPy 1 and for a setuptools that ships ``pkg_resources``. Each shim
below changes nothing where the real thing is present; importing this module (``extensions`` imports it
first) applies them all.

- :func:`shield_numpy_distutils`: ``chainer._environment_check`` imports ``numpy.distutils.system_info``
  (for a macOS-only BLAS warning). NumPy has no ``numpy.distutils`` on Python 3.12 and newer, nor in
  NumPy 2, and NumPy 1's cannot import beside setuptools 74+ (no ``distutils.msvccompiler``); the
  stand-in's ``get_info`` finds no BLAS information, which turns that one warning off.
- :func:`shield_pkg_resources`: the same check calls ``pkg_resources.require`` and ``get_distribution``
  to warn about CuPy/iDeep versions. setuptools 81+ removed ``pkg_resources``; the stand-in answers
  those two calls from ``importlib.metadata`` with the same exceptions.
- :func:`restore_numpy1_names`: NumPy 2 removed ``numpy.sctypes``, which
  ``chainer.functions.array.as_strided`` reads at import time and in ``backward``; it is restored,
  built from NumPy's own scalar types as NumPy 1 built it.
- :func:`patch_chainer`, after Chainer is imported (this module imports it last):
  ``chainer.functions.array.resize_images`` asks for ``numpy.float``, gone since NumPy 1.24, so the one
  function that does sees a ``numpy`` that also has ``float`` (the Python float, as NumPy 1 had it);
  and ``chainer.functions.pad_sequence`` fills integer arrays with a Python int padding: NEP 50 (NumPy
  2's rules for Python scalars) makes one out of the dtype's range (``-1`` into ``uint8``) an
  OverflowError, where NumPy 1 wrapped it around (to 255); the padding is wrapped as NumPy 1 did.
  NEP 50's other change, a NumPy scalar's own dtype winning over a float32 array's, needs no shim on
  the paths checked (``tests/test_ext_chainer_compat.py``: arithmetic, activations, losses and
  normalisation given NumPy-scalar constants, optimizers and their hooks given NumPy-scalar
  hyperparameters): Chainer casts constants to the input's dtype and updates parameters in place.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import operator
import re
import sys
import types
from typing import Any

import numpy

NUMPY2 = int(numpy.__version__.split(".")[0]) >= 2


def _stand_in(name: str, doc: str) -> types.ModuleType:
    """An empty module with a spec, so that ``importlib.util.find_spec(name)`` answers rather than raises."""
    module = types.ModuleType(name, doc)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def shield_numpy_distutils() -> bool:
    """Register a stand-in ``numpy.distutils.system_info`` where NumPy has none or its own cannot import; True if
    it did."""
    if sys.modules.get("numpy.distutils.system_info") is not None:
        return False
    if "numpy.distutils" in sys.modules or importlib.util.find_spec("numpy.distutils") is not None:
        try:
            importlib.import_module("numpy.distutils.system_info")
            return False
        except ImportError:  # NumPy 1's distutils needs distutils.msvccompiler, gone from setuptools 74+
            for name in [k for k in sys.modules if k == "numpy.distutils" or k.startswith("numpy.distutils.")]:
                del sys.modules[name]
    package = _stand_in("numpy.distutils", "Stand-in (wm-trainer): NumPy has no distutils on this Python.")
    package.__path__ = []
    system_info = _stand_in("numpy.distutils.system_info", "Stand-in (wm-trainer): finds no BLAS information.")
    system_info.get_info = lambda name, notfound_action=0: {}
    package.system_info = system_info
    sys.modules["numpy.distutils"], sys.modules["numpy.distutils.system_info"] = package, system_info
    numpy.distutils = package
    return True


class DistributionNotFound(Exception):
    """No installed distribution has the requested name (as ``pkg_resources`` raises it)."""


class VersionConflict(Exception):
    """The installed distribution's version is outside the requested specifier."""


class _Distribution:
    """What Chainer reads of ``pkg_resources.get_distribution``: the name and the version."""

    def __init__(self, name: str) -> None:
        try:
            self.version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise DistributionNotFound(name) from None
        self.project_name = self.key = name


def _require(requirement: str) -> list[_Distribution]:
    """``pkg_resources.require`` for one ``name<specifier>`` string, without dependencies."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    name, spec = match.groups()
    dist = _Distribution(name)
    if spec.strip():
        try:
            from packaging.specifiers import SpecifierSet
        except ImportError:  # nothing to compare with: the distribution is there, which is what matters
            return [dist]
        if not SpecifierSet(spec).contains(dist.version, prereleases=True):
            raise VersionConflict(f"{name} {dist.version} is not {spec}")
    return [dist]


def shield_pkg_resources() -> bool:
    """Register a stand-in ``pkg_resources`` where setuptools has none; True if it did."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return False
    module = _stand_in("pkg_resources", "Stand-in (wm-trainer): this setuptools has no pkg_resources.")
    module.DistributionNotFound, module.VersionConflict = DistributionNotFound, VersionConflict
    module.require, module.get_distribution = _require, _Distribution
    sys.modules["pkg_resources"] = module
    return True


def numpy1_sctypes() -> dict[str, list[type]]:
    """``numpy.sctypes`` as NumPy 1 defined it: the scalar types of each kind, narrowest first."""
    def sized(kind: str) -> list[type]:
        found = []
        for size in (1, 2, 4, 8, 16, 32):
            try:
                found.append(numpy.dtype(f"{kind}{size}").type)
            except TypeError:  # no such width on this platform
                continue
        return found

    return {"int": sized("i"), "uint": sized("u"), "float": sized("f"), "complex": sized("c"),
            "others": [bool, object, bytes, str, numpy.void]}


def restore_numpy1_names() -> list[str]:
    """Put back on ``numpy`` the NumPy 1 names Chainer reads and NumPy 2 removed; the names restored."""
    restored = []
    if "sctypes" not in vars(numpy):
        try:
            numpy.sctypes  # noqa: B018  (NumPy 1 has it; NumPy 2 raises AttributeError)
        except AttributeError:
            numpy.sctypes = numpy1_sctypes()
            restored.append("sctypes")
    return restored


class _NumpyWith(types.ModuleType):
    """NumPy as one function sees it: every NumPy name plus a few NumPy 1 ones."""

    def __init__(self, extra: dict[str, Any]) -> None:
        super().__init__("numpy", numpy.__doc__)
        vars(self).update(extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)


def with_numpy_names(func: types.FunctionType, **extra: Any) -> types.FunctionType:
    """``func`` reading a ``numpy`` that also has ``extra``; its module and every other function are untouched."""
    scope = dict(func.__globals__, numpy=_NumpyWith(extra))
    patched = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    patched.__kwdefaults__, patched.__doc__, patched.__wrapped__ = func.__kwdefaults__, func.__doc__, func
    return patched


def numpy1_int_fill(value: Any, dtype: numpy.dtype) -> Any:
    """``value`` as NumPy 1 stored it into an integer array: a Python int out of the dtype's range wraps around."""
    if not isinstance(value, int) or numpy.dtype(dtype).kind not in "iu":
        return value
    info = numpy.iinfo(dtype)
    if info.min <= value <= info.max:
        return value
    return numpy.array(value % 2 ** info.bits).astype(dtype)[()]  # the C cast NumPy 1 did


def _pad_sequence_forward(forward: Any) -> Any:
    """``PadSequence.forward`` whose padding is stored as NumPy 1 stored it (NumPy 2 raises OverflowError)."""
    def forward_numpy1(self: Any, xs: tuple) -> tuple:
        if xs:
            self.padding = numpy1_int_fill(self.padding, xs[0].dtype)
        return forward(self, xs)

    forward_numpy1.__wrapped__ = forward
    forward_numpy1.__doc__ = forward.__doc__
    return forward_numpy1


def patch_chainer() -> list[str]:
    """Fix what Chainer's imported modules do wrong on today's NumPy; the patches applied, by name."""
    resize_images = importlib.import_module("chainer.functions.array.resize_images")
    pad_sequence = importlib.import_module("chainer.functions.array.pad_sequence")
    applied = []
    if not hasattr(numpy, "float") and not hasattr(resize_images.compute_indices_and_weights, "__wrapped__"):
        # NumPy >= 1.24; a function-wide ``numpy`` keeps the module's ``xp is numpy`` checks true
        resize_images.compute_indices_and_weights = with_numpy_names(
            resize_images.compute_indices_and_weights, float=float)
        applied.append("resize_images.compute_indices_and_weights")
    if not hasattr(pad_sequence.PadSequence.forward, "__wrapped__"):
        # NEP 50: ``y[i, l:] = -1`` on a uint8 array raises on NumPy 2 (NumPy 1.24-1.26 warned and wrapped)
        pad_sequence.PadSequence.forward = _pad_sequence_forward(pad_sequence.PadSequence.forward)
        applied.append("PadSequence.forward")
    return applied


shield_numpy_distutils()
shield_pkg_resources()
restore_numpy1_names()

patch_chainer()


# -- the private internals of other libraries the toolkit reads, all here --------------------------------------
# Each function names what it reaches; ``check_versions`` says whether the installed versions are ones these
# were written against (a test fails on any other, so that a new release is looked at, not trusted).
KNOWN_VERSIONS = {"chainer": ("7.8.1",), "tensorboardX": ("2.6.5",),
                  "numpy": ("1.26", "2.0", "2.1", "2.2", "2.3", "2.4", "2.5")}  # numpy: by release series (X.Y.*)


def _known(version: str, known: tuple[str, ...]) -> bool:
    return any(version == k or version.startswith(k + ".") for k in known)


def check_versions() -> list[str]:
    """One line per installed library whose version this module was not written against (empty: all known)."""
    from importlib import metadata

    out = []
    for name, known in KNOWN_VERSIONS.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed: nothing of it is reached
            continue
        if not _known(version, known):
            out.append(f"{name} {version} (known: {', '.join(known)})")
    return out


def call_converter(converter, batch, device):
    """``chainer.dataset.convert._call_converter``: a converter of either style called as StandardUpdater does."""
    from chainer.dataset import convert

    return convert._call_converter(converter, batch, device)


def loss_scale(optimizer) -> float | None:
    """The optimizer's current loss scale (``Optimizer._loss_scale``), None when none is set."""
    return getattr(optimizer, "_loss_scale", None)


def veto_update(optimizer) -> None:
    """Make ``optimizer.update`` skip the update rules this step (what dynamic loss scaling does on a NaN).

    Called from a 'pre' hook: ``Optimizer.update`` asks ``is_safe_to_update()`` right after those hooks.
    """
    optimizer._loss_scaling_isnan = True


def update_vetoed(optimizer) -> bool:
    """Whether this step's update rules will be skipped (``not optimizer.is_safe_to_update()``)."""
    try:
        return not optimizer.is_safe_to_update()
    except AttributeError:  # before its first update the flag does not exist yet
        return False


def clear_veto(optimizer) -> None:
    """Undo ``veto_update`` where no dynamic loss scaling will (``update_loss_scale`` reads the flag after hooks)."""
    if not getattr(optimizer, "_loss_scaling_is_dynamic", False):
        optimizer._loss_scaling_isnan = False


def hook_dicts(optimizer):
    """(pre-update hooks, post-update hooks) of an optimizer, as the ordered dicts it calls them from."""
    hookable = optimizer._hookable
    return hookable._pre_update_hooks, hookable._post_update_hooks


def place_hooks(optimizer, first_pre: str, last_post: str) -> None:
    """Put the hook named ``first_pre`` first among the 'pre' hooks and ``last_post`` last among the 'post' ones."""
    pre, post = hook_dicts(optimizer)
    if pre and next(iter(pre)) != first_pre and first_pre in pre:
        pre.move_to_end(first_pre, last=False)
    if post and next(reversed(post)) != last_post and last_post in post:
        post.move_to_end(last_post)


def multi_node_communicator(optimizer):
    """The ChainerMN communicator of a multi-node optimizer (its ``communicator`` attribute, set on the instance by
    ``chainermn.optimizers._MultiNodeOptimizer``); None for any other optimizer, without importing chainermn."""
    if not type(optimizer).__module__.startswith("chainermn."):
        return None
    return vars(optimizer).get("communicator")


def mark_multi_node_synced(optimizer) -> None:
    """Tell a multi-node optimizer its target's parameters are already broadcast, so its next ``update`` averages
    and updates (``_MultiNodeOptimizer.is_changed`` records the parameter set it compares the next call with)."""
    is_changed = getattr(type(optimizer), "is_changed", None)
    if is_changed is not None and is_changed.__code__.co_argcount == 2:  # not the double-buffering variant
        is_changed(optimizer, optimizer.target)


def trainer_extensions(trainer) -> dict:
    """name -> entry (``entry.extension``) of every extension of a Trainer (``Trainer._extensions``)."""
    return trainer._extensions


def extension_trigger(extension):
    """The trigger a LogReport/PlotReport checks itself (``_trigger``), or None."""
    return getattr(extension, "_trigger", None)


# Chainer's Parameter and UpdateRule internals, read on the hot path as C-level getters (each property would be
# several Python calls per parameter per iteration on a net whose iteration takes a millisecond)
STATE_OF = operator.attrgetter("_state")  # an UpdateRule's state dict, None before its first update
RULE_STATE_OF = operator.attrgetter("update_rule._state")
DATA_OF = operator.attrgetter("_data")  # a Variable's [array] list
GRAD_VAR_OF = operator.attrgetter("_grad_var")  # a Variable's gradient Variable


def check_adam_eps(rule, dtype) -> None:
    """AdamRule's own check that its eps survives in ``dtype`` (Chainer's ``_check_eps``; raises where it does not)."""
    rule._check_eps(dtype)


def reset_rule_state(rule) -> None:
    """Forget an UpdateRule's state (as before its first update: ``init_state`` runs again)."""
    rule._state = None


def plain_parameters(params) -> bool:
    """Whether every parameter keeps its array in Chainer 7's standard slot (no layout, no ChainerX array)."""
    return all(p._layout is None and not p._has_chainerx_array and p._data[0] is p.array for p in params)


def hookable_of(owner):
    """The hook registry of an optimizer or an UpdateRule (``_hookable``), None if it has none yet."""
    return getattr(owner, "_hookable", None)


def hookable_dicts(hookable):
    """(pre-update hooks, post-update hooks) of a hook registry."""
    return hookable._pre_update_hooks, hookable._post_update_hooks


def persistent_names(link) -> list:
    """Names of a Link's own persistent values (``Link._persistent``)."""
    return list(link._persistent)


def global_random_state():
    """The ``RandomState`` behind ``numpy.random.*`` (``numpy.random.mtrand._rand``), or None."""
    import numpy

    return getattr(numpy.random.mtrand, "_rand", None)


def bit_generator(random_state):
    """The bit generator behind a ``numpy.random.RandomState`` (``_bit_generator``)."""
    return random_state._bit_generator


# -- Chainer's snapshot extension --------------------------------------------------------------------------------
def snapshot_base() -> type:
    """Chainer's snapshot extension class (``chainer.training.extensions._snapshot._Snapshot``)."""
    from chainer.training.extensions import _snapshot

    return _snapshot._Snapshot


def find_latest_snapshot(filename: str, out: str) -> str | None:
    """The newest snapshot file in ``out`` matching ``filename`` (``_snapshot._find_latest_snapshot``), or None."""
    from chainer.training.extensions import _snapshot

    return _snapshot._find_latest_snapshot(filename, out)


# -- NumPy -------------------------------------------------------------------------------------------------------
def read_npy_header(raw, version) -> tuple:
    """(shape, fortran order, dtype) of a ``.npy`` header (``numpy.lib.format._read_array_header``), unpickled
    nothing: unlike ``read_array_header_1_0/2_0`` it takes any format version."""
    import numpy

    reader = getattr(numpy.lib.format, "_read_array_header", None)
    if reader is None:  # NumPy 2.4+: numpy.lib.format re-exports the public names of numpy.lib._format_impl only
        reader = importlib.import_module("numpy.lib._format_impl")._read_array_header
    return reader(raw, version)


# -- tensorboardX's event file writer ----------------------------------------------------------------------------
def file_writer(writer):
    """The ``FileWriter`` behind a tensorboardX ``SummaryWriter`` (``_get_file_writer()``: opens it if closed)."""
    return writer._get_file_writer()


def events_writer(writer):
    """tensorboardX's open ``EventsWriter`` behind ``writer`` (``event_writer._ev_writer``, with its lock, counter
    and open record file), or None when it is closed or laid out otherwise."""
    events = getattr(file_writer(writer), "event_writer", None)
    if events is None or getattr(events, "_closed", True):
        return None
    ev = getattr(events, "_ev_writer", None)
    if not all(hasattr(ev, a) for a in ("_lock", "_num_outstanding_events", "_py_recordio_writer")):
        return None
    if getattr(ev._py_recordio_writer, "_writer", None) is None:
        return None
    return ev


def write_records(ev, data: bytes, count: int) -> None:
    """Append ``count`` framed event records (``data``) to an ``events_writer`` file under its lock, counted as
    its ``write_event`` counts them (so its flush thread flushes them)."""
    with ev._lock:
        ev._num_outstanding_events += count
        ev._py_recordio_writer._writer.write(data)
