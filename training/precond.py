"""Preconditioners: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for EDM, VP, VE and iDDPM.

Each class wraps an inner network (``SongUNet`` or ``DhariwalUNet``, held as ``self.model`` so the
state-dict names start with ``model.``) and has exactly the constructor signature and defaults of
the reference implementation; a checkpoint's ``init_kwargs`` are passed straight through.

Deviations from the reference, all made for deployment and none changing results:

* ``sigma`` may be a Python number, a 0-d tensor, a per-sample ``[B]`` tensor or ``[B,1,1,1]``; it is
  reshaped to ``(-1, 1, 1, 1)`` so a scalar broadcasts and a vector is applied per sample (the ONNX
  contract is ``sigma [B]``).
* **Forcing the fp16 compute path on any device.** The reference uses fp16 only when ``use_fp16``
  is set and the input lives on CUDA, which makes an fp16 graph impossible to trace on a CPU-only
  export machine. Every preconditioner has the attribute ``fp16_everywhere`` (default False, not a
  constructor argument, so checkpoints are unaffected) and the method ``set_export_fp16(enabled)``.
  The compute dtype is fp16 iff ``use_fp16 and not force_fp32 and (x.is_cuda or fp16_everywhere)``
  (see ``compute_dtype``). To export an fp16 graph of a network trained with ``use_fp16=False``,
  set ``net.use_fp16 = True`` as well. In the fp16 path the embedding MLP (c_noise and labels are
  fp32), GroupNorm statistics, attention logits/softmax and the final c_skip mix stay in fp32.
* Export tip: trace a thin wrapper with an explicit ``forward(x, sigma[, class_labels])``. Given
  the preconditioner itself, the TorchScript exporter fills in unspecified defaults such as
  ``force_fp32`` as traced tensors (harmless - they are constants - but it warns).
* iDDPM's ``round_sigma`` snaps with ``argmin |sigma - u|`` in float32 rather than ``torch.cdist``
  (which may switch to a less accurate matrix-product formula for long tables), so the forward pass
  traces to ONNX (Abs, ArgMin, Gather) and matches the NumPy runtime's rounding rule exactly.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from edm_deploy.runtime.core.errors import InputError

from . import networks
from .presets import ARCHITECTURE_NAMES

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "ARCHITECTURES", "vp_sigma"]

ARCHITECTURES = {name: getattr(networks, name) for name in ARCHITECTURE_NAMES}

SigmaLike = Union[float, torch.Tensor]


def vp_sigma(t: SigmaLike, beta_d: float, beta_min: float) -> torch.Tensor:
    """The VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), as a tensor.

    One formula for `VPPrecond.sigma` and `loss.VPLoss.sigma` (the VP loss draws t and needs sigma).
    """
    t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    return ((0.5 * beta_d * (t**2) + beta_min * t).exp() - 1).sqrt()


def _architecture(model_type: str):
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise InputError(
            f"unknown model_type {model_type!r} (known: {', '.join(ARCHITECTURES)})"
        ) from None


class _Precond(torch.nn.Module):
    """Shared plumbing: attributes, input normalisation and the compute-dtype rule."""

    def _setup(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        if img_channels < 1:
            raise InputError(f"img_channels must be >= 1, got {img_channels}")
        if label_dim < 0:
            raise InputError(f"label_dim must be >= 0, got {label_dim}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.fp16_everywhere = False
        self.bf16_autocast = False

    def set_export_fp16(self, enabled: bool = True) -> _Precond:
        """Run the fp16 compute path (when ``use_fp16``) on every device, CPU included.

        For exporters that trace fp16 graphs on a machine without a GPU. Returns ``self``.
        """
        self.fp16_everywhere = bool(enabled)
        return self

    def set_bf16_autocast(self, enabled: bool = True) -> _Precond:
        """Run the inner network under bfloat16 autocast (oneDNN's BF16/AMX kernels on a CPU that
        has them, bf16 tensor cores on CUDA). The preconditioning around it (c_in, c_skip, c_out,
        c_noise and the skip mix) stays fp32, the rule every reduced-precision path here follows.
        Returns ``self``."""
        self.bf16_autocast = bool(enabled)
        return self

    def compute_dtype(self, x: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
        """The dtype the inner network runs in for input ``x``."""
        if self.use_fp16 and not force_fp32 and (x.device.type == "cuda" or getattr(self, "fp16_everywhere", False)):
            return torch.float16
        return torch.float32

    def _inputs(self, x: torch.Tensor, sigma: SigmaLike, class_labels: Optional[torch.Tensor]):
        x = x.to(torch.float32)
        if not isinstance(sigma, torch.Tensor):  # as_tensor on a tensor would be a trace constant
            sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def _run_model(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels, dtype, model_kwargs) -> torch.Tensor:
        if getattr(self, "bf16_autocast", False) and dtype == torch.float32:
            with torch.autocast(device_type=x_in.device.type, dtype=torch.bfloat16):
                out = self.model(x_in, c_noise.flatten(), class_labels=class_labels, **model_kwargs)
            return out.to(torch.float32)
        out = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if out.dtype != dtype:
            raise RuntimeError(f"inner network returned {out.dtype}, expected {dtype}")
        return out.to(torch.float32)

    def round_sigma(self, sigma: SigmaLike, return_index: bool = False) -> torch.Tensor:
        """Continuous-time networks accept any sigma: identity (as a tensor).

        ``return_index`` exists for interface uniformity; only iDDPM has a table to index.
        """
        if return_index:
            raise InputError(f"{type(self).__name__} has no discrete sigma table; return_index=True is iDDPM-only")
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving formulation of Song et al. (2021) (DDPM++ baseline)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        model_type: str = "SongUNet",
        **model_kwargs,
    ):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        with torch.device("cpu"):  # float32 scalars, even when built under a meta device context
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))
        self.model = _architecture(model_type)(
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
            label_dim=label_dim, **model_kwargs,
        )

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x, sigma, class_labels = self._inputs(x, sigma, class_labels)
        dtype = self.compute_dtype(x, force_fp32)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self._run_model(c_in * x, c_noise, class_labels, dtype, model_kwargs)
        return x + c_out * F_x

    def sigma(self, t: SigmaLike) -> torch.Tensor:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (see `vp_sigma`)."""
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma: SigmaLike) -> torch.Tensor:
        """t(sigma), the inverse of ``sigma``."""
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding formulation of Song et al. (2021) (NCSN++ baseline)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        model_type: str = "SongUNet",
        **model_kwargs,
    ):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _architecture(model_type)(
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
            label_dim=label_dim, **model_kwargs,
        )

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x, sigma, class_labels = self._inputs(x, sigma, class_labels)
        dtype = self.compute_dtype(x, force_fp32)
        c_noise = (0.5 * sigma).log()
        F_x = self._run_model(x, c_noise, class_labels, dtype, model_kwargs)
        return x + sigma * F_x


