"""`edm-deploy export`: checkpoint -> ONNX (fp32/fp16/int8, dynamic batch) -> TensorRT engine.

Every artifact is built and verified in a staging folder and only then moved to its final name
(`edm_deploy.export.staging`, `edm_deploy.export.pipeline`): the final name never holds a file
that failed verification or was cut short; a file nothing could be compared with (--no-verify, an
engine built from an .onnx) is said to be unverified.
"""

from __future__ import annotations

from typing import Optional

import click

from edm_deploy.commands.common import FiniteFloat
from edm_deploy.export.quantize import CALIBRATION_METHODS
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.manifest import MAX_BATCH


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--fp16", is_flag=True, help="fp16 compute inside the graph (fp32 inputs/outputs).")
@click.option("--int8", is_flag=True, help="int8 inner UNet (static QDQ, per-channel weights), calibrated on the model's own sampling trajectories; fp32 inputs/outputs.")
@click.option("--calib-images", type=click.IntRange(1, 4096), default=None, help="int8: images (trajectories) to calibrate on [default: 16].")
@click.option("--calib-seed", type=click.IntRange(0, (1 << 32) - 1), default=None, help="int8: first calibration seed [default: 0].")
@click.option("--calib-steps", type=click.IntRange(2, 1000), default=None, help="int8: sampler steps per calibration trajectory [default: 18].")
@click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default=None, help="int8: range estimator [default: minmax].")
@click.option("--calib-data", default=None, metavar="DATASET", help="int8: calibrate on a dataset (a .zip, a folder or 'digits') plus noise instead of trajectories.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Output file (.onnx, or .plan with --format trt) [default: next to MODEL].")
@click.option("--format", "fmt", type=click.Choice(["onnx", "trt", "auto"]), default="auto", show_default=True, help="auto builds a TensorRT engine when TensorRT and a GPU are present.")
@click.option("--max-batch", type=click.IntRange(1, MAX_BATCH), default=64, show_default=True, help="Largest batch the artifact must serve.")
@click.option("--opt-batch", type=click.IntRange(1, MAX_BATCH), default=None, help="Batch TensorRT optimises for [default: min(64, max)].")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True, help="ONNX opset (17: normalisation layers map cleanly to TensorRT, all ops run in onnxruntime).")
@click.option("--no-verify", is_flag=True, help="Skip the fidelity check against the torch model.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="TensorRT timing cache file (read and updated).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="TensorRT builder optimisation level 0-5.")
@click.option("--workspace", type=FiniteFloat(0, 1 << 12, lo_open=True), default=None, help="TensorRT workspace limit in GiB.")
@click.option("--hardware-compat", is_flag=True, help="TensorRT: engine portable to all Ampere+ GPUs (slower).")
@click.option("--schedule", "schedule_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A schedule file from `edm-deploy schedule` (repeatable): its time points ride in the manifest and "
                   "become this model's default for that solver and NFE (`sample --solver S --nfe K`).")
