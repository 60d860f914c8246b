"""Option groups shared by several commands (sampler settings, backend choice)."""

from __future__ import annotations

from typing import Any, Callable

import click

SAMPLER_OPTION_NAMES = (
    "num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
    "solver", "discretization", "schedule", "scaling",
)


def sampler_options(func: Callable) -> Callable:
    """The reference generate.py sampler flags, with the same names and defaults."""
    options = [
        click.option("--steps", "num_steps", type=click.IntRange(min=1), default=18, show_default=True, help="Number of sampling steps N (NFE = 2N-1 for Heun)."),
        click.option("--sigma_min", type=click.FloatRange(min=0, min_open=True), default=None, help="Lowest noise level [default: 0.002, or per --disc]."),
        click.option("--sigma_max", type=click.FloatRange(min=0, min_open=True), default=None, help="Highest noise level [default: 80, or per --disc]."),
        click.option("--rho", type=click.FloatRange(min=0, min_open=True), default=7, show_default=True, help="Time step exponent."),
        click.option("--S_churn", "S_churn", type=click.FloatRange(min=0), default=0, show_default=True, help="Stochasticity strength."),
        click.option("--S_min", "S_min", type=click.FloatRange(min=0), default=0, show_default=True, help="Lowest sigma with churn."),
        click.option("--S_max", "S_max", type=click.FloatRange(min=0), default=float("inf"), show_default=True, help="Highest sigma with churn."),
        click.option("--S_noise", "S_noise", type=click.FloatRange(min=0), default=1, show_default=True, help="Noise inflation."),
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


def backend_options(func: Callable) -> Callable:
    options = [
        click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]), default="auto", show_default=True, help="Runtime; auto follows the file type."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="Device (tensorrt = onnxruntime's TensorRT provider)."),
        click.option("--fp16", is_flag=True, help="torch backend: fp16 compute (CUDA)."),
        click.option("--compile", "compile_", is_flag=True, help="torch backend: torch.compile the network."),
        click.option("--cuda-graph", is_flag=True, help="TensorRT backend: replay CUDA graphs per batch size."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime CPU threads [default: all cores]."),
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
        fp16=params.get("fp16", False),
        compile=params.get("compile_", False),
        cuda_graph=params.get("cuda_graph", False),
        threads=params.get("threads"),
        max_batch=max_batch,
    )
