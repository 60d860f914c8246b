"""`edm_deploy.load(path)`: any model file -> a denoiser with the full runtime interface.

The one place backends are registered: `MODEL_KINDS` maps a file kind to its suffixes, the
backends and devices that run it, the load options that apply to it, its loader, its manifest
reader (for `info`) and its `bench` variants. The CLI's `--backend`/`--device` choices,
`bench`'s variants, `info` and the "option does not apply" errors are all derived from it, so a
new backend is one entry here plus its runner in `edm_deploy.runtime.backends`.

* ``*.plan`` / ``*.engine``: a TensorRT engine with its ``.plan.json`` manifest (TensorRT backend);
* ``*.onnx``: onnxruntime (CPU, CUDA or TensorRT provider);
* ``*.pt``: an edm-deploy checkpoint, run by torch (builds the network from `training`).

Official EDM ``.pkl`` files are refused with a pointer to `edm-deploy convert`, because loading
them the reference way executes code stored in the file. Every loaded denoiser has `close()` and
works as a context manager, so holding a model and its guide is ``with load(a) as d, load(b) as g``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edm_deploy.runtime.backends.base import DenoiserBackend
from edm_deploy.runtime.core.errors import InputError


@dataclass(frozen=True)
class LoadOption:
    """An option of `load` that some kinds of model take, declared once: the CLI's flag, the
    help and the "does not apply" errors are derived from it (`commands.common.backend_options`)."""

    name: str                        # the keyword of `load`
    purpose: str                     # what it is for (errors, help)
    flag: Optional[str] = None       # its command-line flag; None: the Python API only
    type: str = "flag"               # "flag" (on/off) or "int"
    help: str = ""                   # the flag's help text


FP16 = LoadOption("fp16", "fp16 compute in the torch network", "--fp16", help="torch backend: fp16 compute (CUDA).")
BF16 = LoadOption("bf16", "bfloat16 autocast in the torch network", "--bf16",
                  help="torch backend: bfloat16 autocast (CPUs with AVX-512 BF16/AMX, CUDA).")
COMPILE = LoadOption("compile", "torch.compile", "--compile", help="torch backend: torch.compile the network.")
COMPILE_MODE = LoadOption("compile_mode", "torch.compile's mode")
CHANNELS_LAST = LoadOption("channels_last", "channels-last memory format in torch")
THREADS = LoadOption("threads", "onnxruntime CPU threads", "--threads", "int",
                     help="onnxruntime CPU threads [default: all cores].")
CUDA_GRAPH = LoadOption("cuda_graph", "CUDA graph replay of TensorRT engines", "--cuda-graph",
                        help="TensorRT backend: replay CUDA graphs per batch size.")


@dataclass(frozen=True)
class ModelKind:
    """One kind of model file and how it is run."""

    name: str                        # short name used in messages
    suffixes: tuple[str, ...]        # file name endings (lower case)
    backends: tuple[str, ...]        # `backend=` values that run it (the first is its default)
    devices: tuple[str, ...]         # `device=` values it accepts
    options: tuple[LoadOption, ...]  # load options that apply to it
    open: Callable[..., DenoiserBackend]
    read_manifest: Callable[[str], dict]
    bench_variants: dict[str, dict] = field(default_factory=dict)  # bench name -> load options

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)


def _open_plan(path: str, backend: str, device: str, gpu: int, max_batch: Optional[int], cuda_graph: bool = False):
    from edm_deploy.runtime.backends.tensorrt import TensorRTDenoiser

    return TensorRTDenoiser(path, cuda_graph=cuda_graph, max_batch=max_batch, device_id=gpu)


def _open_onnx(path: str, backend: str, device: str, gpu: int, max_batch: Optional[int], threads: Optional[int] = None):
    from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

    ort_device = "tensorrt" if backend == "tensorrt" else device
    return OnnxRuntimeDenoiser(path, device=ort_device, threads=threads, max_batch=max_batch, device_id=gpu)


def _open_pt(path: str, backend: str, device: str, gpu: int, max_batch: Optional[int], **options: Any):
    from edm_deploy.runtime.backends.torch_backend import import_torch

    if device == "auto":
        device = "cuda" if import_torch().cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{gpu}"
    return load_checkpoint_denoiser(path, device=device, max_batch=max_batch, **options)


def _plan_manifest(path: str) -> dict:
    """The sidecar of an engine, checked to describe this very engine file (its recorded sha256).

    Without TensorRT the engine's tensors cannot be read (that check runs when it loads), but
    a sidecar copied beside another engine is told here too, from the hash it records.
    """
    from edm_deploy.runtime.backends.tensorrt import sidecar_path
    from edm_deploy.runtime.core.fileio import sha256_file
    from edm_deploy.runtime.core.manifest import read_sidecar

    manifest = read_sidecar(sidecar_path(path))
    recorded = (manifest.get("tensorrt") or {}).get("plan_sha256")
    if isinstance(recorded, str) and recorded and sha256_file(path) != recorded:
        raise InputError(f"{sidecar_path(path)} describes another engine than {path} (the sha256 it records differs); "
                         "rebuild the engine or restore its own sidecar")
    return manifest


def _onnx_manifest(path: str) -> dict:
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    return read_onnx_manifest(path)


def _pt_manifest(path: str) -> dict:
    """A checkpoint's manifest from its description, without building the network: its skeleton on
    torch's meta device (no weights allocated or initialised) says what the description implies."""
    from edm_deploy.training.checkpoint import check_network_fits, load_checkpoint, network_manifest

    ckpt = load_checkpoint(path)
    skeleton = check_network_fits(ckpt["network"], ckpt["ema"], path)
    manifest = network_manifest(skeleton, ckpt["network"], source_path=path)
    manifest["checkpoint"] = {k: v for k, v in ckpt.get("meta", {}).items() if isinstance(v, (str, int, float, bool))}
    manifest["checkpoint"]["resume_point"] = ckpt.get("training_state") is not None
    manifest["checkpoint"]["parameters"] = sum(p.numel() for p in skeleton.parameters())
    return manifest


