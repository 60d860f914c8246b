"""Option groups shared by several commands (sampler settings, backend choice) and the types
that validate option values at the boundary."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import click

SAMPLER_OPTION_NAMES = (
    "num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
    "solver", "discretization", "schedule", "scaling",
)


class FiniteFloat(click.ParamType):
    """A float that is not NaN, within [lo, hi] (open ends optional); `inf` only where allowed."""

    name = "float"

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 allow_inf: bool = False):
        self.lo, self.hi, self.lo_open, self.allow_inf = lo, hi, lo_open, allow_inf

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.lo is not None and (number < self.lo or (self.lo_open and number == self.lo)):
            self.fail(f"{value!r} must be {'>' if self.lo_open else '>='} {self.lo:g}", param, ctx)
        if self.hi is not None and number > self.hi:
            self.fail(f"{value!r} must be <= {self.hi:g}", param, ctx)
        return number


POSITIVE = FiniteFloat(0, lo_open=True)
NON_NEGATIVE = FiniteFloat(0)


def sampler_options(func: Callable) -> Callable:
    """The reference generate.py sampler flags, with the same names and defaults."""
    options = [
        click.option("--steps", "num_steps", type=click.IntRange(min=1, max=100_000), default=18, show_default=True, help="Number of sampling steps N (NFE = 2N-1 for Heun)."),
        click.option("--sigma_min", type=POSITIVE, default=None, help="Lowest noise level [default: 0.002, or per --disc]."),
        click.option("--sigma_max", type=POSITIVE, default=None, help="Highest noise level [default: 80, or per --disc]."),
        click.option("--rho", type=FiniteFloat(0.01, 1000, lo_open=False), default=7, show_default=True, help="Time step exponent (0.01..1000)."),
        click.option("--S_churn", "S_churn", type=NON_NEGATIVE, default=0, show_default=True, help="Stochasticity strength."),
        click.option("--S_min", "S_min", type=NON_NEGATIVE, default=0, show_default=True, help="Lowest sigma with churn."),
        click.option("--S_max", "S_max", type=FiniteFloat(0, allow_inf=True), default=float("inf"), show_default=True, help="Highest sigma with churn."),
        click.option("--S_noise", "S_noise", type=NON_NEGATIVE, default=1, show_default=True, help="Noise inflation."),
        click.option("--solver", type=click.Choice(["euler", "heun"]), default=None, help="Ablation: ODE solver."),
        click.option("--disc", "discretization", type=click.Choice(["vp", "ve", "iddpm", "edm"]), default=None, help="Ablation: time step discretization."),
        click.option("--schedule", type=click.Choice(["vp", "ve", "linear"]), default=None, help="Ablation: noise schedule sigma(t)."),
        click.option("--scaling", type=click.Choice(["vp", "none"]), default=None, help="Ablation: signal scaling s(t)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampler_kwargs_from(params: dict[str, Any]) -> dict[str, Any]:
    """Pick the sampler settings out of a command's parameters (None = sampler default)."""
    return {k: params[k] for k in SAMPLER_OPTION_NAMES if k in params and params[k] is not None}


def max_threads() -> int:
    """More onnxruntime threads than this only cost memory: a few per usable CPU."""
    from edm_deploy.runtime.backends.onnxrt import usable_cpus

    return max(64, 4 * usable_cpus())


def backend_options(func: Callable) -> Callable:
    from edm_deploy.loading import BACKENDS, DEVICES

    options = [
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Runtime; auto follows the file type."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Device (tensorrt = onnxruntime's TensorRT provider)."),
        click.option("--fp16", is_flag=True, help="torch backend: fp16 compute (CUDA)."),
        click.option("--bf16", is_flag=True, help="torch backend: bfloat16 autocast (CPUs with AVX-512 BF16/AMX, CUDA)."),
        click.option("--compile", "compile_", is_flag=True, help="torch backend: torch.compile the network."),
        click.option("--cuda-graph", is_flag=True, help="TensorRT backend: replay CUDA graphs per batch size."),
        click.option("--threads", type=click.IntRange(min=1, max=max_threads()), default=None, help="onnxruntime CPU threads [default: all cores]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_from_options(model: str, params: dict[str, Any], max_batch: Any = None):
    from edm_deploy.loading import load

    return load(
        model,
        backend=params["backend"],
        device=params["device"],
        max_batch=max_batch,
        fp16=params.get("fp16", False),
        bf16=params.get("bf16", False),
        compile=params.get("compile_", False),
        cuda_graph=params.get("cuda_graph", False),
        threads=params.get("threads"),
    )
