"""TensorRT backend: a serialized engine (`model.plan`) plus its sidecar manifest.

An engine only runs on the TensorRT version and GPU architecture it was built for. Before
deserializing, the sidecar `model.plan.json` is checked against the machine (`check_engine_compat`)
and a mismatch is refused with the command that rebuilds it. Device buffers for the profile's
maximum batch are allocated once; each call copies the batch into them on the device, sets the
input shapes only when the batch size changes, and runs `execute_async_v3` on a private stream.
With `cuda_graph=True` one CUDA graph per batch size is captured after an un-captured warm-up run
(TensorRT's rule after any shape change) and replayed afterwards.

Device arrays come from CuPy (preferred, keeps sampling torch-free) or torch. This module is
written against the TensorRT 10/11 Python API documentation; the compatibility checks are tested
here, the GPU execution path could not be run in this project's CI (no GPU, no TensorRT).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ..core.errors import BackendRuntimeError, BackendUnavailableError, InputError
from ..core.fileio import sha256_file, write_target
from ..core.manifest import (
    CLASS_LABELS,
    DENOISED,
    SIGMA,
    X,
    check_against_graph,
    input_names,
    read_sidecar,
)
from ..core.optional import require
from ..core.xp import library_of
from .base import DenoiserBackend
from .device import device_array_library


def sidecar_path(plan_path: str) -> str:
    """The engine's manifest: beside the engine file itself, so a symlink to an engine finds it."""
    return write_target(plan_path) + ".json"


def rebuild_hint(manifest: dict, plan_path: str) -> str:
    onnx = (manifest.get("tensorrt") or {}).get("onnx") or os.path.basename(os.path.splitext(plan_path)[0] + ".onnx")
    onnx = os.path.join(os.path.dirname(plan_path), onnx)  # the ONNX lives beside its engine
    return f"rebuild it on this machine: edm-deploy export {onnx} --format trt --out {plan_path}"