MODEL_KINDS: dict[str, ModelKind] = {
    "plan": ModelKind("TensorRT", (".plan", ".engine", ".trt"), ("tensorrt",), ("auto", "cuda"), (CUDA_GRAPH,),
                      _open_plan, _plan_manifest, {"tensorrt": {}}),
    "onnx": ModelKind("ONNX", (".onnx",), ("onnxruntime", "tensorrt"), ("auto", "cpu", "cuda", "tensorrt"), (THREADS,),
                      _open_onnx, _onnx_manifest, {"onnxruntime": {}}),
    "pt": ModelKind(".pt checkpoint", (".pt", ".pth", ".ckpt"), ("torch",), ("auto", "cpu", "cuda"),
                    (FP16, BF16, COMPILE, COMPILE_MODE, CHANNELS_LAST), _open_pt, _pt_manifest,
                    {"torch": {}, "torch-compile": {"compile": True}, "torch-fp16": {"fp16": True},
                     "torch-bf16": {"bf16": True}}),
}

# Every load option of every kind, by name (the CLI's backend flags are those with a flag).
LOAD_OPTIONS: dict[str, LoadOption] = {o.name: o for k in MODEL_KINDS.values() for o in k.options}

BACKENDS = ("auto",) + tuple(dict.fromkeys(b for k in MODEL_KINDS.values() for b in k.backends))
DEVICES = tuple(dict.fromkeys(d for k in MODEL_KINDS.values() for d in k.devices))
BENCH_VARIANTS = tuple(v for k in MODEL_KINDS.values() for v in k.bench_variants)


def model_kind(path: str) -> str:
    """'plan', 'onnx' or 'pt' from the file name; anything else is one clear error."""
    lower = str(path).lower()
    for name, kind in MODEL_KINDS.items():
        if lower.endswith(kind.suffixes):
            return name
    if lower.endswith(".pkl"):
        raise InputError(f"{path} is a pickle; if it is an official EDM network, convert it first: edm-deploy convert {path}")
    known = ", ".join(s for k in MODEL_KINDS.values() for s in k.suffixes)
    raise InputError(f"unknown model file type: {path} (expected one of {known})")


def default_device_id() -> int:
    """The GPU this process should use: torchrun's LOCAL_RANK when several processes run, else 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return 0


def _where_option_applies(option: str) -> str:
    kinds = [k.name for k in MODEL_KINDS.values() if option in k.option_names]
    return f"{LOAD_OPTIONS[option].purpose}; it applies to {' and '.join(kinds)} models"


def check_model_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"model not found: {path}")
    if not os.path.isfile(path):
        raise InputError(f"{path} is not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path} is empty (0 bytes): not a model; was an export or a copy interrupted?")


def load(
    path: str,
    backend: str = "auto",
    device: str = "auto",
    max_batch: Optional[int] = None,
    device_id: Optional[int] = None,
    **options: Any,
) -> DenoiserBackend:
    """Load `path` as a denoiser: call it as ``den(x, sigma, class_labels)``; `close()` frees it.

    `backend` picks the runtime ('auto' follows the file type); `device` is 'auto', 'cpu',
    'cuda' or (onnxruntime only) 'tensorrt'; `device_id` defaults to torchrun's LOCAL_RANK so
    each process of a multi-GPU run takes its own GPU. Kind-specific `options` (see
    `LOAD_OPTIONS`): `fp16`, `bf16`, `compile`, `compile_mode`, `channels_last` for `.pt`
    checkpoints, `threads` for onnxruntime, `cuda_graph` for TensorRT engines; one given to
    another kind of model is an error rather than silently ignored.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    kind = MODEL_KINDS[model_kind(path)]
    check_model_file(path)
    unknown = [o for o in options if o not in LOAD_OPTIONS]
    if unknown:
        raise InputError(f"unknown load option(s): {', '.join(unknown)}")
    for option, value in options.items():
        if value and option not in kind.option_names:
            raise InputError(f"{option} does not apply to {kind.name} models ({_where_option_applies(option)})",
                             param=option)
    if backend != "auto" and backend not in kind.backends:
        raise InputError(f"a {kind.name} model runs on the {' or '.join(kind.backends)} backend, not {backend}",
                         param="backend")
    if device not in kind.devices:
        raise InputError(f"a {kind.name} model does not run on device {device!r} (choose {', '.join(kind.devices)})",
                         param="device")
    gpu = default_device_id() if device_id is None else int(device_id)
    given = {k: v for k, v in options.items() if v}
    return kind.open(path, backend if backend != "auto" else kind.backends[0], device, gpu, max_batch, **given)


def read_manifest(path: str) -> dict:
    """The manifest of any model file, reading as little as possible (no torch for .onnx/.plan)."""
    kind = MODEL_KINDS[model_kind(path)]
    check_model_file(path)
    return kind.read_manifest(path)


def load_checkpoint_denoiser(path: str, device: str = "auto", **options: Any) -> DenoiserBackend:
    """A `.pt` checkpoint as a TorchDenoiser (needs torch and the training package)."""
    from edm_deploy.runtime.backends.torch_backend import TorchDenoiser, import_torch

    import_torch()
    from edm_deploy.training.checkpoint import load_checkpoint, load_network, network_manifest

    ckpt = load_checkpoint(path)
    net = load_network(ckpt)
    manifest = network_manifest(net, ckpt["network"], source_path=path)
    return TorchDenoiser(net, manifest, device=device, source=path, **options)
