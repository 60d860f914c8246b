"""How a network rounds the noise levels it is asked for (`round_sigma`).

EDM, VP and VE networks accept any sigma. iDDPM networks were trained on M discrete levels and
snap sigma to the nearest entry of their (float32) table; the sampler must snap every time step to
that table just as the reference does, or it asks the network for levels it never saw. The rule
travels in the artifact manifest, so a runtime needs no torch to apply it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError


def identity_round(sigma) -> np.ndarray:
    """round_sigma of continuous-time networks: the value itself, as float64."""
    return np.asarray(sigma, dtype=np.float64)


class TableRound:
    """Nearest-entry snapping onto a discrete sigma table, computed in float32 like the reference."""

    def __init__(self, table: Sequence[float]):
        table = np.asarray(table, dtype=np.float32).reshape(-1)
        if table.size < 2:
            raise InputError("a sigma table needs at least two entries")
        self.table = table

    def index(self, sigma) -> np.ndarray:
        """Index of the nearest table entry (ties go to the lower index, as argmin does)."""
        s = np.asarray(sigma, dtype=np.float32)
        dist = np.abs(s.reshape(-1, 1) - self.table.reshape(1, -1))
        return dist.argmin(axis=1).reshape(s.shape)

    def __call__(self, sigma) -> np.ndarray:
        return self.table[self.index(sigma)].astype(np.float64)


def round_sigma_from_rule(rule: Mapping[str, Any] | None) -> Callable:
    """Build a round_sigma function from a manifest entry {'kind': 'identity'|'table', ...}."""
    if rule is None or rule.get("kind", "identity") == "identity":
        return identity_round
    if rule["kind"] == "table":
        return TableRound(rule["values"])
    raise InputError(f"unknown sigma rounding rule {rule.get('kind')!r} in the model manifest")
