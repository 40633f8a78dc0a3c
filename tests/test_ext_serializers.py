"""``extensions.load_npz``: Chainer's files and signature, pickling off, one-line errors naming file and key."""
from __future__ import annotations

import io

import chainer
import chainer.links as L
import numpy as np
import pytest

from extensions import NpzLoadError, load_npz, snapshot


def test_round_trip_matches_chainer_and_reads_chainers_none(tmp_path):
    m = L.Linear(3, 2)
    chainer.serializers.save_npz(tmp_path / "m.npz", m)
    back = L.Linear(3, 2)
    load_npz(str(tmp_path / "m.npz"), back)
    np.testing.assert_array_equal(back.W.array, m.W.array)
    lazy = L.Linear(None, 2)  # its W is None: Chainer writes numpy.asarray(None), an object array
    chainer.serializers.save_npz(tmp_path / "lazy.npz", lazy)
    again = L.Linear(None, 2)
    load_npz(tmp_path / "lazy.npz", again)
    assert again.W.array is None
    buf = io.BytesIO()
    chainer.serializers.save_npz(buf, m)
    buf.seek(0)
    load_npz(buf, L.Linear(3, 2))


@pytest.mark.parametrize("make, key, words", [
    (lambda: L.Linear(4, 2), "W", "shape (2, 3), expected (2, 4)"),
    (lambda: L.Linear(3, 2), "b", "missing"),
])
def test_shape_and_missing_key_name_file_and_key(tmp_path, make, key, words):
    m = L.Linear(3, 2)
    path = tmp_path / "m.npz"
    if words == "missing":
        np.savez(path, W=m.W.array)
    else:
        chainer.serializers.save_npz(path, m)
    with pytest.raises(NpzLoadError) as e:
        load_npz(str(path), make())
    assert str(e.value).startswith(f"{path}: key '{key}': ") and words in str(e.value)
    assert "\n" not in str(e.value)
    load_npz(str(path), make(), strict=False) if words == "missing" else None


@pytest.mark.parametrize("dtype", [np.complex64, "U3", np.float64])
def test_dtype_must_cast_within_its_kind(tmp_path, dtype):
    path = tmp_path / "m.npz"
    np.savez(path, W=np.zeros((2, 3), dtype), b=np.zeros(2, np.float32))
    if dtype == np.float64:  # float64 into float32 (float64 troubleshooting snapshots) is fine
        load_npz(str(path), L.Linear(3, 2))
        return
    with pytest.raises(NpzLoadError, match=r"key 'W': dtype"):
        load_npz(str(path), L.Linear(3, 2))


def test_poisoned_and_truncated_files_run_nothing(tmp_path, poison):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npz"
    poison(path, marker, ["W"])  # 0-d object array; a one-parameter link, so W is the first key read
    with pytest.raises(NpzLoadError, match=r"key 'W': holds a pickled Python object"):
        load_npz(str(path), L.Linear(3, 2, nobias=True))
    poison(path, marker, ["b", "W"])  # W as a 1-d object array
    with pytest.raises(NpzLoadError, match=r"key 'W': holds a pickled Python object"):
        load_npz(str(path), L.Linear(3, 2, nobias=True))
    assert not marker.exists()
    good = tmp_path / "m.npz"
    chainer.serializers.save_npz(good, L.Linear(3, 2))
    raw = good.read_bytes()
    for n in (len(raw) // 2, len(raw) - 10, 0):
        good.write_bytes(raw[:n])
        with pytest.raises(NpzLoadError, match=str(good)):
            load_npz(str(good), L.Linear(3, 2))


def test_snapshot_autoload_refuses_a_poisoned_snapshot(tmp_path, poison):
    from chainer import training

    model = L.Classifier(L.Linear(3, 2))
    opt = chainer.optimizers.SGD()
    opt.setup(model)
    data = [(np.zeros(3, np.float32), np.int32(0))] * 4
    it = chainer.iterators.SerialIterator(data, 2)
    trainer = training.Trainer(training.StandardUpdater(it, opt), (2, "iteration"), out=str(tmp_path))
    trainer.extend(snapshot(autoload=True), trigger=(1, "iteration"))
    trainer.run(show_loop_exception_msg=False)
    snaps = sorted(tmp_path.glob("snapshot_iter_*"))
    assert snaps
    with np.load(snaps[-1]) as f:
        keys = list(f.files)
    marker = tmp_path / "marker"
    for s in snaps:
        poison(s, marker, keys)
    it = chainer.iterators.SerialIterator(data, 2)
    again = training.Trainer(training.StandardUpdater(it, opt), (4, "iteration"), out=str(tmp_path))
    again.extend(snapshot(autoload=True), trigger=(1, "iteration"))
    with pytest.raises(NpzLoadError, match="holds a pickled Python object"):
        again.run(show_loop_exception_msg=False)
    assert not marker.exists()