def export(model: str, fp16: bool, int8: bool, calib_images: Optional[int], calib_seed: Optional[int],
           calib_steps: Optional[int], calib_method: Optional[str], calib_data: Optional[str], out_path: Optional[str],
           fmt: str, max_batch: int, opt_batch: Optional[int], opset: int, no_verify: bool,
           timing_cache: Optional[str], opt_level: int, workspace: Optional[float], hardware_compat: bool,
           schedule_files: tuple = ()) -> None:
    """Export a checkpoint's EMA denoiser D(x, sigma, class) with preconditioning inside the graph.

    MODEL is a .pt checkpoint (or an .onnx file to build a TensorRT engine from). The ONNX file
    (and the engine) is verified against the torch model unless --no-verify is given, and appears
    under its final name only when it passed (a failed one is kept as NAME.failed.onnx). An engine
    built from an .onnx has no checkpoint to be compared with: the output says it is unverified. --int8 quantises the
    inner UNet only: the preconditioning, the noise embedding, the skip mix, softmax and
    normalisation stay float (see `edm_deploy.export.quantize`).

    \b
    Examples:
      edm-deploy export runs/digits/ckpt.pt                       # -> runs/digits/ckpt.onnx
      edm-deploy export ckpt.pt --int8 --calib-images 32          # -> ckpt-int8.onnx (CPU speed)
      edm-deploy export ckpt.pt --fp16 --max-batch 256 --format trt --out model.plan
      edm-deploy export model.onnx --format trt --timing-cache trt.cache
      edm-deploy export tuned.pt --schedule consistency2.json     # its searched mid point travels with it
    """
    from edm_deploy.export.pipeline import CalibrationOptions, export_checkpoint, plan_export, verify_staged
    from edm_deploy.export.staging import Staging
    from edm_deploy.loading import check_model_file, model_kind

    calib_given = {k: v for k, v in dict(num_images=calib_images, seed=calib_seed, steps=calib_steps,
                                         method=calib_method, data=calib_data).items() if v is not None}
    if fp16 and int8:
        raise InputError("--fp16 and --int8 exclude each other: choose one precision")
    if calib_given and not int8:
        raise InputError("--calib-* options apply to --int8 exports only")
    kind = model_kind(model)
    check_model_file(model)
    schedules = schedules_from_files(schedule_files)
    if schedules and kind == "onnx":
        raise InputError("--schedule applies when exporting a checkpoint (.pt); an engine built from an .onnx keeps "
                         "the schedules of its manifest")
    plan = plan_export(model, kind, "int8" if int8 else "fp16" if fp16 else "fp32", out_path, fmt, max_batch, opt_batch,
                       calib_given, inputs={"--timing-cache": timing_cache, "--calib-data": calib_data})
    precision, onnx_path, plan_path, want_trt = plan.precision, plan.onnx_path, plan.plan_path, bool(plan.plan_path)

    net = None
    if kind == "onnx":
        from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

        manifest = read_onnx_manifest(onnx_path)
    else:
        click.echo(f"exporting {model} -> {onnx_path} ({precision}, opset {opset}, batch 1..{max_batch})", err=True)
        outcome = export_checkpoint(model, onnx_path, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                                    opset=opset, verify=not no_verify,
                                    calibration=CalibrationOptions(**calib_given) if int8 else None,
                                    echo=lambda line: click.echo(line, err=True), schedules=schedules)
        manifest = outcome.manifest
        if outcome.report is not None:
            click.echo(outcome.report.table())
        click.echo(f"wrote {onnx_path} ({outcome.size_bytes / 1e6:.1f} MB, {outcome.seconds:.1f} s)"
                   + (" (verified)" if not no_verify else " (not verified: --no-verify)"))
        if want_trt and not no_verify:
            from edm_deploy.training.checkpoint import load_checkpoint, load_network

            net = load_network(load_checkpoint(model))

    if not want_trt:
        if fmt == "auto":
            click.echo(f"stopped at ONNX: {plan.trt_reason}")
        return

    from edm_deploy.export.tensorrt_build import build_engine

    click.echo(f"building TensorRT engine {plan_path} (profile 1..{max_batch}, opt level {opt_level})", err=True)
    with Staging(plan_path) as stage:
        engine = build_engine(onnx_path, stage.path(plan_path), manifest, max_batch=max_batch, opt_batch=opt_batch,
                              timing_cache=timing_cache, optimization_level=opt_level, workspace_gib=workspace,
                              hardware_compatible=hardware_compat)
        if net is not None:
            click.echo(verify_staged(stage, plan_path, net, manifest.get("precision", "fp32"), "cuda").table())
        stage.commit([plan_path])
    unverified = ("not verified: --no-verify" if no_verify else
                  "not verified: built from an .onnx, there is no checkpoint to compare with; "
                  "run edm-deploy verify ENGINE --against CKPT" if net is None else "verified")
    click.echo(f"wrote {plan_path} + {plan_path}.json (TensorRT {engine['tensorrt']['version']}, "
               f"{engine['tensorrt']['gpu']}, {engine['tensorrt']['build_seconds']} s; {unverified})")


def schedules_from_files(paths: tuple) -> dict:
    """{"solver@nfe": time points} from schedule files, each naming its solver and NFE."""
    from edm_deploy.runtime.core.manifest import schedule_key
    from edm_deploy.runtime.sampling.schedule_file import read_schedule
    from edm_deploy.runtime.sampling.solvers import SOLVER_REGISTRY

    out: dict = {}
    for path in paths:
        sigmas, meta = read_schedule(path)
        solver, nfe = meta.get("solver"), meta.get("nfe")
        if solver not in SOLVER_REGISTRY or not isinstance(nfe, int) or isinstance(nfe, bool):
            raise InputError(f"--schedule {path} must name its solver and NFE (a file written by edm-deploy schedule)")
        spent = SOLVER_REGISTRY[solver].nfe_for_sigmas(sigmas)
        if spent != nfe:
            raise InputError(f"--schedule {path}: its time points spend {spent} evaluations with {solver}, not the "
                             f"NFE {nfe} it names")
        key = schedule_key(solver, nfe)
        if key in out:
            raise InputError(f"--schedule: two files give time points for {solver} at NFE {nfe}")
        out[key] = [float(v) for v in sigmas]
    return out
