"""Architecture configs and named training presets.

The architecture table reproduces the reference `train.py` (`--arch=ddpmpp|ncsnpp|adm`), so a
network trained here has the same constructor kwargs, and therefore the same state-dict names and
shapes, as the official checkpoints. The paper presets bundle the hyper-parameters of the
published runs (the paper's Table 7, Karras et al. 2022, arXiv:2206.00364); durations, EMA half-lives and ramp-ups are in
kimg (the reference CLI takes Mimg). `tiny` is ours: sized and tuned for scikit-learn's 8x8
digits on a 2-core CPU (see its comment for the measured result).
"""

from __future__ import annotations

import copy
from typing import Any

from edm_deploy.runtime.core.errors import InputError

# The inner-network classes of the reference (`training.networks`), by name: torch-free, so a
# checkpoint can be checked without importing torch.
ARCHITECTURE_NAMES = ("SongUNet", "DhariwalUNet")

# Inner-network kwargs per --arch (model_type + the exact reference overrides).
ARCHS: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(
        model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
    ),
    "ncsnpp": dict(
        model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
        channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2],
    ),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# --precond -> (preconditioner class, loss class). iDDPM has no loss of its own in the reference
# (iDDPMPrecond exists there to run the imported ADM baseline), so training one here is our choice:
# the VP loss. Its weight lambda = 1/sigma^2 times iDDPM's c_out^2 = sigma^2 gives an effective
# weight of 1 at every noise level, i.e. the epsilon-prediction MSE ("L_simple") that iDDPM
# models are trained with. (The EDM loss would weight that error by (sigma^2 + sigma_data^2) /
# sigma_data^2 = 1 + 4 sigma^2, ~485x at sigma = 11, because its lambda assumes EDM's c_out.)
# sigma is drawn from the VP schedule, t ~ U(1e-5, 1), i.e. sigma in ~[0.001, 152]; the preconditioner maps
# sigma to the nearest entry of its table (~[0.0064, 20291] with the defaults) for c_noise, so
# sigma below ~0.0064 gets the last entry, while c_in, c_out and the noise use sigma itself, as
# in the reference forward pass. Not reproduced: the original iDDPM draws sigma from its discrete
# table (uniform index) and adds the learned-variance L_vlb term.
PRECONDS: dict[str, tuple[str, str]] = {
    "edm": ("EDMPrecond", "EDMLoss"),
    "vp": ("VPPrecond", "VPLoss"),
    "ve": ("VEPrecond", "VELoss"),
    "iddpm": ("iDDPMPrecond", "VPLoss"),
}

# Named presets: TrainingOptions field -> value. Anything not listed keeps the option default.
PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 32x32, DDPM++ (or --arch ncsnpp) class-conditional: the paper's headline run.
    "cifar10": dict(
        cond=True, arch="ddpmpp", precond="edm", batch=512, lr=1e-3, lr_rampup_kimg=10000,
        ema_halflife_kimg=500, dropout=0.13, augment=0.12, duration_kimg=200000,
        kimg_per_tick=50, snapshot_kimg=2500,
    ),
    # FFHQ 64x64 / AFHQv2 64x64 unconditional: 4 resolution levels.
    "ffhq64": dict(
        cond=False, arch="ddpmpp", precond="edm", cres=[1, 2, 2, 2], batch=256, lr=2e-4,
        lr_rampup_kimg=10000, ema_halflife_kimg=500, dropout=0.05, augment=0.15, duration_kimg=200000,
        kimg_per_tick=50, snapshot_kimg=2500,
    ),
    "afhq64": dict(
        cond=False, arch="ddpmpp", precond="edm", cres=[1, 2, 2, 2], batch=256, lr=2e-4,
        lr_rampup_kimg=10000, ema_halflife_kimg=500, dropout=0.25, augment=0.15, duration_kimg=200000,
        kimg_per_tick=50, snapshot_kimg=2500,
    ),
    # ImageNet 64x64 class-conditional ADM, fp16 with static loss scaling, no augmentation.
    "imagenet64": dict(
        cond=True, arch="adm", precond="edm", batch=4096, lr=1e-4, lr_rampup_kimg=10000,
        ema_halflife_kimg=50000, dropout=0.10, augment=0.0, fp16=True, loss_scaling=100,
        duration_kimg=2500000, kimg_per_tick=200, snapshot_kimg=10000,
    ),
    # 8x8 digits on a 2-core CPU, class-conditional: a 2-level DDPM++-style SongUNet (8x8 and
    # 4x4, 32/64 channels, one block per level; 715,553 parameters). attn_resolutions=[] removes
    # the optional attention layers, but SongUNet always has one self-attention layer in the first
    # decoder block of the lowest level (model.dec.4x4_in0.qkv / .proj), so there is exactly one,
    # at 4x4. EDM preconditioning and loss, no augmentation or dropout. Tuned on the digits train split:
    # 40 kimg already gives ~96 % classifier-recognised samples, 100 kimg ~98 %. 150 kimg takes
    # ~2.5 min at ~1 s/kimg on an idle 2-core CPU (2 threads); ~4 min with --threads 1.
    "tiny": dict(
        data="digits", cond=True, arch="ddpmpp", precond="edm", cbase=32, cres=[1, 2],
        network_overrides=dict(num_blocks=1, attn_resolutions=[]),
        batch=128, lr=2e-3, lr_rampup_kimg=5, ema_halflife_kimg=10, ema_rampup_ratio=0.05,
        dropout=0.0, augment=0.0, duration_kimg=150, kimg_per_tick=10, snapshot_kimg=50, ckpt_seconds=30,
    ),
    # Fashion-MNIST (32x32 after padding, 1 channel, 10 classes) on a 2-core CPU in about 70 min: the
    # real-image yardstick of benchmarks/fashion.py. A 3-level DDPM++-style SongUNet (32/16/8,
    # 32/64/64 channels, one block per level, 1,226,209 parameters; its one built-in attention layer
    # sits at 8x8). 80 img/s in fp32 on a 2-core Xeon with 2 threads (measured; 2 blocks per level:
    # 51 img/s), so 300 kimg (5 epochs) is ~63 min on an idle machine. No dropout or augmentation:
    # five epochs do not overfit, and both slow a short run down (measured for dropout 0.1: the same
    # 300 kimg end 1.21x worse at Heun-35 in the classifier's features, RESULTS.md).
    "fashion-mnist": dict(
        data="fashion-mnist", cond=True, arch="ddpmpp", precond="edm", cbase=32, cres=[1, 2, 2],
        network_overrides=dict(num_blocks=1, attn_resolutions=[]),
        batch=128, lr=1e-3, lr_rampup_kimg=10, ema_halflife_kimg=20, ema_rampup_ratio=0.05,
        dropout=0.0, augment=0.0, duration_kimg=300, kimg_per_tick=10, snapshot_kimg=50, ckpt_seconds=120,
    ),
}


