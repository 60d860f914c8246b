"""torch backend: a preconditioned torch module as a denoiser (the reference path and GPU fallback).

This module never imports the training package: it receives a ready `nn.Module` (the EDM
preconditioner, built by `edm_deploy.load` from a checkpoint) and its manifest. Options:
`fp16` (the preconditioner's fp16 compute path; on CUDA), `bf16` (autocast to bfloat16: oneDNN's
AVX-512 BF16/AMX kernels on a CPU that has them, bf16 tensor cores on CUDA; the
preconditioning arithmetic around the network stays fp32 as autocast keeps elementwise ops),
`channels_last`, and `compile` (`torch.compile`, with `compile_mode` e.g.
'max-autotune-no-cudagraphs' or 'reduce-overhead' for CUDA graphs). On CUDA the sampler state
lives on the device as a torch float64 tensor, so an evaluation costs no host round trip.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..core.errors import BackendUnavailableError, InputError
from ..core.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, PRECOND_KINDS, encode_limit
from ..core.optional import require
from ..core.xp import library_of
from .base import DenoiserBackend


def import_torch():
    return require("torch", "the torch backend")


def describe_denoiser(net: Any, precision: str = "fp32") -> dict[str, Any]:
    """The runtime fields of a manifest, read off a preconditioner module by duck typing.

    Shared by checkpoint export (`training.checkpoint.network_manifest`) and the torch backend's
    in-process wrapper, so both describe a network identically: shape, classes, sigma range
    (0 / inf become null), sigma_data, precond kind and the rounding rule (a discrete table `u`,
    as iDDPM has, becomes a table rule).
    """
    name = type(net).__name__
    table = getattr(net, "u", None)
    sigma_min = float(net.sigma_min)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "img_resolution": int(net.img_resolution),
        "img_channels": int(net.img_channels),
        "label_dim": int(net.label_dim),
        "sigma_min": encode_limit(sigma_min) if sigma_min > 0 else None,
        "sigma_max": encode_limit(float(net.sigma_max)),
        "sigma_data": float(net.sigma_data) if hasattr(net, "sigma_data") else None,
        "precond": PRECOND_KINDS.get(name, name),
        "sigma_rounding": {"kind": "identity"} if table is None
        else {"kind": "table", "values": [float(v) for v in table.detach().cpu().float().tolist()]},
        "precision": precision,
    }


# What a preconditioner module states about itself that a manifest states too.
MODULE_FIELDS = ("img_resolution", "img_channels", "label_dim")


def check_module_agrees(net: Any, manifest: dict, source: str) -> None:
    """The torch counterpart of `manifest.check_against_graph`: the module's own shape fields and
    preconditioner kind must be the manifest's, so a manifest given with another network is one
    line here, not a shape error (or an allocation of what it claims) later."""
    for key in MODULE_FIELDS:
        have = getattr(net, key, None)
        if have is not None and int(have) != manifest[key]:
            raise InputError(f"{source}: the manifest says {key} {manifest[key]}, but the network has {int(have)}; "
                             "the manifest belongs to another model")
    kind = PRECOND_KINDS.get(type(net).__name__)
    if kind is not None and manifest.get("precond") not in (None, kind):
        raise InputError(f"{source}: the manifest says {manifest['precond']} preconditioning, but the network is a "
                         f"{type(net).__name__}; the manifest belongs to another model")


class TorchDenoiser(DenoiserBackend):
    """A preconditioned EDM network (EDMPrecond & co.) evaluated by PyTorch."""

    name = "torch"

    def __init__(
        self,
        net: Any,
        manifest: dict,
        device: str = "auto",
        fp16: bool = False,
        bf16: bool = False,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        channels_last: bool = False,
        max_batch: Optional[int] = None,
        source: str = "model",
    ):
        torch = import_torch()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device={device!r} was requested but torch sees no CUDA GPU")
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise InputError(f"unknown device {device!r} for the torch backend; choose cpu, cuda or auto")
        if fp16 and bf16:
            raise InputError("fp16 and bf16 exclude each other; choose one")
        manifest = dict(manifest, precision="fp16" if fp16 else "bf16" if bf16 else manifest.get("precision", "fp32"))
        super().__init__(manifest, max_batch=max_batch, source=source)
        check_module_agrees(net, self.manifest, source)
        self.torch = torch
        self.device = device
        self.fp16 = bool(fp16)
        self.bf16 = bool(bf16)
        net = net.eval().requires_grad_(False).to(device)
        if hasattr(net, "use_fp16"):
            net.use_fp16 = self.fp16
        if self.fp16 and not device.startswith("cuda"):
            # On the CPU the preconditioners only run fp16 when explicitly forced (see training.precond).
            force = getattr(net, "set_export_fp16", None)
            if force is None:
                raise InputError("fp16 on the CPU is not supported by this network; drop fp16 or use CUDA")
            force(True)
            self._notes.append("fp16 on a CPU: torch runs fp16 convolutions fast only on CPUs with fp16 matrix "
                               "units and emulates them elsewhere, which was measured up to 1000x slower than fp32 "
                               "(fp16 here exists to reproduce a GPU's fp16 numerics); drop --fp16, or use --bf16 on "
                               "a CPU with AVX-512 BF16/AMX")
        if self.bf16:
            enable = getattr(net, "set_bf16_autocast", None)
            if enable is None:
                raise InputError("this network has no bf16 path; drop bf16")
            enable(True)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.net = net
        self.fn = torch.compile(net, mode=compile_mode) if compile else net
        self.compiled = bool(compile)

    @classmethod
    def from_module(cls, net: Any, device: str = "auto", **options: Any) -> TorchDenoiser:
        """Wrap a preconditioner module directly, deriving its manifest from its attributes.

        For in-process use (evaluation during training, tests); exported artifacts carry a full
        manifest instead. A discrete sigma table (iDDPM's buffer `u`) becomes the rounding rule.
        """
        return cls(net, describe_denoiser(net), device=device, source=type(net).__name__, **options)

    def describe(self) -> str:
        extras = [p for p, on in (("fp16", self.fp16), ("bf16", self.bf16), ("compile", self.compiled),
                                  ("channels_last", self.channels_last)) if on]
        return f"torch on {self.device}" + (f" ({', '.join(extras)})" if extras else "")

    def to_device(self, host_array: np.ndarray) -> Any:
        if self.device.startswith("cuda"):
            return self.torch.from_numpy(host_array).to(self.device)
        return host_array

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def _release(self) -> None:
        self.net = self.fn = None
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    def _run(self, x: Any, sigma: np.ndarray, class_labels: Optional[np.ndarray]) -> Any:
        torch = self.torch
        on_device = library_of(x) == "torch"
        with torch.inference_mode():
            xt = x.to(torch.float32) if on_device else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            xt = xt.to(self.device)
            if self.channels_last:
                xt = xt.contiguous(memory_format=torch.channels_last)
            st = torch.from_numpy(sigma.astype(np.float32)).to(self.device)
            lt = None if class_labels is None else torch.from_numpy(np.ascontiguousarray(class_labels)).to(self.device)
            out = self.fn(xt, st, lt)
        if on_device:
            return out.contiguous()
        return out.float().cpu().numpy()
