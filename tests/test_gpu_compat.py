"""The CuPy compatibility shims, each tested without a GPU (fake CuPy pieces where a device would be needed)."""
from __future__ import annotations

import _ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
from chainer.backends import cuda

from wm_trainer.base import gpu_compat
from wm_trainer.base.errors import UserError

# CuPy 13's own text (cupy/_environment.py, _preload_warning) for a missing optional library.
CUPY_CUDNN_WARNING = """
cudnn library could not be loaded.

Reason: ImportError (libcudnn.so.8: cannot open shared object file: No such file or directory)

You can install the library by:
  $ python -m cupyx.tools.install_library --library cudnn --cuda 12.x
"""


@pytest.fixture
def fresh(monkeypatch):
    """gpu_compat as if never enabled; warning filters and environment restored afterwards."""
    monkeypatch.setitem(gpu_compat._state, "enabled", False)
    monkeypatch.setitem(gpu_compat._state, "preloaded", [])
    monkeypatch.setitem(gpu_compat._state, "announced", set())
    monkeypatch.delenv("CHAINER_WARN_VERSION_MISMATCH", raising=False)
    with warnings.catch_warnings():
        yield monkeypatch


def fake_cupy(device_count=1, count_error: Exception | None = None, name=b"NVIDIA Fake GPU"):
    """Just the CuPy surface gpu_compat touches: runtime.getDeviceCount/getDeviceProperties and __version__."""
    def get_count():
        if count_error is not None:
            raise count_error
        return device_count

    runtime = types.SimpleNamespace(getDeviceCount=get_count, getDeviceProperties=lambda i: {"name": name})
    return types.SimpleNamespace(__version__="13.6.0", cuda=types.SimpleNamespace(runtime=runtime))


class FakeCudaDevice:
    """Stands in for cupy.cuda.Device: records use()."""

    used: list[int] = []

    def __init__(self, device_id=0):
        self.id = device_id

    def use(self):
        FakeCudaDevice.used.append(self.id)

    def __eq__(self, other):
        return isinstance(other, FakeCudaDevice) and other.id == self.id

    __hash__ = object.__hash__


def with_fake_cuda(monkeypatch, cupy, cudnn_version: int = -1):
    monkeypatch.setattr(cuda, "available", True)
    monkeypatch.setattr(cuda, "cupy", cupy)
    monkeypatch.setattr(cuda, "Device", FakeCudaDevice)
    monkeypatch.setattr(cuda, "cudnn_enabled", cudnn_version >= 0)
    monkeypatch.setattr(cuda, "_cudnn_version", cudnn_version)
    monkeypatch.setattr(cuda, "_cudnn_disabled_by_user", False, raising=False)  # set only when CuPy imported
    monkeypatch.setattr(gpu_compat, "preload_cuda_libraries", lambda libraries=None: [])


