"""``LogReport``: Chainer's ``LogReport`` writing the same file, one entry per write instead of the whole log.

Chainer's ``LogReport`` rewrites its whole history (``json.dump(log, indent=4)``) at every write.
With the toolkit's seven keys per parameter in each entry that grows with the run: after a
thousand entries of a 4-parameter net a write encodes some 30 000 values, and the total cost
of a run is quadratic in its length. This subclass encodes each entry once and writes it in
place of the closing bracket. The file is byte for byte what Chainer's would be; it is written
whole (atomically, as Chainer does) whenever it is not the file this extension wrote last:
the first write, after a snapshot was loaded, when someone else changed or removed it, and
when the file name is a format that changes with the entry. Use it in place of Chainer's.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from chainer import serializer as serializer_module
from chainer import training, utils

_INDENT = b"\n    "


def entry_json(entry: dict[str, Any]) -> bytes:
    """``entry`` as it appears inside ``json.dumps(log, indent=4)``: indented one level, no separator."""
    return b"    " + json.dumps(entry, indent=4).encode().replace(b"\n", _INDENT)


class LogReport(training.extensions.LogReport):
    """``chainer.training.extensions.LogReport`` (same arguments, same log file) whose writes cost one entry."""

    _ext_written: tuple[str, int, int, int] | None = None  # (path, size, mtime_ns, entries) of the last write

    def __call__(self, trainer: training.Trainer) -> None:
        name, self._log_name = self._log_name, None  # Chainer's __call__ does everything but the write
        count = len(self._log)
        try:
            super().__call__(trainer)
        finally:
            self._log_name = name
        if name is not None and len(self._log) > count:
            self._write(trainer.out, name.format(**self._log[-1]))

    def _write(self, out: str, name: str) -> None:
        path = os.path.join(out, name)
        last = self._ext_written
        if last is not None and last[0] == path and last[3] == len(self._log) - 1 and _unchanged(path, last):
            with open(path, "r+b") as f:
                f.seek(last[1] - 2)  # the closing "\n]"
                f.write(b",\n" + entry_json(self._log[-1]) + b"\n]")
        else:
            with utils.tempdir(prefix=name, dir=out) as tempd:
                temp = os.path.join(tempd, "log.json")
                with open(temp, "w") as f:
                    json.dump(self._log, f, indent=4)
                shutil.move(temp, path)
        st = os.stat(path)
        self._ext_written = (path, st.st_size, st.st_mtime_ns, len(self._log))

    def serialize(self, serializer: Any) -> None:
        """As Chainer's; a loaded log is written whole at the next write."""
        super().serialize(serializer)
        if isinstance(serializer, serializer_module.Deserializer):
            self._ext_written = None


def _unchanged(path: str, last: tuple[str, int, int, int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == last[1] and st.st_mtime_ns == last[2] and last[1] >= 2

