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

from edm_deploy.runtime.errors import InputError

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


def default_device_id() -> int:
    """The GPU this process should use: torchrun's LOCAL_RANK when several processes run, else 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return 0


def _refuse(kind: str, **given: Any) -> None:
    """Options that do not apply to a file type are an error, not silently ignored."""
    hints = {
        "fp16": "export with `edm-deploy export --fp16` for an fp16 .onnx/.plan",
        "compile": "torch.compile applies to .pt checkpoints",
        "channels_last": "channels-last applies to .pt checkpoints",
        "threads": "--threads applies to onnxruntime on the CPU",
        "cuda_graph": "--cuda-graph applies to TensorRT engines",
    }
    for name, value in given.items():
        if value:
            raise InputError(f"--{name.replace('_', '-')} does not apply to {kind} models ({hints[name]})")


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
    device_id: Optional[int] = None,
) -> Any:
    """Load `path` as a denoiser: call it as ``den(x, sigma, class_labels)``.

    `backend` picks the runtime ('auto' follows the file type); `device` is 'auto', 'cpu',
    'cuda' or (onnxruntime only) 'tensorrt'; `device_id` defaults to torchrun's LOCAL_RANK so
    each process of a multi-GPU run takes its own GPU. The torch-only options (`fp16`,
    `compile`, `channels_last`) apply to `.pt` checkpoints, `threads` to onnxruntime,
    `cuda_graph` to TensorRT engines; passing one to another kind of model is an error.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind = model_kind(path)
    if not os.path.exists(path):
        raise InputError(f"model not found: {path}")
    gpu = default_device_id() if device_id is None else int(device_id)
    if kind == "plan":
        if backend not in ("auto", "tensorrt"):
            raise InputError(f"a TensorRT engine runs only on the tensorrt backend, not {backend}")
        if device not in ("auto", "cuda"):
            raise InputError(f"a TensorRT engine runs on a CUDA GPU, not on --device {device}")
        _refuse("TensorRT", fp16=fp16, compile=compile, channels_last=channels_last, threads=threads)
        from edm_deploy.runtime.backends.tensorrt import TensorRTDenoiser

        return TensorRTDenoiser(path, cuda_graph=cuda_graph, max_batch=max_batch, device_id=gpu)
    if kind == "onnx":
        if backend == "torch":
            raise InputError("an .onnx file cannot run on the torch backend; pass the .pt checkpoint instead")
        _refuse("ONNX", fp16=fp16, compile=compile, channels_last=channels_last, cuda_graph=cuda_graph)
        from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

        ort_device = "tensorrt" if backend == "tensorrt" else device
        return OnnxRuntimeDenoiser(path, device=ort_device, threads=threads, max_batch=max_batch, device_id=gpu)
    if backend not in ("auto", "torch"):
        raise InputError(f"a .pt checkpoint runs on the torch backend; export it first for {backend}")
    _refuse(".pt checkpoint", threads=threads, cuda_graph=cuda_graph)
    if device == "tensorrt":
        raise InputError("--device tensorrt applies to .onnx models (onnxruntime's TensorRT provider)")
    if device == "auto":
        from edm_deploy.runtime.backends.torch_backend import import_torch

        device = "cuda" if import_torch().cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{gpu}"
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