def check_engine_compat(manifest: dict, trt_version: str, gpu_name: str, compute_capability: str, plan_path: str = "model.plan") -> list[str]:
    """Refuse an engine built for another TensorRT version or GPU architecture.

    Returns warnings for differences that do not prevent loading (same architecture, other GPU
    name). Raises InputError with a rebuild hint otherwise.
    """
    info = manifest.get("tensorrt")
    if not info:
        raise InputError(f"{plan_path}: the manifest has no TensorRT section; {rebuild_hint(manifest, plan_path)}")
    warnings = []
    built_version = str(info.get("version"))
    if built_version != str(trt_version):
        raise InputError(
            f"{plan_path} was built with TensorRT {built_version} but this machine has TensorRT {trt_version}; "
            + rebuild_hint(manifest, plan_path)
        )
    built_cc = str(info.get("compute_capability"))
    if built_cc != str(compute_capability):
        level = info.get("hardware_compatibility_level")
        if not (level == "ampere_plus" and _cc_tuple(compute_capability) >= (8, 0)):
            raise InputError(
                f"{plan_path} was built for {info.get('gpu')} (compute capability {built_cc}) but this GPU is "
                f"{gpu_name} ({compute_capability}); " + rebuild_hint(manifest, plan_path)
            )
        warnings.append(f"engine built for compute capability {built_cc}, running on {compute_capability} (hardware-compatible)")
    elif info.get("gpu") and info.get("gpu") != gpu_name:
        warnings.append(f"engine built on {info.get('gpu')}, running on {gpu_name} (same architecture)")
    return warnings


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def engine_io(engine: Any, trt: Any) -> tuple[dict[str, list], list[str], Optional[tuple[int, int]]]:
    """({tensor name: shape, -1 for dynamic}, output names, (min, max) batch of profile 0 or None)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    shapes = {n: [int(d) for d in engine.get_tensor_shape(n)] for n in names}
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    batch_range = None
    if X in names and engine.get_tensor_mode(X) == trt.TensorIOMode.INPUT:
        lo, _opt, hi = engine.get_tensor_profile_shape(X, 0)
        batch_range = (int(lo[0]), int(hi[0]))
    return shapes, outputs, batch_range


def check_engine_io(engine: Any, trt: Any, manifest: dict, source: str) -> None:
    """Refuse an engine whose tensors disagree with its sidecar manifest (one line, before any buffer).

    Names, shapes and the batch profile go through `manifest.check_against_graph`, so a sidecar
    edited or copied from another engine (a forged label_dim, resolution or batch limit) never
    sizes the device buffers; the profile's max batch must also be the one the sidecar records.
    """
    shapes, outputs, batch_range = engine_io(engine, trt)
    if outputs != [DENOISED]:
        raise InputError(f"{source}: engine outputs {outputs} do not match the manifest (expected [{DENOISED!r}])")
    check_against_graph(manifest, shapes, source, batch_range=batch_range)
    profile = (manifest.get("tensorrt") or {}).get("profile") or {}
    if batch_range is not None and profile.get("max") is not None and int(profile["max"]) != batch_range[1]:
        raise InputError(f"{source}: the manifest's TensorRT profile says max batch {profile['max']}, the engine's "
                         f"profile {batch_range[1]}; the sidecar belongs to another engine: rebuild it")
    for n in shapes:
        if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
            raise InputError(f"{source}: tensor {n} is not float32; engines must keep fp32 I/O")


class _DeviceLib:
    """The few CUDA operations the engine runner needs, from CuPy or torch."""

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self.name = device_array_library(device_id)
        if self.name == "cupy":
            import cupy

            cupy.cuda.Device(device_id).use()
            self.cp = cupy
            self.stream = cupy.cuda.Stream(non_blocking=True)
        elif self.name == "torch":
            import torch

            self.torch = torch
            self.stream = torch.cuda.Stream(device=device_id)
        else:
            raise BackendUnavailableError("running TensorRT engines needs CuPy (pip install cupy-cuda12x) or torch with CUDA")

    def gpu(self) -> tuple[str, str]:
        from .gpu_info import detect_gpu

        found = detect_gpu(self.device_id)
        if found is None:
            raise BackendUnavailableError(f"no CUDA GPU {self.device_id} is visible")
        return found

    def empty(self, shape, dtype=np.float32):
        if self.name == "cupy":
            return self.cp.empty(shape, dtype=dtype)
        tdtype = {np.dtype(np.float32): self.torch.float32, np.dtype(np.float16): self.torch.float16}[np.dtype(dtype)]
        return self.torch.empty(shape, dtype=tdtype, device=f"cuda:{self.device_id}")

    def ptr(self, arr) -> int:
        return int(arr.data.ptr) if self.name == "cupy" else int(arr.data_ptr())

    def stream_handle(self) -> int:
        return int(self.stream.ptr) if self.name == "cupy" else int(self.stream.cuda_stream)

    def copy_in(self, dst, src) -> None:
        """dst[:] = src (float32), on the private stream, from host NumPy or device arrays.

        The private stream first waits for the caller's stream, where the sampler produced `src`.
        """
        if self.name == "cupy":
            self.stream.wait_event(self.cp.cuda.get_current_stream().record())
            with self.stream:
                dst[...] = self.cp.asarray(src, dtype=dst.dtype) if not isinstance(src, self.cp.ndarray) else src.astype(dst.dtype)
        else:
            torch = self.torch
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                source = src if isinstance(src, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(src))
                dst.copy_(source.to(dst.device, non_blocking=True).to(dst.dtype))

    def copy_out(self, src):
        if self.name == "cupy":
            with self.stream:
                out = src.copy()
        else:
            with self.torch.cuda.stream(self.stream):
                out = src.clone()
            out.record_stream(self.torch.cuda.current_stream())
        return out

    def sync(self) -> None:
        self.stream.synchronize()

    def to_device(self, host: np.ndarray):
        if self.name == "cupy":
            return self.cp.asarray(host)
        return self.torch.from_numpy(host).to(f"cuda:{self.device_id}")


class TensorRTDenoiser(DenoiserBackend):
    """A TensorRT engine with device-resident I/O buffers and optional CUDA graphs."""

    name = "tensorrt"

    def __init__(self, path: str, cuda_graph: bool = False, max_batch: Optional[int] = None, device_id: int = 0):
        manifest = read_sidecar(sidecar_path(path))
        trt = require("tensorrt", "running .plan engines (without it, sample the .onnx with onnxruntime)")
        self.lib = _DeviceLib(device_id)
        gpu_name, cc = self.lib.gpu()
        notes = check_engine_compat(manifest, trt.__version__, gpu_name, cc, path)
        expected = manifest["tensorrt"].get("plan_sha256")
        if expected and sha256_file(path) != expected:
            raise InputError(f"{path} does not match the sha256 in its manifest (corrupted or replaced); rebuild it")
        profile = manifest["tensorrt"].get("profile")
        if not isinstance(profile, dict) or isinstance(profile.get("max"), bool) or not isinstance(profile.get("max"), int) \
                or profile["max"] < 1:
            raise InputError(f"{path}: the manifest's TensorRT profile has no positive max batch; "
                             + rebuild_hint(manifest, path))
        limit = int(profile["max"]) if max_batch is None else min(int(max_batch), int(profile["max"]))
        super().__init__(manifest, max_batch=limit, source=path)
        self._notes.extend(notes)
        self.device = f"cuda:{device_id} ({gpu_name})"

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise InputError(f"TensorRT could not deserialize {path}; {rebuild_hint(manifest, path)}")
        self.input_names = input_names(self.label_dim)
        self._check_engine_io()

        c, r = self.img_channels, self.img_resolution
        self.buffers = {
            X: self.lib.empty((limit, c, r, r)),
            SIGMA: self.lib.empty((limit,)),
            DENOISED: self.lib.empty((limit, c, r, r)),
        }
        if self.label_dim:
            self.buffers[CLASS_LABELS] = self.lib.empty((limit, self.label_dim))
        self.cuda_graph = cuda_graph
        # Without graphs one execution context serves every batch size (shapes are set when the
        # batch changes). A CUDA graph freezes its context's shapes, so with graphs each batch
        # size gets its own context and graph: splitting a batch (e.g. 64, 36, 64, 36, ...)
        # then never replays a graph captured for another shape.
        self._contexts: dict[int, Any] = {}
        self._graphs: dict[int, Any] = {}
        self._shared = self._new_context() if not cuda_graph else None
        self._shared_batch: Optional[int] = None

    def _check_engine_io(self) -> None:
        """The engine's tensors, shapes and batch profile must be what the sidecar describes."""
        check_engine_io(self.engine, self.trt, self.manifest, self.source)

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__} on {self.device}" + (" with CUDA graphs" if self.cuda_graph else "")

    def to_device(self, host_array: np.ndarray) -> Any:
        return self.lib.to_device(host_array)

    def _release(self) -> None:
        """Graphs, then contexts, then the engine and its runtime, then the device buffers."""
        self._graphs.clear()
        self._contexts.clear()
        self._shared = None
        self.engine = self.runtime = None
        self.buffers = {}
        self.lib.sync()

    def _new_context(self):
        context = self.engine.create_execution_context()
        for name, buf in self.buffers.items():
            # Buffers start at a fixed address for every batch size: bind once per context.
            if not context.set_tensor_address(name, self.lib.ptr(buf)):
                raise InputError(f"TensorRT refused the address of tensor {name!r}")
        return context

    def _set_shapes(self, context, batch: int) -> None:
        c, r = self.img_channels, self.img_resolution
        shapes = {X: (batch, c, r, r), SIGMA: (batch,)}
        if self.label_dim:
            shapes[CLASS_LABELS] = (batch, self.label_dim)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise InputError(f"batch {batch} is outside the engine's optimization profile")

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.lib.stream_handle()):
            raise BackendRuntimeError("TensorRT execution failed (see the TensorRT log above)")

    def _launch(self, batch: int) -> None:
        if not self.cuda_graph:
            if self._shared_batch != batch:
                self._set_shapes(self._shared, batch)
                self._shared_batch = batch
            self._execute(self._shared)
            return
        graph = self._graphs.get(batch)
        if graph is None:
            context = self._new_context()
            self._set_shapes(context, batch)
            self._execute(context)  # the un-captured run TensorRT needs after a shape change
            self._contexts[batch] = context
            self._graphs[batch] = graph = self._capture(context)
        if self.lib.name == "cupy":
            graph.launch(self.lib.stream)
        else:
            with self.lib.torch.cuda.stream(self.lib.stream):
                graph.replay()

    def _capture(self, context):
        if self.lib.name == "cupy":
            self.lib.stream.begin_capture()
            try:
                self._execute(context)
            finally:
                graph = self.lib.stream.end_capture()
            return graph
        torch = self.lib.torch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.lib.stream):
            self._execute(context)
        return graph

    def _run(self, x: Any, sigma: np.ndarray, class_labels: Optional[np.ndarray]) -> Any:
        batch = int(x.shape[0])
        self.lib.copy_in(self.buffers[X][:batch], x)
        self.lib.copy_in(self.buffers[SIGMA][:batch], sigma.astype(np.float32))
        if class_labels is not None:
            self.lib.copy_in(self.buffers[CLASS_LABELS][:batch], class_labels.astype(np.float32))
        self._launch(batch)
        out = self.lib.copy_out(self.buffers[DENOISED][:batch])
        self.lib.sync()
        if library_of(x) == "numpy":
            return out.get() if self.lib.name == "cupy" else out.cpu().numpy()
        return out
