"""`edm-deploy bench`: throughput of one model on several backends, side by side."""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from edm_deploy.commands.common import max_threads
from edm_deploy.loading import BENCH_VARIANTS, DEVICES
from edm_deploy.runtime.errors import InputError


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
def bench(model: str, backends: tuple, batches: tuple, device: str, repeats: int, steps: Optional[int],
          no_sampling: bool, threads: Optional[int], json_path: Optional[str]) -> None:
    """Measure denoiser evaluations/s per backend on the same weights, images/s at the paper's NFE,
    sampler overhead and peak host memory (RSS; GPU memory is not measured), all in one run
    (medians; ratios against the first backend).

    \b
    Examples:
      edm-deploy bench runs/digits/ckpt.pt --backend torch --backend onnxruntime --batch 64
      edm-deploy bench model.plan --batch 256 --json bench.json
    """
    from edm_deploy import benchmarking as bm
    from edm_deploy.loading import model_kind

    kind = model_kind(model)
    if not backends:
        backends = {"pt": ("torch", "onnxruntime"), "onnx": ("onnxruntime",), "plan": ("tensorrt",)}[kind]
    batches = batches or (64,)
    if json_path:
        from edm_deploy.runtime.fileio import refuse_overwriting_inputs
        from edm_deploy.runtime.writers import ensure_writable_dir

        refuse_overwriting_inputs({"MODEL": model}, {"--json": json_path})
        if os.path.isdir(json_path):
            raise InputError(f"--json {json_path} is a folder; give a file name")
        ensure_writable_dir(os.path.dirname(os.path.abspath(json_path)))
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
        from edm_deploy.runtime.fileio import atomic_write_bytes

        payload = {"model": model, "results": bm.as_dicts(results), "peak_rss_mb": bm.peak_rss_mb(), **extra}
        atomic_write_bytes(json_path, json.dumps(payload, indent=2).encode())