# Consistency tuning (`train --consistency --from CKPT`): ECT's published CIFAR-10 run (locuslab/ect
# `run_ecm.sh`: batch 128, RAdam at lr 1e-4 without ramp-up, dropout 0.2, no augmentation,
# 25.6 Mimg, ticks of 12.8 kimg, the gap halving (q = 2) every 250 ticks = 3200 kimg, EMA beta
# 0.9999 per step), the base of every tuning. An EMA beta per step is a half-life here: 0.9999 at
# batch 128 is 0.5 ** (128 / h) with h = 128 ln 2 / -ln 0.9999 = 887 kimg, without ramp-up (ECT
# starts the EMA at the teacher's weights, like EDM's --transfer). The ect_* values are
# TrainingOptions' defaults (ECT's ECMLoss defaults: P_mean -1.1, P_std 2.0, k 8, b 1, c 0).
CONSISTENCY_DEFAULTS: dict[str, Any] = dict(
    batch=128, optimizer="radam", lr=1e-4, lr_rampup_kimg=0, dropout=0.2, augment=0.0,
    ema_halflife_kimg=887.0, ema_rampup_ratio=None, duration_kimg=25600, kimg_per_tick=12.8,
    snapshot_kimg=6400, ckpt_kimg=640, ect_q=2.0, ect_stage_kimg=3200,
)

# Consistency presets, named after the training preset of the model they tune.
CONSISTENCY_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {},  # CONSISTENCY_DEFAULTS are ECT's CIFAR-10 run
    # The `tiny` digits model: measured in benchmarks/consistency.py (see its section of RESULTS.md).
    "tiny": dict(
        data="digits", batch=128, lr=2e-4, dropout=0.0, ema_halflife_kimg=10, duration_kimg=100,
        kimg_per_tick=10, snapshot_kimg=50, ckpt_seconds=30, ect_q=2.0, ect_stage_kimg=25,
    ),
    # The `fashion-mnist` model: the best row at NFE 1 and 2 of benchmarks/consistency_fashion.py's
    # ablation (RESULTS.md) without dropout, as the teacher was trained (ECT's 0.2 was worse at NFE
    # 1-3; from a teacher trained with dropout 0.1, 0 also beat 0.1 and 0.2 at NFE 1-2), at the
    # teacher's lr 1e-3 (ECT's 1e-4 left NFE 1 at twice the distance), tuned for the budget:
    # 86 kimg, half the teacher's training cost (an ECT step is 1.73x an EDM step), the gap halving
    # four times (every 21.5 kimg), an EMA half-life of a tenth of the run. That length brought NFE 2
    # from 1.93x to 1.44x the teacher's Heun-35 (classifier features) against 20 kimg.
    # Measured and not taken: pseudo-Huber (no change), ECT's ImageNet ln t and batch 32 (worse), q 256
    # from the start (destroys the teacher at this lr), a quarter-run EMA (NFE 1 worse, NFE 2-3 equal).
    "fashion-mnist": dict(
        data="fashion-mnist", batch=128, lr=1e-3, dropout=0.0, ema_halflife_kimg=8.6, duration_kimg=86,
        kimg_per_tick=8.6, snapshot_kimg=86, ckpt_seconds=120, ect_q=2.0, ect_stage_kimg=21.5,
    ),
}


def consistency_preset(name: str) -> dict[str, Any]:
    """A deep copy of a consistency preset; an unknown name is an InputError listing the known ones."""
    if name not in CONSISTENCY_PRESETS:
        raise InputError(f"unknown consistency preset {name!r} (known: {', '.join(sorted(CONSISTENCY_PRESETS))})")
    return copy.deepcopy(CONSISTENCY_PRESETS[name])


def preset(name: str) -> dict[str, Any]:
    """A deep copy of a named preset; an unknown name is an InputError listing the known ones."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return copy.deepcopy(PRESETS[name])


def arch_kwargs(arch: str) -> dict[str, Any]:
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r} (choose one of {', '.join(ARCHS)})")
    return copy.deepcopy(ARCHS[arch])


def precond_classes(precond: str) -> tuple[str, str]:
    if precond not in PRECONDS:
        raise InputError(f"unknown preconditioning {precond!r} (choose one of {', '.join(PRECONDS)})")
    return PRECONDS[precond]
