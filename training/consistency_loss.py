"""The Easy Consistency Tuning objective (Geng et al. 2024, "Consistency Models Made Easy").

ECT turns a pretrained EDM denoiser D into a consistency model f(x_t, t) ~ x_0 by asking that
the network agrees with itself at two noise levels of one trajectory, t and r < t, the r-side
acting as the (gradient-free) target. The facts below are those of the public code
(locuslab/ect, branch main, `training/loss.py::ECMLoss` and `training/ct_training_loop.py`):

* t ~ log-normal: ln t ~ N(P_mean, P_std^2), ECT's defaults P_mean = -1.1, P_std = 2.0 (EDM's
  training uses -1.2, 1.2; ECT widens it towards high noise, where a one-step model starts).
* r = t (1 - q^-(stage+1) adj(t)), adj(t) = 1 + k sigmoid(-b t), clamped at r >= 0 (`ect_r`);
  k = 8, b = 1 ("sigmoid" mapping). The gap t - r shrinks by q at every stage: stage 0 asks
  D(x_t) = D(x_r) over a wide gap (close to the teacher's own denoising task), later stages
  approach the consistency condition dt -> 0.
* x_t = y + t eps and x_r = y + r eps share one noise draw eps: both lie on the same trajectory
  to first order, so the target is the same image seen at a lower noise level.
* The r-side runs without gradient and under the same dropout mask as the t-side: the RNG
  state the t-side forward started from is restored before the r-side forward (ECT restores the
  CUDA generator's state; `_DropoutStream` restores the generator of the device the images live
  on, CPU included). D(x_r, r) is replaced by y wherever r = 0 (the boundary condition
  D(x, 0) = x) and passed through `nan_to_num` as in the reference.
* The per-image metric is d = ||D(x_t, t) - D(x_r, r)||_2 (the sqrt of the summed squares, c =
  0, ECT's default) or the pseudo-Huber sqrt(d^2 + c^2) - c for c > 0, weighted by 1 / (t - r).

Where this deviates from the reference, and why:

* The stage is ``floor(cur_nimg / (stage_kimg * 1000))``: a pure function of the images seen,
  so a resumed run continues on the same schedule bit for bit. ECT counts ticks (``--double``
  ticks of ``kimg_per_tick``, its first tick a single step, updated one tick late), which is the
  same schedule up to that first tick.
* Rows with r = 0 are evaluated at sigma = t instead of sigma = 0 on the r-side (the reference
  evaluates log(0) there and masks the NaN away): the masked rows never reach the loss, so the
  loss is the same, without infinities inside the network.
* The network keeps EDM's preconditioning (`EDMPrecond`) at evaluation too. ECT's `ECMPrecond`
  equals it in training mode; in eval mode it shifts c_skip and c_out by its sigma_min so that
  D(x, sigma_min) = x exactly. The consistency sampler never evaluates at sigma_min (it starts at
  sigma_max and re-noises to a mid point), and keeping EDMPrecond keeps every artifact format,
  the export and the verification gate as they are.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from edm_deploy.runtime.core.errors import InputError, check_number

from .loss import _check_images, _draw, _lognormal_sigma

__all__ = ["ECTLoss", "ect_gap", "ect_stage", "ect_r"]


def ect_stage(cur_nimg: int, stage_kimg: float) -> int:
    """The ECT stage after `cur_nimg` training images: it grows by one every `stage_kimg` kimg."""
    return int(cur_nimg // max(stage_kimg * 1000, 1e-8))


# The gap t - r is t (1 + k sigmoid(-b t)) / q^(stage+1); past this shrink factor it is a few float32
# ulps of t, so x_r rounds to x_t and the 1 / (t - r) weight is noise (ECT's CIFAR-10 run ends at 2^8).
MAX_GAP_SHRINK = 1e5


def stages_fit(q: float, stage: int) -> bool:
    """Whether q^(stage+1) stays within MAX_GAP_SHRINK (computed in logs: no overflow)."""
    return (stage + 1) * math.log(q) <= math.log(MAX_GAP_SHRINK)


def _shrink(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """q^-(stage+1) (1 + k sigmoid(-b t)): the fraction of t that separates r from it."""
    return (1 + k * torch.sigmoid(-b * t)) / q ** (stage + 1)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """r(t) = max(t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), 0): the lower noise level paired with t."""
    return torch.clamp(t * (1 - _shrink(t, stage, q, k, b)), min=0)


def ect_gap(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """t - r(t), computed directly (no cancellation when r is close to t); t where r is clamped at 0."""
    return torch.minimum(t * _shrink(t, stage, q, k, b), t)


class _DropoutStream:
    """The state of the generator that dropout draws from on `device`, to replay a forward's masks."""

    def __init__(self, device: torch.device):
        self.device = device

    def get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)


