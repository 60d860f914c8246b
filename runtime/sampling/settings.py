"""How a run samples, as one typed object: built by the CLI, the Python API and the server alike.

`SamplerSettings` holds every sampler option of a run (None: the sampler's default) and checks
them once, without a model: names, types, ranges, and which options apply together (churn to
Euler/Heun, AFS and max_order to the multistep solvers, the paper's ablation options to the
reference samplers, a schedule's own parameters to that schedule). What needs the model (its
sigma range and rounding, the time points) is `planner.plan_sampling`'s job.

Each field's metadata says what the option is (`doc`), its command-line spelling where it is
not ``--name`` (`flag`) and its bounds, so the CLI's flags (`commands/common.py`), the server's
request schema and the docs are derived from here: a new sampler option is one field plus the
code that uses it. `from_options` turns keyword arguments into settings and refuses an unknown
name, naming the one meant (`steps` is `num_steps` in the API).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from ..core import schedules as sch
from ..core.errors import InputError, check_int, check_number, shown
from ..core.schedules import MAX_STEPS, SCHEDULE_PARAM_NAMES
from . import solvers as slv
from .reference import SOLVERS as REFERENCE_SOLVERS

# Largest finite float32: what the network sees of sigma (and of a guided mix).
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Option names users reach for that the API spells otherwise.
ALIASES = {"steps": "num_steps", "disc": "discretization", "class": "class_idx", "seed": "seeds"}


def _opt(doc: str, *, flag: Optional[str] = None, lo: Optional[float] = None, hi: Optional[float] = None,
         lo_open: bool = False, allow_inf: bool = False, choices: Optional[tuple] = None, kind: str = "float",
         ablation: bool = False, solver_option: bool = False) -> Any:
    meta = dict(doc=doc, flag=flag, lo=lo, hi=hi, lo_open=lo_open, allow_inf=allow_inf, choices=choices, kind=kind,
                ablation=ablation, solver_option=solver_option)
    return field(default=None, metadata=meta)


# The highest orders the multistep solvers take (their programs' max_order defaults).
_MAX_ORDERS = sorted({spec.max_order for spec in slv.SOLVER_REGISTRY.values() if spec.max_order is not None})


@dataclass(frozen=True)
class SamplerSettings:
    """Every sampler option of a run; None (False for flags) means the sampler's own default."""

    solver: Optional[str] = _opt("ODE solver [default: heun]", kind="choice", choices=slv.SOLVER_NAMES)
    num_steps: Optional[int] = _opt("Number of time points N from sigma_max to sigma_min [default: 18]; NFE per solver",
                                    flag="--steps", kind="int", lo=1, hi=MAX_STEPS)
    nfe: Optional[int] = _opt("Choose the steps that spend exactly this many network evaluations", kind="int",
                              lo=1, hi=MAX_STEPS)
    sigmas: Optional[tuple] = _opt("Explicit time points (e.g. 80,10,1,0.002), used exactly as given; a final 0 "
                                   "asks for the last step to sigma = 0", kind="sigmas")
    sigma_min: Optional[float] = _opt("Lowest noise level [default: 0.002, or per discretization]", lo=0, lo_open=True)
    sigma_max: Optional[float] = _opt("Highest noise level [default: 80, or per discretization]", lo=0, lo_open=True)
    rho: Optional[float] = _opt("Time step exponent of the edm and time-uniform discretizations [default: 7]",
                                lo=0.01, hi=1000)
    discretization: Optional[str] = _opt("Time step discretization [default: edm]", flag="--disc", kind="choice",
                                         choices=sch.SCHEDULE_NAMES)
    schedule: Optional[str] = _opt("Ablation (heun/euler): noise schedule sigma(t)", kind="choice",
                                   choices=sch.SCHEDULES, ablation=True)
    scaling: Optional[str] = _opt("Ablation (heun/euler): signal scaling s(t)", kind="choice", choices=sch.SCALINGS,
                                  ablation=True)
    alpha: Optional[float] = _opt("Ablation (heun/euler): position of Heun's second evaluation, (0, 1]", lo=0,
                                  hi=1, lo_open=True, ablation=True)
    epsilon_s: Optional[float] = _opt("VP's lowest time t (vp discretization, schedule or scaling) [default: 1e-3]",
                                      lo=0, hi=1, lo_open=True)
    C_1: Optional[float] = _opt("iDDPM discretization constant C_1 [default: 0.001]", lo=0, lo_open=True)
    C_2: Optional[float] = _opt("iDDPM discretization constant C_2 [default: 0.008]", lo=0, lo_open=True)
    M: Optional[int] = _opt("iDDPM discretization: number of training noise levels [default: 1000]", kind="int",
                            lo=1, hi=MAX_STEPS)
    # Options of the solver's program (`solver_option`): checked against the solver, passed to it as given.
    S_churn: Optional[float] = _opt("Stochasticity strength (heun, euler) [default: 0]", lo=0, solver_option=True)
    S_min: Optional[float] = _opt("Lowest sigma with churn [default: 0]", lo=0, solver_option=True)
    S_max: Optional[float] = _opt("Highest sigma with churn [default: inf]", lo=0, allow_inf=True, solver_option=True)
    S_noise: Optional[float] = _opt("Noise inflation with churn [default: 1]", lo=0, solver_option=True)
    afs: bool = field(default=False, metadata=dict(doc="Analytical first step: saves one NFE (multistep solvers)",
                                                   kind="flag", flag=None, solver_option=True))
    denoise_to_zero: bool = field(default=False, metadata=dict(
        doc="Multistep solvers: finish with x = D(x; sigma_min) (one more NFE)", kind="flag", flag="--denoise-to-zero"))
    max_order: Optional[int] = _opt(f"Highest order of a multistep solver [default: its own, "
                                    f"{' or '.join(map(str, _MAX_ORDERS))}]", kind="int", lo=1, hi=max(_MAX_ORDERS),
                                    flag="--max-order", solver_option=True)

    # ----- construction

    @classmethod
    def from_options(cls, **options: Any) -> SamplerSettings:
        """Settings from keyword options (None = unset); an unknown name is one InputError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in names:
                meant = ALIASES.get(key)
                hint = f" (the API calls it {meant})" if meant in names else ""
                raise InputError(f"unknown sampler option {key!r}{hint}; the options are {', '.join(sorted(names))}",
                                 param=key)
        values = {k: v for k, v in options.items() if v is not None}
        return cls(**values).checked()

    @classmethod
    def coerce(cls, settings: Any) -> SamplerSettings:
        """Settings as given, or built from a mapping of options."""
        if isinstance(settings, cls):
            return settings
        if settings is not None and not isinstance(settings, Mapping):
            hint = f" (for the solver, {{'solver': {settings!r}}})" if isinstance(settings, str) else ""
            raise InputError(f"settings must be SamplerSettings or a mapping of sampler options, got "
                             f"{type(settings).__name__} {settings!r:.60}{hint}", param="settings")
        return cls.from_options(**dict(settings or {}))

    def replace(self, **changes: Any) -> SamplerSettings:
        return dataclasses.replace(self, **changes).checked()

    # ----- what is set

    def given(self) -> dict[str, Any]:
        """The options set explicitly (what a run record holds), as JSON-ready values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or v is False or (isinstance(v, float) and v == math.inf):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def solver_name(self) -> str:
        return self.solver or "heun"

    @property
    def ablation_given(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.metadata.get("ablation") and getattr(self, f.name) is not None]

    @property
    def fast_given(self) -> list[str]:
        """Options of the flat solver family that the reference samplers do not have."""
        return [k for k in ("sigmas", "afs", "denoise_to_zero", "max_order") if getattr(self, k) not in (None, False)]

    @property
    def schedule_params(self) -> dict[str, Any]:
        """The schedule parameters set (rho, epsilon_s, ...: `schedules.SCHEDULE_PARAMS`)."""
        return {k: getattr(self, k) for k in SCHEDULE_PARAM_NAMES if getattr(self, k) is not None}

    @property
    def solver_options(self) -> dict[str, Any]:
        """The options set that go to the solver's program (churn, afs, max_order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("solver_option") and getattr(self, f.name) not in (None, False)}

    @property
    def uses_reference_sampler(self) -> bool:
        """heun/euler on the paper's discretizations with nothing of the fast family: `edm_sampler` /
        `ablation_sampler`, bit for bit as the reference `generate.py` would run them."""
        return (self.solver_name in REFERENCE_SOLVERS and self.discretization in (None, *sch.DISCRETIZATIONS)
                and not self.fast_given)

    # ----- checks

    def checked(self) -> SamplerSettings:
        """Every check that needs no model; returns the settings with values normalised."""
        s = dataclasses.replace(self, **{f.name: _check_value(f, getattr(self, f.name)) for f in dataclasses.fields(self)})
        s._check_combinations()
        return s

    def _check_combinations(self) -> None:
        solver = self.solver_name
        spec = slv.get_solver(solver)
        if self.nfe is not None and (self.num_steps is not None or self.sigmas is not None):
            raise InputError("give nfe or num_steps (or sigmas), not both", param=("nfe", "num_steps", "sigmas"))
        if self.sigmas is not None:
            for name in ("num_steps", "discretization", "sigma_min", "sigma_max", *SCHEDULE_PARAM_NAMES):
                if getattr(self, name) is not None:
                    raise InputError(f"{name} does not apply when sigmas is given (the list is the schedule)", param=name)
        if self.nfe is not None and spec.time_points_for_nfe is not None and self.discretization is None:
            self._check_own_time_points(solver)
        if self.S_min is not None and self.S_max is not None and self.S_min > self.S_max:
            raise InputError(f"S_min ({self.S_min:g}) must not exceed S_max ({self.S_max:g})", param="S_min")
        slv.check_solver_options(solver, self.solver_options, denoise_to_zero=self.denoise_to_zero,
                                 explicit_sigmas=self.sigmas is not None)
        if self.max_order is not None:
            highest = spec.max_order
            if self.max_order > highest:
                raise InputError(f"max_order must be an integer from 1 to {highest} for the {solver} solver, "
                                 f"got {self.max_order}", param="max_order")
        if self.uses_reference_sampler:
            self._check_reference_parameters()
            return
        if self.ablation_given:
            key = self.ablation_given[0]
            raise InputError(f"{key} (an ablation option of the paper) applies to the {' and '.join(REFERENCE_SOLVERS)} "
                             f"solvers on the {', '.join(sch.DISCRETIZATIONS)} discretizations without sigmas, afs or denoise_to_zero",
                             param=key)
        disc = self.discretization or "edm"
        for name in self.schedule_params:
            if name not in sch.SCHEDULE_PARAMS[disc]:
                takes = ", ".join(sch.SCHEDULE_PARAMS[disc]) or "no parameters"
                raise InputError(f"{name} does not apply to the {disc} schedule (it takes {takes})", param=name)

    def _check_own_time_points(self, solver: str) -> None:
        """`nfe` on a solver with its own time points (consistency: sigma_max down to 0.821): only sigma_max applies."""
        last = float(slv.get_solver(solver).time_points_for_nfe(2, 80.0)[-1])  # where the solver's points end
        for name in ("sigma_min", *SCHEDULE_PARAM_NAMES):
            if getattr(self, name) is not None:
                raise InputError(f"{name} does not apply to the {solver} solver's own time points for nfe (sigma_max "
                                 f"down to {last:g}); give sigmas to choose others", param=name)
        if self.sigma_max is not None and self.nfe > 1 and self.sigma_max <= last:
            raise InputError(f"sigma_max must be above {last:g}, the last of the {solver} "
                             f"solver's time points for nfe {self.nfe}; give sigmas to choose others",
                             param="sigma_max")

    def _check_reference_parameters(self) -> None:
        """The reference samplers read rho only on edm, epsilon_s only where VP appears, C_1/C_2/M only on iddpm."""
        disc = self.discretization or "edm"
        vp = disc == "vp" or self.schedule == "vp" or self.scaling == "vp"
        uses = {"rho": disc == "edm", "epsilon_s": vp, "C_1": disc == "iddpm", "C_2": disc == "iddpm", "M": disc == "iddpm"}
        where = {"rho": "the edm discretization", "epsilon_s": "a vp discretization, schedule or scaling",
                 "C_1": "the iddpm discretization", "C_2": "the iddpm discretization", "M": "the iddpm discretization"}
        for name, used in uses.items():
            if getattr(self, name) is not None and not used:
                raise InputError(f"{name} does not apply to the {disc} discretization here: the {self.solver_name} "
                                 f"sampler reads it only on {where[name]}", param=name)


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    """One field's value, type-checked and normalised (ints stay ints, sigmas a tuple of floats)."""
    if value is None:
        return None
    meta, name = f.metadata, f.name
    kind = meta["kind"]
    if kind == "flag":
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"{name} must be True or False, got {value!r}", param=name)
        return bool(value)
    if kind == "choice":
        if value not in meta["choices"]:
            raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(meta['choices'])}", param=name)
        return value
    if kind == "sigmas":
        arr = sch.check_sigma_list(value)
        _check_float32(name, float(arr[0]))
        _check_float32(name, float(arr[arr > 0][-1]))  # the lowest level too: 1e-300 would be 0 to the network
        return tuple(float(v) for v in arr)
    if kind == "int":
        value = check_int(value, name)
    else:
        value = check_number(value, name, allow_inf=meta["allow_inf"])
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise InputError(f"{name} must be {'>' if meta['lo_open'] else '>='} {lo:g}, got {shown(value)}", param=name)
    if hi is not None and value > hi:
        raise InputError(f"{name} must be <= {hi:g}, got {shown(value)}", param=name)
    if kind == "float" and not math.isinf(value):
        _check_float32(name, value)
    return value


def _check_float32(name: str, value: float) -> None:
    """The network computes in float32 at best: a level beyond its range would turn into inf or 0 there."""
    if abs(value) > FLOAT32_MAX:
        raise InputError(f"{name} {value:g} is beyond the float32 range the network computes in (|x| <= {FLOAT32_MAX:.4g})",
                         param=name)
    if name.startswith("sigma") and 0 < value < float(np.finfo(np.float32).tiny):
        raise InputError(f"{name} {value:g} is below the smallest float32 noise level the network can see "
                         f"({float(np.finfo(np.float32).tiny):.4g})", param=name)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(SamplerSettings))
