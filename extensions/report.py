"""The ``<out>/nonfinite/`` folder: a readable report, its JSON twin and the last good state.

The snapshot holds the weights and optimizer state from *before* the failing update (the
update never happened, or was rolled back) and the failing batch, so the iteration can be
reproduced: ``extensions.load_npz('model.npz', model)``, ``numpy.load('batch.npz')``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import chainer
import numpy as np

from .files import chmod_like_open
from .localize import Birth

REPORT_DIR = "nonfinite"


@dataclasses.dataclass
class Failure:
    """Everything known about one non-finite iteration."""

    iteration: int
    where: str
    trigger: str
    policy: str
    loss: float | None = None
    replay_loss: float | None = None
    global_norm: float | None = None
    grads_nonfinite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    params_nonfinite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    missing_grads: list[str] = dataclasses.field(default_factory=list)
    birth: Birth | None = None
    verdict: str | None = None
    verdict_detail: str | None = None
    skipped: int = 0
    failures: int = 1
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    # under a ChainerMN multi-node optimizer: the rank where the value was born (the first, if several) and
    # what each process found (rank, loss, born there, birth, verdict, its own gradients' NaN/Inf counts)
    rank: int | None = None
    ranks: list[dict] = dataclasses.field(default_factory=list)

    @property
    def link(self) -> str | None:
        """Path of the Link where the value was born, if found."""
        return self.birth.link if self.birth else None

    @property
    def function(self) -> str | None:
        """The Chainer function (or update rule) that produced it, if found."""
        return self.birth.function if self.birth else None

    def headline(self) -> str:
        """One line: what was detected and where it was born."""
        text = f"non-finite {self.trigger}"
        if self.birth is not None:
            text += f"; {self.birth.describe()}"
            if self.rank is not None:
                text += f" (on rank {self.rank} of {len(self.ranks)} processes)"
        elif self.rank is not None:
            text += f"; on rank {self.rank} of {len(self.ranks)} processes"
        elif self.where == "update" and self.params_nonfinite:
            text += f"; parameters {', '.join(sorted(self.params_nonfinite))} became non-finite in the update"
        return text

    def to_json(self) -> dict:
        """A JSON-safe dict (NaN/Inf written as strings)."""
        data = dataclasses.asdict(self)
        data["link"], data["function"], data["headline"] = self.link, self.function, self.headline()
        return _json_safe(data)

    def to_text(self) -> str:
        """The human-readable report."""
        lines = [f"Non-finite value in training at iteration {self.iteration} (policy: {self.policy})",
                 f"Detected: {self.trigger}"]
        b = self.birth
        if b is not None:
            lines.append(f"Born{'' if self.rank is None else f' on rank {self.rank}'}: {b.describe()}")
            lines.append(f"  Link:     {b.link or '(outside any Link)'}")
            lines.append(f"  function: {b.function}")
            lines.append(f"  source:   {b.source or '(unknown)'}")
            labels = ("inputs", "outputs") if b.where == "forward" else ("incoming gradients", "outgoing gradients")
            for label, arrays in zip(labels, (b.inputs, b.outputs)):
                for i, info in enumerate(arrays):
                    lines.append(f"  {label}[{i}]: {_describe_array(info)}")
        else:
            lines.append(f"Born: not localised (stage: {self.where})")
        if self.verdict:
            lines.append(f"Verdict (float64 replay): {self.verdict} - {self.verdict_detail}")
        if self.loss is not None:
            lines.append(f"Loss: {self.loss}" + (f" (replayed: {self.replay_loss})" if self.replay_loss is not None
                                                 else ""))
        if self.global_norm is not None:
            lines.append(f"Global gradient norm: {self.global_norm}")
        for title, table in (("Non-finite gradients", self.grads_nonfinite),
                             ("Non-finite parameters after the update (rolled back)", self.params_nonfinite)):
            if table:
                lines.append(f"{title}:")
                lines.extend(f"  {name}: {nan} NaN, {inf} Inf" for name, (nan, inf) in sorted(table.items()))
        if self.missing_grads:
            lines.append(f"Parameters with no gradient: {', '.join(self.missing_grads)}")
        if self.ranks:
            lines.append(f"Processes ({len(self.ranks)}, the gradients above are their average; every process "
                         "skipped or stopped at this iteration):")
            for info in self.ranks:
                counts = info.get("grads_nonfinite")
                own = ("not replayed" if counts is None else
                       ", ".join(f"{n} {a} NaN {b} Inf" for n, (a, b) in sorted(counts.items())) or "all finite")
                born = f"; born here: {info['birth']}" if info.get("birth") else (
                    "; born here" if info.get("born") else "")
                verdict = f"; float64 replay: {info['verdict']}" if info.get("verdict") else ""
                lines.append(f"  rank {info['rank']}: loss {info.get('loss')}; own gradients: {own}{born}{verdict}")
        lines.append(f"Non-finite iterations so far: {self.failures}; updates skipped: {self.skipped}")
        if self.files:
            lines.append("Last good state (weights and optimizer before this update, and the batch):")
            lines.extend(f"  {key}: {path}" for key, path in self.files.items())
            lines.append("  load with extensions.load_npz(path, obj) and numpy.load(batch)")
        return "\n".join(lines) + "\n"


def _describe_array(info: dict) -> str:
    if info.get("shape") is None:
        return "None"
    text = f"shape {tuple(info['shape'])} {info.get('dtype', '')}"
    if "min" in info:
        text += f", finite range [{info['min']:.6g}, {info['max']:.6g}]"
    if "nan" in info:
        text += f", {info['nan']} NaN, {info['inf']} Inf"
    return text


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def _atomic(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            chmod_like_open(f.fileno())
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def batch_arrays(in_arrays: Any) -> dict[str, np.ndarray]:
    """The batch as named host arrays (what batch.npz holds); entries that are not arrays are left out."""
    cpu = chainer.backend.CpuDevice()
    if isinstance(in_arrays, dict):
        items = list(in_arrays.items())
    elif isinstance(in_arrays, (tuple, list)):
        items = [(f"arr_{i}", a) for i, a in enumerate(in_arrays)]
    else:
        items = [("arr_0", in_arrays)]
    out = {}
    for key, value in items:
        value = getattr(value, "array", value)
        try:
            out[str(key)] = np.asarray(cpu.send(value))
        except Exception:  # a non-array entry (e.g. a Python object) cannot go into an npz
            continue
    return out


def report_path(out_dir: str) -> str:
    """Where ``write_report`` puts report.txt."""
    return os.path.join(out_dir, REPORT_DIR, "report.txt")


def write_report(out_dir: str, failure: Failure, model: chainer.Link | None = None,
                 optimizer: chainer.Optimizer | None = None, in_arrays: Any = None) -> str:
    """Write report.txt, report.json and (if given) the last good model, optimizer and batch; returns report.txt."""
    folder = os.path.join(out_dir, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    if model is not None:
        failure.files["model"] = os.path.join(folder, "model.npz")
        _atomic(failure.files["model"], lambda f: chainer.serializers.save_npz(f, model))
    if optimizer is not None:
        failure.files["optimizer"] = os.path.join(folder, "optimizer.npz")
        _atomic(failure.files["optimizer"], lambda f: chainer.serializers.save_npz(f, optimizer))
    if in_arrays is not None:
        arrays = batch_arrays(in_arrays)
        failure.files["batch"] = os.path.join(folder, "batch.npz")
        _atomic(failure.files["batch"], lambda f: np.savez(f, **arrays))
    text_path = os.path.join(folder, "report.txt")
    _atomic(os.path.join(folder, "report.json"),
            lambda f: f.write(json.dumps(failure.to_json(), indent=2) + "\n"), mode="w")
    _atomic(text_path, lambda f: f.write(failure.to_text()), mode="w")
    return text_path


def update_counts(out_dir: str, skipped: int, failures: int, iteration: int) -> None:
    """Record another skipped update in an existing report.json (the ``skip`` policy's bookkeeping)."""
    path = os.path.join(out_dir, REPORT_DIR, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return
    data.update(skipped=skipped, failures=failures, last_iteration=iteration)
    _atomic(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), mode="w")