class ECTLoss:
    """ECT's loss (`ECMLoss` of locuslab/ect): one value per image, d(D(x_t, t), sg D(x_r, r)) / (t - r).

    `images_seen` tells the loss how many training images the run has consumed (the training
    loop passes its counter); the stage, and so r(t), follows from it (`ect_stage`). The return
    value has shape [N] (the reference's per-image loss); the training loop sums it and divides
    by the batch, i.e. takes the mean over images, as ECT does.
    """

    def __init__(
        self,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        c: float = 0.0,
        stage_kimg: float = 3200,
        images_seen: Optional[Callable[[], int]] = None,
    ):
        P_mean, P_std, q, k, b, c, stage_kimg = (check_number(v, f"ECTLoss: {name}") for v, name in (
            (P_mean, "P_mean"), (P_std, "P_std"), (q, "q"), (k, "k"), (b, "b"), (c, "c"), (stage_kimg, "stage_kimg")))
        if not (P_std > 0 and q > 1 and k >= 0 and b >= 0 and c >= 0 and stage_kimg > 0):
            raise InputError(
                f"ECTLoss: need finite P_mean, P_std > 0, q > 1, k >= 0, b >= 0, c >= 0 and stage_kimg > 0, got "
                f"P_mean {P_mean}, P_std {P_std}, q {q}, k {k}, b {b}, c {c}, stage_kimg {stage_kimg}")
        self.P_mean, self.P_std = P_mean, P_std
        self.q, self.k, self.b, self.c = q, k, b, c
        self.stage_kimg = stage_kimg
        self.images_seen = images_seen or (lambda: 0)

    @property
    def stage(self) -> int:
        return ect_stage(self.images_seen(), self.stage_kimg)

    def __call__(
        self,
        net: Callable,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        augment_pipe: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        _check_images(images)
        stage = self.stage
        if not stages_fit(self.q, stage):
            raise InputError(f"ECT stage {stage}: the gap t - r has shrunk by q^{stage + 1}, beyond float32's "
                             f"resolution (at most {MAX_GAP_SHRINK:g}); tune for fewer kimg or raise stage_kimg")
        t = _lognormal_sigma(images, self.P_mean, self.P_std, generator)
        r = ect_r(t, stage, self.q, self.k, self.b)
        if augment_pipe is None:
            y, augment_labels = images, None
        elif generator is None:
            y, augment_labels = augment_pipe(images)
        else:
            y, augment_labels = augment_pipe(images, generator=generator)
        eps = _draw("randn", y.shape, y.device, generator).to(y.dtype)  # one draw for both sides

        dropout = _DropoutStream(y.device)
        state = dropout.get()
        D_t = net(y + eps * t, t, labels, augment_labels=augment_labels)
        positive = r > 0
        if bool(positive.any()):
            after = dropout.get()
            dropout.set(state)  # the same dropout masks as the t-side forward
            with torch.no_grad():
                r_eval = torch.where(positive, r, t)  # r = 0 rows are replaced by y below
                D_r = torch.nan_to_num(net(y + eps * r_eval, r_eval, labels, augment_labels=augment_labels))
            dropout.set(after)
            D_r = torch.where(positive, D_r, y)
        else:
            D_r = y
        squared = ((D_t - D_r) ** 2).reshape(len(y), -1).sum(dim=1)
        distance = torch.sqrt(squared + self.c**2) - self.c if self.c > 0 else torch.sqrt(squared)
        return distance / ect_gap(t, stage, self.q, self.k, self.b).flatten()
