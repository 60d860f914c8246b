"""Noise-level discretizations, sigma(t) schedules and s(t) scalings of the EDM paper (Table 1).

Everything here is host-side float64 NumPy: a sampler computes its handful of time steps once and
then only multiplies its state by Python floats, which keeps the state's array library (NumPy,
CuPy, torch) free to live on any device.

Names and defaults follow the paper's reference implementation (`ablation_sampler`), so a user
can move settings across unchanged:

* discretizations: ``edm`` (rho ramp), ``vp`` (uniform t in [1, epsilon_s]), ``ve`` (geometric
  sigma^2), ``iddpm`` (the improved-DDPM discrete table u_j with C_1, C_2, M);
* schedules sigma(t): ``vp``, ``ve`` (sqrt t), ``linear`` (t), each with derivative and inverse;
* scalings s(t): ``vp`` (1/sqrt(1+sigma^2)) and ``none`` (1), each with derivative.

Time-step schedules as data (for the flat solvers of `solvers.py`): `schedule_sigmas(name, ...)`
returns the float64 sigmas sigma_0 > ... > sigma_{N-1} > 0 (no trailing zero) of any name in
`SCHEDULE_NAMES`: the four discretizations above plus ``logsnr`` (uniform in log-SNR, i.e. in
log sigma) and ``time-uniform`` (uniform in a rho-warped VP time), both as zju-pi/diff-sampler's
`get_schedule` defines them. `check_sigma_list` validates an explicit list.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Union

import numpy as np

from .errors import InputError, check_int, param_error

ArrayLike = Union[float, np.ndarray]

DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")
SCHEDULES = ("linear", "vp", "ve")
SCALINGS = ("none", "vp")

# Constants of the VP baseline (Song et al.), as used by the reference sampler.
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_EPSILON_S = 1e-3


# The most time points one schedule may have, however it is given (`num_steps`, an explicit
# `sigmas` list, a schedule file): far beyond any useful sampler (the paper's largest is 256), and
# small enough that the list, its checks and a run record holding it stay a few MB.
MAX_STEPS = 100_000


def check_num_steps(num_steps: int) -> int:
    """Reject non-integer, non-positive or more than `MAX_STEPS` step counts with one clear message."""
    num_steps = check_int(num_steps, "num_steps", lo=1)
    if num_steps > MAX_STEPS:
        raise InputError(f"num_steps must be at most {MAX_STEPS:,}, got {num_steps:,}", param="num_steps")
    return num_steps


def check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    """A usable range is finite, positive and strictly increasing."""
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)):
        raise InputError(f"sigma_min and sigma_max must be finite, got {sigma_min} and {sigma_max}")
    if sigma_min <= 0:
        raise InputError(f"sigma_min must be > 0, got {sigma_min}")
    if sigma_min >= sigma_max:
        raise InputError(f"sigma_min ({sigma_min:g}) must be smaller than sigma_max ({sigma_max:g})")


def _ramp(num_steps: int) -> np.ndarray:
    """i / (N - 1) for i = 0..N-1 (a single step sits at the start of the range)."""
    if num_steps == 1:
        return np.zeros(1, dtype=np.float64)
    return np.arange(num_steps, dtype=np.float64) / (num_steps - 1)


RHO_RANGE = (0.01, 1000.0)  # sigma**(1/rho) overflows float64 for rho below ~0.006 at sigma 80


def check_rho(rho: float) -> None:
    lo, hi = RHO_RANGE
    if not (isinstance(rho, (int, float, np.floating)) and lo <= rho <= hi):
        raise param_error("rho", f"rho must lie in [{lo:g}, {hi:g}], got {rho!r}")


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    num_steps = check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    check_rho(rho)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + _ramp(num_steps) * (b - a)) ** rho


def vp_sigma(t: ArrayLike, beta_d: float, beta_min: float) -> ArrayLike:
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return np.sqrt(np.exp(0.5 * beta_d * np.square(t) + beta_min * t) - 1)


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = VP_EPSILON_S) -> tuple[float, float]:
    """The (beta_d, beta_min) whose VP schedule hits sigma_max at t=1 and sigma_min at t=epsilon_s."""
    beta_d = 2 * (np.log(sigma_min**2 + 1) / epsilon_s - np.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max**2 + 1) - 0.5 * beta_d
    return float(beta_d), float(beta_min)


def vp_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = VP_EPSILON_S) -> np.ndarray:
    """VP discretization: t uniform from 1 down to epsilon_s, mapped through sigma_VP(t)."""
    num_steps = check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    t = 1 + _ramp(num_steps) * (epsilon_s - 1)
    return vp_sigma(t, beta_d, beta_min)


def ve_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """VE discretization: sigma^2 geometric between sigma_max^2 and sigma_min^2."""
    num_steps = check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** _ramp(num_steps)
    return np.sqrt(t)


@functools.lru_cache(maxsize=8)
def _iddpm_table(M: int, C_1: float, C_2: float, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    u = np.zeros(M + 1, dtype=dt)

    def alpha_bar(j: int) -> float:
        return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

    for j in range(M, 0, -1):
        ratio = max(alpha_bar(j - 1) / alpha_bar(j), C_1)
        u[j - 1] = dt.type(np.sqrt((np.float64(u[j]) ** 2 + 1) / ratio - 1))
    u.setflags(write=False)
    return u


def iddpm_sigma_table(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008, dtype: str = "float64") -> np.ndarray:
    """Improved-DDPM noise levels u_0 > ... > u_M = 0 (EDM appendix C.3.4), read-only.

    ``u[j-1] = sqrt((u[j]^2 + 1) / max(alpha_bar(j-1)/alpha_bar(j), C_1) - 1)`` with
    ``alpha_bar(j) = sin^2(pi/2 * j / M / (C_2 + 1))``. The sampler uses float64; networks snap
    sigma onto a float32 copy, as the reference keeps its table in a float32 buffer.
    """
    if M < 2:
        raise InputError(f"iDDPM needs M >= 2, got {M}")
    return _iddpm_table(int(M), float(C_1), float(C_2), dtype)


def iddpm_sigma_steps(
    num_steps: int, sigma_min: float, sigma_max: float, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000
) -> np.ndarray:
    """iDDPM discretization: N entries of the u table inside [sigma_min, sigma_max], evenly by index."""
    num_steps = check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    u = iddpm_sigma_table(M, C_1, C_2)
    inside = u[(u >= sigma_min) & (u <= sigma_max)]
    if inside.size == 0:
        raise InputError(f"no iDDPM noise level lies in [{sigma_min:g}, {sigma_max:g}]")
    index = np.round((inside.size - 1) * _ramp(num_steps)).astype(np.int64)
    return inside[index]


def sigma_steps(
    discretization: str,
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    epsilon_s: float = VP_EPSILON_S,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
) -> np.ndarray:
    """Noise levels sigma_0 > ... > sigma_{N-1} of the named discretization (no trailing zero)."""
    if discretization == "edm":
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    if discretization == "vp":
        return vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s)
    if discretization == "ve":
        return ve_sigma_steps(num_steps, sigma_min, sigma_max)
    if discretization == "iddpm":
        return iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1, C_2, M)
    raise InputError(f"unknown discretization {discretization!r}; choose one of {', '.join(DISCRETIZATIONS)}")


def default_sigma_range(discretization: str, epsilon_s: float = VP_EPSILON_S) -> tuple[float, float]:
    """The reference's default (sigma_min, sigma_max) per discretization."""
    if discretization == "vp":
        return (float(vp_sigma(epsilon_s, VP_BETA_D, VP_BETA_MIN)), float(vp_sigma(1.0, VP_BETA_D, VP_BETA_MIN)))
    ranges = {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}
    if discretization not in ranges:
        raise InputError(f"unknown discretization {discretization!r}; choose one of {', '.join(DISCRETIZATIONS)}")
    return ranges[discretization]


