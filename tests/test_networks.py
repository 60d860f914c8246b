"""Networks and preconditioners: reference compatibility, formulas, fp16 path, ONNX export.

Paper-size networks are built under ``torch.device('meta')`` (no memory, no random init), so the
parameter counts and state-dict layouts of the official 56M-296M models are checked exactly in a
few seconds. Numerical tests use tiny widths.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest

from tests.conftest import requires_onnx, requires_torch

pytestmark = requires_torch

torch = pytest.importorskip("torch")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.training import networks, precond  # noqa: E402
from edm_deploy.training.checkpoint import build_network  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Paper configurations (train.py --arch presets + dataset-specific options)

DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])

PAPER = {
    "cifar_ddpmpp_cond": ("EDMPrecond", dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9,
                                             dropout=0.13, **DDPMPP), 55_735_299, 427),
    "cifar_ddpmpp_uncond": ("EDMPrecond", dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9,
                                               dropout=0.13, **DDPMPP), 55_733_891, 425),
    "cifar_ncsnpp_cond": ("EDMPrecond", dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9,
                                             dropout=0.13, **NCSNPP), 56_400_643, 434),
    "ffhq_ddpmpp_uncond": ("EDMPrecond", dict(img_resolution=64, img_channels=3, augment_dim=9, dropout=0.05,
                                              **{**DDPMPP, "channel_mult": [1, 2, 2, 2]}), 61_805_571, 553),
    "ffhq_ncsnpp_uncond": ("EDMPrecond", dict(img_resolution=64, img_channels=3, augment_dim=9, dropout=0.05,
                                              **{**NCSNPP, "channel_mult": [1, 2, 2, 2]}), 62_761_091, 563),
    "imagenet_adm_cond": ("EDMPrecond", dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True,
                                             dropout=0.10, **ADM), 295_899_267, 553),
    # Baseline ADM (iDDPM, 6 output channels) adds the 1001-entry `u` buffer.
    "imagenet_adm_baseline": ("iDDPMPrecond", dict(img_resolution=64, img_channels=3, label_dim=1000, **ADM),
                              295_904_454, 554),
}

_META_CACHE: dict = {}


def meta_net(name: str):
    """A paper-size network on the meta device (cached: building is the slow part)."""
    if name not in _META_CACHE:
        class_name, kwargs, _, _ = PAPER[name]
        with torch.device("meta"):
            _META_CACHE[name] = build_network({"class_name": class_name, "init_kwargs": kwargs})
    return _META_CACHE[name]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_parameter_counts(name):
    _, _, params, tensors = PAPER[name]
    net = meta_net(name)
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == tensors


def test_cifar_ddpmpp_key_names_and_shapes():
    sd = meta_net("cifar_ddpmpp_cond").state_dict()
    expected = {
        "model.map_label.weight": (128, 10),
        "model.map_label.bias": (128,),
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128),
        "model.map_layer1.weight": (512, 512),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "model.enc.32x32_block0.affine.weight": (256, 512),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_down.skip.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.dec.8x8_in0.qkv.weight": (768, 256, 1, 1),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.16x16_block4.proj.weight": (256, 256, 1, 1),
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "model.map_augment.bias" not in sd
    assert "model.enc.32x32_block0.conv0.resample_filter" not in sd  # only on resampling convs
    assert sum("resample_filter" in k for k in sd) == 8
    # Attention placement: all encoder blocks at 16x16, dec 8x8_in0 and the last 16x16 decoder block.
    attn = sorted({k.split(".qkv")[0] for k in sd if ".qkv.weight" in k})
    assert attn == sorted([f"model.enc.16x16_block{i}" for i in range(4)] + ["model.dec.8x8_in0", "model.dec.16x16_block4"])


def test_cifar_ddpmpp_module_order():
    net = meta_net("cifar_ddpmpp_cond").model
    enc = list(net.enc.keys())
    assert enc == (["32x32_conv"] + [f"32x32_block{i}" for i in range(4)]
                   + ["16x16_down"] + [f"16x16_block{i}" for i in range(4)]
                   + ["8x8_down"] + [f"8x8_block{i}" for i in range(4)])
    dec = list(net.dec.keys())
    assert dec == (["8x8_in0", "8x8_in1"] + [f"8x8_block{i}" for i in range(5)]
                   + ["16x16_up"] + [f"16x16_block{i}" for i in range(5)]
                   + ["32x32_up"] + [f"32x32_block{i}" for i in range(5)] + ["32x32_aux_norm", "32x32_aux_conv"])
    keys = [k for k in net.state_dict() if k.startswith("enc.16x16_down.")]
    assert keys == [f"enc.16x16_down.{s}" for s in (
        "norm0.weight", "norm0.bias", "conv0.weight", "conv0.bias", "conv0.resample_filter", "affine.weight",
        "affine.bias", "norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "skip.weight", "skip.bias",
        "skip.resample_filter")]
    first = list(meta_net("cifar_ddpmpp_cond").state_dict())[:5]
    assert first == ["model.map_label.weight", "model.map_label.bias", "model.map_augment.weight",
                     "model.map_layer0.weight", "model.map_layer0.bias"]


def test_ncsnpp_keys():
    sd = meta_net("cifar_ncsnpp_cond").state_dict()
    assert list(sd)[0] == "model.map_noise.freqs"
    assert tuple(sd["model.map_noise.freqs"].shape) == (128,)
    assert tuple(sd["model.enc.16x16_aux_residual.weight"].shape) == (256, 3, 3, 3)
    assert tuple(sd["model.enc.16x16_aux_residual.resample_filter"].shape) == (1, 1, 4, 4)
    assert tuple(sd["model.enc.8x8_aux_residual.weight"].shape) == (256, 256, 3, 3)
    assert tuple(sd["model.map_layer0.weight"].shape) == (512, 256)
    assert sum(k.endswith("resample_filter") or k.endswith("freqs") for k in sd) == 11
    enc = list(meta_net("cifar_ncsnpp_cond").model.enc.keys())
    assert enc.index("16x16_aux_residual") == enc.index("16x16_down") + 1


def test_adm_keys():
    net = meta_net("imagenet_adm_cond")
    sd = net.state_dict()
    assert tuple(sd["model.map_label.weight"].shape) == (768, 1000)
    assert "model.map_label.bias" not in sd
    assert tuple(sd["model.enc.32x32_block0.qkv.weight"].shape) == (1152, 384, 1, 1)
    assert tuple(sd["model.dec.8x8_in0.affine.weight"].shape) == (1536, 768)
    assert tuple(sd["model.out_conv.weight"].shape) == (3, 192, 3, 3)
    assert list(sd)[-4:] == ["model.out_norm.weight", "model.out_norm.bias", "model.out_conv.weight", "model.out_conv.bias"]
    assert sum(k.endswith("resample_filter") for k in sd) == 12
    # resample_proj=False: equal-width resampling skips are weightless resamplers.
    assert "model.enc.32x32_down.skip.resample_filter" in sd
    assert "model.enc.32x32_down.skip.weight" not in sd
    assert net.model.enc["32x32_block0"].num_heads == 6
    assert net.model.out_norm.eps == 1e-5 and net.model.enc["32x32_block0"].norm0.eps == 1e-5
    assert meta_net("cifar_ddpmpp_cond").model.enc["32x32_block0"].norm0.eps == 1e-6
    assert meta_net("imagenet_adm_baseline").model.out_conv.out_channels == 6


# ---------------------------------------------------------------------------------------------
# Primitive layers


def test_resample_filters_are_nearest_and_box():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    up = networks.Conv2d(3, 3, kernel=0, up=True)
    down = networks.Conv2d(3, 3, kernel=0, down=True)
    assert torch.allclose(up(x), torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    f4 = networks.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert torch.allclose(f4.resample_filter, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1]))[None, None] / 64)
    assert f4(x).shape == (2, 3, 4, 4)
    assert networks.Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(x).shape == (2, 3, 16, 16)
    # A constant image stays constant in the interior under [1,3,3,1] up/down-sampling.
    c = torch.ones(1, 3, 8, 8)
    assert torch.allclose(f4(c)[..., 1:-1, 1:-1], torch.ones(1, 3, 2, 2))
    fused = networks.Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    assert fused(x).shape == (2, 5, 4, 4)
    fused_up = networks.Conv2d(3, 5, kernel=3, up=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    assert fused_up(x).shape == (2, 5, 16, 16)
    assert networks.Conv2d(3, 5, kernel=3).resample_filter is None
    assert "resample_filter" in networks.Conv2d(3, 5, kernel=3)._buffers  # registered as None


def test_embeddings():
    x = torch.tensor([0.0, 0.3, -1.7])
    pe = networks.PositionalEmbedding(8, endpoint=True)
    f = (1 / 10000) ** (torch.arange(4, dtype=torch.float32) / 3)
    expect = torch.cat([torch.cos(x[:, None] * f), torch.sin(x[:, None] * f)], dim=1)
    assert torch.allclose(pe(x), expect)
    f = (1 / 10000) ** (torch.arange(4, dtype=torch.float32) / 4)
    assert torch.allclose(networks.PositionalEmbedding(8)(x)[:, :4], torch.cos(x[:, None] * f))
    fe = networks.FourierEmbedding(8)
    arg = x[:, None] * (2 * math.pi * fe.freqs)
    assert torch.allclose(fe(x), torch.cat([arg.cos(), arg.sin()], dim=1))


def test_attention_qkv_interleave_is_head_channel_qkv():
    """qkv output channel index = head*3*c + channel*3 + {0: q, 1: k, 2: v}."""
    torch.manual_seed(1)
    block = networks.UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=2, adaptive_scale=False,
                               init_zero=dict(init_weight=1)).eval()
    x = torch.randn(2, 8, 4, 4)
    emb = torch.randn(2, 4)
    captured = {}
    block.qkv.register_forward_hook(lambda m, i, o: captured.update(qkv=o))
    block.proj.register_forward_hook(lambda m, i, o: captured.update(a=i[0]))
    block(x, emb)
    qkv = captured["qkv"].reshape(2, 2, 4, 3, 16)  # [N, head, c, qkv, L]
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    w = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(4), dim=-1)
    a = torch.einsum("nhqk,nhck->nhcq", w, v).reshape(2, 8, 4, 4)
    assert torch.allclose(captured["a"], a, atol=1e-5)


def test_groupnorm_groups_and_fp32_statistics():
    assert networks.GroupNorm(256).num_groups == 32
    assert networks.GroupNorm(16).num_groups == 4
    gn = networks.GroupNorm(16)
    x = (torch.randn(2, 16, 4, 4) * 100 + 1000).half()
    y = gn(x)
    assert y.dtype == torch.float16
    ref = torch.nn.functional.group_norm(x.float(), 4, eps=1e-5)
    assert (y.float() - ref).abs().max() < 5e-3


# ---------------------------------------------------------------------------------------------
# User errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(embedding_type="sinusoid"), "embedding_type"),
    (dict(encoder_type="dense"), "encoder_type"),
    (dict(decoder_type="residual"), "decoder_type"),
    (dict(img_resolution=10, channel_mult=[1, 2, 2]), "divisible"),
    (dict(model_channels=10), "GroupNorm"),
    (dict(model_type="UNet3D"), "model_type"),
])
def test_bad_configs_raise_input_error(kwargs, match):
    base = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4])
    with pytest.raises(InputError, match=match):
        precond.EDMPrecond(**{**base, **kwargs})


def test_round_sigma_return_index_only_for_iddpm():
    net = precond.EDMPrecond(8, 1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1)
    assert net.round_sigma(1.5).item() == 1.5
    with pytest.raises(InputError):
        net.round_sigma(1.5, return_index=True)


# ---------------------------------------------------------------------------------------------
# Preconditioning formulas


class StubModel(torch.nn.Module):
    """Records what the preconditioner feeds the network and returns a fixed function of x."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append(dict(x=x, noise=noise_labels, labels=class_labels, augment=augment_labels))
        out = torch.cat([torch.sin(3 * x) + 0.5] * (self.out_channels // x.shape[1]), dim=1)
        return out


def _with_stub(net):
    net.model = StubModel((2 if isinstance(net, precond.iDDPMPrecond) else 1) * net.img_channels)
    return net


TINY_SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


@pytest.mark.parametrize("kind", ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond"])
def test_precond_formulas(kind):
    net = _with_stub(getattr(precond, kind)(img_resolution=8, img_channels=2, label_dim=3, **TINY_SONG))
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 60.0])
    labels = torch.eye(3)[[0, 1, 2, 0]]
    D = net(x, sigma, labels, augment_labels=torch.zeros(4, 9))
    assert D.dtype == torch.float32 and D.shape == x.shape
    call = net.model.calls[-1]
    assert torch.equal(call["labels"], labels) and call["augment"].shape == (4, 9)
    s = sigma.reshape(-1, 1, 1, 1).double()
    xd = x.float().double()
    if kind == "EDMPrecond":
        sd = 0.5
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt()
        c_noise = s.log() / 4
    elif kind == "VEPrecond":
        c_skip, c_out, c_in, c_noise = 1, s, 1, (0.5 * s).log()
    else:
        c_skip, c_out, c_in = 1, -s, 1 / (s**2 + 1).sqrt()
        if kind == "VPPrecond":
            t = ((0.1**2 + 2 * 19.9 * (1 + s**2).log()).sqrt() - 0.1) / 19.9
            c_noise = 999 * t
        else:
            u = net.u.double()
            c_noise = 999 - (s.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(1).double()
    assert torch.allclose(call["x"].double(), c_in * xd, rtol=1e-5, atol=1e-6)
    assert torch.allclose(call["noise"].double(), torch.as_tensor(c_noise).double().flatten(), rtol=1e-4, atol=1e-4)
    F = torch.sin(3 * (c_in * xd)) + 0.5
    assert torch.allclose(D.double(), c_skip * xd + c_out * F, rtol=1e-4, atol=1e-4 * 60)


def test_edm_zero_network_gives_c_skip_x():
    net = precond.EDMPrecond(8, 1, label_dim=0, **TINY_SONG).eval()
    with torch.no_grad():
        net.model.dec["8x8_aux_conv"].weight.zero_()
        net.model.dec["8x8_aux_conv"].bias.zero_()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 0.5, 2.0])
    with torch.no_grad():
        D = net(x, sigma)
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert torch.allclose(D, c_skip.reshape(-1, 1, 1, 1) * x, atol=1e-6)


