"""Non-leaky geometric (and optional colour) augmentation, as used by EDM training.

EDM borrows ADA's augmentation pipe but makes it *non-leaking* in a different way from ADA: every
augmented training image comes with a vector of *augmentation labels* describing what was done to
it, the network is conditioned on that vector (``augment_labels``, fed through a bias-free
``map_augment`` layer), and at sampling time the vector is zero ("no augmentation"). The network
therefore learns the augmented distributions as separate, labelled tasks and never generates
augmented-looking images. With the train.py config (``xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1``) the label vector has 9 entries:

====  ================================================================================
 idx  meaning
====  ================================================================================
  0   x-flip applied (0/1). Eligible with prob min(1, 1e8*p), i.e. always for p > 0, then 50 %.
  1   y-flip applied (0/1). Eligible with prob p, then 50 %.
  2   isotropic scale: w ~ N(0,1), the image is scaled by 2^(scale_std*w). 0 when not applied.
 3,4  rotation by theta ~ U(-pi, pi)*rotate_frac_max: (cos theta - 1, sin theta).
 5,6  anisotropic scale: (w cos r, w sin r), w ~ N(0,1), stretch 2^(aniso_std*w) along the
      direction r; r ~ U(-pi, pi) with prob aniso_rotate_prob, else r = 0.
 7,8  fractional translation: (w_x, w_y) ~ N(0,1); the shift is w * translate_frac_std * size.
====  ================================================================================

In general each enabled operation (multiplier > 0) contributes its columns in the order of the
constructor arguments: xflip 1, yflip 1, rotate_int 2 (cos-1, sin of k*90 deg), translate_int 2
(shift / size), scale 1, rotate_frac 2, aniso 2, translate_frac 2, brightness 1, contrast 1,
lumaflip 1, hue 2 (cos-1, sin), saturation 1 (the N(0,1) draws, or 0/1 for lumaflip). Only the
train.py layout above is promised to match the reference implementation. Every operation is
applied to an image independently with probability p (times its multiplier, capped at 1).

How the geometry is applied, and why:

* Flips, quarter turns and integer translations are exact pixel operations (reflect padding).
* The continuous transforms (scale, rotation, anisotropy, fractional translation) are composed
  into one 3x3 inverse matrix per image and applied in a single resampling step, so the image is
  interpolated once whatever the number of operations. The image is reflect-padded (as far as the
  transform needs), upsampled 2x with the orthonormal Symlet-6 wavelet low-pass, sampled
  bilinearly at the transformed positions of a 2x output grid (``grid_sample``), and downsampled
  2x with the time-reversed filter. Upsampling with h and downsampling with reversed h is a
  perfect-reconstruction pair, so an image whose transform is the identity comes back unchanged
  (to float rounding) and the band-limited interpolation keeps the aliasing ADA was designed to
  avoid out of the augmented images.
* Randomness comes from a `torch.Generator` when one is passed, else from torch's global CPU
  generator (which the training loop seeds and checkpoints). Random numbers are always drawn for
  every enabled operation, whatever p, so the stream does not depend on p or on the data.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from edm_deploy.runtime.core.errors import InputError

# Symlet-6 decomposition low-pass filter (orthonormal: sum = sqrt(2), sum of squares = 1,
# orthogonal to its even shifts). Mathematical constants, as tabulated by e.g. PyWavelets.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
_TAPS = len(SYM6)          # 12
_OFFSET = _TAPS // 2 - 1   # 5: aligns the filter's phase centre (~5.5) with the pixel grid
_MARGIN = 7                # padding (input pixels) beyond the transformed extent for the filters
# The filter's DC group delay (its centroid, ~5.098 taps) is not the integer offset + 0.5; the
# remaining fraction places upsampled sample m at input position (m + 0.5 + _DELAY) / 2. Using the
# same placement for the sampling grid keeps identity exact and makes flips and rotations act
# about the true image centre (otherwise they would be off by ~0.2 px).
_DELAY = _OFFSET + 0.5 - sum(k * v for k, v in enumerate(SYM6)) / sum(SYM6)

# The train.py configuration (besides p).
TRAIN_PY_CONFIG = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

_LABEL_COLUMNS = (
    ("xflip", 1), ("yflip", 1), ("rotate_int", 2), ("translate_int", 2), ("scale", 1),
    ("rotate_frac", 2), ("aniso", 2), ("translate_frac", 2), ("brightness", 1), ("contrast", 1),
    ("lumaflip", 1), ("hue", 2), ("saturation", 1),
)


class AugmentPipe:
    """Augment a float image batch [N,C,H,W]; returns (images, augment_labels [N, label_dim])."""

    def __init__(
        self,
        p: float = 1,
        xflip: float = 0,
        yflip: float = 0,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale: float = 0,
        rotate_frac: float = 0,
        aniso: float = 0,
        translate_frac: float = 0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
        brightness: float = 0,
        contrast: float = 0,
        lumaflip: float = 0,
        hue: float = 0,
        saturation: float = 0,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        hue_max: float = 1,
        saturation_std: float = 1,
    ) -> None:
        self.init_kwargs = dict(
            p=p, xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
            translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std,
            brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation,
            brightness_std=brightness_std, contrast_std=contrast_std, hue_max=hue_max,
            saturation_std=saturation_std,
        )
        for key, value in self.init_kwargs.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if not math.isfinite(number) or number < 0:
                raise InputError(f"AugmentPipe: {key} must be a finite number >= 0, got {value!r}")
            setattr(self, key, number)

    @property
    def label_dim(self) -> int:
        """Length of the augment_labels vector (9 for the train.py configuration)."""
        return sum(n for name, n in _LABEL_COLUMNS if getattr(self, name) > 0)

    def __repr__(self) -> str:
        active = {k: v for k, v in self.init_kwargs.items() if k == "p" or (k in dict(_LABEL_COLUMNS) and v > 0)}
        return f"AugmentPipe({', '.join(f'{k}={v:g}' for k, v in active.items())})"

    # ------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None):
        if images.ndim != 4:
            raise InputError(f"AugmentPipe expects [N,C,H,W] images, got shape {list(images.shape)}")
        n, c, h, w = images.shape
        dev = images.device
        images = images.clone()
        labels: list[torch.Tensor] = []

        def rand(*shape):
            return torch.rand(shape, generator=generator, dtype=torch.float64)

        def randn(*shape):
            return torch.randn(shape, generator=generator, dtype=torch.float64)

        def gate(mult: float) -> torch.Tensor:
            return rand(n) < mult * self.p

        def to_dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=dev)

        # -- exact pixel operations ------------------------------------------------------------
        if self.xflip > 0:
            i = torch.where(gate(self.xflip), torch.floor(rand(n) * 2), torch.zeros(n, dtype=torch.float64))
            images = torch.where(to_dev(i > 0).view(n, 1, 1, 1), images.flip(3), images)
            labels.append(i[:, None])
        if self.yflip > 0:
            i = torch.where(gate(self.yflip), torch.floor(rand(n) * 2), torch.zeros(n, dtype=torch.float64))
            images = torch.where(to_dev(i > 0).view(n, 1, 1, 1), images.flip(2), images)
            labels.append(i[:, None])
        if self.rotate_int > 0:
            k = torch.where(gate(self.rotate_int), torch.floor(rand(n) * 4), torch.zeros(n, dtype=torch.float64))
            if h == w:
                for turns in (1, 2, 3):
                    sel = to_dev(k == turns).view(n, 1, 1, 1)
                    images = torch.where(sel, torch.rot90(images, turns, dims=(2, 3)), images)
            else:  # only half turns keep a non-square shape
                k = torch.where(k % 2 == 1, torch.zeros_like(k), k)
                images = torch.where(to_dev(k == 2).view(n, 1, 1, 1), images.flip(2).flip(3), images)
            labels.append(torch.stack([torch.cos(k * math.pi / 2) - 1, torch.sin(k * math.pi / 2)], 1).round())
        if self.translate_int > 0:
            t = (rand(n, 2) * 2 - 1) * self.translate_int_max
            t = torch.where(gate(self.translate_int)[:, None], t, torch.zeros_like(t))
            shift = torch.round(t * torch.tensor([w, h], dtype=torch.float64)).long()
            images = _shift_reflect(images, to_dev(shift[:, 0]), to_dev(shift[:, 1]))
            labels.append(shift.double() / torch.tensor([w, h], dtype=torch.float64))

        # -- continuous transforms: one inverse matrix per image ---------------------------------
        g_inv = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        if self.scale > 0:
            wv = torch.where(gate(self.scale), randn(n), torch.zeros(n, dtype=torch.float64))
            s = torch.exp2(wv * self.scale_std)
            g_inv = g_inv @ _scale2d(1 / s, 1 / s)
            labels.append(wv[:, None])
        if self.rotate_frac > 0:
            theta = (rand(n) * 2 - 1) * math.pi * self.rotate_frac_max
            theta = torch.where(gate(self.rotate_frac), theta, torch.zeros_like(theta))
            g_inv = g_inv @ _rotate2d(theta)  # the reference's rotate2d_inv(-theta): content turns by -theta
            labels.append(torch.stack([torch.cos(theta) - 1, torch.sin(theta)], 1))
        if self.aniso > 0:
            wv = randn(n)
            r = (rand(n) * 2 - 1) * math.pi
            r = torch.where(rand(n) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            on = gate(self.aniso)
            wv = torch.where(on, wv, torch.zeros_like(wv))
            r = torch.where(on, r, torch.zeros_like(r))
            s = torch.exp2(wv * self.aniso_std)
            g_inv = g_inv @ _rotate2d(-r) @ _scale2d(1 / s, s) @ _rotate2d(r)  # reference order and signs
            labels.append(torch.stack([wv * torch.cos(r), wv * torch.sin(r)], 1))
        if self.translate_frac > 0:
            wv = randn(n, 2)
            wv = torch.where(gate(self.translate_frac)[:, None], wv, torch.zeros_like(wv))
            shift = wv * self.translate_frac_std * torch.tensor([w, h], dtype=torch.float64)
            g_inv = g_inv @ _translate2d(-shift[:, 0], -shift[:, 1])
            labels.append(wv)
        moved = (g_inv - torch.eye(3, dtype=torch.float64)).abs().flatten(1).amax(1) > 0
        if bool(moved.any()):
            idx = to_dev(torch.nonzero(moved).flatten())
            warped = _resample(images.index_select(0, idx), g_inv[moved].to(dev))
            images = images.index_copy(0, idx, warped.to(images.dtype))

        # -- colour: one 4x4 matrix per image, applied after the geometry -----------------------
        color = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(3)
        any_color = False
        if self.brightness > 0:
            wv = torch.where(gate(self.brightness), randn(n), torch.zeros(n, dtype=torch.float64))
            b = wv * self.brightness_std
            color = _translate3d(b, b, b) @ color
            labels.append(wv[:, None])
            any_color = True
        if self.contrast > 0:
            wv = torch.where(gate(self.contrast), randn(n), torch.zeros(n, dtype=torch.float64))
            cst = torch.exp2(wv * self.contrast_std)
            color = _scale3d(cst, cst, cst) @ color
            labels.append(wv[:, None])
            any_color = True
        if self.lumaflip > 0:
            i = torch.where(gate(self.lumaflip), torch.floor(rand(n) * 2), torch.zeros(n, dtype=torch.float64))
            householder = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(luma, luma)
            color = torch.where((i > 0).view(n, 1, 1), householder, torch.eye(4, dtype=torch.float64)) @ color
            labels.append(i[:, None])
            any_color = True
        if self.hue > 0:
            theta = (rand(n) * 2 - 1) * math.pi * self.hue_max
            theta = torch.where(gate(self.hue), theta, torch.zeros_like(theta))
            color = _rotate3d(luma[:3], theta) @ color
            labels.append(torch.stack([torch.cos(theta) - 1, torch.sin(theta)], 1))
            any_color = True
        if self.saturation > 0:
            wv = torch.where(gate(self.saturation), randn(n), torch.zeros(n, dtype=torch.float64))
            sat = torch.exp2(wv * self.saturation_std).view(n, 1, 1)
            proj = torch.outer(luma, luma)
            color = (proj + (torch.eye(4, dtype=torch.float64) - proj) * sat) @ color
            labels.append(wv[:, None])
            any_color = True
        if any_color:
            images = _apply_color(images, color.to(dev))

        if labels:
            out_labels = torch.cat(labels, dim=1).to(device=dev, dtype=torch.float32)
        else:
            out_labels = torch.zeros([n, 0], device=dev, dtype=torch.float32)
        return images, out_labels


# ----------------------------------------------------------------------------------------------
# Matrices (float64, batched over images).


def _eye(n: int, size: int) -> torch.Tensor:
    return torch.eye(size, dtype=torch.float64).repeat(n, 1, 1)


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(len(sx), 3)
    m[:, 0, 0] = sx
    m[:, 1, 1] = sy
    return m


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    m = _eye(len(theta), 3)
    m[:, 0, 0] = torch.cos(theta)
    m[:, 0, 1] = -torch.sin(theta)
    m[:, 1, 0] = torch.sin(theta)
    m[:, 1, 1] = torch.cos(theta)
    return m


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _eye(len(tx), 3)
    m[:, 0, 2] = tx
    m[:, 1, 2] = ty
    return m


def _translate3d(tx, ty, tz) -> torch.Tensor:
    m = _eye(len(tx), 4)
    m[:, 0, 3], m[:, 1, 3], m[:, 2, 3] = tx, ty, tz
    return m


def _scale3d(sx, sy, sz) -> torch.Tensor:
    m = _eye(len(sx), 4)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, sz
    return m


def _rotate3d(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation about a unit axis (the luma axis for hue rotation)."""
    x, y, z = (float(a) for a in axis)
    k = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=torch.float64)
    s, c = torch.sin(theta).view(-1, 1, 1), torch.cos(theta).view(-1, 1, 1)
    r = torch.eye(3, dtype=torch.float64) + s * k + (1 - c) * (k @ k)
    m = _eye(len(theta), 4)
    m[:, :3, :3] = r
    return m


