"""Option groups shared by several commands (sampler settings, backend choice) and the types
that validate option values at the boundary."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import click


def _ascii(value: Any, param_type: click.ParamType, param: Any, ctx: Any) -> None:
    """Numbers on the command line are written in ASCII: Python's int() and float() also read other
    scripts' digits ('٣' is 3), which a user typing a seed, a class or a weight never means."""
    if isinstance(value, str) and not value.isascii():
        param_type.fail(f"{value!r} is not a number written in ASCII digits", param, ctx)


class AsciiInt(click.IntRange):
    """`click.IntRange` that reads ASCII digits only (`_ascii`)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        _ascii(value, self, param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloat(click.ParamType):
    """A float that is not NaN, within [lo, hi] (open ends optional); `inf` only where allowed."""

    name = "float"

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 allow_inf: bool = False):
        self.lo, self.hi, self.lo_open, self.allow_inf = lo, hi, lo_open, allow_inf

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        _ascii(value, self, param, ctx)
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


def _solver_help() -> str:
    from edm_deploy.runtime.sampling.solvers import SOLVER_REGISTRY

    return "ODE solver [default: heun]: " + "; ".join(
        f"{spec.name} (NFE {spec.nfe_formula})" for spec in SOLVER_REGISTRY.values()) + "."


def _click_option(f: Any) -> Callable:
    """One `SamplerSettings` field as a click option: its flag, type and bounds from the field's metadata."""
    meta = f.metadata
    flag = meta["flag"] or f"--{f.name}"
    help_text = _solver_help() if f.name == "solver" else meta["doc"] + "."
    if meta["kind"] == "flag":
        return click.option(flag, f.name, is_flag=True, default=None, help=help_text)
    if meta["kind"] == "choice":
        kind: Any = click.Choice(meta["choices"])
    elif meta["kind"] == "int":
        kind = click.IntRange(min=meta["lo"], max=meta["hi"])
    elif meta["kind"] == "sigmas":
        kind = None
        help_text = ("Explicit time points, comma-separated (e.g. 80,10,1,0.002) or a .json schedule file "
                     "(edm-deploy schedule); used exactly as given.")
    else:
        kind = FiniteFloat(meta["lo"], meta["hi"], lo_open=meta["lo_open"], allow_inf=meta["allow_inf"])
    return click.option(flag, f.name, type=kind, default=None, help=help_text)


# Sampler options the CLI does not offer (the API has them): the paper's rarely used ablation constants.
API_ONLY_OPTIONS = ("alpha", "epsilon_s", "C_1", "C_2", "M")


def sampler_options(func: Callable) -> Callable:
    """Sampler flags, one per `SamplerSettings` field (but `API_ONLY_OPTIONS`), with the reference
    generate.py's names and defaults. Options default to unset (None) so that one a solver does
    not take can be refused."""
    import dataclasses

    from edm_deploy.runtime.sampling.settings import SamplerSettings

    for f in reversed(dataclasses.fields(SamplerSettings)):
        if f.name not in API_ONLY_OPTIONS:
            func = _click_option(f)(func)
    return func


def settings_from(params: dict[str, Any]) -> Any:
    """The run's `SamplerSettings` from a command's parameters (a --sigmas file read here)."""
    import dataclasses

    from edm_deploy.runtime.sampling.schedule_file import parse_sigmas
    from edm_deploy.runtime.sampling.settings import SamplerSettings

    names = [f.name for f in dataclasses.fields(SamplerSettings)]
    options = {k: params[k] for k in names if params.get(k) is not None}
    meta: dict = {}
    if options.get("sigmas") is not None:
        options["sigmas"], meta = parse_sigmas(options["sigmas"])
    return SamplerSettings.from_options(**options), meta


def max_threads() -> int:
    """More onnxruntime threads than this only cost memory: a few per usable CPU."""
    from edm_deploy.runtime.backends.onnxrt import usable_cpus

    return max(64, 4 * usable_cpus())


def backend_options(func: Callable) -> Callable:
    """--backend, --device and every load option that has a flag, as `loading.MODEL_KINDS` declares them."""
    from edm_deploy.loading import BACKENDS, DEVICES, LOAD_OPTIONS

    options = [
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Runtime; auto follows the file type."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Device (tensorrt = onnxruntime's TensorRT provider)."),
    ]
    for option in LOAD_OPTIONS.values():
        if option.flag is None:
            continue
        if option.type == "int":
            options.append(click.option(option.flag, option.name, type=click.IntRange(min=1, max=max_threads()),
                                        default=None, help=option.help))
        else:
            options.append(click.option(option.flag, option.name, is_flag=True, help=option.help))
    for option in reversed(options):
        func = option(func)
    return func


def load_from_options(model: str, params: dict[str, Any], max_batch: Any = None, only_applicable: bool = False):
    """Load `model` with the backend flags; `only_applicable` drops the ones its kind does not take
    (a second model of another kind, e.g. an ONNX guide for a .pt model run with --compile)."""
    from edm_deploy.loading import LOAD_OPTIONS, MODEL_KINDS, load, model_kind

    options = {name: params[name] for name, o in LOAD_OPTIONS.items() if o.flag is not None and params.get(name)}
    backend = params["backend"]
    if only_applicable:
        kind = MODEL_KINDS[model_kind(model)]
        options = {k: v for k, v in options.items() if k in kind.option_names}
        backend = backend if backend in kind.backends else "auto"
    return load(model, backend=backend, device=params["device"], max_batch=max_batch, **options)


def output_options(func: Callable) -> Callable:
    """One flag per output format of `runtime.output.writers.OUTPUT_KINDS` (a folder, or a file)."""
    from edm_deploy.runtime.output.writers import OUTPUT_KINDS

    for kind in reversed(list(OUTPUT_KINDS.values())):
        path = click.Path(file_okay=False) if kind.metavar == "DIR" else click.Path(dir_okay=False)
        func = click.option(kind.flag, kind.param, type=path, default=None, help=kind.help)(func)
    return func
