"""Checkpoint -> verified artifact: the one export path the CLI and the demo share.

`export_checkpoint` builds an fp32, fp16 or int8 ONNX file in a staging folder (`staging`),
verifies it against the fp32 torch model with the gate of `verify`, and only then moves it to
its final name; a failed one is kept as ``NAME.failed.onnx`` and an InputError says so. An int8
export is an fp32 export quantised in the staging folder (`quantize.quantize_int8`, calibrated
on the model's own sampling trajectories or on a dataset); only the int8 file is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from edm_deploy.runtime.core.errors import InputError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class CalibrationOptions:
    """How an int8 export is calibrated (see `quantize.quantize_int8`)."""

    num_images: int = 16
    seed: int = 0
    method: str = "minmax"
    steps: int = 18
    data: Optional[str] = None  # a dataset spec (`training.dataset.open_dataset`): data + noise instead of trajectories


@dataclass
class ExportOutcome:
    path: str
    manifest: dict
    seconds: float
    size_bytes: int
    report: Any  # the VerifyReport, or None with verify=False


@dataclass
class ExportPlan:
    """What one export run writes: checked before any work, so a bad combination fails at once."""

    model: str
    kind: str                      # "pt" (export, then optionally build) or "onnx" (build an engine from it)
    precision: str
    onnx_path: str
    plan_path: Optional[str]       # the TensorRT engine, when one is built
    trt_reason: str                # why no engine is built ("" when one is)

    @property
    def finals(self) -> list[str]:
        """The files that appear under their final names."""
        return ([self.onnx_path] if self.kind == "pt" else []) + ([self.plan_path] if self.plan_path else [])


def plan_export(model: str, kind: str, precision: str = "fp32", out_path: Optional[str] = None, fmt: str = "auto",
                max_batch: int = 64, opt_batch: Optional[int] = None, calibration: Optional[dict] = None,
                inputs: Optional[dict] = None) -> ExportPlan:
    """Check an export's settings and derive its output names (`kind` is the model file's, "pt" or "onnx").

    ``fmt`` "onnx", "trt" or "auto" (an engine when TensorRT and a GPU are here); ``calibration``
    holds the int8 calibration options given; ``inputs`` other files the run reads (a timing
    cache, calibration data), which no output may replace.
    """
    from edm_deploy.runtime.core.fileio import refuse_overwriting_inputs, write_target

    from .staging import companions, refuse_foreign_outputs
    from .tensorrt_build import tensorrt_status

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", param="precision")
    if calibration and precision != "int8":
        raise InputError("calibration options apply to int8 exports only", param="calibration")
    if opt_batch is not None and opt_batch > max_batch:
        raise InputError(f"opt_batch must lie in [1, max_batch={max_batch}], got {opt_batch}", param="opt_batch")
    if kind == "plan":
        raise InputError("the model is already a TensorRT engine", param="model")
    if out_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise InputError(f"output folder does not exist: {os.path.dirname(os.path.abspath(out_path))}", param="out_path")
    if out_path is not None and not out_path.lower().endswith((".onnx", *ENGINE_SUFFIXES)):
        raise InputError(f"out_path must end in .onnx or .plan, got {out_path}", param="out_path")
    if kind == "onnx" and precision != "fp32":
        raise InputError("a precision takes effect when exporting a .pt checkpoint; an .onnx keeps its own",
                         param="precision")
    trt_ok, trt_reason = tensorrt_status()
    want_trt = fmt == "trt" or (fmt == "auto" and trt_ok)
    if fmt == "trt" and not trt_ok:
        raise InputError(f"fmt trt: {trt_reason}", param="fmt")
    if kind == "onnx" and not want_trt:
        raise InputError("the model is already ONNX; use fmt trt to build an engine from it", param="fmt")
    if out_path is not None and out_path.lower().endswith(ENGINE_SUFFIXES) and not want_trt:
        raise InputError(f"out_path {out_path} names an engine, but no engine is built here ({trt_reason}); "
                         "give an .onnx name or fmt trt", param=("out_path", "fmt"))
    onnx_path, plan_path = output_paths(model, precision, out_path, engine=want_trt)
    if kind == "pt":
        onnx_path = write_target(onnx_path)  # a symlinked output is written through
    plan_path = write_target(plan_path) if plan_path else None
    plan = ExportPlan(model, kind, precision, onnx_path, plan_path, "" if want_trt else trt_reason)
    refuse_overwriting_inputs({"model": model, **(inputs or {})},
                              {f"output {os.path.basename(f)}": f for p in plan.finals for f in [p, *companions(p)]})
    refuse_foreign_outputs(plan.finals)
    return plan


def default_onnx_path(ckpt: str, precision: str) -> str:
    stem = os.path.splitext(ckpt)[0]
    return stem + ("" if precision == "fp32" else f"-{precision}") + ".onnx"


ENGINE_SUFFIXES = (".plan", ".engine")


def output_paths(model: str, precision: str, out_path: Optional[str], engine: bool) -> tuple[str, Optional[str]]:
    """(the ONNX file, the engine or None) that `edm-deploy export MODEL` writes.

    The one place output names are derived (the command uses it, and a test checks the names its
    help examples promise): an .onnx MODEL is its own ONNX file; otherwise `out_path` when it is
    an .onnx name, else the checkpoint's name with the precision (``ckpt.onnx``,
    ``ckpt-fp16.onnx``, ``ckpt-int8.onnx``) beside `out_path` or the checkpoint. The engine
    (with `engine`) is `out_path` when it names one, else the ONNX file's name with ``.plan``.
    Companion files (``.plan.json``, ``.onnx.data``) are `staging.companions` of these.
    """
    if model.lower().endswith(".onnx"):
        onnx_path = model
    elif out_path and out_path.lower().endswith(".onnx"):
        onnx_path = out_path
    else:
        onnx_path = default_onnx_path(out_path or model, precision)
    plan_path = None
    if engine:
        plan_path = (out_path if out_path and out_path.lower().endswith(ENGINE_SUFFIXES)
                     else os.path.splitext(onnx_path)[0] + ".plan")
    return onnx_path, plan_path


def calibration_images(data: str, count: int, seed: int) -> np.ndarray:
    """`count` images of a dataset (seeded pick), as float32 NCHW in [-1, 1]."""
    from edm_deploy.training.dataset import open_dataset

    ds = open_dataset(data)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ds), size=min(count, len(ds)), replace=False))
    images, _ = ds.batch(pick.tolist())
    return images.astype(np.float32) / 127.5 - 1


def _runner(path: str, device: str):
    """The runtime backend of an exported artifact (the export layer does not use the app's registry)."""
    if path.endswith(".onnx"):
        from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

        return OnnxRuntimeDenoiser(path, device=device)
    from edm_deploy.runtime.backends.tensorrt import TensorRTDenoiser

    return TensorRTDenoiser(path)


def verify_staged(stage, final: str, net: Any, precision: str, device: str):
    """Verify a staged artifact; a failure keeps it under a name that says so, and raises."""
    from .verify import verify_artifact

    with _runner(stage.path(final), device) as den:
        report = verify_artifact(final, net, den, precision)  # the inputs `edm-deploy verify` uses by default
    if not report.passed:
        kept = stage.keep_failed(final)
        raise InputError(f"verification of {final} failed; nothing was written under that name, the failed file is "
                         f"kept as {kept} for inspection:\n{report.table()}")
    return report


def export_checkpoint(
    ckpt_path: str,
    out_path: Optional[str] = None,
    precision: str = "fp32",
    max_batch: int = 64,
    opt_batch: Optional[int] = None,
    opset: int = 17,
    verify: bool = True,
    calibration: Optional[CalibrationOptions] = None,
    echo: Callable[[str], None] = lambda line: None,
    schedules: Optional[dict] = None,
) -> ExportOutcome:
    """Export `ckpt_path`'s EMA denoiser to a verified ONNX file at `out_path` (default beside it).

    `schedules` ({"solver@nfe": time points}) ride in the manifest: the planner's default for that
    solver and NFE on this file (`edm-deploy export --schedule`)."""
    import time

    from edm_deploy.runtime.core.fileio import refuse_overwriting_inputs
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    from .onnx_export import export_onnx
    from .staging import Staging, companions, refuse_foreign_outputs

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", param="precision")
    if calibration is not None and precision != "int8":
        raise InputError("calibration options apply to int8 exports only", param="calibration")
    out_path = out_path or default_onnx_path(ckpt_path, precision)
    refuse_overwriting_inputs({"ckpt_path": ckpt_path, "calibration data": calibration and calibration.data},
                              {f"out_path ({os.path.basename(p)})": p for p in [out_path, *companions(out_path)]})
    refuse_foreign_outputs([out_path])
    start = time.perf_counter()
    ckpt = load_checkpoint(ckpt_path)
    net = load_network(ckpt)
    with Staging(out_path) as stage:
        if precision == "int8":
            from .quantize import quantize_int8

            calib = calibration or CalibrationOptions()
            fp32_path = os.path.join(stage.folder, "fp32-" + os.path.basename(out_path))
            export_onnx(net, ckpt["network"], fp32_path, opset=opset, max_batch=max_batch, opt_batch=opt_batch,
                        source_path=ckpt_path, schedules=schedules)
            dataset = None if calib.data is None else calibration_images(calib.data, calib.num_images, calib.seed)
            echo(f"calibrating int8 on {calib.num_images} {'dataset images' if dataset is not None else 'sampling trajectories'}"
                 f" ({calib.method})")
            result = quantize_int8(fp32_path, stage.path(out_path), num_images=calib.num_images, seed=calib.seed,
                                   method=calib.method, dataset=dataset, steps=calib.steps)
            os.unlink(fp32_path)
            manifest, size = result.manifest, result.size_bytes
        else:
            result = export_onnx(net, ckpt["network"], stage.path(out_path), fp16=precision == "fp16", opset=opset,
                                 max_batch=max_batch, opt_batch=opt_batch, source_path=ckpt_path, schedules=schedules)
            manifest, size = result.manifest, result.size_bytes
        report = verify_staged(stage, out_path, net, precision, "cpu") if verify else None
        stage.commit([out_path])
    return ExportOutcome(out_path, manifest, time.perf_counter() - start, size, report)