# --------------------------------------------------------------------------------------------
# Time-step schedules as data: one dispatcher by name, plus validation of explicit lists

SCHEDULE_NAMES = ("edm", "vp", "ve", "iddpm", "logsnr", "time-uniform")

# Which keyword parameters each schedule uses (any other one given is an error, not ignored).
SCHEDULE_PARAMS = {
    "edm": ("rho",),
    "vp": ("epsilon_s",),
    "ve": (),
    "iddpm": ("C_1", "C_2", "M"),
    "logsnr": (),
    "time-uniform": ("rho", "epsilon_s"),
}
# Every schedule parameter, each once, in first-use order.
SCHEDULE_PARAM_NAMES = tuple(dict.fromkeys(name for params in SCHEDULE_PARAMS.values() for name in params))

# (sigma_min, sigma_max) of the schedules the EDM reference does not define: diff-sampler's defaults.
_FAST_SAMPLER_RANGE = (0.002, 80.0)


def symmetric_linspace(start: float, end: float, num: int) -> np.ndarray:
    """`num` evenly spaced float64 values from `start` to `end`, both ends exact.

    The first half counts up from `start`, the second half down from `end` (the way torch's
    `linspace` computes it), so the schedules below land on the same sigmas as diff-sampler's.
    """
    if num == 1:
        return np.array([start], dtype=np.float64)
    step = (end - start) / (num - 1)
    idx = np.arange(num, dtype=np.float64)
    half = num // 2
    return np.where(idx < half, start + step * idx, end - step * (num - 1 - idx))


