"""Measurements behind `edm-deploy bench` and `benchmarks/`: denoiser throughput per backend,
sampling throughput at the paper's NFE, sampler overhead, peak memory, export time.

Every comparison runs in one process on the same weights, warmed up, repeated, and reported as
medians with their spread, because wall-clock numbers on shared machines are noisy and only
ratios measured side by side mean anything.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edm_deploy.runtime.core.contract import as_denoiser
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.timing import TimedDenoiser

# The `format` tag of the JSON `bench --json` writes: what says an existing file may be replaced.
BENCH_FORMAT = "edm-deploy-bench"


def is_bench_json(path: str) -> bool:
    """Whether `path` is a JSON that `bench --json` wrote (the one kind of file it replaces)."""
    from edm_deploy.runtime.core.jsonio import has_format

    return has_format(path, (BENCH_FORMAT,))


# The largest batch bench times a model without a declared limit (a .pt checkpoint) at, and the
# limit of the ONNX export it compares such a model with: bench's memory grows with the batch.
BENCH_MAX_BATCH = 1024


def batch_limit(model: str) -> tuple[int, str]:
    """(the largest batch bench may time `model` at, where that limit comes from)."""
    from edm_deploy.loading import model_kind, read_manifest

    if model_kind(model) != "pt":
        declared = (read_manifest(model).get("batch") or {}).get("max")
        if declared is not None:
            return int(declared), "its export's --max-batch"
    return BENCH_MAX_BATCH, "bench's limit for a model that declares none"


def check_batches(model: str, batches: Sequence[int]) -> None:
    """Every --batch within the model's batch limit, before anything is timed."""
    limit, source = batch_limit(model)
    above = [b for b in batches if b > limit]
    if above:
        raise InputError(f"batch {max(above)} is above the batch limit of {model}: {limit} ({source}); bench times "
                         f"network calls of that many rows, so use --batch {limit} or less", param="batches")


def paper_steps(resolution: int) -> int:
    """Steps of the paper's deterministic setting: 18 (NFE 35) at 32x32 and below, 40 (NFE 79) above."""
    return 18 if resolution <= 32 else 40


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


# A measurement is unstable when its slowest repeat took more than this many times its fastest.
# On an idle machine repeats of one evaluation agree to a few per cent (the recorded runs of
# benchmarks/RESULTS.md: spreads of 1-15 %); a busy one gave 29 to 447 ms for the same batch, and
# a ratio of two such medians says nothing about the backends.
UNSTABLE_RATIO = 2.0
MIN_REPEATS_TO_JUDGE = 3


def timing_is_stable(times: list[float]) -> bool:
    """Whether repeated timings of one thing agree well enough for a ratio to mean something."""
    if len(times) < MIN_REPEATS_TO_JUDGE:
        return True  # too few to tell; `results_table` says so
    return max(times) <= UNSTABLE_RATIO * min(times)


def _median_spread(times: list[float]) -> tuple[float, float]:
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if med else 0.0


@dataclass
class BackendResult:
    backend: str
    batch: int
    evals_per_s: float
    image_evals_per_s: float
    spread: float
    stable: bool = True              # `timing_is_stable` of the evaluation repeats (and of the sampling runs)
    repeats: int = 0
    img_per_s_at_nfe: Optional[float] = None
    nfe: Optional[int] = None
    overhead_fraction: Optional[float] = None
    setup_s: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def denoiser_inputs(den: Any, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Any]:
    """Host inputs of one evaluation of `batch` rows: noise at sigma 1, the classes in turn (None if unconditional)."""
    x = rng.standard_normal((batch, den.img_channels, den.img_resolution, den.img_resolution)).astype(np.float32)
    labels = np.eye(den.label_dim, dtype=np.float32)[np.arange(batch) % den.label_dim] if den.label_dim else None
    return x, np.full(batch, 1.0), labels


