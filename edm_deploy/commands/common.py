"""Option groups shared by several commands (sampler settings, backend choice) and the types
that validate option values at the boundary."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import click

SAMPLER_OPTION_NAMES = (
    "num_steps", "nfe", "sigmas", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
    "solver", "discretization", "schedule", "scaling", "afs", "denoise_to_zero",
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


def _solver_help() -> str:
    from edm_deploy.runtime.solvers import SOLVER_REGISTRY

    return "ODE solver [default: heun]: " + "; ".join(
        f"{spec.name} (NFE {spec.nfe_formula})" for spec in SOLVER_REGISTRY.values()) + "."


def sampler_options(func: Callable) -> Callable:
    """Sampler flags: the reference generate.py's, with its names and defaults, and the fast solvers'.

    Choices come from the runtime's registries (solvers, schedules), so the CLI never retypes them.
    Options default to unset (None) so that one a solver does not take can be refused.
    """
    from edm_deploy.runtime.schedules import SCALINGS, SCHEDULE_NAMES, SCHEDULES
    from edm_deploy.runtime.solvers import SOLVER_NAMES

    options = [
        click.option("--steps", "num_steps", type=click.IntRange(min=1, max=100_000), default=None, help="Number of time points N from sigma_max to sigma_min [default: 18]; NFE per --solver."),
        click.option("--nfe", type=click.IntRange(min=1, max=100_000), default=None, help="Choose the steps that spend exactly this many network evaluations with --solver."),
        click.option("--sigmas", default=None, help="Explicit time points, comma-separated (e.g. 80,10,1,0.002) or a .json schedule file (edm-deploy schedule); used exactly as given."),
        click.option("--sigma_min", type=POSITIVE, default=None, help="Lowest noise level [default: 0.002, or per --disc]."),
        click.option("--sigma_max", type=POSITIVE, default=None, help="Highest noise level [default: 80, or per --disc]."),
        click.option("--rho", type=FiniteFloat(0.01, 1000), default=None, help="Time step exponent of the edm discretization (0.01..1000) [default: 7]."),
        click.option("--S_churn", "S_churn", type=NON_NEGATIVE, default=None, help="Stochasticity strength (heun, euler) [default: 0]."),
        click.option("--S_min", "S_min", type=NON_NEGATIVE, default=None, help="Lowest sigma with churn [default: 0]."),
        click.option("--S_max", "S_max", type=FiniteFloat(0, allow_inf=True), default=None, help="Highest sigma with churn [default: inf]."),
        click.option("--S_noise", "S_noise", type=NON_NEGATIVE, default=None, help="Noise inflation with churn [default: 1]."),
        click.option("--solver", type=click.Choice(SOLVER_NAMES), default=None, help=_solver_help()),
        click.option("--disc", "discretization", type=click.Choice(SCHEDULE_NAMES), default=None, help="Time step discretization [default: edm]."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="Ablation (heun/euler): noise schedule sigma(t)."),
        click.option("--scaling", type=click.Choice(SCALINGS), default=None, help="Ablation (heun/euler): signal scaling s(t)."),
        click.option("--afs", is_flag=True, default=None, help="Analytical first step: saves one NFE (multistep solvers)."),
        click.option("--denoise-to-zero", is_flag=True, default=None, help="Multistep solvers: finish with x = D(x; sigma_min) (one more NFE)."),
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


def load_from_options(model: str, params: dict[str, Any], max_batch: Any = None, only_applicable: bool = False):
    """Load `model` with the backend flags; `only_applicable` drops the ones its kind does not take
    (a second model of another kind, e.g. an ONNX guide for a .pt model run with --compile)."""
    from edm_deploy.loading import MODEL_KINDS, load, model_kind

    options = dict(fp16=params.get("fp16", False), bf16=params.get("bf16", False), compile=params.get("compile_", False),
                   cuda_graph=params.get("cuda_graph", False), threads=params.get("threads"))
    backend = params["backend"]
    if only_applicable:
        kind = MODEL_KINDS[model_kind(model)]
        options = {k: v for k, v in options.items() if k in kind.options}
        backend = backend if backend in kind.backends else "auto"
    return load(model, backend=backend, device=params["device"], max_batch=max_batch, **options)