def logsnr_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log-SNR: lambda = -log sigma evenly spaced (k-diffusion's 'exponential').

    Exponential integrators (DPM-Solver++, UniPC) take equal steps h in lambda on this grid.
    """
    num_steps = check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    lam = symmetric_linspace(-math.log(sigma_max), -math.log(sigma_min), num_steps)
    return np.exp(-lam)


def time_uniform_sigma_steps(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, epsilon_s: float = VP_EPSILON_S
) -> np.ndarray:
    """Uniform in VP time warped by rho: t_i = (1 + i/(N-1) (epsilon_s^(1/rho) - 1))^rho, sigma = sigma_VP(t_i).

    The VP schedule is fitted to [sigma_min, sigma_max] as in `vp_betas_for_range`; rho = 1 is
    the VP discretization. sigma_VP is evaluated as e**u, not exp(u), like diff-sampler's
    `get_schedule(schedule_type='time_uniform')`, so the levels agree to the last bit there.
    """
    num_steps = check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    if not rho > 0:
        raise param_error("rho", f"rho must be > 0, got {rho}")
    if not 0 < epsilon_s < 1:
        raise param_error("epsilon_s", f"epsilon_s must lie in (0, 1), got {epsilon_s}")
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    t = (1 + _ramp(num_steps) * (epsilon_s ** (1 / rho) - 1)) ** rho
    return (np.power(np.e, 0.5 * beta_d * (t**2) + beta_min * t) - 1) ** 0.5


def schedule_sigmas(name: str, num_steps: int, sigma_min: float, sigma_max: float, **params: float) -> np.ndarray:
    """The named schedule's float64 sigmas, strictly decreasing from sigma_max, no trailing zero.

    `params` are the schedule's own parameters (`SCHEDULE_PARAMS`); one that the schedule does not
    use is an error rather than silently ignored.
    """
    if name not in SCHEDULE_NAMES:
        raise param_error("schedule", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    unused = sorted(set(params) - set(SCHEDULE_PARAMS[name]))
    if unused:
        takes = ", ".join(SCHEDULE_PARAMS[name]) or "no parameters"
        raise param_error(unused[0], f"{unused[0]} does not apply to the {name} schedule (it takes {takes})")
    if name == "logsnr":
        return logsnr_sigma_steps(num_steps, sigma_min, sigma_max)
    if name == "time-uniform":
        return time_uniform_sigma_steps(num_steps, sigma_min, sigma_max, **params)
    return sigma_steps(name, num_steps, sigma_min, sigma_max, **params)


def schedule_default_range(name: str) -> tuple[float, float]:
    """Default (sigma_min, sigma_max) of a schedule: the EDM reference's, or diff-sampler's (0.002, 80)."""
    if name not in SCHEDULE_NAMES:
        raise param_error("schedule", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if name in DISCRETIZATIONS:
        return default_sigma_range(name)
    return _FAST_SAMPLER_RANGE


def check_sigma_list(sigmas, name: str = "sigmas") -> np.ndarray:
    """An explicit list of time points as float64: finite, positive, strictly decreasing, optional final 0.

    Anything else is one InputError naming the first offending entry, so a hand-written or
    searched schedule (AYS, GITS) fails before any network evaluation.
    """
    count = _count_time_points(sigmas, name)
    if count > MAX_STEPS + 1:  # a final 0 is not a step
        raise param_error(name, f"{name} holds {count:,} time points; at most {MAX_STEPS:,} (plus a final 0) "
                                "are allowed, as for num_steps")
    _check_number_types(sigmas, name)
    try:
        arr = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise param_error(name, f"{name} must be a list of numbers, got {_short(sigmas)}") from None
    if arr.ndim != 1:
        raise param_error(name, f"{name} must be a flat list of numbers, got shape {list(arr.shape)}")
    if arr.size == 0:
        raise param_error(name, f"{name} is empty; give at least one positive noise level")
    for i, v in enumerate(arr):
        if not math.isfinite(v):
            raise param_error(name, f"{name} must be finite: {name}[{i}] = {v}")
        if v < 0 or (v == 0 and i != arr.size - 1):
            raise param_error(name, f"{name} must be positive except for a final 0: {name}[{i}] = {v:g}")
        if i > 0 and not v < arr[i - 1]:
            raise param_error(name, f"{name} must be strictly decreasing: {name}[{i}] = {v:g} follows {arr[i - 1]:g}")
    if arr[0] == 0:
        raise param_error(name, f"{name} must start with a positive noise level, got {arr.tolist()}")
    return arr


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _count_time_points(sigmas: object, name: str) -> int:
    """How many entries `sigmas` has, found without converting it (so a huge list costs nothing)."""
    if isinstance(sigmas, np.ndarray):
        return int(sigmas.shape[0]) if sigmas.ndim else 1
    try:
        return len(sigmas)  # type: ignore[arg-type]
    except TypeError:
        raise param_error(name, f"{name} must be a list of numbers, got {_short(sigmas)}") from None


def _check_number_types(sigmas: object, name: str) -> None:
    """Entries must be numbers: NumPy would read ``"80"`` as 80.0 and ``True`` as 1.0 without a word."""
    if isinstance(sigmas, np.ndarray) and sigmas.dtype.kind != "O":
        if sigmas.dtype.kind not in "iuf":
            raise param_error(name, f"{name} must hold numbers, got an array of {sigmas.dtype}")
        return
    if isinstance(sigmas, (str, bytes)):
        raise param_error(name, f"{name} must be a list of numbers, got the text {_short(sigmas)}")
    for i, v in enumerate(sigmas):  # type: ignore[union-attr]
        if isinstance(v, (list, tuple, np.ndarray)):
            continue  # a nested list: the shape check names it
        # a number: int, float, NumPy scalars, or any scalar type with __float__ (a 0-d torch tensor)
        if isinstance(v, (bool, np.bool_)) or not (isinstance(v, (int, float, np.number)) or hasattr(v, "__float__")):
            raise param_error(name, f"{name} must be a list of numbers: {name}[{i}] = {_short(v)} is a {type(v).__name__}")


# --------------------------------------------------------------------------------------------
# sigma(t) schedules and s(t) scalings


@dataclass(frozen=True)
class LinearSchedule:
    """sigma(t) = t: the EDM choice, under which the probability-flow ODE is dx/dt = (x - D)/t."""

    name = "linear"

    def sigma(self, t: ArrayLike) -> ArrayLike:
        return t

    def sigma_deriv(self, t: ArrayLike) -> ArrayLike:
        return np.ones_like(t) if isinstance(t, np.ndarray) else 1.0

    def sigma_inv(self, sigma: ArrayLike) -> ArrayLike:
        return sigma


@dataclass(frozen=True)
class VESchedule:
    """sigma(t) = sqrt(t) (variance exploding)."""

    name = "ve"

    def sigma(self, t: ArrayLike) -> ArrayLike:
        return np.sqrt(t)

    def sigma_deriv(self, t: ArrayLike) -> ArrayLike:
        return 0.5 / np.sqrt(t)

    def sigma_inv(self, sigma: ArrayLike) -> ArrayLike:
        return np.square(sigma)


@dataclass(frozen=True)
class VPSchedule:
    """sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) (variance preserving)."""

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN
    name = "vp"

    def sigma(self, t: ArrayLike) -> ArrayLike:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_deriv(self, t: ArrayLike) -> ArrayLike:
        s = self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (s + 1 / s)

    def sigma_inv(self, sigma: ArrayLike) -> ArrayLike:
        return (np.sqrt(self.beta_min**2 + 2 * self.beta_d * np.log(np.square(sigma) + 1)) - self.beta_min) / self.beta_d


@dataclass(frozen=True)
class NoScaling:
    """s(t) = 1: the network sees x directly."""

    name = "none"

    def s(self, t: ArrayLike) -> ArrayLike:
        return np.ones_like(t) if isinstance(t, np.ndarray) else 1.0

    def s_deriv(self, t: ArrayLike) -> ArrayLike:
        return np.zeros_like(t) if isinstance(t, np.ndarray) else 0.0


@dataclass(frozen=True)
class VPScaling:
    """s(t) = 1/sqrt(1 + sigma(t)^2), with s'(t) = -sigma sigma' s^3 under the given schedule."""

    schedule: object
    name = "vp"

    def s(self, t: ArrayLike) -> ArrayLike:
        return 1 / np.sqrt(1 + np.square(self.schedule.sigma(t)))

    def s_deriv(self, t: ArrayLike) -> ArrayLike:
        return -self.schedule.sigma(t) * self.schedule.sigma_deriv(t) * self.s(t) ** 3


def make_schedule(name: str, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """sigma(t) schedule by name: 'linear', 'vp' (with the given betas) or 've'."""
    if name == "linear":
        return LinearSchedule()
    if name == "ve":
        return VESchedule()
    if name == "vp":
        return VPSchedule(beta_d, beta_min)
    raise InputError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def make_scaling(name: str, schedule) -> object:
    """s(t) scaling by name: 'none' or 'vp'."""
    if name == "none":
        return NoScaling()
    if name == "vp":
        return VPScaling(schedule)
    raise InputError(f"unknown scaling {name!r}; choose one of {', '.join(SCALINGS)}")
