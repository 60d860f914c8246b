"""Measured export fidelity: an artifact (.onnx or .plan) against its torch checkpoint.

Inputs cover what a sampler will ask for: batch sizes {1, an odd size, max}; per-row sigma drawn
log-uniformly over the model's usable range (the sampler's [0.002, 80] clamped to the network's
own limits and snapped by round_sigma); x = y + sigma * n with data-scale y; one-hot class labels
cycling through the classes. The artifact runs through the same backend `sample` uses, the
reference is the fp32 torch network.

What the gate measures, and why
-------------------------------
The sampler never uses the denoiser output D on its own. Every Euler or Heun step of the
probability-flow ODE moves the state by ``(sigma_next - sigma) * d`` with the derivative
``d = (x - D) / sigma`` (the final step to sigma = 0 returns D itself, which is that same
formula). An error ``dD`` in the artifact's output changes the derivative by ``-dD / sigma``, so
the fraction by which it changes each step is, per row,

    derivative error = ||d_art - d_ref|| / ||d_ref|| = ||D_art - D_ref|| / ||x - D_ref||

(sigma cancels). This is the gate: it has the same meaning at sigma = 0.002 and at sigma = 80 and
for every preconditioner, and it bounds the error of a whole trajectory by the tolerance times
the length of the path the sampler walks. The two measures the gate used before do not:

* the largest absolute difference grows with |D|, which reaches ~|x| ~ sigma for VP, VE and
  iDDPM (c_skip = 1, D = x + c_out F): correct fp32 exports exceed 1e-4 near sigma = 80, where
  the sampler divides the difference by 80;
* the error relative to |D| blows up where D is small next to x (a trained network at high sigma:
  D ~ data, x ~ sigma * noise), and VP's fp32 sin/cos of a noise embedding near 999 alone gives
  F a relative error of ~1e-5 there, which VP multiplies by sigma into D.

Both are still measured and shown in the per-band table (``max abs err``, ``max rel L2``) as
information. The tolerances (`TOLERANCES`, the only place they are written down) are per
precision, in the derivative error; every row must be finite. polygraphy's comparator checks
the same quantity independently: it is given each row's derivative divided by the norm of the
reference derivative, so its L2 distance is the gate's number (see `_polygraphy_check`).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.manifest import CLASS_LABELS, SIGMA, X


@dataclass(frozen=True)
class Tolerance:
    """The largest derivative error (see the module docstring) one row of an export may have."""

    derivative: float
    why: str


# precision -> tolerance. Measured on correct exports of every preconditioner (EDM, VP, VE,
# iDDPM) x architecture (DDPM++, NCSN++, ADM) of the test networks: fp32 <= 4e-6, fp16 <= 1e-3.
TOLERANCES = {
    "fp32": Tolerance(1e-4, "fp32 rounding of x - D near sigma_min (one ulp of x over sigma ~ 3e-5 per "
                            "element), with room for reordered sums; correct exports measure <= 4e-6"),
    "fp16": Tolerance(1e-2, "about 20 unit roundoffs of fp16 (4.9e-4); correct exports measure <= 1e-3"),
    "int8": Tolerance(0.2, "four times the 0.050 the trained digits model measures on the default inputs "
                           "(98 rows: batches 1, 33, 64; MinMax calibration on 16 sampling trajectories; largest "
                           "for 0.07 < sigma < 0.4, <= 0.035 above 0.4), 1.75x its largest over 1502 rows (0.114, "
                           "batches up to 1000), three orders below a wrongly quantised graph (296 with the skip "
                           "path in int8)"),
    "bf16": Tolerance(5e-2, "about 13 unit roundoffs of bf16 (3.9e-3), for the torch backend's bf16 autocast of "
                            "the inner network; the trained digits model measures 8.0e-3"),
}


def tolerance_summary() -> str:
    """One line, e.g. ``fp32 1e-04, fp16 0.01, int8 0.05 (provisional)``, for help texts."""
    return ", ".join(
        f"{name} {tol.derivative:g}" + (" (provisional)" if tol.why.startswith("provisional") else "")
        for name, tol in TOLERANCES.items()
    )


@dataclass
class BandStats:
    lo: float
    hi: float
    rows: int = 0
    max_abs: float = 0.0
    max_rel_l2: float = 0.0
    max_deriv: float = 0.0


@dataclass
class VerifyReport:
    artifact: str
    precision: str
    backend: str
    batches: list[int]
    bands: list[BandStats]
    max_deriv: float          # the gate: max over rows of ||D_art - D_ref|| / ||x - D_ref||
    max_rel_l2: float         # information: max over rows of ||D_art - D_ref|| / ||D_ref||
    max_abs: float            # information: largest elementwise |D_art - D_ref|
    nonfinite_rows: int
    tolerance: float
    polygraphy: Optional[str] = None
    polygraphy_passed: Optional[bool] = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [
            f"verify {self.artifact} ({self.precision}, {self.backend}) against the fp32 torch model",
            f"batches {self.batches}; gate ({self.precision}): derivative error ||D - D_ref|| / ||x - D_ref|| "
            f"<= {self.tolerance:g} in every row",
            "(the fraction by which the artifact changes each sampler step; max abs and rel L2 of D: information)",
            f"{'sigma band':>22} {'rows':>5} {'max abs err':>12} {'max rel L2':>12} {'max deriv err':>14}",
        ]
        for b in self.bands:
            if b.rows:
                lines.append(f"{f'[{b.lo:.4g}, {b.hi:.4g}]':>22} {b.rows:>5} {b.max_abs:>12.3e} "
                             f"{b.max_rel_l2:>12.3e} {b.max_deriv:>14.3e}")
        lines.append(f"{'all':>22} {sum(b.rows for b in self.bands):>5} {self.max_abs:>12.3e} "
                     f"{self.max_rel_l2:>12.3e} {self.max_deriv:>14.3e}")
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
        feed = {X: x, SIGMA: sigma}
        if net.label_dim:
            feed[CLASS_LABELS] = np.eye(net.label_dim, dtype=np.float32)[np.arange(b) % net.label_dim]
        feeds.append(feed)
    return feeds


def reference_outputs(net: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import torch

    outs = []
    net = net.eval()
    with torch.no_grad():
        for feed in feeds:
            labels = torch.from_numpy(feed[CLASS_LABELS]) if CLASS_LABELS in feed else None
            outs.append(net(torch.from_numpy(feed[X]), torch.from_numpy(feed[SIGMA]), labels).float().numpy())
    return outs


# The largest batch verification runs by default: the export gate and `edm-deploy verify` measure
# on the same inputs, so both print the same figure for one artifact (memory stays small too).
VERIFY_BATCH_LIMIT = 64
MAX_VERIFY_BATCHES = 16  # batch sizes one verification may be asked to measure


def default_batches(max_batch: int) -> list[int]:
    """{1, an odd size strictly between when one exists, max} with max capped at `VERIFY_BATCH_LIMIT`:
    1, 5, 8 for 8; 1, 33, 64 for 64 and above."""
    max_batch = min(max_batch, VERIFY_BATCH_LIMIT)
    mid = max_batch // 2
    odd = mid if mid % 2 else mid + 1
    return sorted({1, odd, max_batch} if 1 < odd < max_batch else {1, max_batch})


def derivative_scale(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per row, ||x - D_ref||: sigma times the norm of the ODE derivative the sampler steps with."""
    diff = x.astype(np.float64) - reference.astype(np.float64)
    return np.sqrt((diff.reshape(len(diff), -1) ** 2).sum(axis=1))


