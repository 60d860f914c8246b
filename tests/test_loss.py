"""Training losses: per-element output, sigma distributions, weighting, determinism, augmentation."""

from __future__ import annotations

import math

import pytest

from tests.conftest import requires_torch

pytestmark = requires_torch

torch = pytest.importorskip("torch")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.training import loss as losses  # noqa: E402
from edm_deploy.training import precond  # noqa: E402


class RecordingNet:
    """A denoiser that returns 0.3 * its input and records sigma, labels and augment labels."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, labels=labels, augment_labels=augment_labels))
        return 0.3 * x


def _images(n=6, seed=0):
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


ALL = [losses.EDMLoss(), losses.VPLoss(), losses.VELoss()]


@pytest.mark.parametrize("loss_fn", ALL, ids=lambda f: type(f).__name__)
def test_weighting_formula_and_unreduced_shape(loss_fn):
    net = RecordingNet()
    y = _images()
    g = torch.Generator().manual_seed(3)
    out = loss_fn(net, y, generator=g)
    assert out.shape == y.shape  # per element, unreduced
    call = net.calls[-1]
    sigma = call["sigma"]
    assert sigma.shape == (6, 1, 1, 1) and (sigma > 0).all()
    noise = call["x"] - y
    if isinstance(loss_fn, losses.EDMLoss):
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    else:
        weight = 1 / sigma**2
    assert torch.allclose(out, weight * (0.3 * (y + noise) - y) ** 2, rtol=1e-5, atol=1e-6)
    # The noise really is sigma * N(0, 1): its per-sample scale follows sigma.
    std = (noise / sigma).std()
    assert 0.7 < float(std) < 1.3


@pytest.mark.parametrize("loss_fn", ALL, ids=lambda f: type(f).__name__)
def test_deterministic_with_generator_and_seed(loss_fn):
    y = _images()
    a = loss_fn(RecordingNet(), y, generator=torch.Generator().manual_seed(11))
    b = loss_fn(RecordingNet(), y, generator=torch.Generator().manual_seed(11))
    c = loss_fn(RecordingNet(), y, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = loss_fn(RecordingNet(), y)
    torch.manual_seed(5)
    e = loss_fn(RecordingNet(), y)
    assert torch.equal(d, e)


def test_sigma_distributions():
    y = torch.zeros(4000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    net = RecordingNet()
    losses.EDMLoss()(net, y, generator=g)
    log_sigma = net.calls[-1]["sigma"].log().flatten()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.08 and abs(float(log_sigma.std()) - 1.2) < 0.08

    losses.VELoss()(net, y, generator=g)
    s = net.calls[-1]["sigma"].flatten()
    assert float(s.min()) >= 0.02 and float(s.max()) <= 100
    u = (s.log() - math.log(0.02)) / math.log(100 / 0.02)  # log-uniform -> uniform
    assert abs(float(u.mean()) - 0.5) < 0.03

    vp = losses.VPLoss()
    vp(net, y, generator=g)
    s = net.calls[-1]["sigma"].flatten()
    assert float(s.max()) <= float(vp.sigma(1.0)) * (1 + 1e-6)
    assert float(s.min()) >= float(vp.sigma(1e-5)) * (1 - 1e-6)
    sd = s.double()
    t = ((0.1**2 + 2 * 19.9 * (1 + sd**2).log()).sqrt() - 0.1) / 19.9  # back to t: uniform on [epsilon_t, 1]
    assert abs(float(t.mean()) - 0.5) < 0.03


def test_labels_and_augment_pipe_reach_the_net():
    y = _images(3)
    labels = torch.eye(4)[:3]

    def pipe(images, generator=None):
        return images.flip(3), torch.full([images.shape[0], 9], 0.5)

    net = RecordingNet()
    out = losses.EDMLoss()(net, y, labels, augment_pipe=pipe, generator=torch.Generator().manual_seed(0))
    call = net.calls[-1]
    assert call["labels"] is labels
    assert torch.equal(call["augment_labels"], torch.full([3, 9], 0.5))
    sigma = call["sigma"]
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    target = y.flip(3)  # the loss compares against the augmented images
    assert torch.allclose(out, weight * (0.3 * call["x"] - target) ** 2, rtol=1e-5, atol=1e-6)
    net = RecordingNet()
    losses.VPLoss()(net, y)
    assert net.calls[-1]["augment_labels"] is None


def test_loss_with_real_network_backpropagates():
    net = precond.EDMPrecond(8, 1, label_dim=2, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                             num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.1)
    y = torch.randn(2, 1, 8, 8)
    out = losses.EDMLoss()(net, y, torch.eye(2), generator=torch.Generator().manual_seed(0))
    assert out.shape == y.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert net.model.map_layer0.weight.grad is not None
    assert net.model.dec["8x8_aux_conv"].weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(InputError):
        losses.VELoss(sigma_min=1, sigma_max=0.5)
    with pytest.raises(InputError):
        losses.EDMLoss(P_std=0)
    with pytest.raises(InputError):
        losses.EDMLoss()(RecordingNet(), torch.zeros(3, 4))


def test_vp_sigma_is_one_formula():
    vp = precond.VPPrecond(8, 1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    t = torch.linspace(1e-5, 1, 9, dtype=torch.float64)
    assert torch.equal(losses.VPLoss().sigma(t), vp.sigma(t))
    assert torch.equal(precond.vp_sigma(t, 19.9, 0.1), vp.sigma(t))
    assert torch.allclose(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve", "iddpm"])
def test_each_preconditioner_trains_with_unit_effective_weight(kind):
    """lambda(sigma) * c_out(sigma)^2 == 1: every noise level weighs the raw network's error alike.

    The loss for each --precond comes from the presets; c_out is that preconditioner's. (Before
    iDDPM used the VP loss it trained with the EDM weight, i.e. 1 + 4 sigma^2 here.)
    """
    from edm_deploy.training.training_loop import make_loss

    loss_fn = make_loss(kind)
    net = RecordingNet()
    y = _images(64)
    out = loss_fn(net, y, generator=torch.Generator().manual_seed(1))
    call = net.calls[-1]
    sigma = call["sigma"].double()
    weight = out.double() / ((0.3 * call["x"] - y) ** 2).double()
    c_out = {
        "edm": sigma * 0.5 / (sigma**2 + 0.25).sqrt(),
        "vp": -sigma,
        "ve": sigma,
        "iddpm": -sigma,  # iDDPMPrecond.forward: c_out = -sigma
    }[kind]
    assert torch.allclose(weight * c_out**2, torch.ones_like(weight), rtol=1e-4)
