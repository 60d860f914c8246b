"""AugmentPipe: identity at p=0, labels that describe what was done, determinism, sane statistics."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.training import augment as A  # noqa: E402
from edm_deploy.training.augment import TRAIN_PY_CONFIG, AugmentPipe  # noqa: E402


def _digits(n=64):
    pytest.importorskip("sklearn")
    from edm_deploy.training.dataset import load_digits_split

    x = torch.from_numpy(load_digits_split()[0][:n]).float()
    return x / 127.5 - 1


def _blob(size=32, cx=10.3, cy=14.0, width=3.0, n=1):
    yy, xx = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    img = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2)).float()
    return img.expand(n, 1, size, size).clone()


def _centroid(img):
    """Intensity centroid (x, y) of each [1,H,W] image, relative to the image centre."""
    n, _, h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    m = img[:, 0].double().clamp(min=0)
    tot = m.sum((1, 2))
    return torch.stack([(m * xx).sum((1, 2)) / tot - (w - 1) / 2, (m * yy).sum((1, 2)) / tot - (h - 1) / 2], 1)


def test_label_layout_and_p0_identity():
    pipe = AugmentPipe(p=0, **TRAIN_PY_CONFIG)
    assert pipe.label_dim == 9
    x = _digits()
    out, labels = pipe(x)
    assert torch.equal(out, x)
    assert labels.shape == (64, 9) and labels.dtype == torch.float32 and labels.abs().max() == 0


def test_flip_labels_match_the_flip():
    x = _digits()
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1)(x, generator=torch.Generator().manual_seed(1))
    assert labels.shape == (64, 2)
    for i in range(64):
        ref = x[i]
        if labels[i, 0] == 1:
            ref = ref.flip(2)
        if labels[i, 1] == 1:
            ref = ref.flip(1)
        assert torch.equal(out[i], ref)
    assert 10 < labels[:, 0].sum() < 54 and 10 < labels[:, 1].sum() < 54


def test_xflip_multiplier_makes_flip_always_eligible():
    x = _digits()
    pipe = AugmentPipe(p=0.12, **TRAIN_PY_CONFIG)
    _, labels = pipe(x.repeat(8, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert 0.4 < labels[:, 0].mean() < 0.6          # eligible always, then 50 %
    assert 0.02 < labels[:, 1].mean() < 0.12         # eligible with p = 0.12, then 50 %
    assert 0.05 < (labels[:, 2] != 0).float().mean() < 0.2


def test_deterministic_under_a_generator():
    x = _digits()
    pipe = AugmentPipe(p=0.5, **TRAIN_PY_CONFIG)
    a = pipe(x, generator=torch.Generator().manual_seed(3))
    b = pipe(x, generator=torch.Generator().manual_seed(3))
    c = pipe(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(5)
    d = pipe(x)
    torch.manual_seed(5)
    e = pipe(x)
    assert torch.equal(d[0], e[0])


def test_augmented_statistics_stay_sane():
    x = _digits()
    out, labels = AugmentPipe(p=1, **TRAIN_PY_CONFIG)(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and torch.isfinite(labels).all()
    assert abs(out.mean() - x.mean()) < 0.15
    assert 0.6 * x.std() < out.std() < 1.2 * x.std()
    assert out.min() > -1.6 and out.max() < 1.6
    assert (labels[:, 2:] != 0).float().mean() > 0.5  # every continuous op was applied to most images


def test_resampler_identity_is_exact_and_quarter_turn_matches_rot90():
    x = _digits(8)
    same = A._resample(x, torch.eye(3, dtype=torch.float64).repeat(8, 1, 1))
    assert (same - x).abs().max() < 1e-5  # perfect-reconstruction filter pair
    blob = _blob()
    turned = A._resample(blob, A._rotate2d(torch.tensor([-math.pi / 2])))
    assert (turned - torch.rot90(blob, -1, (2, 3))).abs().max() < 0.01
    flip = torch.eye(3, dtype=torch.float64)[None].clone()
    flip[:, 0, 0] = -1
    assert (A._resample(blob, flip) - blob.flip(3)).abs().max() < 0.01  # centred: no half-pixel drift


def test_translation_and_rotation_labels_describe_the_motion():
    centred = _blob(size=32, cx=15.5, cy=15.5, width=1.5, n=16)
    gen = torch.Generator().manual_seed(2)
    out, labels = AugmentPipe(p=1, translate_frac=1)(centred, generator=gen)
    moved = _centroid(out) - _centroid(centred)
    expected = labels.double() * 0.125 * 32
    small = expected.abs().max(1).values < 6  # keep the blob clear of its reflection in the padding
    assert small.sum() >= 8
    assert torch.allclose(moved[small], expected[small], atol=0.05)

    # 4 px right of centre: far enough inside that no corner of the rotated frame sees the blob's
    # mirror image in the reflect padding.
    blob = _blob(size=32, cx=19.5, cy=15.5, width=1.5, n=16)

    out, labels = AugmentPipe(p=1, rotate_frac=1)(blob, generator=torch.Generator().manual_seed(3))
    # As in the reference (G_inv = rotate2d_inv(-theta)), the label's angle theta turns the
    # content by -theta in the image's (x right, y down) pixel frame.
    cos, sin = labels[:, 0].double() + 1, labels[:, 1].double()
    c0 = _centroid(blob)
    rx = cos * c0[:, 0] + sin * c0[:, 1]
    ry = -sin * c0[:, 0] + cos * c0[:, 1]
    assert torch.allclose(_centroid(out), torch.stack([rx, ry], 1), atol=0.01)


def _covariance(img):
    """Intensity covariance [[xx, xy], [xy, yy]] of each [1,H,W] image (x right, y down)."""
    n, _, h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    m = img[:, 0].double().clamp(min=0)
    tot = m.sum((1, 2))
    dx = xx[None] - ((m * xx).sum((1, 2)) / tot)[:, None, None]
    dy = yy[None] - ((m * yy).sum((1, 2)) / tot)[:, None, None]
    cxx, cyy, cxy = ((m * a * b).sum((1, 2)) / tot for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    return torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)


def _stretch(s, direction):
    """The linear map that scales by s along the unit vectors `direction` [N,2] and by 1/s across."""
    d = direction
    e = torch.stack([-d[:, 1], d[:, 0]], -1)
    return s[:, None, None] * d[:, :, None] * d[:, None, :] + (1 / s)[:, None, None] * e[:, :, None] * e[:, None, :]


def test_aniso_label_names_the_stretch_axis():
    # As in the reference (G_inv = rotate2d_inv(r) @ scale2d_inv(s, 1/s) @ rotate2d_inv(-r), label
    # (w cos r, w sin r)), the content is stretched by s = 2^(0.2 w) along the axis at angle r in the
    # label's frame, i.e. along (cos r, -sin r) in the (x right, y down) pixel frame, and squeezed by
    # 1/s across it. The label cannot tell (w, r) from (-w, r + pi), which stretch the same axis by s
    # and 1/s (inverse maps), so both readings are accepted; the mirrored axis (cos r, +sin r) is not.
    blob = _blob(size=32, cx=15.5, cy=15.5, width=2.0, n=24)
    out, labels = AugmentPipe(p=1, aniso=1, aniso_rotate_prob=1)(blob, generator=torch.Generator().manual_seed(5))
    a, b = labels[:, 0].double(), labels[:, 1].double()
    w, r = torch.hypot(a, b), torch.atan2(b, a)
    s = torch.exp2(0.2 * w)
    c0, c = _covariance(blob), _covariance(out)

    def misfit(direction):
        errs = []
        for m in (_stretch(s, direction), _stretch(1 / s, direction)):
            errs.append((m @ c0 @ m.transpose(1, 2) - c).abs().flatten(1).amax(1))
        return torch.minimum(*errs)

    right = misfit(torch.stack([torch.cos(r), -torch.sin(r)], -1))
    mirrored = misfit(torch.stack([torch.cos(r), torch.sin(r)], -1))
    assert right.max() < 0.15, right  # the resampling blur adds ~1-2 % to variances of ~4 px^2
    telling = (w > 0.5) & (torch.sin(4 * r).abs() > 0.5)  # where the mirrored axis really differs
    assert telling.sum() >= 5 and (mirrored[telling] > 0.4).all(), mirrored[telling]


def test_scale_label_changes_size():
    blob = _blob(size=32, cx=15.5, cy=15.5, width=2.0, n=16)
    out, labels = AugmentPipe(p=1, scale=1)(blob, generator=torch.Generator().manual_seed(4))
    mass = out.sum((1, 2, 3)) / blob.sum((1, 2, 3))
    expected = torch.exp2(2 * 0.2 * labels[:, 0])  # area scales with s^2
    assert torch.allclose(mass, expected, rtol=0.02)


def test_colour_and_integer_ops_run():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    pipe = AugmentPipe(p=1, rotate_int=1, translate_int=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    out, labels = pipe(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and labels.shape == (6, pipe.label_dim) and pipe.label_dim == 10
    assert torch.isfinite(out).all()
    grey, glabels = AugmentPipe(p=1, brightness=1, contrast=1)(x[:, :1])
    assert grey.shape == (6, 1, 16, 16) and glabels.shape == (6, 2)


def test_bad_arguments():
    with pytest.raises(InputError, match="p must be"):
        AugmentPipe(p=-1)
    with pytest.raises(InputError, match="scale"):
        AugmentPipe(scale="lots")
    with pytest.raises(InputError, match=r"\[N,C,H,W\]"):
        AugmentPipe()(torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="1 or 3 channels"):
        AugmentPipe(p=1, brightness=1)(torch.zeros(2, 2, 8, 8))
    assert issubclass(InputError, ValueError)  # callers catching ValueError keep working
