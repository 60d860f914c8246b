"""onnxruntime backend: an exported `.onnx` denoiser on the CPU, CUDA or TensorRT provider.

The provider actually running the graph is checked after the session is created, because
onnxruntime silently falls back to the CPU when a GPU provider cannot start (missing CUDA/cuDNN
libraries): asking for a device explicitly and not getting it is an error; `device='auto'` takes
the best available provider and records any fallback in `warnings`.

On a GPU the sampler state can stay on the device: with CuPy (preferred, torch-free) or torch
present, `to_device` places the latents there and `_run` binds device buffers with IOBinding, so
no image crosses PCIe per evaluation. Without either, plain `run()` copies host arrays each call.
The CUDA and TensorRT paths are written against onnxruntime's documented API but were not run in
this project's CI (no GPU there); the CPU path is tested.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ..core.errors import (
    BackendRuntimeError,
    BackendUnavailableError,
    EdmDeployError,
    InputError,
    first_line,
)
from ..core.manifest import (
    CLASS_LABELS,
    DENOISED,
    ONNX_METADATA_KEY,
    SIGMA,
    X,
    check_against_graph,
    check_precision,
    loads,
)
from ..core.onnx_file import check_content_digest
from ..core.optional import require
from ..core.xp import library_of
from .base import DenoiserBackend
from .device import device_array_library

PROVIDER_FOR_DEVICE = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def import_onnxruntime():
    return require("onnxruntime", "running .onnx models")


def manifest_from_session(session, path: str) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in meta:
        raise InputError(f"{path} has no edm-deploy manifest; export it with `edm-deploy export`")
    return loads(meta[ONNX_METADATA_KEY], path)


def resolve_device(device: str, available: list[str]) -> str:
    """'auto' -> the best provider present; an explicit device must be available."""
    if device == "auto":
        if "CUDAExecutionProvider" in available:
            return "cuda"
        return "cpu"
    if device not in PROVIDER_FOR_DEVICE:
        raise InputError(f"unknown device {device!r} for onnxruntime; choose cpu, cuda, tensorrt or auto")
    if PROVIDER_FOR_DEVICE[device] not in available:
        raise BackendUnavailableError(
            f"onnxruntime here has no {PROVIDER_FOR_DEVICE[device]} (available: {', '.join(available)}); "
            "install onnxruntime-gpu built for your CUDA version, or use --device cpu"
        )
    return device


def provider_list(device: str, manifest: dict, max_batch: int, device_id: int = 0, cache_dir: Optional[str] = None) -> list:
    """Provider list with options, best first, always ending with the CPU provider."""
    cpu = "CPUExecutionProvider"
    cuda_opts = {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC",
                 "arena_extend_strategy": "kSameAsRequested"}
    if manifest.get("precision", "fp32") == "fp32":
        cuda_opts["use_tf32"] = "0"  # an fp32 model must compute in fp32 (TF32 would break fp32 fidelity)
    cuda = ("CUDAExecutionProvider", cuda_opts)
    if device == "cpu":
        return [cpu]
    if device == "cuda":
        return [cuda, cpu]
    c, r, label_dim = manifest["img_channels"], manifest["img_resolution"], manifest["label_dim"]

    def shapes(b: int) -> str:
        parts = [f"{X}:{b}x{c}x{r}x{r}", f"{SIGMA}:{b}"]
        if label_dim:
            parts.append(f"{CLASS_LABELS}:{b}x{label_dim}")
        return ",".join(parts)

    opt = int(manifest.get("batch", {}).get("opt") or max_batch)
    trt_opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "edm-deploy", "ort-trt"),
        "trt_timing_cache_enable": "True",
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(min(opt, max_batch)),
        "trt_profile_max_shapes": shapes(max_batch),
    }
    return [("TensorrtExecutionProvider", trt_opts), cuda, cpu]


# Why the CPU session runs without onnxruntime's memory patterns: a pattern is a plan of one
# session run's allocations, recorded per input shape on its first run and held (with a block of
# the arena sized to it) from the second run of that shape on. A server's batches take every row
# count up to its limit, so the process grows by one plan per batch size as each size recurs: on
# the Fashion-MNIST network, three passes over batch sizes 1-64 held RSS at 183 MB without patterns
# and 313 MB with them, the rise coming in the second pass; a 10-minute soak of the digits server
# rose 24 % after warm-up with them and 0 % without (benchmarks/serving_memory.py, RESULTS.md).
# Calls cost no more without them on the CPU (0.98-1.02x at batches 8-64, side by side). GPU
# providers keep onnxruntime's default: not measured there (no GPU here).


class OnnxRuntimeDenoiser(DenoiserBackend):
    """An exported denoiser run by onnxruntime."""

    name = "onnxruntime"

    def __init__(
        self,
        path: str,
        device: str = "auto",
        threads: Optional[int] = None,
        max_batch: Optional[int] = None,
        device_id: int = 0,
        memory_pattern: Optional[bool] = None,
    ):
        """`memory_pattern`: onnxruntime's per-shape memory plan; None = off on the CPU (why: above the class)."""
        ort = import_onnxruntime()
        if not os.path.exists(path):
            raise InputError(f"model not found: {path}")
        available = ort.get_available_providers()
        self.requested_device = device
        resolved = resolve_device(device, available)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(threads) if threads else usable_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_mem_pattern = resolved != "cpu" if memory_pattern is None else bool(memory_pattern)

        def session_for(providers, opts):
            try:
                return ort.InferenceSession(path, sess_options=opts, providers=providers)
            except Exception as exc:
                first = first_line(exc)
                if resolved == "cpu":
                    raise InputError(f"{path} is not a loadable ONNX model ({first})") from exc
                raise BackendUnavailableError(
                    f"onnxruntime could not start {PROVIDER_FOR_DEVICE[resolved]} for {path} ({first})"
                ) from exc

        if resolved == "cpu":
            self.session = session_for(provider_list(resolved, {}, 0, device_id), options)
            manifest = manifest_from_session(self.session, path)
            limit = max_batch
        else:
            # GPU provider options (TensorRT profiles, TF32) depend on the manifest: read it first.
            manifest = read_onnx_manifest(path)
            limit = int(max_batch or (manifest.get("batch") or {}).get("max") or 64)
            self.session = session_for(provider_list(resolved, manifest, limit, device_id), options)
        super().__init__(manifest, max_batch=limit, source=path)

        active = self.session.get_providers()[0]
        if active != PROVIDER_FOR_DEVICE[resolved]:
            message = (f"onnxruntime fell back to {active} although {PROVIDER_FOR_DEVICE[resolved]} was requested "
                       "(usually missing CUDA/cuDNN/TensorRT libraries)")
            if device != "auto":
                raise BackendUnavailableError(message)
            self._notes.append(message)
        self.provider = active
        self.device = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                       "TensorrtExecutionProvider": "tensorrt"}.get(active, active)
        self.device_id = device_id
        self._check_io()
        self._device_lib = device_array_library(device_id) if self.device != "cpu" else None

    def _check_io(self) -> None:
        """The graph's inputs and outputs must be what the manifest describes (`check_against_graph`)."""
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs != [DENOISED]:
            raise InputError(f"{self.source}: expected one output {DENOISED!r}, found {outputs}")
        check_against_graph(self.manifest, session_shapes(self.session), self.source)
        check_content_digest(self.source, self.manifest)

    def _release(self) -> None:
        self.session = None  # onnxruntime frees the session (and its device arena) with the object

    def describe(self) -> str:
        return f"onnxruntime {self.provider}"

    def to_device(self, host_array: np.ndarray) -> Any:
        if self._device_lib == "cupy":
            import cupy

            return cupy.asarray(host_array)
        if self._device_lib == "torch":
            import torch

            return torch.from_numpy(host_array).to(f"cuda:{self.device_id}")
        return host_array

    def _run(self, x: Any, sigma: np.ndarray, class_labels: Optional[np.ndarray]) -> Any:
        lib = library_of(x)
        try:
            if lib == "numpy":
                feed = {X: np.ascontiguousarray(x, dtype=np.float32), SIGMA: sigma.astype(np.float32)}
                if class_labels is not None:
                    feed[CLASS_LABELS] = np.ascontiguousarray(class_labels, dtype=np.float32)
                return self.session.run([DENOISED], feed)[0]
            return self._run_bound(x, sigma, class_labels, lib)
        except EdmDeployError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types (e.g. out of memory)
            first = first_line(exc, 300)
            raise BackendRuntimeError(f"onnxruntime failed to run {self.source} at batch {x.shape[0]}: {first}") from exc

    def _run_bound(self, x: Any, sigma: np.ndarray, class_labels: Optional[np.ndarray], lib: str) -> Any:
        """Device-resident input and output through IOBinding (CuPy or torch CUDA arrays)."""
        if lib == "cupy":
            import cupy

            x32 = cupy.ascontiguousarray(x.astype(cupy.float32))
            out = cupy.empty_like(x32)
            cupy.cuda.get_current_stream().synchronize()
            x_ptr, out_ptr = x32.data.ptr, out.data.ptr
        else:
            import torch

            x32 = x.to(torch.float32).contiguous()
            out = torch.empty_like(x32)
            torch.cuda.current_stream(x32.device).synchronize()
            x_ptr, out_ptr = x32.data_ptr(), out.data_ptr()
        shape = list(x32.shape)
        binding = self.session.io_binding()
        binding.bind_input(X, "cuda", self.device_id, np.float32, shape, x_ptr)
        binding.bind_cpu_input(SIGMA, sigma.astype(np.float32))
        if class_labels is not None:
            binding.bind_cpu_input(CLASS_LABELS, np.ascontiguousarray(class_labels, dtype=np.float32))
        binding.bind_output(DENOISED, "cuda", self.device_id, np.float32, shape, out_ptr)
        self.session.run_with_iobinding(binding)
        return out


