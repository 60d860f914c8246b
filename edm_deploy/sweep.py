"""The fastest settings for a model: solvers x NFE x precisions, speed next to a quality proxy.

`edm-deploy bench MODEL --solvers` answers "what should I run?" on the user's own model, with
no dataset: every setting samples the same latents (seeds 0..N-1, the same class labels), and
its quality is the end-point error against a reference run, the paper's deterministic Heun at
NFE 35 on the full-precision model: the RMS distance of the final images in data units ([-1, 1],
so 0.05 is about 6 of 255 grey levels). A low end-point error does not prove a low FID, but a
setting far from the converged ODE solution is far from what the model was trained to produce,
and the proxy costs seconds where FID costs 50,000 images and an Inception network.

Precisions are the model's exports that exist beside it under the export's own names
(``model.onnx``, ``model-fp16.onnx``, ``model-int8.onnx``, `export.pipeline.default_onnx_path`).
Speed is images per second through the whole sampler (median of repeats, with the stability
rule of `benchmarking.timing_is_stable`). Every setting is planned as `sample --solver S --nfe K`
plans it (`runtime.sampling.planner.plan_sampling`).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edm_deploy.benchmarking import timing_is_stable
from edm_deploy.runtime.core.errors import InputError

REFERENCE = ("heun", 35)          # the paper's deterministic setting at 32x32 (18 steps)
DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20, 35)
DEFAULT_MAX_ERROR = 0.05          # RMS end-point error in [-1, 1] data units (about 6/255)
DEFAULT_LATENTS = 64
# The sweep holds every latent (float32), the reference end points and one setting's end points
# (float64) at once: 20 bytes per pixel per latent, bounded here before anything is drawn.
MAX_SWEEP_BYTES = 2 << 30
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class SweepRow:
    """One setting: a model file (precision), a solver, an NFE; its speed and its error."""

    model: str
    precision: str
    solver: str
    nfe: int
    images_per_s: float
    spread: float
    stable: bool
    rms_error: float      # against the reference end points
    max_error: float      # the worst pixel


@dataclass
class SweepResult:
    rows: list[SweepRow]
    reference: SweepRow
    skipped: list[str] = field(default_factory=list)   # solver/NFE pairs that cannot exist, and why
    latents: int = 0

    def fastest(self, max_error: float = DEFAULT_MAX_ERROR) -> Optional[SweepRow]:
        """The fastest stable setting whose RMS end-point error is within `max_error` (None: none is)."""
        fits = [r for r in self.rows if r.rms_error <= max_error and r.stable]
        return max(fits, key=lambda r: r.images_per_s) if fits else None

    def pareto(self) -> list[SweepRow]:
        """Stable settings no other beats on both speed and error, fastest first (an unstable
        timing's speed is unknown, so it is on no front)."""
        rows = sorted((r for r in self.rows if r.stable), key=lambda r: (-r.images_per_s, r.rms_error))
        front, best = [], math.inf
        for r in rows:
            if r.rms_error < best:
                front.append(r)
                best = r.rms_error
        return front

    def as_dict(self) -> dict:
        return {"reference": asdict(self.reference), "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped, "latents": self.latents}


# The end-point error ranks settings by distance from the converged sampler, not by FID: on real
# images (Fashion-MNIST, Inception FID) the two disagree at low NFE.
PROXY_NOTE = ("note: the RMS error is a proxy (distance from the converged Heun-35 images), not FID; "
              "FID per solver and NFE on real images: benchmarks/RESULTS.md, 'Real images'")

def precision_variants(model: str) -> list[str]:
    """`model` and its sibling exports that exist, full precision first (the reference runs on the first).

    ``demo/model-int8.onnx`` finds ``demo/model.onnx`` and ``demo/model-fp16.onnx`` beside it; a
    ``.pt`` checkpoint comes first itself, then the ONNX files exported from it under default names.
    """
    from edm_deploy.export.pipeline import default_onnx_path

    stem, ext = os.path.splitext(model)
    for precision in PRECISIONS[1:]:
        if ext.lower() == ".onnx" and stem.endswith(f"-{precision}"):
            stem = stem[: -len(precision) - 1]
    candidates = ([model] if ext.lower() != ".onnx" else []) + [default_onnx_path(stem + ext, p) for p in PRECISIONS]
    found: list[str] = []
    for path in candidates:
        if os.path.isfile(path) and all(os.path.abspath(path) != os.path.abspath(f) for f in found):
            found.append(path)
    if not any(os.path.abspath(f) == os.path.abspath(model) for f in found):
        found.insert(0, model)  # a name of its own: compared with nothing else
    return found


def check_sweep_arguments(solvers: Sequence[str], nfes: Sequence[int], num_latents: int, batch: int,
                          repeats: int) -> None:
    """Every argument, before any model loads: known solvers, positive NFEs, sizes."""
    from edm_deploy.runtime.sampling.solvers import get_solver

    for solver in solvers:
        get_solver(solver)
    for k in nfes:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 1000:
            raise InputError(f"nfe must be an integer from 1 to 1000, got {k!r}", param="nfe")
    for name, value in (("latents", num_latents), ("batch", batch), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}", param=name)


def _sample_all(den: Any, latents: np.ndarray, labels: Optional[np.ndarray], plan: Any, batch: int) -> np.ndarray:
    from edm_deploy.runtime.core.xp import to_host
    from edm_deploy.runtime.sampling.solvers import default_randn_like

    parts = []
    for lo in range(0, len(latents), batch):
        x = den.to_device(latents[lo:lo + batch])
        y = None if labels is None else labels[lo:lo + batch]
        parts.append(to_host(plan.run(den, x, y, default_randn_like)).astype(np.float64))
    return np.concatenate(parts)


def _timed(den: Any, latents, labels, plan: Any, batch: int, repeats: int):
    """(end points, images/s median, spread, stable, evaluations per image) of one setting."""
    from edm_deploy.runtime.core.timing import TimedDenoiser

    counted = TimedDenoiser(den)
    walls, out = [], None
    for _ in range(repeats):
        counted.reset()
        start = time.perf_counter()
        out = _sample_all(counted, latents, labels, plan, batch)
        walls.append(time.perf_counter() - start)
    calls_per_batch = counted.calls / math.ceil(len(latents) / batch)
    wall = statistics.median(walls)
    spread = (max(walls) - min(walls)) / wall if wall else 0.0
    return out, len(latents) / wall, spread, timing_is_stable(walls), calls_per_batch


def sweep(model: str, solvers: Sequence[str], nfes: Sequence[int] = DEFAULT_NFES,
          num_latents: int = DEFAULT_LATENTS, batch: int = 64, repeats: int = 3, device: str = "auto",
          threads: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> SweepResult:
    """Every solver x NFE on every precision variant of `model` (see the module docstring)."""
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator, draw_latents_and_labels
    from edm_deploy.runtime.sampling.planner import plan_sampling
    from edm_deploy.runtime.sampling.solvers import steps_for_nfe

    check_sweep_arguments(solvers, nfes, num_latents, batch, repeats)
    say = progress or (lambda _line: None)
    variants = precision_variants(model)
    reference: Optional[SweepRow] = None
    ref_points: Optional[np.ndarray] = None
    rows: list[SweepRow] = []
    skipped: list[str] = []
    plans = []
    for solver in solvers:
        for k in nfes:
            try:
                steps_for_nfe(solver, int(k))  # a budget the solver cannot spend is skipped, saying why
                plans.append((solver, int(k)))
            except InputError as exc:
                skipped.append(str(exc))
    if not plans:
        raise InputError(f"none of the settings asked for exists ({'; '.join(skipped)}); choose other NFEs",
                         param="nfe")
    for path in variants:
        options = {"threads": threads} if threads and path.lower().endswith(".onnx") else {}
        with load(path, device=device, **options) as den:
            precision = den.precision
            shape = (den.img_channels, den.img_resolution, den.img_resolution)
            need = num_latents * int(np.prod(shape)) * 20
            if need > MAX_SWEEP_BYTES:
                raise InputError(f"latents {num_latents} of {shape[0]}x{shape[1]}x{shape[2]} would hold "
                                 f"{need / 2**30:.1f} GiB of images at once; at most {MAX_SWEEP_BYTES / 2**30:.0f} GiB "
                                 f"(use at most {MAX_SWEEP_BYTES // (20 * int(np.prod(shape))):,} latents)",
                                 param="latents")
            rnd = StackedRandomGenerator(range(num_latents))
            latents, labels = draw_latents_and_labels(rnd, shape, int(den.label_dim))
            warm_up = plan_sampling(den, {"solver": "euler", "num_steps": 2})
            _sample_all(den, latents[:batch], None if labels is None else labels[:batch], warm_up, batch)
            if ref_points is None:
                solver, k = REFERENCE
                say(f"reference: {solver} NFE {k} on {path} ({num_latents} latents)")
                ref_points, ips, spread, stable, _ = _timed(den, latents, labels,
                                                            plan_sampling(den, {"solver": solver, "nfe": k}), batch,
                                                            repeats)
                reference = SweepRow(path, precision, solver, k, ips, spread, stable, 0.0, 0.0)
            for solver, k in plans:
                say(f"{precision} {solver} NFE {k}")
                plan = plan_sampling(den, {"solver": solver, "nfe": k})
                points, ips, spread, stable, calls = _timed(den, latents, labels, plan, batch, repeats)
                if calls != plan.nfe:  # the registry's NFE formula and the network calls must agree
                    raise AssertionError(f"{solver} at {len(plan.sigmas)} time points made {calls} calls, not NFE "
                                         f"{plan.nfe}")
                diff = points - ref_points
                rows.append(SweepRow(path, precision, solver, k, ips, spread, stable,
                                     float(np.sqrt(np.mean(diff * diff))), float(np.abs(diff).max())))
    assert reference is not None
    return SweepResult(rows, reference, skipped, num_latents)


def sweep_table(result: SweepResult, max_error: float = DEFAULT_MAX_ERROR) -> str:
    """The settings worth knowing and the one-line answer.

    Shown: the Pareto front (no other setting is both faster and closer to the reference) and,
    per precision, the fastest setting within `max_error`; every row is in `SweepResult.as_dict`
    (`bench --json`).
    """
    ref = result.reference
    front = result.pareto()
    per_precision = [best for best in (SweepResult([r for r in result.rows if r.precision == p], ref).fastest(max_error)
                                       for p in dict.fromkeys(r.precision for r in result.rows)) if best is not None]
    shown = sorted({id(r): r for r in front + per_precision}.values(), key=lambda r: -r.images_per_s)
    lines = [f"quality: RMS end-point error against {ref.solver} NFE {ref.nfe} on {os.path.basename(ref.model)} "
             f"({ref.precision}, {ref.images_per_s:.1f} img/s), same {result.latents} latents; speed: images/s "
             "through the whole sampler",
             f"{'model':<28} {'precision':<10} {'solver':<9} {'NFE':>4} {'img/s':>9} {'vs ref':>7} {'RMS err':>9} "
             f"{'max err':>8}  why shown"]
    front_ids, best_ids = {id(r) for r in front}, {id(r) for r in per_precision}
    for r in shown:
        speed = f"{r.images_per_s:>9.1f}" if r.stable else f"{'unstable':>9}"
        ratio = f"{r.images_per_s / ref.images_per_s:>6.1f}x" if r.stable and ref.stable else f"{'-':>7}"
        why = ", ".join(w for w, on in (("pareto", id(r) in front_ids),
                                        (f"fastest {r.precision} within {max_error:g}", id(r) in best_ids)) if on)
        lines.append(f"{os.path.basename(r.model)[:28]:<28} {r.precision[:10]:<10} {r.solver:<9} {r.nfe:>4} {speed} "
                     f"{ratio} {r.rms_error:>9.2e} {r.max_error:>8.2e}  {why}")
    lines.append(f"({len(result.rows)} settings measured; all of them with --json)")
    unstable = [r for r in result.rows if not r.stable] + ([ref] if not ref.stable else [])
    if unstable:
        lines.append(f"note: {len(unstable)} timings were unstable (the slowest repeat took more than twice the "
                     "fastest: a busy machine); their speed is not shown and they are not recommended; rerun on an "
                     "idle machine")
    best = result.fastest(max_error)
    if best is None:
        lines.append(f"fastest within RMS error {max_error:g}: none of these settings (try larger NFEs)")
    else:
        speedup = f", {best.images_per_s / ref.images_per_s:.1f}x the reference" if ref.stable else ""
        lines.append(f"fastest within RMS error {max_error:g}: --solver {best.solver} --nfe {best.nfe} on "
                     f"{best.model} ({best.precision}): {best.images_per_s:.1f} img/s{speedup}, "
                     f"RMS error {best.rms_error:.2e}")
    lines.append(PROXY_NOTE)
    return "\n".join(lines)
