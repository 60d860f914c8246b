"""Measuring a denoiser: wall time inside the network, and the number of calls.

Backends never time their own evaluations, because timing a GPU call means waiting for it
(a device synchronisation per evaluation), which stalls the pipeline of an unmeasured run. A
front end that reports the time spent inside the network wraps the denoiser in `TimedDenoiser`,
itself a denoiser, and reads `eval_seconds` afterwards.
"""

from __future__ import annotations

import time
from typing import Any

from .contract import DelegatingDenoiser


class TimedDenoiser(DelegatingDenoiser):
    """`den` with each call timed to completion (synchronised); everything else delegated."""

    def __init__(self, den: Any):
        super().__init__(den)
        self.eval_seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.eval_seconds, self.calls = 0.0, 0

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        start = time.perf_counter()
        out = self.den(x, sigma, class_labels)
        self.den.synchronize()
        self.eval_seconds += time.perf_counter() - start
        self.calls += 1
        return out