def test_scalar_sigma_and_missing_labels_broadcast():
    net = _with_stub(precond.EDMPrecond(8, 1, label_dim=3, **TINY_SONG))
    x = torch.randn(3, 1, 8, 8)
    a = net(x, 0.7)
    b = net(x, torch.tensor(0.7))
    c = net(x, torch.full([3], 0.7))
    assert torch.equal(a, b) and torch.allclose(a, c)
    assert net.model.calls[0]["labels"].shape == (1, 3) and not net.model.calls[0]["labels"].any()
    assert net.model.calls[0]["noise"].shape == (1,)


def test_iddpm_u_table_and_round_sigma():
    net = precond.iDDPMPrecond(8, 1, **TINY_SONG)
    u = net.u
    assert u.dtype == torch.float32 and u.shape == (1001,) and u[1000] == 0
    assert float(u[0]) == pytest.approx(20291.17, rel=1e-6)
    assert float(u[1]) == pytest.approx(641.66, rel=1e-5)
    assert float(u[500]) == pytest.approx(1.0124, rel=1e-4)
    assert net.sigma_min == pytest.approx(0.0064223, rel=1e-4)  # float32 recurrence (float64: 0.0064254)
    assert net.sigma_max == float(u[0]) and net.sigma_min == float(u[999])
    assert "u" in net.state_dict()
    s = torch.tensor([[1.0], [0.0065], [5e4]], dtype=torch.float64)
    r = net.round_sigma(s)
    assert r.shape == s.shape and r.dtype == torch.float64
    idx = net.round_sigma(s, return_index=True)
    assert idx.dtype == torch.int64 and idx.flatten().tolist()[2] == 0 and idx.flatten().tolist()[1] == 999
    assert float(r[0]) == float(u[int(idx[0])]) and abs(float(r[0]) - 1.0) < 0.01
    exact = net.round_sigma(u[123:125])
    assert torch.equal(exact, u[123:125])
    assert net.round_sigma(np.array([2.0])).shape == (1,)  # runtime samplers pass NumPy arrays


