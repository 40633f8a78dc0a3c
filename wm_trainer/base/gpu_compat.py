"""Chainer 7.8.1 on today's CuPy (cupy-cuda12x 13.x): every compatibility shim, in one place.

Chainer 7.8.1 was written for CuPy 7. What goes wrong with CuPy 13, and the shim for it:

- CUDA libraries installed from pip wheels (``nvidia-cublas-cu12``, ``nvidia-cuda-nvrtc-cu12``,
  ``nvidia-curand-cu12``, ``nvidia-cudnn-cu12`` 8.x ...) carry no rpath, so CuPy's extension
  modules do not find them without ``LD_LIBRARY_PATH``; ``import chainer`` then silently falls
  back to CPU-only (``chainer.backends.cuda.available`` is False). :func:`preload_cuda_libraries`
  loads them process-wide before Chainer imports CuPy.
- cuDNN is no longer bundled with CuPy (CuPy 13 binds cuDNN 8 only; CuPy 14 has no cuDNN at all).
  Chainer then runs convolutions through im2col + cuBLAS, which works, but it warns "Please
  reinstall CuPy after you install cudnn" (wrong advice since CuPy 8) and CuPy warns once per
  missing optional library; ``cupy.cudnn`` is a deprecated alias in CuPy 13.
  :func:`quiet_known_warnings` drops those; :func:`describe` says in one line what is in use.
- Chainer's import-time version check names CuPy 7 (``>=7.7.0,<8.0.0``) and warns for a source
  ``cupy`` 13 install; :func:`relax_version_check` turns that check off.
- ``chainer.backends.cuda`` decides ``available`` once, at import: a CuPy that imports but has no
  driver or no device only fails later, deep inside a kernel launch. :func:`use_device` probes the
  device and turns every such failure into one :class:`~wm_trainer.base.errors.UserError`.

This module's own code imports neither Chainer nor CuPy; :func:`enable` (or :func:`enable_if_installed`)
must run before the first ``import chainer`` for the preloading to help. The ``wm_trainer`` package
calls :func:`enable_if_installed` first thing, before it imports the toolkit (and with it Chainer).
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import chainer

# Sub-folders of site-packages/nvidia/ that CuPy 13 needs (cuda_runtime: headers for NVRTC, nvjitlink: for cuSPARSE).
CUDA_WHEEL_DIRS = ("cuda_runtime", "cuda_nvrtc", "nvjitlink", "cublas", "curand", "cusolver", "cusparse", "cufft",
                   "cudnn")
# CUDA 13's wheels share one folder, site-packages/nvidia/cu13/lib; take only the libraries CuPy links.
CUDA13_DIR, CUDA13_LIBS = "cu13", re.compile(r"^lib(cudart|nvrtc|nvJitLink|cublas|cublasLt|curand|cusolver|cusparse|"
                                              r"cufft)(-builtins)?\.so")
CUDNN_MAJOR = 8  # the cuDNN CuPy 13 links against (libcudnn.so.8); cuDNN 9 wheels are of no use to it
# nvblas would interpose on the host BLAS; the .alt. NVRTC builds are an alternative CuPy never loads.
SKIP_LIBRARY = re.compile(r"^libnvblas\.|\.alt\.")

# Start-of-message patterns (case-insensitive) of warnings that are noise once we report the setup ourselves.
NOISY_WARNINGS = (
    r"\s*cudnn library could not be loaded",  # CuPy's preloader: cuDNN is optional
    r"\s*nccl library could not be loaded",  # multi-GPU only
    r"\s*cutensor library could not be loaded",  # optional accelerator
    r"cuDNN is not enabled",  # Chainer: advises reinstalling CuPy, which does not help
    r"cupy\.cudnn is deprecated",  # CuPy 13: Chainer imports the old alias of cupyx.cudnn
)

_state: dict[str, Any] = {"enabled": False, "preloaded": [], "announced": set()}


def relax_version_check() -> None:
    """Stop Chainer's import-time check that CuPy is 7.x (it is 13.x now); effective before ``import chainer``."""
    os.environ.setdefault("CHAINER_WARN_VERSION_MISMATCH", "0")


def quiet_known_warnings() -> None:
    """Ignore the cuDNN/NCCL/cuTENSOR availability warnings; :func:`describe` reports the setup in one line."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _site_dirs() -> list[Path]:
    return [Path(p) for p in dict.fromkeys(sys.path) if p and Path(p, "nvidia").is_dir()]


def cuda_wheel_libraries(site_dirs: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Shared libraries of the ``nvidia-*-cu12`` wheels under ``site_dirs`` (default: ``sys.path``)."""
    roots = [Path(p) for p in site_dirs] if site_dirs is not None else _site_dirs()
    found: list[Path] = []
    for root in roots:
        for name in (*CUDA_WHEEL_DIRS, CUDA13_DIR):
            for path in sorted(Path(root, "nvidia", name, "lib").glob("lib*.so*")):
                if SKIP_LIBRARY.search(path.name) or not path.is_file():
                    continue
                if name == "cudnn" and not re.search(rf"\.so\.{CUDNN_MAJOR}(\.|$)", path.name):
                    continue
                if name == CUDA13_DIR and not CUDA13_LIBS.search(path.name):
                    continue
                found.append(path)
    return found


