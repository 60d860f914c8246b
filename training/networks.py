"""EDM network architectures: DDPM++ / NCSN++ (`SongUNet`) and ADM (`DhariwalUNet`).

These are independent re-implementations written from a description of the reference networks
of Karras et al. (2022), with three goals, in this order:

1. **Checkpoint compatibility.** Constructor signatures and defaults, module names, the order in
   which children, parameters and buffers are registered, and tensor layouts follow the reference
   naming scheme exactly (``model.enc.32x32_block0.conv0.weight``, ``resample_filter`` buffers only
   on resampling convolutions, ``map_noise.freqs`` for Fourier features, qkv channels interleaved
   as [head][channel][q,k,v]). An official state dict therefore loads with ``strict=True`` and the
   converter never needs to rename or permute anything.

2. **Clean deployment.** ``forward`` traces with the TorchScript-based ``torch.onnx.export`` into a
   graph with a symbolic batch dimension:

   * no Python branching on tensor *values*; the only branches depend on the static configuration
     (module names, ``self.training``, whether optional inputs are given);
   * the batch size is never baked in: reshapes use ``-1`` for the batch (or batch*heads) axis and
     only static channel/spatial sizes otherwise;
   * attention is plain MatMul + Softmax (no custom ``autograd.Function``), with the logits and the
     softmax computed in float32 and cast back, so fp16 engines keep the numerically fragile part
     in fp32;
   * no in-place ops on activations (they confuse tracing and autograd alike);
   * the sin/cos swap of SongUNet is a slice + concat instead of a batch-sized reshape.

3. **Mixed precision that an exporter can reproduce on any device.** Layers cast their weights to
   the activation dtype, as the reference does, so a network fed fp16 activations computes its
   convolutions in fp16 while the master weights stay fp32. GroupNorm statistics are computed in
   fp32 and cast back (PyTorch's CUDA kernel accumulates in fp32 as well; doing it explicitly makes
   CPU/ONNX fp16 graphs match). The embedding MLP runs in the dtype of the noise labels, which the
   preconditioners keep in fp32.

Training-only behaviour (dropout, label dropout) is controlled by ``self.training`` and vanishes in
``eval()`` mode, which is how export traces the network.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.nn.functional import silu

from edm_deploy.runtime.core.errors import InputError

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "attention_weights",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
    "SongUNet",
    "DhariwalUNet",
]


# ---------------------------------------------------------------------------------------------
# Initialisation


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor for one of the four standard initialisation schemes.

    Uses the default device context, so building a network under ``torch.device('meta')`` allocates
    nothing (handy for counting parameters of the 296M ADM).
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise InputError(
        f"unknown init_mode {mode!r} (expected xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal)"
    )


# ---------------------------------------------------------------------------------------------
# Primitive layers


class Linear(torch.nn.Module):
    """Fully connected layer; weight [out, in] like torch.nn.Linear, cast to the input dtype."""

    def __init__(
        self,
        in_features: int,                   # length of each input vector
        out_features: int,                  # length of each output vector
        bias: bool = True,                  # add a learned offset; False leaves `bias` a plain None
        init_mode: str = "kaiming_normal",  # initial weight distribution (see `weight_init` for the names)
        init_weight: float = 1,             # factor on the initial weights (0: the layer starts as zero)
        init_bias: float = 0,               # factor on the initial bias (drawn like the weights, so 0 = zeros)
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        # Without bias the attribute is a plain None (not a registered parameter), as in the reference.
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(torch.nn.Module):
    """2-D convolution with optional FIR up/down-sampling.

    ``kernel=0`` gives a pure resampler with no weights. The ``resample_filter`` buffer
    (outer(f, f) / sum(f)^2, shape [1, 1, F, F]) is registered as ``None`` - hence absent from the
    state dict - unless ``up`` or ``down`` is set. Resampling is a depthwise (transposed)
    convolution with that filter, which is exact for both [1,1] (nearest / 2x2 average) and
    [1,3,3,1] filters and maps to plain ONNX Conv/ConvTranspose nodes.
    """

    def __init__(
        self,
        in_channels: int,                           # channels read
        out_channels: int,                          # channels written (ignored when kernel is 0)
        kernel: int,                                # square kernel size; 0 = no convolution, only resampling
        bias: bool = True,                          # add a learned per-channel offset
        up: bool = False,                           # upsample 2x with the filter before convolving
        down: bool = False,                         # downsample 2x with the filter (before, or fused after)
        resample_filter: Sequence[float] = [1, 1],  # 1-D FIR taps, used as outer(f, f) / sum(f)^2: [1, 1] box
                                                    # (DDPM++, ADM) or [1, 3, 3, 1] binomial (NCSN++)
        fused_resample: bool = False,               # convolve and resample in one strided pass (NCSN++'s
                                                    # residual encoder path only)
        init_mode: str = "kaiming_normal",          # initial weight distribution (see `weight_init`)
        init_weight: float = 1,                     # factor on the initial weights (0: starts as zero)
        init_bias: float = 0,                       # factor on the initial bias
    ):
        if up and down:
            raise InputError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = (
            torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        )
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None)

    def _filter(self, dtype: torch.dtype, channels: int, gain: float = 1.0) -> torch.Tensor:
        """The depthwise resampling kernel [channels, 1, F, F]."""
        f = self.resample_filter.to(dtype)
        if gain != 1.0:
            f = f * gain
        # expand (not tile): the TorchScript ONNX exporter keeps the kernel shape known only for
        # Expand, and a Conv with a kernel of unknown shape cannot be exported.
        return f.expand(channels, 1, f.shape[2], f.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv2d = torch.nn.functional.conv2d
        conv_transpose2d = torch.nn.functional.conv_transpose2d
        w = self.weight.to(x.dtype) if self.weight is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0

        if self.fused_resample and self.up and w is not None:
            f = self._filter(x.dtype, self.in_channels, 4.0)
            x = conv_transpose2d(x, f, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, self._filter(x.dtype, self.out_channels), groups=self.out_channels, stride=2)
        else:
            if self.up:
                f = self._filter(x.dtype, self.in_channels, 4.0)
                x = conv_transpose2d(x, f, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                f = self._filter(x.dtype, self.in_channels)
                x = conv2d(x, f, groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups.

    Statistics and the affine transform are computed in float32 and the result is cast back to the
    input dtype, so fp16 graphs do not lose precision in the variance.
    """

    def __init__(
        self,
        num_channels: int,               # channels normalised (each with its own learned scale and shift)
        num_groups: int = 32,            # groups wanted; fewer when channels would run short
        min_channels_per_group: int = 4,  # lower bound on channels per group (sets the actual group count)
        eps: float = 1e-5,               # added to the variance (1e-6 in SongUNet, 1e-5 in DhariwalUNet)
    ):
        super().__init__()
        groups = min(num_groups, num_channels // min_channels_per_group)
        if groups < 1 or num_channels % groups != 0:
            raise InputError(
                f"GroupNorm: {num_channels} channels cannot be split into {max(groups, 1)} equal groups "
                f"(use channel counts that are multiples of {min_channels_per_group} and of the group count)"
            )
        self.num_groups = groups
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.group_norm is what F.group_norm calls after a batch-size sanity check; calling it
        # directly keeps that Python-side check (and its tracer warnings) out of the export.
        y = torch.group_norm(
            x.to(torch.float32),
            self.num_groups,
            self.weight.to(torch.float32),
            self.bias.to(torch.float32),
            self.eps,
            torch.backends.cudnn.enabled,
        )
        return y.to(x.dtype)


def attention_weights(q: torch.Tensor, k: torch.Tensor, head_channels: Optional[int] = None) -> torch.Tensor:
    """softmax over keys of q^T k / sqrt(C): q, k [N, C, L] -> w [N, L_q, L_k].

    The key scaling happens in the input dtype (as in the reference); the product and the softmax
    run in float32 and the weights are cast back to q's dtype. Plain MatMul + Softmax keeps the
    ONNX graph free of custom ops and lets TensorRT keep this part in fp32 in fp16 engines.
    """
    # Pass head_channels when tracing: a Python int keeps the scale a constant in the graph.
    head_channels = head_channels if head_channels is not None else int(k.shape[1])
    k = k / math.sqrt(head_channels)
    logits = torch.matmul(q.to(torch.float32).transpose(1, 2), k.to(torch.float32))
    return torch.softmax(logits, dim=2).to(q.dtype)


class UNetBlock(torch.nn.Module):
    """Residual block (optionally resampling) with optional self-attention.

    The union of the DDPM++, NCSN++ and ADM blocks. Children are registered in the reference
    order: norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj].
    """

    def __init__(
        self,
        in_channels: int,                           # channels entering the block
        out_channels: int,                          # channels leaving it (a 1x1 skip convolution adapts)
        emb_channels: int,                          # length of the noise/label embedding the block is fed
        up: bool = False,                           # upsample 2x on the way through (decoder)
        down: bool = False,                         # downsample 2x on the way through (encoder)
        attention: bool = False,                    # add self-attention after the residual part
        num_heads: Optional[int] = None,            # attention heads; None: out_channels // channels_per_head
        channels_per_head: int = 64,                # channels per head when num_heads is None (ADM)
        dropout: float = 0,                         # dropout probability before the second convolution
        skip_scale: float = 1,                      # factor on residual sums (sqrt(1/2) in SongUNet keeps
                                                    # the variance of a sum of two unit-variance terms)
        eps: float = 1e-5,                          # GroupNorm epsilon
        resample_filter: Sequence[float] = [1, 1],  # FIR taps for up/down (see `Conv2d`)
        resample_proj: bool = False,                # give a resampling skip path a 1x1 convolution even when
                                                    # the channel count stays (SongUNet)
        adaptive_scale: bool = True,                # embedding gives a scale and a shift after the norm (ADM);
                                                    # False: it is added before the norm (DDPM++/NCSN++)
        init: dict = dict(),  # noqa: B006 - never mutated; initialisation of the ordinary layers
        init_zero: dict = dict(init_weight=0),  # noqa: B006 - for the layers that close a residual branch
                                                #   (near zero, so a new block starts close to the identity)
        init_attn: Optional[dict] = None,           # for the attention projections (None: `init`)
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            # As in the reference, fewer than channels_per_head channels give 0 heads, i.e. no
            # attention layers at all (relevant for tiny ADM configs only).
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
            if self.num_heads < 0 or (self.num_heads and out_channels % self.num_heads != 0):
                raise InputError(
                    f"UNetBlock: {out_channels} channels cannot be split into attention heads "
                    f"(num_heads={num_heads}, channels_per_head={channels_per_head})"
                )
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init
            )

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplying by exactly 1 changes nothing; leaving it out keeps ADM graphs smaller.
        return x * self.skip_scale if self.skip_scale != 1 else x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        h = self.conv0(silu(self.norm0(x)))

        # The embedding path stays in its own dtype (fp32); only the result meets the activations.
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            h = silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = silu(self.norm1(h + params))

        h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        h = self._scale(h + (self.skip(orig) if self.skip is not None else orig))

        if self.num_heads:
            channels = self.out_channels
            head_channels = channels // self.num_heads
            height, width = h.shape[2], h.shape[3]
            # [N, 3C, H, W] -> [N*heads, C/heads, 3, H*W]: channels are interleaved [head][c][q,k,v].
            qkv = self.qkv(self.norm2(h)).reshape(-1, head_channels, 3, height * width)
            q, k, v = qkv.unbind(2)
            w = attention_weights(q, k, head_channels)                      # [N*heads, L_q, L_k]
            a = torch.matmul(v, w.transpose(1, 2))           # [N*heads, C/heads, L_q]
            a = a.reshape(-1, channels, height, width)
            h = self._scale(self.proj(a) + h)
        return h


# ---------------------------------------------------------------------------------------------
# Timestep embeddings


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x f), sin(x f)] with f_i = (1/max_positions)^(i / (C/2 - endpoint)).

    Has no weights; the frequencies are recomputed in float32 on the input's device in forward,
    which keeps them out of ``.half()``/``.to()`` casts and out of the state dict.
    """

    def __init__(
        self,
        num_channels: int,           # output length: half cosines, half sines (must be even)
        max_positions: int = 10000,  # frequencies fall geometrically from 1 towards 1 / max_positions
        endpoint: bool = False,      # True: the last frequency reaches 1 / max_positions exactly (SongUNet)
    ):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise InputError(f"PositionalEmbedding needs an even number of channels >= 2, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.reshape(-1, 1) * freqs.to(x.dtype).reshape(1, -1)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi f x), sin(2 pi f x)]; ``freqs`` [C/2] is a state-dict buffer."""

    def __init__(
        self,
        num_channels: int,   # output length: half cosines, half sines (must be even)
        scale: float = 16,   # standard deviation of the random frequencies (drawn once, then stored)
    ):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise InputError(f"FourierEmbedding needs an even number of channels >= 2, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (2 * math.pi * self.freqs).to(x.dtype)
        x = x.reshape(-1, 1) * f.reshape(1, -1)
        return torch.cat([x.cos(), x.sin()], dim=1)


# ---------------------------------------------------------------------------------------------
# Shared checks


def _check_common(img_resolution: int, channel_mult: Sequence[int], label_dim: int, augment_dim: int, name: str) -> None:
    if len(channel_mult) < 1:
        raise InputError(f"{name}: channel_mult must list at least one level")
    if label_dim < 0 or augment_dim < 0:
        raise InputError(f"{name}: label_dim and augment_dim must be >= 0")
    levels = len(channel_mult)
    factor = 1 << (levels - 1)
    if img_resolution < factor or img_resolution % factor:
        raise InputError(
            f"{name}: img_resolution {img_resolution} must be divisible by 2^{levels - 1} = {factor} "
            f"for {levels} resolution levels"
        )


def _drop_labels(x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
    """Classifier-free-guidance label dropout (training only): zero whole rows with probability p."""
    keep = torch.rand([x.shape[0], 1], device=x.device) >= p
    return labels * keep.to(labels.dtype)


def _takes_skip(name: str) -> bool:
    """Decoder blocks named ``{res}x{res}_block{i}`` consume one encoder skip (concatenated after x).

    Decided from the name (static), not from runtime shapes, so tracing records no shape logic.
    It is equivalent to the reference rule "concatenate iff x's channels != block.in_channels".
    """
    return "_block" in name


# ---------------------------------------------------------------------------------------------
# DDPM++ / NCSN++


class SongUNet(torch.nn.Module):
    """The DDPM++ and NCSN++ U-Nets of Song et al. (2021) as configured in EDM."""

    def __init__(
        self,
        img_resolution: int,                        # side of the square input and output images
        in_channels: int,                           # image channels read (1 grey, 3 RGB)
        out_channels: int,                          # image channels written
        label_dim: int = 0,                         # number of classes (one-hot labels); 0 = unconditional
        augment_dim: int = 0,                       # length of the augmentation label vector (AugmentPipe's
                                                    # 9); 0 = the network takes none
        model_channels: int = 128,                  # channels at the first level; every level multiplies it
        channel_mult: Sequence[int] = [1, 2, 2, 2],  # per resolution level, the factor on model_channels;
                                                    # its length sets the number of levels (each halves the size)
        channel_mult_emb: int = 4,                  # embedding vector length = model_channels * this
        num_blocks: int = 4,                        # residual blocks per level in the encoder (+1 in the decoder)
        attn_resolutions: Sequence[int] = [16],     # image sides (e.g. 16 for 16x16) whose blocks get attention
        dropout: float = 0.10,                      # dropout probability inside the blocks (training only)
        label_dropout: float = 0,                   # probability of dropping a class label during training
                                                    # (what classifier-free guidance needs)
        embedding_type: str = "positional",         # noise-level embedding: 'positional' (sinusoids at fixed
                                                    # frequencies, DDPM++) or 'fourier' (random ones, NCSN++)
        channel_mult_noise: int = 1,                # noise embedding length = model_channels * this
                                                    # (1 for DDPM++, 2 for NCSN++)
        encoder_type: str = "standard",             # 'standard': plain downsampling blocks (DDPM++);
                                                    # 'skip': a downsampled copy of the input, through a 1x1
                                                    # convolution, is added at every level; 'residual': the
                                                    # previous level's result (the input image at first),
                                                    # through a strided 3x3 convolution, is added with a
                                                    # factor 1/sqrt(2) (NCSN++)
        decoder_type: str = "standard",             # 'standard': one output head at full resolution;
                                                    # 'skip': an output head per level, upsampled and summed
        resample_filter: Sequence[float] = [1, 1],  # FIR taps of every resampling: [1, 1] (DDPM++) or
                                                    # [1, 3, 3, 1] (NCSN++)
    ):
        if embedding_type not in ("fourier", "positional"):
            raise InputError(f"SongUNet: unknown embedding_type {embedding_type!r} (expected 'positional' or 'fourier')")
        if encoder_type not in ("standard", "skip", "residual"):
            raise InputError(
                f"SongUNet: unknown encoder_type {encoder_type!r} (expected 'standard', 'skip' or 'residual')"
            )
        if decoder_type not in ("standard", "skip"):
            raise InputError(f"SongUNet: unknown decoder_type {decoder_type!r} (expected 'standard' or 'skip')")
        _check_common(img_resolution, channel_mult, label_dim, augment_dim, "SongUNet")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network (noise level, class label, augmentation label -> embedding).
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. ModuleDict insertion order is execution order.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: Optional[torch.Tensor],
        augment_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # Mapping. The embedding comes out as [cos, sin]; DDPM++/NCSN++ want [sin, cos].
        emb = self.map_noise(noise_labels)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(x, labels, self.label_dropout)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = x + block(aux)
                skips[-1] = x
            elif "aux_residual" in name:
                x = (x + block(aux)) / math.sqrt(2)
                skips[-1] = x
                aux = x
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if _takes_skip(name):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ---------------------------------------------------------------------------------------------
# ADM


class DhariwalUNet(torch.nn.Module):
    """The ADM U-Net of Dhariwal & Nichol (2021) as configured in EDM."""

    def __init__(
        self,
        img_resolution: int,                            # side of the square input and output images
        in_channels: int,                               # image channels read
        out_channels: int,                              # channels written (iDDPM asks for twice the image
                                                        # channels: the second half predicts variances)
        label_dim: int = 0,                             # number of classes (one-hot labels); 0 = unconditional
        augment_dim: int = 0,                           # length of the augmentation label vector; 0 = none
        model_channels: int = 192,                      # channels at the first level
        channel_mult: Sequence[int] = [1, 2, 3, 4],     # per resolution level, the factor on model_channels
        channel_mult_emb: int = 4,                      # embedding vector length = model_channels * this
        num_blocks: int = 3,                            # residual blocks per level in the encoder (+1 in the decoder)
        attn_resolutions: Sequence[int] = [32, 16, 8],  # image sides whose blocks get attention (64 channels
                                                        # per head)
        dropout: float = 0.10,                          # dropout probability inside the blocks (training only)
        label_dropout: float = 0,                       # probability of dropping a class label during training
    ):
        _check_common(img_resolution, channel_mult, label_dim, augment_dim, "DhariwalUNet")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping network. Note the label projection has no bias and joins after map_layer1.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            if label_dim
            else None
        )

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: Optional[torch.Tensor],
        augment_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # Mapping ([cos, sin], no swap).
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(x, labels, self.label_dropout)
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Encoder: every output, including the first conv, is a skip.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if _takes_skip(name):
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))