def time_denoiser(den: Any, batch: int, repeats: int = 5, warmup: int = 2,
                  seed: int = 0) -> tuple[float, float, bool]:
    """(median seconds per evaluation, spread, stable) at `batch`, inputs on the backend's device."""
    x, sigma, labels = denoiser_inputs(den, batch, np.random.default_rng(seed))
    x = den.to_device(x)
    for _ in range(warmup):
        den(x, sigma, labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        den(x, sigma, labels)
        den.synchronize()
        times.append(time.perf_counter() - start)
    return (*_median_spread(times), timing_is_stable(times))


def time_sampling(den: Any, batch: int, num_steps: int, repeats: int = 1) -> tuple[float, float, bool]:
    """(images per second, overhead fraction, stable) for the deterministic sampler at `num_steps`."""
    from edm_deploy.runtime.sampling.generate import sample_batch

    seeds = list(range(batch))
    sample_batch(den, seeds, None, {"num_steps": 2})  # warm-up at the timed batch (shapes, graphs, compiles)
    den = TimedDenoiser(den)
    walls, overheads = [], []
    for _ in range(repeats):
        den.reset()
        start = time.perf_counter()
        sample_batch(den, seeds, None, {"num_steps": num_steps})
        wall = time.perf_counter() - start
        walls.append(wall)
        overheads.append(max(0.0, 1 - den.eval_seconds / wall))
    wall = statistics.median(walls)
    return batch / wall, statistics.median(overheads), timing_is_stable(walls)


def bench_backend(name: str, make: Callable[[], Any], batch: int, repeats: int, sample_steps: Optional[int]) -> BackendResult:
    """Time one backend; `sample_steps` 0 means the paper's steps for its resolution, None skips sampling."""
    start = time.perf_counter()
    with as_denoiser(make()) as den:
        setup = time.perf_counter() - start
        if sample_steps == 0:
            sample_steps = paper_steps(den.img_resolution)
        per_eval, spread, stable = time_denoiser(den, batch, repeats=repeats)
        result = BackendResult(backend=name if name == den.describe() else f"{name} [{den.describe()}]", batch=batch,
                               evals_per_s=1 / per_eval, image_evals_per_s=batch / per_eval, spread=spread,
                               stable=stable, repeats=repeats, setup_s=setup)
        result.notes.extend(den.warnings)
        if sample_steps:
            from edm_deploy.runtime.sampling.reference import nfe

            ips, overhead, sampling_stable = time_sampling(den, batch, sample_steps, repeats=max(1, min(repeats, 3)))
            result.img_per_s_at_nfe, result.nfe, result.overhead_fraction = ips, nfe(sample_steps), overhead
            result.stable = result.stable and sampling_stable
    return result


def backend_factories(model: str, backends: list[str], device: str = "auto", threads: Optional[int] = None,
                      workdir: Optional[str] = None) -> tuple[list[tuple[str, Callable[[], Any]]], dict]:
    """Backends to compare for `model` (bench variants of `loading.MODEL_KINDS`).

    A .pt model asked for onnxruntime is exported to ONNX once (timed) and run from there.
    """
    from edm_deploy.loading import BENCH_VARIANTS, MODEL_KINDS, load, model_kind

    kind = model_kind(model)
    extra: dict[str, Any] = {}
    factories: list[tuple[str, Callable[[], Any]]] = []
    unknown = [b for b in backends if b not in BENCH_VARIANTS]
    if unknown:
        raise InputError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BENCH_VARIANTS)}", param="backends")
    if kind == "pt" and any(b in MODEL_KINDS["onnx"].bench_variants for b in backends):
        from edm_deploy.export.onnx_export import export_onnx
        from edm_deploy.training.checkpoint import load_checkpoint, load_network

        ckpt = load_checkpoint(model)
        onnx_path = os.path.join(workdir or tempfile.mkdtemp(prefix="edm-bench-"), "bench.onnx")
        result = export_onnx(load_network(ckpt), ckpt["network"], onnx_path, max_batch=BENCH_MAX_BATCH)
        extra["export_s"] = result.seconds
    else:
        onnx_path = model
    for b in backends:
        runs_on = next(k for k, spec in MODEL_KINDS.items() if b in spec.bench_variants)
        path = onnx_path if runs_on == "onnx" else model
        if model_kind(path) != runs_on:
            raise InputError(f"{b} needs a {MODEL_KINDS[runs_on].name} model"
                             + (" or a .pt checkpoint" if runs_on == "onnx" else ""), param="backends")
        options = dict(MODEL_KINDS[runs_on].bench_variants[b])
        if runs_on == "onnx":
            options["threads"] = threads
        factories.append((b, lambda path=path, options=options: load(path, device=device, **options)))
    return factories, extra


def results_table(results: list[BackendResult]) -> str:
    """The side-by-side table; a ratio is printed only between stable measurements.

    An unstable row (see `timing_is_stable`) keeps its median but shows ``unstable`` instead of
    a ratio, and a note under the table says why, so a busy machine never reads as a finding.
    """
    first = results[0] if results else None
    base = first.image_evals_per_s if first else 1.0
    lines = [f"{'backend':<44} {'batch':>5} {'img-evals/s':>12} {'spread':>7} {'vs first':>8} {'img/s @NFE':>11} {'overhead':>8}"]
    for r in results:
        ips = f"{r.img_per_s_at_nfe:.2f} @{r.nfe}" if r.img_per_s_at_nfe else "-"
        ovh = f"{r.overhead_fraction:.1%}" if r.overhead_fraction is not None else "-"
        ratio = f"{r.image_evals_per_s / base:>7.2f}x" if r.stable and first.stable else f"{'unstable':>8}"
        lines.append(f"{r.backend[:44]:<44} {r.batch:>5} {r.image_evals_per_s:>12.2f} {r.spread:>7.1%} "
                     f"{ratio} {ips:>11} {ovh:>8}")
    unstable = [r for r in results if not r.stable]
    if unstable:
        names = ", ".join(f"{r.backend.split(' [')[0]} at batch {r.batch}" for r in unstable)
        lines.append(f"note: unstable timings for {names}: the slowest repeat took more than {UNSTABLE_RATIO:g}x the "
                     "fastest (a busy machine?), so no ratio is shown for them; rerun on an idle machine or with more "
                     "--repeats")
    elif results and min(r.repeats for r in results) < MIN_REPEATS_TO_JUDGE:
        lines.append(f"note: fewer than {MIN_REPEATS_TO_JUDGE} repeats cannot show whether the timings are stable")
    return "\n".join(lines)


def as_dicts(results: list[BackendResult]) -> list[dict]:
    return [asdict(r) for r in results]
