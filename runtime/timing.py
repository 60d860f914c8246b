"""Measuring a denoiser: wall time inside the network, and the number of calls.

Backends never time their own evaluations, because timing a GPU call means waiting for it
(a device synchronisation per evaluation), which stalls the pipeline of an unmeasured run. A
front end that reports the time spent inside the network wraps the denoiser in `TimedDenoiser`,
itself a denoiser, and reads `eval_seconds` afterwards.
"""

from __future__ import annotations

import time
from typing import Any

from edm_deploy.runtime.contract import DenoiserBase, as_denoiser


class TimedDenoiser(DenoiserBase):
    """`den` with each call timed to completion (synchronised); everything else delegated."""

    def __init__(self, den: Any):
        self.den = as_denoiser(den)
        for name in ("sigma_min", "sigma_max", "img_channels", "img_resolution", "label_dim", "max_batch", "device",
                     "label_dropout"):
            setattr(self, name, getattr(self.den, name))
        self.eval_seconds = 0.0
        self.calls = 0

    @property
    def warnings(self) -> list[str]:
        return self.den.warnings

    def round_sigma(self, sigma: Any) -> Any:
        return self.den.round_sigma(sigma)

    def to_device(self, host_array: Any) -> Any:
        return self.den.to_device(host_array)

    def synchronize(self) -> None:
        self.den.synchronize()

    def describe(self) -> str:
        return self.den.describe()

    def close(self) -> None:
        self.den.close()

    def reset(self) -> None:
        self.eval_seconds, self.calls = 0.0, 0

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        start = time.perf_counter()
        out = self.den(x, sigma, class_labels)
        self.den.synchronize()
        self.eval_seconds += time.perf_counter() - start
        self.calls += 1
        return out
