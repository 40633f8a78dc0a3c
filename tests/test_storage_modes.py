"""Files written atomically follow the user's umask, as files ``open`` creates do."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from extensions.report import _atomic as report_atomic
from wm_trainer.base.storage import atomic_savez, atomic_write_bytes, atomic_write_json
from wm_trainer.models.controller import Controller


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        written = [atomic_write_json(tmp_path / "eval.json", {"a": 1}),
                   Controller(2, 3, 1).save(tmp_path / "controller.npz"),
                   atomic_savez(tmp_path / "ep.npz", x=np.zeros(3)),
                   atomic_write_bytes(tmp_path / "agent.gif", b"GIF89a")]
        report_atomic(str(tmp_path / "report.txt"), lambda f: f.write(b"x"))
        written.append(tmp_path / "report.txt")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert expected == 0o666 & ~mask
    assert {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in written} == {p.name: expected for p in written}
