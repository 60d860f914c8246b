"""Training losses of the EDM paper: EDMLoss (config F) and the VP / VE baselines.

Each loss draws one noise level sigma per image from its training distribution p(sigma), noises the
(optionally augmented) images, runs the preconditioned denoiser and returns the **unreduced,
per-element** weighted squared error lambda(sigma) * (D(y + n; sigma) - y)^2, exactly as the
reference does; the training loop decides how to reduce it (sum, then divide by the batch size).

The constructor arguments and defaults are those of the reference classes, so a training config
names them the same way. For reproducible tests and debugging every ``__call__`` also accepts an
optional ``torch.Generator``; without one the global RNG is used, as in the reference.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from edm_deploy.runtime.core.errors import InputError

from .precond import vp_sigma

__all__ = ["EDMLoss", "VPLoss", "VELoss"]


def _lognormal_sigma(images: torch.Tensor, P_mean: float, P_std: float,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """One noise level per image with ln sigma ~ N(P_mean, P_std^2): EDM's training sigmas, ECT's t."""
    rnd_normal = _draw("randn", [images.shape[0], 1, 1, 1], images.device, generator)
    return (rnd_normal * P_std + P_mean).exp()


def _draw(kind: str, shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """float32 uniform ('rand') or normal ('randn') numbers on ``device``.

    With a generator the numbers are drawn on the generator's device and moved, so a CPU generator
    gives the same numbers whatever device the images live on.
    """
    fn = torch.rand if kind == "rand" else torch.randn
    if generator is None:
        return fn(list(shape), device=device)
    return fn(list(shape), generator=generator, device=generator.device).to(device)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"loss: images must be a [N, C, H, W] tensor, got {shape}")


def _denoising_loss(
    net: Callable,
    images: torch.Tensor,
    labels: Optional[torch.Tensor],
    augment_pipe: Optional[Callable],
    sigma: torch.Tensor,
    weight: torch.Tensor,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """weight * (D(y + sigma * eps; sigma, labels, augment_labels) - y)^2, per element."""
    if augment_pipe is None:
        y, augment_labels = images, None
    elif generator is None:
        y, augment_labels = augment_pipe(images)
    else:
        y, augment_labels = augment_pipe(images, generator=generator)
    n = _draw("randn", y.shape, y.device, generator).to(y.dtype) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


class VPLoss:
    """Variance-preserving baseline: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), lambda = 1/sigma^2.

    With VP's (and iDDPM's) c_out = -sigma the effective weight lambda * c_out^2 is 1: this is the
    epsilon-prediction MSE. The training presets also use it for iDDPM (see `presets.PRECONDS`).
    """

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(
        self,
        net: Callable,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        augment_pipe: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        _check_images(images)
        rnd_uniform = _draw("rand", [images.shape[0], 1, 1, 1], images.device, generator)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma**2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator)

    def sigma(self, t) -> torch.Tensor:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), the same function as `VPPrecond.sigma`."""
        return vp_sigma(t, self.beta_d, self.beta_min)


class VELoss:
    """Variance-exploding baseline: sigma log-uniform on [sigma_min, sigma_max], lambda = 1/sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        if not 0 < sigma_min < sigma_max:
            raise InputError(f"VELoss: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(
        self,
        net: Callable,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        augment_pipe: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        _check_images(images)
        rnd_uniform = _draw("rand", [images.shape[0], 1, 1, 1], images.device, generator)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma**2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator)


class EDMLoss:
    """EDM (config F): ln(sigma) ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    lambda = 1 / c_out^2 for EDM's c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), so the
    *effective* weight of the raw network F's error, lambda * c_out^2, is 1 at every noise level
    (paper section 5, eq. 8 with Table 1). The unit variance of F's inputs and training target
    comes from c_in, c_skip and c_out, not from lambda. The weight suits EDMPrecond only: with
    another c_out the effective weight is lambda * c_out^2 of that preconditioner.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if not (P_std > 0 and sigma_data > 0 and math.isfinite(P_mean)):
            raise InputError(f"EDMLoss: need finite P_mean, P_std > 0 and sigma_data > 0, got {P_mean}, {P_std}, {sigma_data}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(
        self,
        net: Callable,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        augment_pipe: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        _check_images(images)
        sigma = _lognormal_sigma(images, self.P_mean, self.P_std, generator)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator)
