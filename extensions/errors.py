"""The errors the toolkit raises: a NaN/Inf in training, and float64 mode not in force."""
from __future__ import annotations

from .schema import ConfigError


class NonFiniteError(RuntimeError):
    """A NaN/Inf in training: where it was born, in which Link and function, and why.

    ``where`` is ``forward``, ``backward`` or ``update``; ``verdict`` is ``precision``
    (finite when replayed in float64), ``bug`` (non-finite in float64 too) or None.
    """

    def __init__(self, message: str, *, iteration: int | None = None, where: str | None = None,
                 link: str | None = None, function: str | None = None, verdict: str | None = None,
                 report_path: str | None = None):
        super().__init__(message)
        self.message = message
        self.iteration, self.where, self.link = iteration, where, link
        self.function, self.verdict, self.report_path = function, verdict, report_path

    def summary(self) -> str:
        """One line for a terminal: iteration, place, verdict and where the report is."""
        parts = [self.message]
        if self.iteration is not None:
            parts.insert(0, f"iteration {self.iteration}:")
        if self.verdict:
            parts.append(f"[verdict: {self.verdict}]")
        if self.report_path:
            parts.append(f"(report: {self.report_path})")
        return " ".join(parts)


class Float64Error(ConfigError):
    """float64 mode is on (``debug.float64``) but some parameters are not float64; names them.

    A ConfigError so that any CLI treating configuration problems as one-line errors shows it.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, f"debug.float64: {message}")
        self.file, self.path, self.line, self.detail = None, "debug.float64", None, message
