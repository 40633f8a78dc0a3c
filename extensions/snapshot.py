"""Chainer's ``snapshot`` extension whose ``autoload`` reads the newest snapshot with the safe ``load_npz``."""
from __future__ import annotations

import os
from typing import Any

from chainer.training.extensions import snapshot_writers

from . import chainer_compat as compat
from .serializers import load_npz


class Snapshot(compat.snapshot_base()):  # type: ignore[misc]
    """As Chainer's snapshot extension; resuming (``autoload``) never unpickles."""

    def initialize(self, trainer: Any) -> None:
        """Load the newest snapshot safely (when ``autoload``), then set up Chainer's clean-up of old ones."""
        if self.autoload:
            latest = compat.find_latest_snapshot(self.filename, trainer.out)
            if latest is not None:
                load_npz(os.path.join(trainer.out, latest), trainer if self._target is None else self._target)
        autoload, self.autoload = self.autoload, False
        try:
            super().initialize(trainer)
        finally:
            self.autoload = autoload


def snapshot(savefun: Any = None, filename: str = "snapshot_iter_{.updater.iteration}", *, target: Any = None,
             condition: Any = None, writer: Any = None, snapshot_on_error: bool = False, n_retains: int = -1,
             autoload: bool = False) -> Snapshot:
    """``chainer.training.extensions.snapshot`` with the same arguments; ``autoload`` uses the safe loader."""
    if savefun is not None and writer is not None:
        raise TypeError("savefun and writer arguments cannot be specified together.")
    if writer is None:
        writer = snapshot_writers.SimpleWriter(**({} if savefun is None else {"savefun": savefun}))
    return Snapshot(target=target, condition=condition, writer=writer, filename=filename,
                    snapshot_on_error=snapshot_on_error, n_retains=n_retains, autoload=autoload)
