"""The denoiser contract every backend, analytic oracle and composition satisfies.

A denoiser is a callable ``den(x, sigma, class_labels) -> denoised`` where ``x`` is [B, C, H, W],
``sigma`` is [B] and ``class_labels`` is [B, label_dim] one-hot (or None for unconditional
models). It returns D(x; sigma) with x's shape, in any float dtype (the samplers cast to
float64). Alongside it carries:

* ``sigma_min``, ``sigma_max``: the noise-level range it supports (samplers clamp to it);
* ``round_sigma(sigma)``: the levels it actually evaluates at (identity except for iDDPM);
* ``img_channels``, ``img_resolution``, ``label_dim``: its data shape and number of classes;
* ``max_batch``: the largest batch one call accepts, or None for no limit.

That minimal `Denoiser` protocol is all a sampler needs, so any user callable with those
attributes samples. Everything else a caller may use (where the sampler state should live,
notes for the user, a description, synchronisation for timing, freeing resources) is declared
on `DenoiserBase` with defaults; `as_denoiser` gives a plain callable that full interface, so
front ends never probe for attributes.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Protocol, runtime_checkable

from .errors import InputError

REQUIRED_ATTRIBUTES = ("sigma_min", "sigma_max", "round_sigma", "img_channels", "img_resolution", "label_dim")


@runtime_checkable
class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float
    img_channels: int
    img_resolution: int
    label_dim: int
    max_batch: Optional[int]

    def round_sigma(self, sigma: Any) -> Any: ...

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any: ...


class DenoiserBase:
    """The full interface of a denoiser, with the defaults of a host-side one.

    Subclasses set the contract attributes and implement ``__call__``. Resources (sessions,
    engines, device buffers) are freed by `close`, also on leaving a ``with`` block, so two
    models (a model and its guide) are as easy to hold as one.
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf
    img_channels: int
    img_resolution: int
    label_dim: int = 0
    max_batch: Optional[int] = None
    device: str = "cpu"
    # The label dropout the model was trained with, when known: classifier-free guidance needs
    # it > 0 (the unconditional branch is untrained otherwise); None = unknown.
    label_dropout: Optional[float] = None
    # True for a consistency-tuned model (its manifest's `consistency` record, e.g. ECT): one
    # evaluation maps a noisy image to a clean one, so it wants the consistency sampler and an
    # ODE solver gives poor images; False for a plain denoiser (and when unknown).
    consistency_tuned: bool = False

    @property
    def warnings(self) -> list[str]:
        """Notes the user should see (a provider fallback, a hardware-compatible engine)."""
        return []

    def round_sigma(self, sigma: Any) -> Any:
        import numpy as np

        return np.asarray(sigma, dtype=np.float64)

    def to_device(self, host_array: Any) -> Any:
        """The sampler state's home for this denoiser: the host array itself by default."""
        return host_array

    def synchronize(self) -> None:
        """Wait for queued device work (only timing needs it); a no-op on the host."""

    def describe(self) -> str:
        """One line for progress output: what runs, and where."""
        return f"{type(self).__name__} on {self.device}"

    def numerics(self) -> str:
        """What decides the bits this denoiser computes (implementation, precision, kind of device):
        a resumed run must use the same, or its images would not match the earlier ones."""
        return f"{type(self).__name__} {self.device.split(':')[0]}"

    def close(self) -> None:
        """Free sessions, contexts and device memory; the denoiser cannot be called afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class DelegatingDenoiser(DenoiserBase):
    """A denoiser wrapping another (`den`): its contract attributes and its whole interface are
    the wrapped one's unless a subclass says otherwise. Compositions (timing, a fixed batch shape,
    guidance) subclass it and override only what they change."""

    CONTRACT = ("sigma_min", "sigma_max", "img_channels", "img_resolution", "label_dim", "max_batch", "device",
                "label_dropout", "consistency_tuned")

    def __init__(self, den: Any):
        self.den = as_denoiser(den)
        for name in self.CONTRACT:
            setattr(self, name, getattr(self.den, name))

    @property
    def warnings(self) -> list[str]:
        return self.den.warnings

    def round_sigma(self, sigma: Any) -> Any:
        return self.den.round_sigma(sigma)

    def to_device(self, host_array: Any) -> Any:
        return self.den.to_device(host_array)

    def synchronize(self) -> None:
        self.den.synchronize()

    def describe(self) -> str:
        return self.den.describe()

    def numerics(self) -> str:
        return self.den.numerics()

    def close(self) -> None:
        self.den.close()

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        return self.den(x, sigma, class_labels)


class _Adapted(DenoiserBase):
    """A plain contract callable seen through the full interface (defaults for the rest)."""

    def __init__(self, net: Any):
        self.net = net
        for name in ("sigma_min", "sigma_max", "img_channels", "img_resolution", "label_dim"):
            setattr(self, name, getattr(net, name))
        self.max_batch = getattr(net, "max_batch", None)
        self.label_dropout = getattr(net, "label_dropout", None)
        self.consistency_tuned = bool(getattr(net, "consistency_tuned", False))

    def round_sigma(self, sigma: Any) -> Any:
        return self.net.round_sigma(sigma)

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        return self.net(x, sigma, class_labels)

    def describe(self) -> str:
        return type(self.net).__name__


def as_denoiser(net: Any) -> DenoiserBase:
    """`net` with the full interface: itself when it has it, else a thin adapter."""
    check_denoiser(net)
    return net if isinstance(net, DenoiserBase) else _Adapted(net)


def check_denoiser(net: Any) -> None:
    """Fail early, naming what is missing, if `net` does not follow the contract."""
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(net, a)]
    if missing or not callable(net):
        what = ", ".join(missing) if missing else "__call__"
        raise InputError(f"{type(net).__name__} is not a denoiser: it lacks {what}")


def check_batch(net: Any, latents: Any, class_labels: Any) -> None:
    """Latents must be [B, C, R, R] for the network; labels [B, label_dim] only if conditional."""
    shape = tuple(latents.shape)
    expected = (net.img_channels, net.img_resolution, net.img_resolution)
    if len(shape) != 4 or shape[1:] != expected:
        raise InputError(
            f"latents must have shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] for this model, got {list(shape)}"
        )
    if class_labels is None:
        return
    if net.label_dim == 0:
        raise InputError("this model is unconditional; class labels cannot be given")
    lshape = tuple(class_labels.shape)
    if lshape != (shape[0], net.label_dim):
        raise InputError(f"class_labels must have shape [{shape[0]}, {net.label_dim}], got {list(lshape)}")
