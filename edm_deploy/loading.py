"""`edm_deploy.load(path)`: any model file -> a denoiser that follows the runtime contract.

* ``*.plan`` / ``*.engine``: a TensorRT engine with its ``.plan.json`` manifest (TensorRT backend);
* ``*.onnx``: onnxruntime (CPU, CUDA or TensorRT provider);
* ``*.pt``: an edm-deploy checkpoint, run by torch (builds the network from `training`).

Official EDM ``.pkl`` files are refused with a pointer to `edm-deploy convert`, because loading
them the reference way executes code stored in the file.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from edm_deploy.errors import InputError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def model_kind(path: str) -> str:
    """'plan', 'onnx' or 'pt' from the file name; anything else is one clear error."""
    lower = str(path).lower()
    if lower.endswith((".plan", ".engine", ".trt")):
        return "plan"
    if lower.endswith(".onnx"):
        return "onnx"
    if lower.endswith((".pt", ".pth", ".ckpt")):
        return "pt"
    if lower.endswith(".pkl"):
        raise InputError(f"{path} is an official EDM pickle; convert it first: edm-deploy convert {path}")
    raise InputError(f"unknown model file type: {path} (expected .plan, .onnx or .pt)")


def load(
    path: str,
    backend: str = "auto",
    device: str = "auto",
    max_batch: Optional[int] = None,
    fp16: bool = False,
    compile: bool = False,
    compile_mode: Optional[str] = None,
    channels_last: bool = False,
    threads: Optional[int] = None,
    cuda_graph: bool = False,
) -> Any:
    """Load `path` as a denoiser: call it as ``den(x, sigma, class_labels)``.

    `backend` picks the runtime ('auto' follows the file type); `device` is 'auto', 'cpu',
    'cuda' or (onnxruntime only) 'tensorrt'. The torch-only options (`fp16`, `compile`,
    `channels_last`) apply to `.pt` checkpoints; `cuda_graph` to TensorRT engines.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind = model_kind(path)
    if not os.path.exists(path):
        raise InputError(f"model not found: {path}")
    if kind == "plan":
        if backend not in ("auto", "tensorrt"):
            raise InputError(f"a TensorRT engine runs only on the tensorrt backend, not {backend}")
        from edm_deploy.runtime.backends.tensorrt import TensorRTDenoiser

        return TensorRTDenoiser(path, cuda_graph=cuda_graph, max_batch=max_batch)
    if kind == "onnx":
        if backend == "torch":
            raise InputError("an .onnx file cannot run on the torch backend; pass the .pt checkpoint instead")
        from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

        ort_device = "tensorrt" if backend == "tensorrt" else device
        return OnnxRuntimeDenoiser(path, device=ort_device, threads=threads, max_batch=max_batch)
    if backend not in ("auto", "torch"):
        raise InputError(f"a .pt checkpoint runs on the torch backend; export it first for {backend}")
    return load_checkpoint_denoiser(path, device=device, fp16=fp16, compile=compile, compile_mode=compile_mode,
                                    channels_last=channels_last, max_batch=max_batch)


def load_checkpoint_denoiser(path: str, device: str = "auto", **options: Any) -> Any:
    """A `.pt` checkpoint as a TorchDenoiser (needs torch and the training package)."""
    from edm_deploy.runtime.backends.torch_backend import TorchDenoiser, import_torch

    import_torch()
    from edm_deploy.training.checkpoint import load_checkpoint, load_network, network_manifest

    ckpt = load_checkpoint(path)
    net = load_network(ckpt)
    manifest = network_manifest(net, ckpt["network"], source_path=path)
    return TorchDenoiser(net, manifest, device=device, source=path, **options)
