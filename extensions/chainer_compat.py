"""Every private internal of other libraries the toolkit reaches, in one place; and the NumPy shim Chainer 7.8.1 needs.

Chainer's ``_environment_check`` imports ``numpy.distutils.system_info`` (for a macOS-only BLAS warning).
NumPy has no ``numpy.distutils`` on Python 3.12 and newer, so there ``import chainer`` fails outright;
:func:`shield_numpy_distutils`, run when this module is imported (``extensions`` imports it first),
puts a stand-in whose ``get_info`` finds no BLAS information, which turns that one warning off and
nothing else.
"""
from __future__ import annotations

import importlib.util
import operator
import sys
import types


def shield_numpy_distutils() -> bool:
    """Register a stand-in ``numpy.distutils.system_info`` where NumPy has none; True if it did."""
    if "numpy.distutils" in sys.modules or importlib.util.find_spec("numpy.distutils") is not None:
        return False
    import numpy

    package = types.ModuleType("numpy.distutils", "Stand-in (wm-trainer): NumPy has no distutils on this Python.")
    package.__path__ = []
    system_info = types.ModuleType("numpy.distutils.system_info")
    system_info.get_info = lambda name, notfound_action=0: {}
    package.system_info = system_info
    sys.modules["numpy.distutils"], sys.modules["numpy.distutils.system_info"] = package, system_info
    numpy.distutils = package
    return True


shield_numpy_distutils()


# -- the private internals of other libraries the toolkit reads, all here --------------------------------------
# Each function names what it reaches; ``check_versions`` says whether the installed versions are ones these
# were written against (a test fails on any other, so that a new release is looked at, not trusted).
KNOWN_VERSIONS = {"chainer": ("7.8.1",), "tensorboardX": ("2.6.5",),
                  "numpy": ("1.26", "2.0", "2.1", "2.2", "2.3")}  # numpy: by release series (X.Y.*)


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

    return numpy.lib.format._read_array_header(raw, version)


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