def _apply_color(images: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    n, c, h, w = images.shape
    color = color.to(images.dtype)
    flat = images.reshape(n, c, h * w)
    if c == 3:
        out = color[:, :3, :3] @ flat + color[:, :3, 3:]
    elif c == 1:  # greyscale: the luma response of the colour transform
        m = color[:, :3, :].mean(dim=1, keepdim=True)
        out = flat * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
    else:
        raise InputError(f"AugmentPipe: colour augmentation needs 1 or 3 channels, got {c}")
    return out.reshape(n, c, h, w)


# ----------------------------------------------------------------------------------------------
# Pixel operations and the band-limited resampler.


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map any integer index into [0, size) by mirror reflection without edge repeat (any distance)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    j = torch.remainder(index, period)
    return torch.where(j >= size, period - j, j)


def _shift_reflect(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Translate each image by whole pixels (content moves by +t), filling with reflections."""
    n, c, h, w = images.shape
    cols = reflect_index(torch.arange(w, device=images.device)[None, :] - tx[:, None], w)  # [N,W]
    rows = reflect_index(torch.arange(h, device=images.device)[None, :] - ty[:, None], h)  # [N,H]
    images = torch.gather(images, 3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return torch.gather(images, 2, rows.view(n, 1, h, 1).expand(n, c, h, w))


def _filter(device, dtype, reverse: bool, gain: float) -> torch.Tensor:
    f = torch.tensor(SYM6, dtype=torch.float64)
    if reverse:
        f = f.flip(0)
    return (f * gain).to(device=device, dtype=dtype)


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """u[m] = sqrt2 * sum_i x[i] h[m - 2i + 5] along both axes (zero insertion + filter)."""
    n, c, h, w = x.shape
    f = _filter(x.device, x.dtype, reverse=True, gain=math.sqrt(2))
    z = x.new_zeros(n * c, 1, h, 2 * w)
    z[:, :, :, ::2] = x.reshape(n * c, 1, h, w)
    z = F.conv2d(F.pad(z, (_TAPS - 1 - _OFFSET, _OFFSET, 0, 0)), f.view(1, 1, 1, _TAPS))
    y = z.new_zeros(n * c, 1, 2 * h, 2 * w)
    y[:, :, ::2, :] = z
    y = F.conv2d(F.pad(y, (0, 0, _TAPS - 1 - _OFFSET, _OFFSET)), f.view(1, 1, _TAPS, 1))
    return y.reshape(n, c, 2 * h, 2 * w)


def _downsample2x(x: torch.Tensor) -> torch.Tensor:
    """y[n] = sum_k x[2n + k] h[k] / sqrt2 along both axes ('valid': input 2S+10 -> output S)."""
    n, c, h, w = x.shape
    f = _filter(x.device, x.dtype, reverse=False, gain=1 / math.sqrt(2))
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(y, f.view(1, 1, 1, _TAPS), stride=(1, 2))
    y = F.conv2d(y, f.view(1, 1, _TAPS, 1), stride=(2, 1))
    return y.reshape(n, c, y.shape[-2], y.shape[-1])


def _resample(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Apply per-image inverse transforms (centred pixel coordinates) with band-limited resampling."""
    n, c, h, w = images.shape
    dev = images.device
    # The 2x output grid, extended by the down filter's reach: indices m in [-5, 2S+5).
    mx = torch.arange(-_OFFSET, 2 * w + _TAPS - 1 - _OFFSET, dtype=torch.float64)
    my = torch.arange(-_OFFSET, 2 * h + _TAPS - 1 - _OFFSET, dtype=torch.float64)
    cx = (mx + 0.5 + _DELAY) / 2 - w / 2
    cy = (my + 0.5 + _DELAY) / 2 - h / 2
    g64 = g_inv.to(device="cpu", dtype=torch.float64)
    corners = torch.tensor([[cx[0], cy[0], 1], [cx[-1], cy[0], 1], [cx[0], cy[-1], 1], [cx[-1], cy[-1], 1]],
                           dtype=torch.float64)
    src = torch.einsum("nij,kj->nki", g64, corners)
    extent = torch.maximum(src[..., 0].abs() - w / 2, src[..., 1].abs() - h / 2).max().clamp(min=0)
    pad = int(math.ceil(float(extent))) + _MARGIN

    rows = reflect_index(torch.arange(-pad, h + pad, device=dev), h)
    cols = reflect_index(torch.arange(-pad, w + pad, device=dev), w)
    padded = images.index_select(2, rows).index_select(3, cols)
    up = _upsample2x(padded)

    gy, gx = torch.meshgrid(cy, cx, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)                     # [Ho,Wo,3]
    s = torch.einsum("nij,hwj->nhwi", g64, pts)[..., :2]                          # [N,Ho,Wo,2]
    grid = (2 * s - _DELAY) / torch.tensor([w + 2 * pad, h + 2 * pad], dtype=torch.float64)
    sampled = F.grid_sample(up, grid.to(device=dev, dtype=up.dtype), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return _downsample2x(sampled)