def test_importing_wm_trainer_applies_the_cuda_shims_before_chainer_is_imported():
    """``import wm_trainer`` imports Chainer (through the toolkit's shield), but only after gpu_compat's shims."""
    code = """if True:
        import importlib.abc, importlib.util, sys
        seen = []
        class Spy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "chainer" and not seen:
                    gc = sys.modules.get("wm_trainer.base.gpu_compat")
                    seen.append(gc is not None and (gc._state["enabled"] or importlib.util.find_spec("cupy") is None))
                return None
        sys.meta_path.insert(0, Spy())
        import wm_trainer
        print(seen, "chainer" in sys.modules)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[True] True"


def test_cpu_device_needs_no_cupy(fresh):
    device = gpu_compat.use_device(-1)
    assert device.xp is np
    assert not gpu_compat._state["enabled"]
    assert "cupy" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_without_cupy_is_one_user_error(fresh):
    fresh.setattr(gpu_compat, "preload_cuda_libraries", lambda libraries=None: [])
    with pytest.raises(UserError) as e:
        gpu_compat.use_device(0)
    msg = str(e.value)
    assert msg.startswith("experiment.device=0: CuPy is not installed")
    assert "pip install -e '.[cuda]'" in msg and "experiment.device=-1" in msg


def test_missing_cuda_library_is_named(fresh):
    fresh.setattr(gpu_compat, "preload_cuda_libraries", lambda libraries=None: [])
    fresh.setattr(cuda, "available", False)
    fresh.setattr(cuda, "_resolution_error",
                  ImportError("libcublas.so.12: cannot open shared object file: No such file or directory"),
                  raising=False)
    with pytest.raises(UserError, match=r"CuPy cannot find libcublas\.so\.12: .*LD_LIBRARY_PATH"):
        gpu_compat.use_device(0)


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"), "no CUDA device is visible"),
    (RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"),
     "no NVIDIA driver, or one older than CuPy's CUDA 12 runtime"),
])
def test_cupy_without_a_usable_device_is_a_user_error(fresh, error, expected):
    with_fake_cuda(fresh, fake_cupy(count_error=error))
    with pytest.raises(UserError) as e:
        gpu_compat.use_device(0)
    assert expected in str(e.value) and str(e.value).startswith("experiment.device=0: cannot query CUDA devices")


def test_device_index_beyond_the_visible_ones(fresh):
    with_fake_cuda(fresh, fake_cupy(device_count=2))
    with pytest.raises(UserError, match=r"experiment.device=2: CuPy sees 2 CUDA device\(s\) \(valid: 0\.\.1\)"):
        gpu_compat.use_device(2)
    with_fake_cuda(fresh, fake_cupy(device_count=0))
    with pytest.raises(UserError, match="CuPy sees no CUDA device"):
        gpu_compat.use_device(0)


def test_use_device_selects_the_gpu_and_says_what_runs_convolutions(fresh, capsys):
    with_fake_cuda(fresh, fake_cupy(device_count=2))
    FakeCudaDevice.used = []
    device = gpu_compat.use_device(1)
    assert isinstance(device, cuda.GpuDevice) and device.device.id == 1 and device.name == "@cupy:1"
    assert FakeCudaDevice.used == [1]
    assert gpu_compat._state["enabled"]
    err = capsys.readouterr().err
    assert err.strip() == ("wm-trainer: GPU 1: NVIDIA Fake GPU, CuPy 13.6.0, "
                           "no cuDNN: convolutions use im2col + cuBLAS (slower; see README, GPU)")
    gpu_compat.use_device(1)
    assert capsys.readouterr().err == ""  # announced once per device


def test_describe_reports_the_cudnn_version(fresh):
    with_fake_cuda(fresh, fake_cupy(), cudnn_version=8907)
    assert gpu_compat.cudnn_version() == 8907
    assert gpu_compat.describe(0) == "GPU 0: NVIDIA Fake GPU, CuPy 13.6.0, cuDNN 8.9.7"
    with_fake_cuda(fresh, fake_cupy(), cudnn_version=-1)
    fresh.setenv("CHAINER_CUDNN", "0")
    assert gpu_compat.describe(0).endswith("cuDNN off (CHAINER_CUDNN=0): convolutions use im2col + cuBLAS")


def _chainer_cudnn_warning(monkeypatch) -> None:
    """Make Chainer emit its real 'cuDNN is not enabled' warning (CuPy present, cuDNN absent)."""
    monkeypatch.setattr(cuda, "available", True)
    monkeypatch.setattr(cuda, "cudnn_enabled", False)
    monkeypatch.setattr(cuda, "_cudnn_disabled_by_user", False, raising=False)
    monkeypatch.delattr(cuda.check_cuda_available, "_already_warned", raising=False)
    cuda.check_cuda_available()
    monkeypatch.delattr(cuda.check_cuda_available, "_already_warned", raising=False)


def test_cudnn_and_nccl_warnings_are_quieted_others_are_not(fresh):
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        _chainer_cudnn_warning(fresh)
    assert any("cuDNN is not enabled" in str(w.message) for w in before)  # the control: Chainer does warn

    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        gpu_compat.quiet_known_warnings()
        _chainer_cudnn_warning(fresh)
        warnings.warn(CUPY_CUDNN_WARNING, UserWarning, stacklevel=1)
        warnings.warn(CUPY_CUDNN_WARNING.replace("cudnn", "nccl"), UserWarning, stacklevel=1)
        warnings.warn("cupy.cudnn is deprecated. Use cupyx.cudnn instead", DeprecationWarning, stacklevel=1)
        warnings.warn("an unrelated warning about cudnn", UserWarning, stacklevel=1)
    assert [str(w.message) for w in after] == ["an unrelated warning about cudnn"]


def test_relaxed_version_check_accepts_a_newer_cupy(fresh):
    from chainer import _environment_check, _version

    # Chainer's own check, pointed at an installed package whose version is outside the range it wants.
    fresh.setattr(_version, "_optional_dependencies", [
        {"name": "CuPy", "packages": ["numpy"], "specifier": ">=7.7.0,<8.0.0", "help": "https://docs.cupy.dev"}])
    with warnings.catch_warnings(record=True) as strict:
        warnings.simplefilter("always")
        _environment_check._check_optional_dependencies()
    assert any("may not be compatible" in str(w.message) for w in strict)

    gpu_compat.relax_version_check()
    with warnings.catch_warnings(record=True) as relaxed:
        warnings.simplefilter("always")
        _environment_check._check_optional_dependencies()
    assert not [w for w in relaxed if "may not be compatible" in str(w.message)]


def test_relax_version_check_respects_the_users_setting(fresh):
    fresh.setenv("CHAINER_WARN_VERSION_MISMATCH", "1")
    gpu_compat.relax_version_check()
    assert os.environ["CHAINER_WARN_VERSION_MISMATCH"] == "1"


def _wheel_tree(root):
    """A site-packages with nvidia-*-cu12 style folders; every 'library' is a real loadable ELF file."""
    elf = _ctypes.__file__
    files = {
        "nvidia/cublas/lib/libwmfakeblas.so.12": True,
        "nvidia/cublas/lib/libnvblas.so.12": False,  # would interpose on the host BLAS
        "nvidia/cuda_nvrtc/lib/libwmfakertc.alt.so.12": False,  # alternative build CuPy never loads
        "nvidia/cudnn/lib/libwmfakednn.so.8": True,
        "nvidia/cudnn/lib/libcudnn_wmfake.so.9": False,  # cuDNN 9: CuPy 13 cannot use it
        "nvidia/cufile/lib/libwmfakefile.so.1": False,  # not a library CuPy needs
        "nvidia/cu13/lib/libnvrtc-builtins.so.13.99": True,  # CUDA 13 wheels: one shared folder ...
        "nvidia/cu13/lib/libnppc.so.13": False,  # ... from which only CuPy's libraries are taken
    }
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(elf, path)
    return sorted(root / rel for rel, wanted in files.items() if wanted)


def test_cuda_wheel_libraries_are_found_and_preloaded(fresh, tmp_path):
    wanted = _wheel_tree(tmp_path)
    found = gpu_compat.cuda_wheel_libraries([tmp_path])
    assert sorted(found) == wanted
    loaded = gpu_compat.preload_cuda_libraries(found)
    assert sorted(loaded) == wanted
    assert gpu_compat._state["preloaded"] == loaded


def test_preload_loads_dependencies_first_by_retrying(fresh, tmp_path):
    # libdep must be loaded before libtop can be; libbroken never loads; libsys is on the system path.
    loaded: list[str] = []

    def fake_dlopen(name):
        base = name.rsplit("/", 1)[-1]
        if "/" not in name:
            if base == "libsys.so.1" or base in loaded:
                return
            raise OSError(f"{name}: cannot open shared object file")
        if base == "libbroken.so.1" or (base == "libtop.so.12" and "libdep.so.12" not in loaded):
            raise OSError(f"{name}: undefined symbol")
        loaded.append(base)

    fresh.setattr(gpu_compat, "_dlopen", fake_dlopen)
    paths = [tmp_path / n for n in ("libtop.so.12", "libbroken.so.1", "libdep.so.12", "libsys.so.1")]
    result = gpu_compat.preload_cuda_libraries(paths)
    assert [p.name for p in result] == ["libdep.so.12", "libtop.so.12"]


def test_enable_is_idempotent(fresh):
    calls = []
    fresh.setattr(gpu_compat, "preload_cuda_libraries", lambda libraries=None: calls.append(1) or [])
    gpu_compat.enable()
    gpu_compat.enable()
    assert calls == [1]
    assert os.environ["CHAINER_WARN_VERSION_MISMATCH"] == "0"
    assert sum(1 for f in warnings.filters if f[1] is not None and "cudnn library" in f[1].pattern) == 1



@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_benchmark_says_no_gpu_and_succeeds(fresh, capsys):
    from benchmarks import bench_gpu

    assert bench_gpu.main([]) == 0
    assert capsys.readouterr().out.strip() == "no GPU: CuPy is not installed (pip install -e '.[cuda]')"


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_benchmark_imports_no_torch_or_cupy_without_a_gpu():
    code = ("import sys; from benchmarks import bench_gpu; rc = bench_gpu.main([]); "
            "print(rc, sorted(m for m in ('torch', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip().splitlines()[-1] == "0 []"


def test_enable_if_installed_only_with_cupy(fresh):
    calls = []
    fresh.setattr(gpu_compat, "preload_cuda_libraries", lambda libraries=None: calls.append(1) or [])
    fresh.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else object())
    assert gpu_compat.enable_if_installed() is False and calls == [] and not gpu_compat._state["enabled"]
    fresh.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert gpu_compat.enable_if_installed() is True and calls == [1] and gpu_compat._state["enabled"]
