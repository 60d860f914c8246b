"""edm_deploy.runtime: the NumPy-side sampling runtime (no torch needed).

Samplers, schedules, per-seed noise, analytic denoisers and the denoiser backends. Backend
libraries (onnxruntime, TensorRT, torch) are imported only when their backend is chosen.
"""

from .core.contract import Denoiser, check_batch, check_denoiser
from .core.rounding import TableRound, identity_round, round_sigma_from_rule
from .core.schedules import (
    edm_sigma_steps,
    iddpm_sigma_steps,
    iddpm_sigma_table,
    sigma_steps,
    ve_sigma_steps,
    vp_sigma_steps,
)
from .sampling.analytic import FiniteSetDenoiser, GaussianDenoiser
from .sampling.noise import StackedRandomGenerator, draw_latents_and_labels, one_hot
from .sampling.reference import ablation_sampler, edm_sampler, nfe

__all__ = [
    "Denoiser",
    "FiniteSetDenoiser",
    "GaussianDenoiser",
    "StackedRandomGenerator",
    "TableRound",
    "ablation_sampler",
    "check_batch",
    "check_denoiser",
    "draw_latents_and_labels",
    "edm_sampler",
    "edm_sigma_steps",
    "iddpm_sigma_steps",
    "iddpm_sigma_table",
    "identity_round",
    "nfe",
    "one_hot",
    "round_sigma_from_rule",
    "sigma_steps",
    "ve_sigma_steps",
    "vp_sigma_steps",
]