def session_shapes(session) -> dict[str, list]:
    """{tensor name: shape} of an onnxruntime session's inputs and outputs (symbolic dims as names)."""
    return {t.name: list(t.shape) for t in (*session.get_inputs(), *session.get_outputs())}


def proto_shapes(model) -> dict[str, list]:
    """The same from an ONNX ModelProto's graph, initializers (weights listed as inputs) left out."""
    weights = {init.name for init in model.graph.initializer}

    def dims(value) -> list:
        shape = value.type.tensor_type.shape
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]

    shapes = {v.name: dims(v) for v in model.graph.input if v.name not in weights}
    shapes.update({v.name: dims(v) for v in model.graph.output})
    return shapes


def read_onnx_manifest(path: str) -> dict[str, Any]:
    """The manifest in an ONNX file's metadata, read without loading its weights, checked
    against the graph's inputs and outputs (`check_against_graph`).

    Uses the `onnx` package when installed; otherwise a minimal onnxruntime session (the
    runtime must work without onnx). Either way, no torch.
    """
    if not os.path.exists(path):
        raise InputError(f"file not found: {path}")
    try:
        import onnx
    except ModuleNotFoundError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:
            raise InputError(f"{path} is not a readable ONNX file ({first_line(exc)})") from exc
        meta = {p.key: p.value for p in model.metadata_props}
        shapes = proto_shapes(model)
    else:
        ort = import_onnxruntime()
        try:
            session = ort.InferenceSession(path, sess_options=light_session_options(ort), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"{path} is not a readable ONNX file ({first_line(exc)})") from exc
        meta = session.get_modelmeta().custom_metadata_map
        shapes = session_shapes(session)
    if ONNX_METADATA_KEY not in meta:
        raise InputError(f"{path} has no edm-deploy manifest; export it with `edm-deploy export`")
    manifest = loads(meta[ONNX_METADATA_KEY], path)
    check_against_graph(manifest, shapes, path)
    check_content_digest(path, manifest)
    if onnx is not None:
        check_precision(manifest, proto_precision(model), path)
    return manifest


def proto_precision(model) -> str:
    """The precision an ONNX graph computes in, told from its contents: int8 graphs quantise
    (QuantizeLinear/DequantizeLinear), fp16 graphs hold float16 weights or cast to float16."""
    from onnx import TensorProto

    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8"
    half = any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute)
        for node in model.graph.node)
    return "fp16" if half else "fp32"


def light_session_options(ort):
    """A cheap CPU session: no graph optimisation, one thread (for reading metadata)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return options


def usable_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. under taskset or torchrun)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
