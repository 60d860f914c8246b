"""The denoiser contract every backend and every analytic oracle satisfies.

A denoiser is a callable ``den(x, sigma, class_labels) -> denoised`` where ``x`` is [B, C, H, W],
``sigma`` is [B] and ``class_labels`` is [B, label_dim] one-hot (or None for unconditional
models). It returns D(x; sigma) with x's shape, in any float dtype (the samplers cast to
float64). Alongside it carries:

* ``sigma_min``, ``sigma_max``: the noise-level range it supports (samplers clamp to it);
* ``round_sigma(sigma)``: the levels it actually evaluates at (identity except for iDDPM);
* ``img_channels``, ``img_resolution``, ``label_dim``: its data shape and number of classes;
* ``max_batch``: the largest batch one call accepts, or None for no limit.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from edm_deploy.runtime.errors import InputError

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
