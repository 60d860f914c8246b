"""ONNX -> TensorRT engine (`model.plan`) with one dynamic-batch optimization profile.

Built against the TensorRT 10.12+/11 Python API: the network is created STRONGLY_TYPED, so the
precision comes from the ONNX itself (an fp16 export gives an fp16 engine; TensorRT 11 removed
the weak-typing FP16 builder flag and 10.12 deprecated it). One profile covers batch 1..max with
the given opt batch for every input (x, sigma and class_labels share the batch dimension).
Optional: a timing cache file (loaded and saved back), the builder optimisation level (0-5,
default 3) and Ampere-plus hardware compatibility.

The engine and its sidecar manifest (`model.plan.json`: the ONNX manifest plus TensorRT version,
GPU, compute capability, profile, precision and the plan's sha256) are written atomically.
Everything except the actual build is exercised by tests with a stand-in `tensorrt` module; the
real build needs a GPU and TensorRT and was not run in this project's CI.

int8 (`export/quantize.py` output, manifest precision "int8"): explicit quantisation. The QDQ
graph's QuantizeLinear/DequantizeLinear nodes become TensorRT Quantize/Dequantize layers and fix
where int8 is used; in a strongly typed network no precision flag is set (TensorRT's
documentation: with explicit quantisation and strong typing, precision-control build flags are
not required and should not be specified; the INT8 flag is also gone in TensorRT 11). Before
building, the ONNX is checked for what TensorRT's explicit quantisation accepts: signed int8 with
zero points 0 (symmetric) and no int32 bias DequantizeLinear; after parsing, the network must
contain Quantize/Dequantize layers. TF32 is switched off as for fp32 so the float-kept parts
(preconditioning, embedding, softmax, normalisation) compute in fp32. This int8 path has NOT
been run on a GPU with a real TensorRT: only the call sequence is tested, with the stand-in.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from edm_deploy.runtime.backends.tensorrt import sidecar_path
from edm_deploy.runtime.core.errors import BackendUnavailableError, InputError
from edm_deploy.runtime.core.fileio import atomic_write_bytes, sha256_file
from edm_deploy.runtime.core.manifest import CLASS_LABELS, DIGEST_KEY, SIGMA, X, write_sidecar
from edm_deploy.runtime.core.optional import require


def import_tensorrt():
    return require("tensorrt", "building engines")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a GPU visible."""
    try:
        import_tensorrt()
    except BackendUnavailableError as exc:
        return False, str(exc)
    from edm_deploy.runtime.backends.gpu_info import detect_gpu

    if detect_gpu() is None:
        return False, "TensorRT is installed but no CUDA GPU is visible"
    return True, "TensorRT and a CUDA GPU are available"


def profile_shapes(manifest: dict, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shapes per input for one profile over the batch dimension."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(f"need 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch}) batch")
    c, r, label_dim = int(manifest["img_channels"]), int(manifest["img_resolution"]), int(manifest["label_dim"])

    def per_input(b: int) -> dict[str, tuple]:
        shapes = {X: (b, c, r, r), SIGMA: (b,)}
        if label_dim:
            shapes[CLASS_LABELS] = (b, label_dim)
        return shapes

    lo, mid, hi = per_input(min_batch), per_input(opt_batch), per_input(max_batch)
    return {name: (lo[name], mid[name], hi[name]) for name in lo}


