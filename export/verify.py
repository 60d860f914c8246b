"""Measured export fidelity: an artifact (.onnx or .plan) against its torch checkpoint.

Inputs cover what a sampler will ask for: batch sizes {1, an odd size, max}; per-row sigma drawn
log-uniformly over the model's usable range (the sampler's [0.002, 80] clamped to the network's
own limits and snapped by round_sigma); x = y + sigma * n with data-scale y; one-hot class labels
cycling through the classes. The artifact runs through the same backend `sample` uses, the
reference is the fp32 torch network. Results are judged per row by relative L2 error
``||D_art - D_ref|| / ||D_ref||`` and by the largest elementwise difference, with per-precision
tolerances, plus a NaN/Inf check, and polygraphy's comparator runs the same outputs through its
elementwise/statistical check. A table reports the errors per sigma band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from edm_deploy.runtime.errors import InputError

# precision -> (max relative L2 per row, max abs elementwise); fp16 has no elementwise bound.
TOLERANCES = {"fp32": (1e-5, 1e-4), "fp16": (1e-2, None)}


@dataclass
class BandStats:
    lo: float
    hi: float
    rows: int = 0
    max_abs: float = 0.0
    max_rel_l2: float = 0.0


@dataclass
class VerifyReport:
    artifact: str
    precision: str
    backend: str
    batches: list[int]
    bands: list[BandStats]
    max_rel_l2: float
    max_abs: float
    nonfinite_rows: int
    rel_tol: float
    abs_tol: Optional[float]
    polygraphy: Optional[str] = None
    polygraphy_passed: Optional[bool] = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [
            f"verify {self.artifact} ({self.precision}, {self.backend}) against the fp32 torch model",
            f"batches {self.batches}; tolerance: relative L2 <= {self.rel_tol:g}"
            + (f", max abs <= {self.abs_tol:g}" if self.abs_tol is not None else ""),
            f"{'sigma band':>22} {'rows':>5} {'max abs err':>12} {'max rel L2':>12}",
        ]
        for b in self.bands:
            if b.rows:
                lines.append(f"{f'[{b.lo:.4g}, {b.hi:.4g}]':>22} {b.rows:>5} {b.max_abs:>12.3e} {b.max_rel_l2:>12.3e}")
        lines.append(f"{'all':>22} {sum(b.rows for b in self.bands):>5} {self.max_abs:>12.3e} {self.max_rel_l2:>12.3e}")
        if self.polygraphy:
            lines.append(f"polygraphy comparator: {self.polygraphy}")
        lines.append("PASS" if self.passed else "FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def sigma_range(net: Any) -> tuple[float, float]:
    lo = max(float(net.sigma_min), 0.002)
    hi = min(float(net.sigma_max), 80.0)
    return lo, hi


def make_feeds(net: Any, batches: Sequence[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Deterministic test inputs: per-row log-uniform sigma, x at the matching noise level."""
    import torch

    rng = np.random.default_rng(seed)
    lo, hi = sigma_range(net)
    feeds = []
    for b in batches:
        u = (np.arange(b) + rng.uniform(0, 1, b)) / b  # stratified: every batch spans the range
        sigma = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
        sigma = np.asarray(net.round_sigma(torch.from_numpy(sigma).float()), dtype=np.float32).reshape(b)
        y = np.clip(rng.standard_normal((b, net.img_channels, net.img_resolution, net.img_resolution)) * 0.5, -1, 1)
        x = (y + sigma.reshape(-1, 1, 1, 1) * rng.standard_normal(y.shape)).astype(np.float32)
        feed = {"x": x, "sigma": sigma}
        if net.label_dim:
            feed["class_labels"] = np.eye(net.label_dim, dtype=np.float32)[np.arange(b) % net.label_dim]
        feeds.append(feed)
    return feeds


