"""edm_deploy.runtime: the NumPy-side sampling runtime (no torch needed).

Samplers, schedules, per-seed noise, analytic denoisers and the denoiser backends. Backend
libraries (onnxruntime, TensorRT, torch) are imported only when their backend is chosen.
"""

from edm_deploy.runtime.analytic import FiniteSetDenoiser, GaussianDenoiser
from edm_deploy.runtime.contract import Denoiser, check_batch, check_denoiser
from edm_deploy.runtime.noise import StackedRandomGenerator, draw_latents_and_labels, one_hot
from edm_deploy.runtime.rounding import TableRound, identity_round, round_sigma_from_rule
from edm_deploy.runtime.sampling import ablation_sampler, edm_sampler, nfe
from edm_deploy.runtime.schedules import (
    edm_sigma_steps,
    iddpm_sigma_steps,
    iddpm_sigma_table,
    sigma_steps,
    ve_sigma_steps,
    vp_sigma_steps,
)

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
