"""`edm-deploy bench`: throughput of one model on several backends, side by side."""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from edm_deploy.commands.common import POSITIVE, max_threads
from edm_deploy.loading import BENCH_VARIANTS, DEVICES
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling.solvers import SOLVER_NAMES
from edm_deploy.sweep import DEFAULT_LATENTS, DEFAULT_MAX_ERROR, DEFAULT_NFES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--backend", "backends", multiple=True, type=click.Choice(BENCH_VARIANTS), help="Backends to compare (repeatable) [default: all that fit the file].")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1, 65536), help="Batch sizes (repeatable) [default: 64].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed repetitions per measurement (medians reported).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Also time full sampling at this many steps [default: the paper's: 18 at 32x32, 40 at 64x64].")
@click.option("--no-sampling", is_flag=True, help="Only time single denoiser evaluations.")
@click.option("--threads", type=click.IntRange(min=1, max=max_threads()), default=None, help="onnxruntime CPU threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
@click.option("--solvers", "solver_sweep", is_flag=True,
              help="Find the fastest settings: every solver x NFE on MODEL and its -fp16/-int8 exports beside it, "
                   "images/s next to the end-point error against Heun NFE 35 on the same latents (no dataset needed).")
@click.option("--solver", "solvers", multiple=True, type=click.Choice(SOLVER_NAMES),
              help="--solvers: the solvers to compare (repeatable) [default: all].")
@click.option("--nfe", "nfes", multiple=True, type=click.IntRange(1, 1000),
              help=f"--solvers: the NFEs to compare (repeatable) [default: {', '.join(map(str, DEFAULT_NFES))}].")
@click.option("--latents", type=click.IntRange(1, 100_000), default=DEFAULT_LATENTS, show_default=True,
              help="--solvers: images (seeds 0..N-1) each setting samples.")
@click.option("--max-error", type=POSITIVE, default=DEFAULT_MAX_ERROR, show_default=True,
              help="--solvers: the RMS end-point error (data units, [-1, 1]) the answer may have.")
def bench(model: str, backends: tuple, batches: tuple, device: str, repeats: int, steps: Optional[int],
          no_sampling: bool, threads: Optional[int], json_path: Optional[str], solver_sweep: bool, solvers: tuple,
          nfes: tuple, latents: int, max_error: float) -> None:
    """Measure denoiser evaluations/s per backend on the same weights, images/s at the paper's NFE,
    sampler overhead and peak host memory (RSS; GPU memory is not measured), all in one run
    (medians; ratios against the first backend, shown only for stable timings).

    With --solvers: which solver, NFE and precision to run this model with. Every setting samples
    the same latents; the table gives images/s and the end-point error against the paper's Heun
    at NFE 35, and the last lines the fastest setting within --max-error. That error is a proxy
    (distance from the converged sampler), not FID; FID per solver and NFE on real images is in
    benchmarks/RESULTS.md ("Real images").

    \b
    Examples:
      edm-deploy bench runs/digits/ckpt.pt --backend torch --backend onnxruntime --batch 64
      edm-deploy bench model.plan --batch 256 --json bench.json
      edm-deploy bench demo/model.onnx --solvers           # also demo/model-fp16.onnx, demo/model-int8.onnx
      edm-deploy bench model.onnx --solvers --solver ipndm --solver dpmpp-2m --nfe 5 --nfe 10 --max-error 0.02
    """
    from edm_deploy import benchmarking as bm
    from edm_deploy.loading import check_model_file, model_kind

    kind = model_kind(model)
    sweep_only = {"--solver": solvers, "--nfe": nfes, "--latents": latents != DEFAULT_LATENTS,
                  "--max-error": max_error != DEFAULT_MAX_ERROR}
    if not solver_sweep and any(sweep_only.values()):
        raise InputError(f"{next(k for k, v in sweep_only.items() if v)} applies to bench --solvers only")
    if solver_sweep and (backends or steps is not None or no_sampling or len(batches) > 1):
        raise InputError("--solvers compares solvers on MODEL's own backend at one --batch; drop "
                         "--backend/--steps/--no-sampling or the extra --batch")
    bm.check_batches(model, batches or (64,))
    if json_path:
        from edm_deploy.runtime.core.fileio import (
            refuse_foreign_file,
            refuse_overwriting_inputs,
            write_target,
        )
        from edm_deploy.runtime.output.writers import ensure_writable_dir

        refuse_overwriting_inputs({"MODEL": model}, {"--json": json_path})
        if os.path.isdir(json_path):
            raise InputError(f"--json {json_path} is a folder; give a file name")
        refuse_foreign_file(json_path, "--json", bm.is_bench_json, "a bench JSON")
        json_path = write_target(json_path)  # a symlink is written through
        ensure_writable_dir(os.path.dirname(os.path.abspath(json_path)))
    if solver_sweep:
        from edm_deploy.sweep import check_sweep_arguments, sweep, sweep_table

        check_model_file(model)
        solvers, nfes, batch = solvers or SOLVER_NAMES, nfes or DEFAULT_NFES, (batches or (64,))[0]
        check_sweep_arguments(solvers, nfes, latents, batch, repeats)
        result = sweep(model, solvers, nfes, num_latents=latents, batch=batch, repeats=min(repeats, 3),
                       device=device, threads=threads, progress=lambda line: click.echo(f"timing {line} ...", err=True))
        for reason in result.skipped:
            click.echo(f"skipped: {reason}", err=True)
        click.echo(sweep_table(result, max_error))
        if json_path:
            from edm_deploy.runtime.core.fileio import atomic_write_bytes

            atomic_write_bytes(json_path, json.dumps({"format": bm.BENCH_FORMAT, "model": model, "max_error": max_error,
                                                     **result.as_dict()},
                                                     indent=2).encode())
        return
    if not backends:
        backends = {"pt": ("torch", "onnxruntime"), "onnx": ("onnxruntime",), "plan": ("tensorrt",)}[kind]
    batches = batches or (64,)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edm-bench-") as workdir:
        factories, extra = bm.backend_factories(model, list(backends), device=device, threads=threads, workdir=workdir)
        if "export_s" in extra:
            click.echo(f"exported to ONNX for onnxruntime in {extra['export_s']:.1f} s", err=True)
        results = []
        for batch in batches:
            for name, make in factories:
                click.echo(f"timing {name} at batch {batch} ...", err=True)
                results.append(bm.bench_backend(name, make, batch, repeats, None if no_sampling else (steps or 0)))
    click.echo(bm.results_table(results))
    click.echo(f"peak RSS {bm.peak_rss_mb():.0f} MB")
    if json_path:
        from edm_deploy.runtime.core.fileio import atomic_write_bytes

        payload = {"format": bm.BENCH_FORMAT, "model": model, "results": bm.as_dicts(results), "peak_rss_mb": bm.peak_rss_mb(), **extra}
        atomic_write_bytes(json_path, json.dumps(payload, indent=2).encode())