def reference_outputs(net: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import torch

    outs = []
    net = net.eval()
    with torch.no_grad():
        for feed in feeds:
            labels = torch.from_numpy(feed["class_labels"]) if "class_labels" in feed else None
            outs.append(net(torch.from_numpy(feed["x"]), torch.from_numpy(feed["sigma"]), labels).float().numpy())
    return outs


def default_batches(max_batch: int) -> list[int]:
    """{1, an odd size strictly between when one exists, max}: 1, 5, 8 for 8; 1, 33, 64 for 64."""
    mid = max_batch // 2
    odd = mid if mid % 2 else mid + 1
    return sorted({1, odd, max_batch} if 1 < odd < max_batch else {1, max_batch})


def verify_artifact(
    artifact_path: str,
    net: Any,
    den: Any,
    precision: str,
    batches: Optional[Sequence[int]] = None,
    seed: int = 0,
    num_bands: int = 6,
    use_polygraphy: bool = True,
) -> VerifyReport:
    """Compare `den` (the artifact's backend) with `net` (fp32 torch) and return a report."""
    if precision not in TOLERANCES:
        raise InputError(f"unknown precision {precision!r}")
    max_batch = int(den.max_batch or (den.manifest.get("batch") or {}).get("max") or 8)
    batches = list(batches or default_batches(max_batch))
    feeds = make_feeds(net, batches, seed)
    want = reference_outputs(net, feeds)
    got = [np.asarray(den(f["x"], f["sigma"], f.get("class_labels")), dtype=np.float32) for f in feeds]

    lo, hi = sigma_range(net)
    edges = np.exp(np.linspace(math.log(lo), math.log(hi), num_bands + 1))
    bands = [BandStats(float(edges[i]), float(edges[i + 1])) for i in range(num_bands)]
    rel_tol, abs_tol = TOLERANCES[precision]
    max_rel = max_abs = 0.0
    nonfinite = 0
    for feed, a, b in zip(feeds, got, want):
        for row in range(len(a)):
            s = float(feed["sigma"][row])
            k = int(np.clip(np.searchsorted(edges, s, side="right") - 1, 0, num_bands - 1))
            diff = a[row].astype(np.float64) - b[row].astype(np.float64)
            if not np.isfinite(a[row]).all():
                nonfinite += 1
                continue
            rel = float(np.linalg.norm(diff) / max(np.linalg.norm(b[row]), 1e-30))
            mabs = float(np.abs(diff).max())
            band = bands[k]
            band.rows += 1
            band.max_abs = max(band.max_abs, mabs)
            band.max_rel_l2 = max(band.max_rel_l2, rel)
            max_rel, max_abs = max(max_rel, rel), max(max_abs, mabs)

    report = VerifyReport(
        artifact=artifact_path, precision=precision, backend=den.describe(), batches=batches, bands=bands,
        max_rel_l2=max_rel, max_abs=max_abs, nonfinite_rows=nonfinite, rel_tol=rel_tol, abs_tol=abs_tol,
    )
    if nonfinite:
        report.failures.append(f"{nonfinite} output rows contain NaN/Inf")
    if max_rel > rel_tol:
        report.failures.append(f"relative L2 error {max_rel:.3e} exceeds {rel_tol:g}")
    if abs_tol is not None and max_abs > abs_tol:
        report.failures.append(f"max abs error {max_abs:.3e} exceeds {abs_tol:g}")
    if use_polygraphy:
        _polygraphy_check(report, got, want, precision)
    return report


def _polygraphy_check(report: VerifyReport, got: list, want: list, precision: str) -> None:
    """Run the same outputs through polygraphy's comparator (elementwise for fp32, mean for fp16)."""
    try:
        from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        report.polygraphy = "not installed (skipped)"
        return
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    runs = RunResults()
    runs.append(("artifact", [IterationResult({"denoised": g}, runner_name="artifact") for g in got]))
    runs.append(("torch-fp32", [IterationResult({"denoised": w}, runner_name="torch-fp32") for w in want]))
    if precision == "fp32":
        func = SimpleCompareFunc(atol=1e-4, rtol=1e-4, check_error_stat="elemwise")
        what = "elementwise atol=rtol=1e-4"
    else:
        func = SimpleCompareFunc(atol=1e-2, rtol=1e-1, check_error_stat="mean")
        what = "mean error atol=1e-2 / rtol=1e-1"
    accuracy = Comparator.compare_accuracy(runs, compare_func=func)
    valid = Comparator.validate(runs, check_inf=True, check_nan=True)
    ok = bool(accuracy) and bool(valid)
    report.polygraphy = f"{'passed' if ok else 'FAILED'} ({what}, NaN/Inf check {'passed' if valid else 'FAILED'})"
    report.polygraphy_passed = ok
    if not ok:
        report.failures.append("polygraphy comparator failed")