class iDDPMPrecond(_Precond):
    """Improved DDPM (Nichol & Dhariwal 2021): discrete cosine schedule, 2*C output channels."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        C_1: float = 0.001,
        C_2: float = 0.008,
        M: int = 1000,
        model_type: str = "DhariwalUNet",
        **model_kwargs,
    ):
        super().__init__()
        if M < 2:
            raise InputError(f"iDDPMPrecond: M must be >= 2, got {M}")
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # The inner net also predicts variances (the second img_channels outputs); they go unused.
        self.model = _architecture(model_type)(
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels * 2,
            label_dim=label_dim, **model_kwargs,
        )
        u = self._u_table(M, C_1)
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j: SigmaLike) -> torch.Tensor:
        """Cosine schedule alpha_bar(j) = sin^2(pi/2 * j / M / (C_2 + 1)), in float32."""
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def _u_table(self, M: int, C_1: float) -> torch.Tensor:
        """u[M] = 0; u[j-1] = sqrt((u[j]^2 + 1) / max(alpha_bar(j-1)/alpha_bar(j), C_1) - 1), float32.

        Built on the CPU in float32 regardless of the default device so the values match the
        reference bit for bit (they are also stored in the state dict).
        """
        with torch.device("cpu"):
            u = torch.zeros(M + 1, dtype=torch.float32)
            for j in range(M, 0, -1):
                ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
                u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        return u

    def round_sigma(self, sigma: SigmaLike, return_index: bool = False) -> torch.Tensor:
        """Snap sigma onto the nearest entry of ``u`` (|difference| in float32, first index on ties).

        Returns the snapped values in sigma's dtype and device, or with ``return_index=True`` the
        int64 indices j (the network is then fed c_noise = M - 1 - j). The shape is sigma's shape.
        """
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma)
        table = self.u.to(torch.float32)
        s = sigma.to(device=table.device, dtype=torch.float32).reshape(-1, 1)
        index = (s - table.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else table[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x, sigma, class_labels = self._inputs(x, sigma, class_labels)
        dtype = self.compute_dtype(x, force_fp32)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self._run_model(c_in * x, c_noise, class_labels, dtype, model_kwargs)
        return x + c_out * F_x[:, : self.img_channels]


class EDMPrecond(_Precond):
    """The EDM preconditioning (Karras et al. 2022, Table 1)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        **model_kwargs,
    ):
        super().__init__()
        if not sigma_data > 0:
            raise InputError(f"EDMPrecond: sigma_data must be > 0, got {sigma_data}")
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _architecture(model_type)(
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
            label_dim=label_dim, **model_kwargs,
        )

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x, sigma, class_labels = self._inputs(x, sigma, class_labels)
        dtype = self.compute_dtype(x, force_fp32)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self._run_model(c_in * x, c_noise, class_labels, dtype, model_kwargs)
        return c_skip * x + c_out * F_x
