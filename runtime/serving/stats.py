"""What the engine counts itself, and the hooks a metrics exporter receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .requests import GenerationResult


class EngineObserver:
    """Hooks for metrics (the server maps them to Prometheus); every method a no-op here.

    Called from the engine's thread; keep them short.
    """

    def network_call(self, rows: int, seconds: float) -> None:
        """A call of the model: its real rows (classifier-free twins included, padding not)."""

    def padding(self, rows: int) -> None:
        """Rows of padding the last call carried to reach a checked batch shape (called when nonzero)."""

    def request_done(self, status: str, images: int, result: Optional[GenerationResult]) -> None:
        """A request settled: "ok", "error", "timeout" or "cancelled"."""


@dataclass
class EngineStats:
    """Counters the engine keeps itself (thread-safe to read: plain ints and floats)."""

    network_calls: int = 0
    rows: int = 0                   # real rows of the model's calls (classifier-free twins included)
    padded_rows: int = 0            # rows added to reach a checked batch shape (model and guide)
    guide_calls: int = 0
    guide_rows: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    images_done: int = 0
    network_seconds: float = 0.0

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.network_calls if self.network_calls else 0.0

    @property
    def padded_fraction(self) -> float:
        """Padding as a share of every row the networks evaluated."""
        total = self.rows + self.guide_rows + self.padded_rows
        return self.padded_rows / total if total else 0.0

    @property
    def seconds_per_call(self) -> float:
        return self.network_seconds / self.network_calls if self.network_calls else 0.0