def test_vp_sigma_range():
    net = precond.VPPrecond(8, 1, **TINY_SONG)
    assert net.sigma_max == pytest.approx(152.167, rel=1e-5)
    # sigma(epsilon_t) is evaluated in float32 as in the reference: exp(1.001e-6) - 1 is quantised to
    # 8 or 9 float32 ulps of 1 depending on the exp implementation, i.e. sqrt gives 0.00097656 or
    # 0.0010358 - never the float64 value 0.0010005.
    ulp = 2.0**-23
    assert any(net.sigma_min == pytest.approx(math.sqrt(n * ulp), rel=1e-6) for n in (8, 9))
    assert net.sigma_inv(net.sigma(torch.tensor(0.5))).item() == pytest.approx(0.5, rel=1e-5)
    ve = precond.VEPrecond(8, 1, **TINY_SONG)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    edm = precond.EDMPrecond(8, 1, **TINY_SONG)
    assert edm.sigma_min == 0 and math.isinf(edm.sigma_max) and edm.sigma_data == 0.5


# ---------------------------------------------------------------------------------------------
# Real tiny networks: batch invariance, fp16 path, ONNX


TINY = {
    "ddpmpp": ("EDMPrecond", dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                  attn_resolutions=[4], augment_dim=9)),
    "ncsnpp": ("EDMPrecond", dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                  attn_resolutions=[4], embedding_type="fourier", encoder_type="residual",
                                  channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "song_skip": ("VPPrecond", dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                                    attn_resolutions=[4], encoder_type="skip", decoder_type="skip")),
    "adm": ("EDMPrecond", dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 1], num_blocks=1,
                               attn_resolutions=[4])),
    "adm_iddpm": ("iDDPMPrecond", dict(model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4])),
}