def _dlopen(name: str) -> None:
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def preload_cuda_libraries(libraries: Sequence[Path] | None = None) -> list[Path]:
    """Load CUDA wheel libraries process-wide so CuPy links to them; returns those loaded from the wheels.

    A library the system loader already finds (a CUDA toolkit on the library path) is used as is.
    Dependencies are resolved by retrying until a round loads nothing new (cuBLAS needs cuBLASLt, ...).
    """
    pending = list(cuda_wheel_libraries() if libraries is None else libraries)
    loaded: list[Path] = []
    while pending:
        failed = []
        for path in pending:
            try:
                _dlopen(path.name)  # already loaded, or on the system's library path
                continue
            except OSError:
                pass
            try:
                _dlopen(str(path))
                loaded.append(path)
            except OSError:
                failed.append(path)
        if len(failed) == len(pending):
            break
        pending = failed
    _state["preloaded"].extend(loaded)
    return loaded


def enable() -> None:
    """Apply every shim once (idempotent). Call it before the first ``import chainer`` when a GPU is wanted."""
    if _state["enabled"]:
        return
    relax_version_check()
    quiet_known_warnings()
    preload_cuda_libraries()
    _state["enabled"] = True


def enable_if_installed() -> bool:
    """:func:`enable` when CuPy is installed (Chainer will import it anyway); True if it did. Imports no CuPy."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False
    enable()
    return True


def _cuda_backend():
    from chainer.backends import cuda

    return cuda


def cuda_problem() -> str | None:
    """Why Chainer's CUDA backend cannot be used (no CuPy, a missing CUDA library ...), or None when it can."""
    cuda = _cuda_backend()
    return None if cuda.available else _unavailable_reason(cuda)


def _unavailable_reason(cuda) -> str:
    err = getattr(cuda, "_resolution_error", None)
    text = " ".join(str(err).split()) if err is not None else "unknown reason"
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in ("cupy", "cupyx"):
        return "CuPy is not installed: pip install -e '.[cuda]' (see README, GPU)"
    missing = re.search(r"(lib[\w+-]+\.so[.\d]*)", text)
    if missing:
        return (f"CuPy cannot find {missing.group(1)}: install the CUDA 12 toolkit or the nvidia-*-cu12 wheels "
                "(pip install -e '.[cuda]'), or add their lib folder to LD_LIBRARY_PATH")
    return f"CuPy failed to import: {text}"


def device_count() -> int:
    """CUDA devices CuPy can see; UserError naming the cause (driver too old, none visible) when it cannot."""
    cuda = _cuda_backend()
    try:
        return int(cuda.cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError and friends; their classes move between CuPy versions
        text = " ".join(str(e).split())
        if "InsufficientDriver" in text:
            hint = ("no NVIDIA driver, or one older than CuPy's CUDA 12 runtime (nvidia-smi shows the driver's "
                    "'CUDA Version'; see README, GPU)")
        elif "NoDevice" in text:
            hint = "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        else:
            hint = "check nvidia-smi"
        raise UserError(f"cannot query CUDA devices ({text}): {hint}") from None


def cudnn_version() -> int:
    """cuDNN version as an integer (e.g. 8907), or -1 when Chainer runs without cuDNN."""
    cuda = _cuda_backend()
    return int(cuda._cudnn_version) if cuda.cudnn_enabled else -1


def describe(device: int) -> str:
    """One line: GPU name, CuPy version, and whether convolutions use cuDNN or Chainer's im2col + cuBLAS path."""
    cuda = _cuda_backend()
    cupy = cuda.cupy
    try:
        props = cupy.cuda.runtime.getDeviceProperties(device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:  # noqa: BLE001 - the name is informational only
        name = "unknown GPU"
    version = cudnn_version()
    if version >= 0:
        major, minor, patch = version // 1000, version % 1000 // 100, version % 100
        conv = f"cuDNN {major}.{minor}.{patch}"
    elif os.environ.get("CHAINER_CUDNN", "1") == "0":
        conv = "cuDNN off (CHAINER_CUDNN=0): convolutions use im2col + cuBLAS"
    else:
        conv = "no cuDNN: convolutions use im2col + cuBLAS (slower; see README, GPU)"
    return f"GPU {device}: {name}, CuPy {cupy.__version__}, {conv}"


def use_device(device: int) -> chainer.backend.Device:
    """The Chainer device for ``experiment.device``: -1 -> CPU; N -> shims on, CUDA device N checked and selected.

    Every installation problem (no CuPy, missing CUDA library, old driver, no such device) is a UserError.
    """
    if device < 0:
        import chainer

        return chainer.get_device("@numpy")
    enable()
    import chainer

    problem = cuda_problem()
    if problem is not None:
        raise UserError(f"experiment.device={device}: {problem}; or set experiment.device=-1")
    try:
        count = device_count()
    except UserError as e:
        raise UserError(f"experiment.device={device}: {e}; or set experiment.device=-1") from None
    if count == 0:
        raise UserError(f"experiment.device={device}: CuPy sees no CUDA device; check nvidia-smi and "
                        "CUDA_VISIBLE_DEVICES, or set experiment.device=-1")
    if device >= count:
        raise UserError(f"experiment.device={device}: CuPy sees {count} CUDA device(s) "
                        f"(valid: 0..{count - 1}); check CUDA_VISIBLE_DEVICES")
    spec = chainer.get_device(f"@cupy:{device}")
    spec.use()
    if device not in _state["announced"]:
        _state["announced"].add(device)
        print(f"wm-trainer: {describe(device)}", file=sys.stderr)
    return spec