def _param_error(param: str, message: str) -> InputError:
    """An InputError about one parameter; the CLI renames `param` in the text to its flag."""
    exc = InputError(message)
    exc.param = param
    return exc


def _check_arguments(precision: str, batches: Optional[Sequence[int]], seed: Any, num_bands: Any,
                     max_batch: int) -> None:
    """Every bad argument as one InputError naming the parameter, before any work."""
    if precision not in TOLERANCES:
        raise InputError(f"precision {precision!r} has no tolerance (known: {', '.join(TOLERANCES)})")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise _param_error("seed", f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(num_bands, numbers.Integral) or isinstance(num_bands, bool) or num_bands < 1:
        raise _param_error("num_bands", f"num_bands must be a positive integer, got {num_bands!r}")
    if batches is not None:
        if len(batches) > MAX_VERIFY_BATCHES:
            raise _param_error("batches", f"batches lists {len(batches)} batch sizes; at most {MAX_VERIFY_BATCHES} "
                                          "are measured in one run")
        bad = [b for b in batches if not isinstance(b, numbers.Integral) or isinstance(b, bool)
               or not 1 <= b <= max_batch]
        if not batches or bad:
            raise _param_error("batches", f"batches must be batch sizes from 1 to {max_batch} (the artifact's "
                                          f"largest batch), got {list(batches)!r}")


COMPARED_FIELDS = ("img_resolution", "img_channels", "label_dim")


def check_comparable(net: Any, den: Any, artifact_path: str) -> None:
    """An artifact can be measured against a network only if both take the same inputs.

    Another network of another shape or class count would end in a backend's shape error or a
    remark about labels; this says which field differs. (That it is *the* checkpoint the
    artifact came from is `source_mismatch`'s question, which a user may overrule; this one not.)
    """
    for key in COMPARED_FIELDS:
        a, b = getattr(den, key, None), getattr(net, key, None)
        if a is not None and b is not None and int(a) != int(b):
            raise InputError(f"{artifact_path} cannot be compared with this checkpoint: {key} is {a} in the artifact "
                             f"and {b} in the checkpoint, so it is not the checkpoint it was exported from")


def source_mismatch(manifest: dict, ckpt_path: str) -> Optional[str]:
    """Why `ckpt_path` is not the checkpoint the artifact's manifest records (None when it is, or
    when the manifest records none): the export writes the source checkpoint's sha256."""
    from edm_deploy.runtime.core.fileio import sha256_file

    recorded = (manifest.get("source") or {}).get("sha256")
    if not isinstance(recorded, str) or not recorded or not os.path.isfile(ckpt_path):
        return None  # nothing to compare with (a missing file is load_checkpoint's to report)
    actual = sha256_file(ckpt_path)
    if actual == recorded:
        return None
    name = (manifest.get("source") or {}).get("checkpoint") or "?"
    return (f"{ckpt_path} is not the checkpoint this was exported from: the manifest records {name} with sha256 "
            f"{recorded[:16]}..., this file has {actual[:16]}...")


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
    """Compare `den` (the artifact's backend) with `net` (fp32 torch) and return a report.

    The verdict is the derivative error against ``TOLERANCES[precision]`` plus a NaN/Inf check
    (and polygraphy's comparator, when installed); see the module docstring.
    """
    max_batch = int(den.max_batch or (den.manifest.get("batch") or {}).get("max") or 8)
    _check_arguments(precision, batches, seed, num_bands, max_batch)
    check_comparable(net, den, artifact_path)
    batches = [int(b) for b in batches] if batches is not None else default_batches(max_batch)
    feeds = make_feeds(net, batches, int(seed))
    want = reference_outputs(net, feeds)
    got = [np.asarray(den(f[X], f[SIGMA], f.get(CLASS_LABELS)), dtype=np.float32) for f in feeds]

    lo, hi = sigma_range(net)
    edges = np.exp(np.linspace(math.log(lo), math.log(hi), num_bands + 1))
    bands = [BandStats(float(edges[i]), float(edges[i + 1])) for i in range(num_bands)]
    tolerance = TOLERANCES[precision].derivative
    max_deriv = max_rel = max_abs = 0.0
    nonfinite = 0
    for feed, a, b in zip(feeds, got, want):
        scale = derivative_scale(feed[X], b)
        for row in range(len(a)):
            if not np.isfinite(a[row]).all():
                nonfinite += 1
                continue
            s = float(feed[SIGMA][row])
            k = int(np.clip(np.searchsorted(edges, s, side="right") - 1, 0, num_bands - 1))
            diff = a[row].astype(np.float64) - b[row].astype(np.float64)
            err = float(np.linalg.norm(diff))
            deriv = err / max(float(scale[row]), 1e-30)
            rel = err / max(float(np.linalg.norm(b[row])), 1e-30)
            mabs = float(np.abs(diff).max())
            band = bands[k]
            band.rows += 1
            band.max_abs = max(band.max_abs, mabs)
            band.max_rel_l2 = max(band.max_rel_l2, rel)
            band.max_deriv = max(band.max_deriv, deriv)
            max_deriv, max_rel, max_abs = max(max_deriv, deriv), max(max_rel, rel), max(max_abs, mabs)

    report = VerifyReport(
        artifact=artifact_path, precision=precision, backend=den.describe(), batches=batches, bands=bands,
        max_deriv=max_deriv, max_rel_l2=max_rel, max_abs=max_abs, nonfinite_rows=nonfinite, tolerance=tolerance,
    )
    if nonfinite:
        report.failures.append(f"{nonfinite} output rows contain NaN/Inf")
    if max_deriv > tolerance:
        report.failures.append(f"derivative relative L2 error {max_deriv:.3e} exceeds the {precision} "
                               f"tolerance {tolerance:g}")
    if use_polygraphy:
        _polygraphy_check(report, feeds, got, want, tolerance)
    return report


def normalized_derivatives(feeds: list, outputs: list, references: list) -> list[np.ndarray]:
    """Per row, (x - D) / ||x - D_ref||: the ODE derivative in units of the reference's norm.

    The L2 distance between a row of these for the artifact and for the reference is the row's
    derivative error, so any L2 comparator on them applies the gate's metric.
    """
    rows = []
    for feed, out, ref in zip(feeds, outputs, references):
        scale = np.maximum(derivative_scale(feed[X], ref), 1e-30)
        x = feed[X].astype(np.float64)
        for row in range(len(out)):
            rows.append((x[row] - out[row].astype(np.float64)) / scale[row])
    return rows


def _polygraphy_check(report: VerifyReport, feeds: list, got: list, want: list, tolerance: float) -> None:
    """polygraphy's comparator on the gate's quantity: one iteration per row, L2 <= the tolerance.

    Each row's derivative is divided by the reference derivative's norm (`normalized_derivatives`),
    so polygraphy's L2 distance per iteration is exactly the gate's derivative error and both
    verdicts agree. Where polygraphy has no L2 comparator (older releases) its elementwise
    ``max`` statistic is used on the same arrays; it never exceeds the L2 distance, so it can only
    be more lenient than the gate, never refuse what the gate accepts.
    """
    try:
        from polygraphy.comparator import Comparator, IterationResult, RunResults
        from polygraphy.logger import G_LOGGER
    except ImportError:
        report.polygraphy = "not installed (skipped)"
        return
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        from polygraphy.comparator import L2CompareFunc

        func = L2CompareFunc(l2_threshold=tolerance)
        what = f"L2 of the normalised derivative <= {tolerance:g} per row"
    except ImportError:
        from polygraphy.comparator import SimpleCompareFunc

        func = SimpleCompareFunc(atol=tolerance, rtol=0.0, check_error_stat="max")
        what = f"max elementwise error of the normalised derivative <= {tolerance:g}"
    runs = RunResults()
    runs.append(("artifact", [IterationResult({"derivative": d}, runner_name="artifact")
                              for d in normalized_derivatives(feeds, got, want)]))
    runs.append(("torch-fp32", [IterationResult({"derivative": d}, runner_name="torch-fp32")
                                for d in normalized_derivatives(feeds, want, want)]))
    accuracy = Comparator.compare_accuracy(runs, compare_func=func)
    valid = Comparator.validate(runs, check_inf=True, check_nan=True)
    ok = bool(accuracy) and bool(valid)
    report.polygraphy = f"{'passed' if ok else 'FAILED'} ({what}, NaN/Inf check {'passed' if valid else 'FAILED'})"
    report.polygraphy_passed = ok
    if not ok:
        report.failures.append("polygraphy comparator failed")