def tiny(name, label_dim=3, use_fp16=False, seed=0):
    class_name, kwargs = TINY[name]
    torch.manual_seed(seed)
    net = build_network({"class_name": class_name, "init_kwargs": dict(
        img_resolution=8, img_channels=2, label_dim=label_dim, use_fp16=use_fp16, dropout=0.0, **kwargs)})
    with torch.no_grad():  # non-zero weights everywhere, so every layer shows in the output
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn_like(p) / fan_in**0.5)
    return net.eval().requires_grad_(False)


def inputs(n, label_dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g) * 1.5)
    labels = torch.nn.functional.one_hot(torch.arange(n) % label_dim, label_dim).float() if label_dim else None
    return x, sigma, labels


@pytest.mark.parametrize("name", sorted(TINY))
def test_batch_invariance(name):
    net = tiny(name)
    x, sigma, labels = inputs(4)
    whole = net(x, sigma, labels)
    singles = torch.cat([net(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1]) for i in range(4)])
    assert torch.isfinite(whole).all()
    scale = whole.abs().max()
    assert (whole - singles).abs().max() <= 1e-5 * scale


def test_checkpoint_style_roundtrip_strict():
    net = tiny("ncsnpp")
    again = tiny("ncsnpp", seed=5)
    again.load_state_dict(net.state_dict(), strict=True)
    x, sigma, labels = inputs(2)
    assert torch.equal(net(x, sigma, labels), again(x, sigma, labels))


