"""The EDM paper's samplers around any denoiser that follows the contract (`contract.py`).

* `edm_sampler`: Algorithm 2 of the paper. Deterministic Heun with the EDM time steps when
  S_churn = 0; with churn, noise is added inside [S_min, S_max] and scaled by S_noise. The last
  step to sigma = 0 is Euler, so NFE = 2N - 1.
* `ablation_sampler`: the generalised sampler of the paper's section 3 (Algorithm 1 + churn):
  Euler or Heun (or any alpha for the second-order point), any discretization, sigma(t)
  schedule and s(t) scaling of Table 1.

Both share one loop, so `ablation_sampler(solver='heun', discretization='edm',
schedule='linear', scaling='none')` returns exactly what `edm_sampler` returns. Names, defaults,
clamping to the network's sigma range, `round_sigma` at every evaluated level and the float64
state follow the reference implementation. The network is called with float64 x and a float64
sigma per row; backends cast to what they run in.

Noise: `randn_like(x)` is called for every step whenever any step adds noise (the reference's
stream order, so an external noise stream reproduces exactly) and never for a fully deterministic
run, where it would be multiplied by zero anyway.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from edm_deploy.runtime import schedules as sch
from edm_deploy.runtime.contract import check_batch, check_denoiser
from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.xp import from_host, to_float64

SOLVERS = ("heun", "euler")


def nfe(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per image: 2N - 1 for Heun (the last step is Euler), N for Euler."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps


def _default_randn_like(x):
    return np.random.standard_normal(x.shape)


def _clamped_range(net, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    lo = max(float(sigma_min), float(net.sigma_min))
    hi = min(float(sigma_max), float(net.sigma_max))
    sch.check_sigma_range(lo, hi)
    return lo, hi


def _check_churn(S_churn: float, S_min: float, S_max: float, S_noise: float) -> None:
    if S_churn < 0:
        raise InputError(f"S_churn must be >= 0, got {S_churn}")
    if S_noise < 0:
        raise InputError(f"S_noise must be >= 0, got {S_noise}")
    if S_min > S_max:
        raise InputError(f"S_min ({S_min}) must not exceed S_max ({S_max})")


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
    callback: Optional[Callable[[int, int], None]] = None,
):
    """EDM Algorithm 2 (deterministic Heun when S_churn = 0). Returns the float64 end state."""
    check_denoiser(net)
    check_batch(net, latents, class_labels)
    num_steps = sch.check_num_steps(num_steps)
    lo, hi = _clamped_range(net, sigma_min, sigma_max)
    sigmas = sch.edm_sigma_steps(num_steps, lo, hi, rho)
    t_steps = np.append(np.asarray(net.round_sigma(sigmas), dtype=np.float64), 0.0)
    return _sample_loop(
        net, latents, class_labels, randn_like, t_steps, sch.LinearSchedule(), sch.NoScaling(),
        "heun", 1.0, S_churn, S_min, S_max, S_noise, callback,
    )


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
    callback: Optional[Callable[[int, int], None]] = None,
):
    """The paper's generalised sampler (solver, discretization, schedule, scaling, alpha)."""
    check_denoiser(net)
    check_batch(net, latents, class_labels)
    num_steps = sch.check_num_steps(num_steps)
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must lie in (0, 1], got {alpha}")
    default_lo, default_hi = sch.default_sigma_range(discretization, epsilon_s)
    lo, hi = _clamped_range(net, default_lo if sigma_min is None else sigma_min,
                            default_hi if sigma_max is None else sigma_max)

    # The VP schedule is re-fitted to the (clamped) range, as in the reference.
    beta_d, beta_min = sch.vp_betas_for_range(lo, hi, epsilon_s)
    sigma_fn = sch.make_schedule(schedule, beta_d, beta_min)
    scale_fn = sch.make_scaling(scaling, sigma_fn)
    sigmas = sch.sigma_steps(discretization, num_steps, lo, hi, rho=rho, epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M)
    t_steps = np.asarray(sigma_fn.sigma_inv(np.asarray(net.round_sigma(sigmas), dtype=np.float64)), dtype=np.float64)
    t_steps = np.append(t_steps, 0.0)
    return _sample_loop(
        net, latents, class_labels, randn_like, t_steps, sigma_fn, scale_fn,
        solver, float(alpha), S_churn, S_min, S_max, S_noise, callback,
    )


def _sample_loop(
    net, latents, class_labels, randn_like, t_steps, sigma_fn, scale_fn,
    solver, alpha, S_churn, S_min, S_max, S_noise, callback,
):
    """One loop for both samplers; the linear/none case takes the paper's simplified formulas."""
    _check_churn(S_churn, S_min, S_max, S_noise)
    num_steps = len(t_steps) - 1
    edm_form = isinstance(sigma_fn, sch.LinearSchedule) and isinstance(scale_fn, sch.NoScaling)
    unscaled = isinstance(scale_fn, sch.NoScaling)

    sigma = lambda t: float(sigma_fn.sigma(t))  # noqa: E731
    s = lambda t: 1.0 if unscaled else float(scale_fn.s(t))  # noqa: E731
    round_sigma = lambda v: float(np.asarray(net.round_sigma(np.array([v], dtype=np.float64))).reshape(-1)[0])  # noqa: E731
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= sigma(t) <= S_max else 0.0 for t in t_steps[:-1]]
    stochastic = any(g > 0 for g in gammas)
    batch = latents.shape[0]

    def denoise(x, t):
        x_in = x if unscaled else x / s(t)
        sig = np.full(batch, sigma(t), dtype=np.float64)
        return to_float64(net(x_in, sig, class_labels))

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
        d_cur = derivative(x_hat, denoise(x_hat, t_hat), t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime = t_next if alpha == 1 else t_hat + alpha * h
            x_prime = x_hat + (h if alpha == 1 else alpha * h) * d_cur
            d_prime = derivative(x_prime, denoise(x_prime, t_prime), t_prime)
            w = 1 / (2 * alpha)
            x_next = x_hat + h * ((1 - w) * d_cur + w * d_prime)
        if callback is not None:
            callback(i, num_steps)
    return x_next
