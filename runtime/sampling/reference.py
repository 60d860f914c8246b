"""The EDM paper's reference samplers, bit for bit, around any denoiser of the contract (`core/contract.py`).

`edm_sampler` is Algorithm 2 (Heun, churn, the last step Euler); `ablation_sampler` the
generalised sampler of section 3 (Euler or Heun or any alpha, any discretization, sigma(t) and
s(t) of Table 1), also as a step program (`ablation_program`) for the planner. In the EDM form
(sigma(t) = t, s(t) = 1, alpha = 1) both run the flat Heun/Euler programs of `solvers.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..core import schedules as sch
from ..core.contract import check_batch, check_denoiser
from ..core.errors import InputError
from ..core.xp import from_host, to_float64
from . import solvers as slv
from .solvers import StepInfo

SOLVERS = ("heun", "euler")

Callback = Optional[Callable[[StepInfo], None]]


def nfe(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per image of the reference samplers for ``num_steps`` time points (the registry's count)."""
    return slv.get_solver(solver).nfe(num_steps)


_default_randn_like = slv.default_randn_like


def clamped_range(net, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """[sigma_min, sigma_max] inside the network's range, as the reference clamps it."""
    lo = max(float(sigma_min), float(net.sigma_min))
    hi = min(float(sigma_max), float(net.sigma_max))
    sch.check_sigma_range(lo, hi)
    return lo, hi


def edm_sampler(
    net: Any,
    latents: Any,
    class_labels: Any = None,
    randn_like: Callable = _default_randn_like,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    callback: Callback = None,
):
    """EDM Algorithm 2 (deterministic Heun when S_churn = 0). Returns the float64 end state."""
    check_denoiser(net)
    check_batch(net, latents, class_labels)
    num_steps = sch.check_num_steps(num_steps)
    lo, hi = clamped_range(net, sigma_min, sigma_max)
    sigmas = sch.edm_sigma_steps(num_steps, lo, hi, rho)
    t_steps = np.append(np.asarray(net.round_sigma(sigmas), dtype=np.float64), 0.0)
    x = to_float64(latents) * float(t_steps[0])
    program = slv.heun_program(x, t_steps, callback=callback, round_sigma=net.round_sigma, S_churn=S_churn, S_min=S_min,
                               S_max=S_max, S_noise=S_noise, randn_like=randn_like)
    return slv.run_program(net, program, class_labels)


@dataclass
class AblationSetup:
    """The paper's generalised sampler, resolved for one network: time steps t_i and the sigma(t), s(t) in use."""

    t_steps: np.ndarray                # the t_i, a final 0 appended
    sigma_fn: Any
    scale_fn: Any

    @property
    def is_edm_form(self) -> bool:
        """sigma(t) = t and s(t) = 1: the flat Euler/Heun programs apply."""
        return isinstance(self.sigma_fn, sch.LinearSchedule) and isinstance(self.scale_fn, sch.NoScaling)

    @property
    def sigmas(self) -> np.ndarray:
        """The noise levels the steps start from, sigma(t_i), and the final 0."""
        return np.append(np.asarray(self.sigma_fn.sigma(self.t_steps[:-1]), dtype=np.float64), 0.0)


def ablation_setup(
    net: Any, num_steps: int = 18, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
    rho: float = 7, discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
    epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
) -> AblationSetup:
    """The reference's time steps for ``net``: the discretization's sigmas in the (clamped) range,
    rounded by the network, mapped to t by the schedule's inverse; the VP schedule re-fitted to the range."""
    num_steps = sch.check_num_steps(num_steps)
    default_lo, default_hi = sch.default_sigma_range(discretization, epsilon_s)
    lo, hi = clamped_range(net, default_lo if sigma_min is None else sigma_min,
                            default_hi if sigma_max is None else sigma_max)
    beta_d, beta_min = sch.vp_betas_for_range(lo, hi, epsilon_s)
    sigma_fn = sch.make_schedule(schedule, beta_d, beta_min)
    scale_fn = sch.make_scaling(scaling, sigma_fn)
    sigmas = sch.sigma_steps(discretization, num_steps, lo, hi, rho=rho, epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M)
    t_steps = np.asarray(sigma_fn.sigma_inv(np.asarray(net.round_sigma(sigmas), dtype=np.float64)), dtype=np.float64)
    return AblationSetup(np.append(t_steps, 0.0), sigma_fn, scale_fn)


def ablation_program(
    setup: AblationSetup, latents: Any, round_sigma: Callable, randn_like: Callable = _default_randn_like,
    solver: str = "heun", alpha: float = 1, S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"),
    S_noise: float = 1, callback: Callback = None,
) -> slv.Program:
    """The generalised sampler as a step program: the flat Euler/Heun program in the EDM form
    (sigma(t) = t, s(t) = 1, alpha = 1), the general loop otherwise."""
    _check_solver_and_alpha(solver, alpha)
    if setup.is_edm_form and alpha == 1:
        program = slv.heun_program if solver == "heun" else slv.euler_program
        x = to_float64(latents) * float(setup.t_steps[0])
        return program(x, setup.t_steps, callback=callback, round_sigma=round_sigma, S_churn=S_churn, S_min=S_min,
                       S_max=S_max, S_noise=S_noise, randn_like=randn_like)
    return _general_program(latents, randn_like, setup, round_sigma, solver, float(alpha), S_churn, S_min, S_max,
                            S_noise, callback)


def ablation_sampler(
    net: Any,
    latents: Any,
    class_labels: Any = None,
    randn_like: Callable = _default_randn_like,
    num_steps: int = 18,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    alpha: float = 1,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    callback: Callback = None,
):
    """The paper's generalised sampler (solver, discretization, schedule, scaling, alpha)."""
    check_denoiser(net)
    check_batch(net, latents, class_labels)
    num_steps = sch.check_num_steps(num_steps)
    _check_solver_and_alpha(solver, alpha)
    setup = ablation_setup(net, num_steps, sigma_min, sigma_max, rho, discretization, schedule, scaling, epsilon_s,
                           C_1, C_2, M)
    program = ablation_program(setup, latents, net.round_sigma, randn_like, solver, alpha, S_churn, S_min, S_max,
                               S_noise, callback)
    return slv.run_program(net, program, class_labels)


def _check_solver_and_alpha(solver: str, alpha: float) -> None:
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must lie in (0, 1], got {alpha}")


def _general_program(
    latents, randn_like, setup, round_sigma_fn, solver, alpha, S_churn, S_min, S_max, S_noise, callback,
) -> slv.Program:
    """The general loop (any sigma(t), s(t), alpha); linear/none with alpha != 1 takes the paper's simplified formulas.

    Each evaluation is asked for at the network's input x / s(t) and noise level sigma(t).
    """
    t_steps, sigma_fn, scale_fn = setup.t_steps, setup.sigma_fn, setup.scale_fn
    slv.check_churn(S_churn, S_min, S_max, S_noise)
    num_steps = len(t_steps) - 1
    edm_form = setup.is_edm_form
    unscaled = isinstance(scale_fn, sch.NoScaling)

    sigma = lambda t: float(sigma_fn.sigma(t))  # noqa: E731
    s = lambda t: 1.0 if unscaled else float(scale_fn.s(t))  # noqa: E731
    round_sigma = lambda v: float(np.asarray(round_sigma_fn(np.array([v], dtype=np.float64))).reshape(-1)[0])  # noqa: E731
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= sigma(t) <= S_max else 0.0 for t in t_steps[:-1]]
    stochastic = any(g > 0 for g in gammas)

    def derivative(x, denoised, t):
        if edm_form:
            return (x - denoised) / t
        sd = float(sigma_fn.sigma_deriv(t))
        sc_d = 0.0 if unscaled else float(scale_fn.s_deriv(t))
        return (sd / sigma(t) + sc_d / s(t)) * x - sd * s(t) / sigma(t) * denoised

    t_next = float(t_steps[0])
    x_next = to_float64(latents) * (sigma(t_next) * s(t_next))
    for i in range(num_steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        x_cur = x_next

        # Temporarily raise the noise level (churn); the stream is consumed every step if any step churns.
        gamma = gammas[i]
        sigma_cur = sigma(t_cur)
        t_hat = float(sigma_fn.sigma_inv(round_sigma(sigma_cur + gamma * sigma_cur))) if gamma > 0 else t_cur
        x_hat = x_cur if unscaled else (s(t_hat) / s(t_cur)) * x_cur
        if stochastic:
            eps = randn_like(x_cur)
            if gamma > 0:
                noise_std = math.sqrt(max(sigma(t_hat) ** 2 - sigma_cur**2, 0.0)) * s(t_hat) * S_noise
                if isinstance(eps, np.ndarray):
                    eps = from_host(eps, x_cur)
                x_hat = x_hat + noise_std * eps

        # Euler step, then the second-order correction unless this is the last step.
        h = t_next - t_hat
        denoised = yield (x_hat if unscaled else x_hat / s(t_hat)), sigma(t_hat)
        d_cur = derivative(x_hat, denoised, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime = t_next if alpha == 1 else t_hat + alpha * h
            x_prime = x_hat + (h if alpha == 1 else alpha * h) * d_cur
            denoised_prime = yield (x_prime if unscaled else x_prime / s(t_prime)), sigma(t_prime)
            d_prime = derivative(x_prime, denoised_prime, t_prime)
            w = 1 / (2 * alpha)
            x_next = x_hat + h * ((1 - w) * d_cur + w * d_prime)
        if callback is not None:
            callback(StepInfo(i, num_steps, sigma_cur, sigma(t_hat), sigma(t_next), x_next, denoised))
    return x_next