def test_label_dropout_in_training_only():
    net = tiny("ddpmpp")
    net.model.label_dropout = 1.0
    x, sigma, labels = inputs(2)
    net.train()
    dropped = net(x, sigma, labels)
    assert torch.allclose(dropped, net(x, sigma, torch.zeros_like(labels)), atol=1e-6)
    net.eval()
    assert not torch.allclose(net(x, sigma, labels), dropped, atol=1e-6)


@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_fp16_path_forced_on_cpu(name):
    net = tiny(name, use_fp16=True)
    x, sigma, labels = inputs(2)
    ref = net(x, sigma, labels)  # CPU without the flag: fp32, as in the reference
    assert net.compute_dtype(x) == torch.float32
    assert net.set_export_fp16(True) is net and net.fp16_everywhere
    assert net.compute_dtype(x) == torch.float16 and net.compute_dtype(x, force_fp32=True) == torch.float32
    seen = {}
    net.model.map_layer0.register_forward_hook(lambda m, i, o: seen.update(emb=i[0].dtype))
    net.model.enc["8x8_conv"].register_forward_hook(lambda m, i, o: seen.update(conv=o.dtype))
    half = net(x, sigma, labels)
    assert seen == {"emb": torch.float32, "conv": torch.float16}
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    err = (half - ref).abs().max() / ref.abs().max()
    assert 0 < err < 2e-2
    assert torch.equal(net(x, sigma, labels, force_fp32=True), ref)
    net.set_export_fp16(False)
    assert torch.equal(net(x, sigma, labels), ref)


def _export(net, label_dim):
    x, sigma, labels = inputs(2, label_dim)
    args, names = (x, sigma), ["x", "sigma"]
    if label_dim:
        args, names = args + (labels,), names + ["class_labels"]
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(net, args, buf, dynamo=False, opset_version=17, input_names=names,
                          output_names=["denoised"], dynamic_axes={n: {0: "batch"} for n in names + ["denoised"]})
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
              and "networks.py" in w.filename]
    assert not tracer, [str(w.message) for w in tracer]
    return buf.getvalue()


@requires_onnx
# ADM is exported behind the iDDPM preconditioner: one export covers the DhariwalUNet graph, the
# argmin table snap and the 2*C -> C output slice.
@pytest.mark.parametrize("name, label_dim", [("ddpmpp", 3), ("ncsnpp", 0), ("adm_iddpm", 3)])
def test_onnx_export_dynamic_batch(name, label_dim):
    import onnxruntime as ort

    net = tiny(name, label_dim=label_dim)
    model = _export(net, label_dim)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in __import__("onnx").load_from_string(model).graph.node}
    assert "Softmax" in ops and "MatMul" in ops and "Einsum" not in ops
    for b in (1, 3):
        x, sigma, labels = inputs(b, label_dim, seed=7 + b)
        feed = {"x": x.numpy(), "sigma": sigma.numpy()}
        if label_dim:
            feed["class_labels"] = labels.numpy()
        (out,) = sess.run(None, feed)
        ref = net(x, sigma, labels).numpy()
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
