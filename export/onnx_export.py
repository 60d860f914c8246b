"""torch -> ONNX: the whole preconditioned denoiser D(x, sigma, class_labels) as one graph.

Design choices, each for a deployment reason:

* Preconditioning (c_skip, c_out, c_in, c_noise) is inside the graph, so a runtime needs nothing
  but the file and its manifest.
* One symbolic batch dimension named ``batch`` is shared by ``x [B,C,H,W]``, ``sigma [B]``,
  ``class_labels [B,L]`` (omitted for unconditional models) and ``denoised``; the trace uses an
  example batch >= 2 so nothing specialises to 1.
* Opset 17 by default: LayerNormalization/InstanceNormalization paths that TensorRT maps to
  normalization layers exist from 17 on, while opset 18's GroupNormalization has per-group
  affine semantics that differ from torch's and opset 21's (which fixed that) has no
  onnxruntime kernel; 17 is also what both onnxruntime and TensorRT 10/11 parse everywhere.
* `--fp16` traces the preconditioner's fp16 compute path even on the CPU: convolutions and
  matmuls in fp16 with fp32 inputs/outputs; the sigma embedding, GroupNorm statistics, attention
  softmax and the final c_skip mix stay fp32 (they overflow or lose accuracy in fp16).
* The TorchScript-based exporter (`dynamo=False`) is used: it handles the dynamic batch of these
  UNets reliably, whereas the torch.export path has specialised batch dims in known cases.
* The file is written in a temporary folder and renamed into place; models above 2 GB use
  external data (`<name>.onnx.data`), which is renamed first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest
from edm_deploy.runtime.core.errors import InputError, first_line
from edm_deploy.runtime.core.manifest import (
    CLASS_LABELS,
    DENOISED,
    DIGEST_KEY,
    ONNX_METADATA_KEY,
    SCHEDULES_KEY,
    SIGMA,
    X,
    dumps,
    schedules_record,
)
from edm_deploy.runtime.core.manifest import input_names as graph_input_names
from edm_deploy.runtime.core.onnx_file import digest_of_bytes
from edm_deploy.runtime.core.version import __version__

DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2_000_000_000  # bytes; a little under 2 GiB for headroom


@dataclass
class ExportResult:
    path: str
    manifest: dict
    seconds: float
    size_bytes: int
    external_data: bool


def _example_inputs(net: Any, batch: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    c, r = net.img_channels, net.img_resolution
    from .verify import sigma_range

    lo, hi = sigma_range(net)
    u = torch.rand(batch, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.log(torch.tensor(lo, dtype=torch.float64)) * (1 - u) + torch.log(torch.tensor(hi, dtype=torch.float64)) * u)
    sigma = net.round_sigma(sigma.float()).float()
    x = torch.randn(batch, c, r, r, generator=gen) * torch.sqrt(sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % net.label_dim, net.label_dim).float()
    return x, sigma.reshape(batch), labels



def _wrapper(net: Any, conditional: bool):
    import torch

    class Conditional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, sigma, class_labels):
            return self.net(x, sigma, class_labels)

    class Unconditional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, sigma):
            return self.net(x, sigma, None)

    return Conditional() if conditional else Unconditional()


def embed_manifest(model: Any, manifest: dict) -> None:
    """The edm_deploy manifest as the ONNX model's only metadata entry (an export's, or a quantised copy's).

    The manifest records the digest of everything else in the file (`runtime.core.onnx_file`), so a
    load notices a damaged or altered file; a model whose weights go to an external data file
    (over 2 GB) records none, as the digest would not cover them.
    """
    del model.metadata_props[:]
    model.producer_name, model.producer_version = "edm-deploy", __version__
    manifest.pop(DIGEST_KEY, None)
    if model.ByteSize() <= PROTOBUF_LIMIT:
        manifest[DIGEST_KEY] = digest_of_bytes(model.SerializeToString(), manifest.get("precision", "fp32"))
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, dumps(manifest)


def export_onnx(
    net: Any,
    network: dict,
    out_path: str,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 64,
    opt_batch: Optional[int] = None,
    example_batch: int = 2,
    source_path: Optional[str] = None,
    schedules: Optional[dict] = None,
) -> ExportResult:
    """Trace `net` (a preconditioner in eval mode) into `out_path` with its manifest."""
    import onnx
    import torch

    from edm_deploy.training.checkpoint import network_manifest

    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}", param="max_batch")
    opt_batch = opt_batch or min(max_batch, 64)
    if not 1 <= opt_batch <= max_batch:
        raise InputError(f"opt_batch must lie in [1, {max_batch}], got {opt_batch}", param="opt_batch")
    if example_batch < 2:
        raise InputError("the example batch must be >= 2 so the batch dimension stays symbolic")
    if not 13 <= opset <= 21:
        raise InputError(f"opset must lie in [13, 21], got {opset}", param="opset")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"output folder does not exist: {out_dir}")

    start = time.perf_counter()
    net = net.eval().requires_grad_(False).to("cpu")
    previous = (getattr(net, "use_fp16", False), getattr(net, "fp16_everywhere", False))
    if fp16:
        if not hasattr(net, "set_export_fp16"):
            raise InputError("this network has no fp16 compute path to export")
        net.use_fp16 = True
        net.set_export_fp16(True)
    else:
        net.use_fp16 = False
    conditional = bool(net.label_dim)
    x, sigma, labels = _example_inputs(net, example_batch)
    args = (x, sigma, labels) if conditional else (x, sigma)
    input_names = graph_input_names(net.label_dim)
    dynamic_axes = {name: {0: "batch"} for name in input_names + [DENOISED]}

    manifest = network_manifest(net, network, source_path=source_path, precision="fp16" if fp16 else "fp32")
    manifest["batch"] = {"min": 1, "opt": int(opt_batch), "max": int(max_batch)}
    if schedules:
        manifest[SCHEDULES_KEY] = schedules_record(schedules, "schedules")
    manifest["io"] = {
        "inputs": {X: ["batch", net.img_channels, net.img_resolution, net.img_resolution], SIGMA: ["batch"]}
        | ({CLASS_LABELS: ["batch", net.label_dim]} if conditional else {}),
        "outputs": {DENOISED: ["batch", net.img_channels, net.img_resolution, net.img_resolution]},
        "dtype": "float32",
    }
    manifest["producer"].update({"onnx": onnx.__version__, "opset": int(opset), "exporter": "torch.onnx (TorchScript)"})

    tmp_dir = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        raw = os.path.join(tmp_dir, "raw.onnx")
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _wrapper(net, conditional), args, raw,
                    input_names=input_names, output_names=[DENOISED], dynamic_axes=dynamic_axes,
                    opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"ONNX export failed: {first_line(exc, 300)}") from exc
        finally:
            net.use_fp16 = previous[0]
            if hasattr(net, "set_export_fp16"):
                net.set_export_fp16(previous[1])

        model = onnx.load(raw, load_external_data=True)
        _check_symbolic_batch(model, input_names)
        embed_manifest(model, manifest)
        name = os.path.basename(out_path)
        staged = os.path.join(tmp_dir, name)
        external = model.ByteSize() > PROTOBUF_LIMIT
        if external:
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=name + ".data", size_threshold=1024, convert_attribute=False)
            onnx.checker.check_model(staged, full_check=True)
        else:
            onnx.save_model(model, staged)
            onnx.checker.check_model(staged, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(staged, load_external_data=False), strict_mode=False)
        _check_symbolic_batch(inferred, input_names, outputs=True)
        if external:
            os.replace(staged + ".data", out_path + ".data")
        elif os.path.exists(out_path + ".data"):
            os.unlink(out_path + ".data")  # weights of an earlier, larger export under this name
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    size = os.path.getsize(out_path) + (os.path.getsize(out_path + ".data") if os.path.exists(out_path + ".data") else 0)
    return ExportResult(out_path, manifest, time.perf_counter() - start, size, external)


def _check_symbolic_batch(model, input_names, outputs: bool = False) -> None:
    """Every input (and output) must keep the symbolic `batch` as its first dimension."""
    values = list(model.graph.input) + (list(model.graph.output) if outputs else [])
    for value in values:
        if value.name not in input_names and value.name != DENOISED:
            continue
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.dim_param != "batch":
            raise InputError(f"export specialised the batch dimension of {value.name!r} to {dim0.dim_value}; this is a bug")


def graph_op_types(path: str) -> dict[str, int]:
    """Histogram of op types (tests and `info` use it to prove an fp16 graph is really fp16)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fp16_initializer_fraction(path: str) -> float:
    """Share of weight bytes stored as float16."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(path, load_external_data=True)
    total = half = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if init.data_type == TensorProto.FLOAT16:
            half += 2 * n
            total += 2 * n
        elif init.data_type == TensorProto.FLOAT:
            total += 4 * n
    return half / total if total else 0.0


__all__ = ["DEFAULT_OPSET", "ExportResult", "export_onnx", "fp16_initializer_fraction", "graph_op_types",
           "read_onnx_manifest"]