def build_engine(
    onnx_path: str,
    plan_path: str,
    manifest: dict,
    max_batch: Optional[int] = None,
    opt_batch: Optional[int] = None,
    timing_cache: Optional[str] = None,
    optimization_level: int = 3,
    workspace_gib: Optional[float] = None,
    hardware_compatible: bool = False,
) -> dict:
    """Build and write `plan_path` (+ `.json` sidecar); return the engine manifest."""
    trt = import_tensorrt()
    from edm_deploy.runtime.backends.gpu_info import detect_gpu

    gpu = detect_gpu()
    if gpu is None:
        raise BackendUnavailableError("building a TensorRT engine needs a CUDA GPU, and none is visible")
    if not 0 <= optimization_level <= 5:
        raise InputError(f"optimization_level must lie in 0..5, got {optimization_level}", param="optimization_level")
    batch = manifest.get("batch") or {}
    max_batch = int(max_batch or batch.get("max") or 64)
    opt_batch = int(opt_batch or min(batch.get("opt") or max_batch, max_batch))
    shapes = profile_shapes(manifest, 1, opt_batch, max_batch)
    out_dir = os.path.dirname(os.path.abspath(plan_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"output folder does not exist: {out_dir}")
    if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        raise BackendUnavailableError(f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT 10 or newer")
    precision = manifest.get("precision", "fp32")
    quantization = check_int8_onnx(onnx_path) if precision == "int8" else None

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InputError(f"TensorRT could not parse {onnx_path}: " + " | ".join(errors[:3]))
    if quantization is not None:
        quantization["qdq_layers"] = count_qdq_layers(trt, network)
        if quantization["qdq_layers"] == 0:
            raise InputError(f"TensorRT parsed {onnx_path} without any Quantize/Dequantize layer; an int8 engine "
                             "needs the explicitly quantised (QDQ) graph from `quantize_int8`")

    config = builder.create_builder_config()
    config.builder_optimization_level = int(optimization_level)
    if precision in ("fp32", "int8") and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default; an fp32 export must stay fp32, and so must an int8 graph's float parts
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in shapes.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    if timing_cache:
        previous = open(timing_cache, "rb").read() if os.path.exists(timing_cache) else b""
        cache = config.create_timing_cache(previous)
        config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError(
            "TensorRT failed to build the engine (see the TensorRT log above); common causes: not enough GPU "
            "memory for the max batch (try a smaller --max-batch or --workspace), or an unsupported layer"
        )
    atomic_write_bytes(plan_path, bytes(plan))
    if timing_cache:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))

    engine_manifest = {k: v for k, v in manifest.items() if k != DIGEST_KEY}  # that digest is the ONNX file's
    engine_manifest["batch"] = {"min": 1, "opt": opt_batch, "max": max_batch}
    engine_manifest["tensorrt"] = {
        "version": trt.__version__,
        "gpu": gpu[0],
        "compute_capability": gpu[1],
        "profile": {"min": 1, "opt": opt_batch, "max": max_batch},
        "precision": manifest.get("precision", "fp32"),
        "strongly_typed": True,
        "builder_optimization_level": int(optimization_level),
        "hardware_compatibility_level": "ampere_plus" if hardware_compatible else None,
        "onnx": os.path.basename(onnx_path),
        "build_seconds": round(time.perf_counter() - start, 1),
        "plan_sha256": sha256_file(plan_path),
    }
    if quantization is not None:
        engine_manifest["tensorrt"]["explicit_quantization"] = {
            "qdq_layers": quantization["qdq_layers"], "int8_nodes": len(quantization["int8_nodes"]),
        }
    write_sidecar(sidecar_path(plan_path), engine_manifest)
    return engine_manifest


def check_int8_onnx(onnx_path: str) -> dict:
    """What TensorRT's explicit quantisation needs from a QDQ graph; InputError naming what is wrong."""
    import onnx

    from .quantize import quantization_summary

    summary = quantization_summary(onnx.load(onnx_path))
    if not summary["int8_nodes"]:
        raise InputError(f"{onnx_path} says int8 but has no quantised Conv/MatMul/Gemm; quantise it with `quantize_int8`")
    if summary["zero_point_types"] != ["INT8"] or summary["nonzero_zero_points"]:
        raise InputError(f"{onnx_path}: TensorRT needs signed int8 with zero point 0 (symmetric quantisation), found "
                         f"{', '.join(summary['zero_point_types'])} with {len(summary['nonzero_zero_points'])} non-zero "
                         "zero points")
    if summary["int32_dequantize"]:
        raise InputError(f"{onnx_path}: TensorRT cannot parse int32 (bias) DequantizeLinear nodes; quantise with float "
                         "biases (`quantize_int8` does)")
    return summary


def count_qdq_layers(trt, network) -> int:
    """Quantize + Dequantize layers in a parsed network (0 means the QDQ graph was not seen)."""
    kinds = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


__all__ = ["build_engine", "check_int8_onnx", "count_qdq_layers", "import_tensorrt", "profile_shapes",
           "tensorrt_status"]
