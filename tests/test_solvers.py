"""The flat solver family against analytic oracles, the registry, the references and today's loop.

* convergence orders under step doubling (global) and from an exact history (local);
* parities that must hold between solvers, NFE = counted network calls, AFS saves one call;
* values of the reference implementations (k-diffusion, diff-sampler) on a tiny case;
* bit-identity of `edm_sampler` / `ablation_sampler` with a fused reference loop written out here;
* batch invariance, a torch state, and one clear InputError for everything a user can get wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edm_deploy.runtime import (
    FiniteSetDenoiser,
    GaussianDenoiser,
    StackedRandomGenerator,
    TableRound,
    ablation_sampler,
    edm_sampler,
    iddpm_sigma_table,
)
from edm_deploy.runtime.core import schedules as sch
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.xp import from_host, to_float64
from edm_deploy.runtime.sampling import solvers as slv
from edm_deploy.runtime.sampling.planner import sample, sampling_sigmas

MULTISTEP = ("dpmpp-3m", "unipc", "ipndm", "ipndm-v", "deis")
AFS_SOLVERS = MULTISTEP
# The probability-flow ODE solvers (all but the consistency-model sampler).
ODE_SOLVER_NAMES = tuple(name for name, spec in slv.SOLVER_REGISTRY.items() if not spec.for_consistency_models)


def unipc_update(den, x, models, times, sigma_next, order, class_labels, use_corrector):
    """One UniPC step with a denoiser at hand: the predictor, then (optionally) the corrector at its end."""
    x_t, step = slv.unipc_predict(x, models, times, sigma_next, order)
    if not use_corrector:
        return x_t, None
    model_t = slv.evaluate(den, x_t, sigma_next, class_labels)
    return slv.unipc_correct(step, model_t), model_t


def gaussian(batch=4, res=8):
    den = GaussianDenoiser(img_channels=1, img_resolution=res, mu=0.3, std=0.5)
    return den, StackedRandomGenerator(range(batch)).randn((1, res, res)).astype(np.float64)


def finite_set(batch, seed0=0):
    rng = np.random.default_rng(0)
    den = FiniteSetDenoiser(rng.uniform(-1, 1, size=(10, 1, 8, 8)))
    return den, StackedRandomGenerator(range(seed0, seed0 + batch)).randn((1, 8, 8))


def run(name, den, latents, sigmas, **options):
    """Call a solver by name on latents scaled to sigmas[0], counting network calls."""
    den.calls = 0
    return slv.get_solver(name).fn(den, latents * float(sigmas[0]), np.asarray(sigmas, dtype=np.float64), **options)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------------
# Global convergence order under step doubling (Gaussian data, exact ODE solution)

# (solver, schedule, time points N, expected order, why). Every multistep solver starts with a
# first-order step (DPM-Solver-1 or Euler) and, where lower_order_final applies, ends with one:
# such a step has local error O(h^2), so asymptotically each of them is a second-order method.
# How soon that shows depends on the step's error constant:
# * DPM-Solver-1's is not small at sigma_max (D - mu grows like e^lambda there), and the
#   reference's third-order update is itself only second order (see the local test): 2;
# * Euler's in sigma is proportional to x''(sigma) ~ s^2 / sigma_max^3, about 1e-7 of the
#   first step: DEIS shows its bulk order 4 until the error is near 1e-9;
# * UniPC corrects its first step (local O(h^3), allows 3) and skips the corrector only on
#   the last step, where D hardly moves: it shows its bulk order p + 1 = 4 here;
# * iPNDM's equal-step weights on the non-uniform rho = 7 grid are only second order;
# * iPNDM-v's order-4 weights (diff-sampler's) satisfy the order conditions to 3 only (see the
#   local test), and its Euler start is tiny on the log-SNR grid: 3.
ORDER_CASES = [
    ("euler", "edm", (64, 128, 256), 1.0, "Euler"),
    ("heun", "edm", (64, 128, 256), 2.0, "Heun, Euler into 0 at sigma_min"),
    ("dpmpp-2m", "edm", (64, 128, 256), 2.0, "2M, first step DPM-Solver-1"),
    ("dpmpp-3m", "edm", (128, 256, 512), 2.0, "first-order first step; the 3M update is order 2"),
    ("unipc", "edm", (32, 64, 128, 256), 4.0, "UniP-3 + UniC, corrected warm start"),
    ("ipndm", "edm", (64, 128, 256), 2.0, "fixed AB weights on a non-uniform grid"),
    ("ipndm-v", "logsnr", (512, 1024, 2048), 3.0, "variable-step AB, the reference's weights are order 3"),
    ("deis", "edm", (32, 64, 128, 256), 4.0, "tAB4, Euler start negligible at sigma_max"),
]


@pytest.mark.parametrize("name,schedule,points,order,why", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_global_convergence_order_under_step_doubling(name, schedule, points, order, why):
    den, latents = gaussian()
    spec = slv.get_solver(name)
    errs = []
    for n in points:
        t = sch.schedule_sigmas(schedule, n, 0.002, 80.0)
        x0 = latents * t[0]
        exact = den.ode_solution(x0, t[0], t[-1])
        if spec.appends_zero:
            t, exact = np.append(t, 0.0), den(exact, np.full(len(x0), t[-1]))
        errs.append(rel_err(run(name, den, latents, t), exact))
    measured = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    margin = 0.15 if order <= 3 else 0.3
    assert all(abs(m - order) < margin for m in measured), (why, errs, measured)


# --------------------------------------------------------------------------------------------
# Local order of one update from the exact trajectory (the bulk order, free of warm starts)

LOCAL_H = (0.1, 0.05, 0.025, 0.0125)


def exact_history(den, x_max, h, k):
    """k exact points (oldest first) then the next one, uniform in lambda around sigma = 0.2.

    (Around some levels the leading error terms of the Gaussian nearly cancel and the measured
    exponent creeps to its limit only at tiny h; sigma = 0.2 is free of that for every update.)
    """
    lam0 = -math.log(0.2)
    sig = [math.exp(-(lam0 - j * h)) for j in range(k - 1, -1, -1)] + [math.exp(-(lam0 + h))]
    xs = [den.ode_solution(x_max, 80.0, s) for s in sig]
    models = [den(x, np.full(len(x), s)) for x, s in zip(xs[:-1], sig[:-1])]
    slopes = [(x - m) / s for x, m, s in zip(xs[:-1], models, sig[:-1])]
    return sig, xs, models, slopes


def local_order(one_step):
    den, latents = gaussian()
    x_max = latents * 80.0
    errs = []
    for h in LOCAL_H:
        out, exact = one_step(den, x_max, h)
        errs.append(float(np.abs(out - exact).max()))
    return math.log2(errs[-2] / errs[-1]), errs


# The third-order update is the reference's (diff-sampler, copied from the DPM-Solver codebase,
# which has the same line): it weights the second divided difference D2 = h^2 [m0, m1, m2] by
# phi_3, half the 2 phi_3 that integrating the quadratic exactly needs, so its local error is
# O(h^3) like the second-order update's (with 2 phi_3 it measures O(h^4)).
@pytest.mark.parametrize("order,expected", [(1, 2), (2, 3), (3, 3)])
def test_dpmpp_update_local_order(order, expected):
    def one_step(den, x_max, h):
        sig, xs, models, _ = exact_history(den, x_max, h, order)
        return slv.dpmpp_update(xs[-2], models, sig[:-1], sig[-1], order), xs[-1]

    measured, errs = local_order(one_step)
    assert abs(measured - expected) < 0.15, errs


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [False, True])
def test_unipc_corrector_raises_the_local_order_by_one(order, corrector):
    def one_step(den, x_max, h):
        sig, xs, models, _ = exact_history(den, x_max, h, order)
        return unipc_update(den, xs[-2], models, sig[:-1], sig[-1], order, None, corrector)[0], xs[-1]

    measured, errs = local_order(one_step)
    assert abs(measured - (order + 1 + corrector)) < 0.15, errs


# Local error exponents (method order + 1): AB with weights for equal steps is second order on
# a non-uniform grid; diff-sampler's variable-step order-4 weights are third order (on equal
# steps they are (57, -65, 43, -11)/24, not AB4's (55, -59, 37, -9)/24); DEIS is exact in tau.
AB_LOCAL = [
    ("ipndm", 2, 3), ("ipndm", 3, 3), ("ipndm", 4, 3),
    ("ipndm-v", 2, 3), ("ipndm-v", 3, 4), ("ipndm-v", 4, 4),
    ("deis", 2, 3), ("deis", 3, 4), ("deis", 4, 5),
]


@pytest.mark.parametrize("name,order,expected", AB_LOCAL)
def test_adams_bashforth_local_order(name, order, expected):
    def one_step(den, x_max, h):
        sig, xs, _, slopes = exact_history(den, x_max, h, order)
        if name == "deis":
            c = slv.deis_tab_coefficients(sig, order)[order - 1]
            out = xs[-2] + c[0] * slopes[-1]
            for k in range(1, order):
                out = out + c[k] * slopes[-1 - k]
        else:
            step = slv._ipndm_step if name == "ipndm" else slv._ipndm_v_step
            out = step(xs[-2], slopes[-1], slopes[:-1], order - 1, order, sig)
        return out, xs[-1]

    measured, errs = local_order(one_step)
    assert abs(measured - expected) < 0.15, errs


def test_ipndm_v_weights_on_equal_steps():
    """Orders 2 and 3 reduce to the fixed AB weights; order 4 is the reference's own (57, -65, 43, -11)/24."""
    t = [10.0, 9.0, 8.0, 7.0, 6.0]

    def weights(order):
        zero = np.zeros(1)
        row = [-float(slv._ipndm_v_step(zero, np.ones(1), [zero] * 3, 3, order, t)[0]) * 24]
        for k in range(1, order):
            hist = [zero] * 3
            hist[-k] = np.ones(1)
            row.append(-float(slv._ipndm_v_step(zero, zero, hist, 3, order, t)[0]) * 24)
        return row

    np.testing.assert_allclose(weights(2), [36, -12], atol=1e-12)
    np.testing.assert_allclose(weights(3), [46, -32, 10], atol=1e-12)
    np.testing.assert_allclose(weights(4), [57, -65, 43, -11], atol=1e-12)


# --------------------------------------------------------------------------------------------
# Values of the reference implementations (float64, dynamic thresholding off), tiny case:
# Gaussian(mu 0.3, std 0.5) on 1x2x2, latents below, EDM sigmas N = 6 in [0.002, 80];
# k-diffusion with a final 0 (euler, heun, dpmpp-2m), diff-sampler ending at sigma_min.

REF_LATENTS = np.array([[[[0.5, -1.25], [2.0, 0.125]]]])
REFERENCE_VALUES = {
    "euler": [0.4359236792284906, -0.043404156841753694, 0.8467761101458429, 0.3332105714991526],
    "heun": [0.7233139549304073, -0.7694808483506224, 2.002852357742715, 0.4034293542273291],
    "dpmpp-2m": [0.5519381299944872, -0.3365086760314128, 1.3134639637309735, 0.36155667156036597],
    "dpmpp-3m": [0.49323697773226455, -0.1882032460087187, 1.0773285980816785, 0.34721407264491094],
    "unipc": [0.4962729954206475, -0.195873587926724, 1.08954149543268, 0.3479558704176392],
    "ipndm": [0.5519086170976498, -0.33643411322151884, 1.3133452430855042, 0.3615494606006847],
    "ipndm-v": [0.4943421020000042, -0.19099528540555202, 1.0817741483476224, 0.34748409041309924],
    "deis": [0.49547360432695364, -0.19385396760688445, 1.0863258088416716, 0.34776055319827304],
}


@pytest.mark.parametrize("name", ODE_SOLVER_NAMES)
def test_matches_reference_implementation_values(name):
    den = GaussianDenoiser(1, 2, mu=0.3, std=0.5)
    t = sch.edm_sigma_steps(6, 0.002, 80.0)
    if slv.get_solver(name).appends_zero:
        t = np.append(t, 0.0)
    out = run(name, den, REF_LATENTS, t)
    np.testing.assert_allclose(out.reshape(-1), REFERENCE_VALUES[name], rtol=0, atol=1e-13)


def test_schedules_match_diff_sampler_get_schedule():
    logsnr = [79.99999999999997, 9.608995471851447, 1.1541599247257706, 0.1386289686310293,
              0.01665106414803746, 0.0020000000000000005]
    time_uniform = [80.00000000000001, 6.292339565936032, 1.5599652447262673, 0.5560024185093034,
                    0.15034264359470215, 0.0019999999999732445]
    np.testing.assert_allclose(sch.schedule_sigmas("logsnr", 6, 0.002, 80.0), logsnr, rtol=1e-15)
    np.testing.assert_allclose(sch.schedule_sigmas("time-uniform", 6, 0.002, 80.0, rho=2), time_uniform, rtol=1e-15)


# --------------------------------------------------------------------------------------------
# Schedules as data


def test_schedule_dispatcher_returns_the_existing_functions_results():
    assert sch.SCHEDULE_NAMES == ("edm", "vp", "ve", "iddpm", "logsnr", "time-uniform")
    assert np.array_equal(sch.schedule_sigmas("edm", 18, 0.002, 80, rho=5), sch.edm_sigma_steps(18, 0.002, 80, 5))
    assert np.array_equal(sch.schedule_sigmas("vp", 18, 0.002, 80), sch.vp_sigma_steps(18, 0.002, 80))
    assert np.array_equal(sch.schedule_sigmas("ve", 18, 0.02, 100), sch.ve_sigma_steps(18, 0.02, 100))
    assert np.array_equal(sch.schedule_sigmas("iddpm", 18, 0.002, 81, M=500), sch.iddpm_sigma_steps(18, 0.002, 81, M=500))


@pytest.mark.parametrize("name", sch.SCHEDULE_NAMES)
@pytest.mark.parametrize("n", [2, 7, 40])
def test_every_schedule_is_strictly_decreasing_float64_without_zero(name, n):
    lo, hi = sch.schedule_default_range(name)
    t = sch.schedule_sigmas(name, n, lo, hi)
    assert t.dtype == np.float64 and t.shape == (n,) and np.all(np.diff(t) < 0) and t[-1] > 0
    if name == "iddpm":  # the table's own levels inside the range
        table = sch.iddpm_sigma_table()
        assert lo <= t[-1] and t[0] <= hi and all(np.isclose(table, v, rtol=0, atol=0).any() for v in t)
    else:
        np.testing.assert_allclose([t[0], t[-1]], [hi, lo], rtol=1e-10)


def test_logsnr_is_uniform_in_log_sigma_and_time_uniform_rho1_is_vp():
    t = sch.schedule_sigmas("logsnr", 11, 0.002, 80)
    steps = np.diff(np.log(t))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-12)
    np.testing.assert_allclose(sch.schedule_sigmas("time-uniform", 11, 0.002, 80, rho=1),
                               sch.vp_sigma_steps(11, 0.002, 80), rtol=1e-14)


@pytest.mark.parametrize(
    "sigmas,match",
    [
        ([80, 10, 10, 1], "strictly decreasing: sigmas\\[2\\]"),
        ([80, 1, 5], "strictly decreasing"),
        ([80, -1], "positive except for a final 0"),
        ([80, 0, 1], "positive except for a final 0: sigmas\\[1\\]"),
        ([80, float("nan"), 1], "finite: sigmas\\[1\\]"),
        ([float("inf"), 1], "finite"),
        ([], "empty"),
        ([0], "start with a positive"),
        ([[80, 1]], "flat list"),
        (["a", 1], "list of numbers"),
    ],
)
def test_bad_sigma_lists_give_one_clear_error(sigmas, match):
    with pytest.raises(InputError, match=match) as info:
        sch.check_sigma_list(sigmas)
    assert info.value.param == "sigmas"


def test_good_sigma_list_passes_with_an_optional_final_zero():
    assert sch.check_sigma_list([80, 1.5, 0.002, 0]).tolist() == [80, 1.5, 0.002, 0]
    assert sch.check_sigma_list((3.0,)).dtype == np.float64


def test_schedule_parameters_that_do_not_apply_are_errors():
    with pytest.raises(InputError, match="rho does not apply to the logsnr schedule"):
        sch.schedule_sigmas("logsnr", 5, 0.002, 80, rho=7)
    with pytest.raises(InputError, match="unknown schedule 'cosine'"):
        sch.schedule_sigmas("cosine", 5, 0.002, 80)
    with pytest.raises(InputError, match="rho must be > 0"):
        sch.schedule_sigmas("time-uniform", 5, 0.002, 80, rho=0)


# --------------------------------------------------------------------------------------------
# Parities between solvers


@pytest.mark.parametrize("name", ["ipndm", "ipndm-v", "deis"])
def test_adams_bashforth_of_max_order_1_is_euler_bit_for_bit(name):
    den, latents = gaussian()
    t = sch.edm_sigma_steps(9, 0.002, 80)
    assert np.array_equal(run(name, den, latents, t, max_order=1), run("euler", den, latents, t))


def test_ipndm_and_ipndm_v_agree_to_order_3_on_equal_steps():
    den, latents = gaussian()
    t = np.linspace(80, 2, 12)
    for order in (2, 3):
        np.testing.assert_allclose(run("ipndm-v", den, latents, t, max_order=order),
                                   run("ipndm", den, latents, t, max_order=order), rtol=1e-12, atol=1e-12)


def test_first_data_prediction_step_is_ddim():
    """DPM-Solver-1 (and UniPC's first predictor): x' = (sigma'/sigma) x + (1 - sigma'/sigma) D(x; sigma)."""
    den, latents = gaussian()
    s0, s1 = 80.0, 20.0
    x = latents * s0
    d0 = den(x, np.full(4, s0))
    ddim = (s1 / s0) * x + (1 - s1 / s0) * d0
    np.testing.assert_allclose(run("dpmpp-2m", den, latents, [s0, s1]), ddim, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(run("dpmpp-3m", den, latents, [s0, s1]), ddim, rtol=1e-13, atol=1e-13)
    predictor = unipc_update(den, x, [d0], [s0], s1, 1, None, False)[0]
    np.testing.assert_allclose(predictor, ddim, rtol=1e-13, atol=1e-13)


def test_step_into_zero_is_the_denoised_state():
    """A final 0 means x = D(x; sigma_min): exactly for the multistep solvers, to rounding for Euler."""
    den, latents = gaussian()
    t = sch.edm_sigma_steps(8, 0.002, 80)
    for name in MULTISTEP + ("dpmpp-2m",):
        at_min = run(name, den, latents, t)
        np.testing.assert_array_equal(run(name, den, latents, np.append(t, 0)), den(at_min, np.full(4, t[-1])))
    at_min = run("euler", den, latents, t)
    np.testing.assert_allclose(run("euler", den, latents, np.append(t, 0)), den(at_min, np.full(4, t[-1])), atol=1e-14)


@pytest.mark.parametrize("name", AFS_SOLVERS)
def test_afs_saves_exactly_one_network_call(name):
    den, latents = gaussian()
    t = sch.edm_sigma_steps(40, 0.002, 80)
    plain = run(name, den, latents, t)
    calls = den.calls
    with_afs = run(name, den, latents, t, afs=True)
    assert den.calls == calls - 1
    # At sigma_max the analytic slope is nearly the true one: a change, but well inside the
    # solver's own error at this N (measured: at most 0.15 of it).
    exact = den.ode_solution(latents * t[0], t[0], t[-1])
    assert 0 < rel_err(with_afs, plain) < 0.25 * rel_err(plain, exact)


# --------------------------------------------------------------------------------------------
# Registry: NFE, steps_for_nfe, options


@pytest.mark.parametrize("name", ODE_SOLVER_NAMES)
@pytest.mark.parametrize("n", [2, 3, 4, 5, 9])
def test_registry_nfe_equals_counted_calls(name, n):
    spec = slv.get_solver(name)
    den, latents = gaussian(batch=2)
    settings = [(False, False)]
    if not spec.appends_zero:
        settings += [(False, True), (True, False), (True, True)]
    for afs, dtz in settings:
        t = sampling_sigmas(den, name, num_steps=n, denoise_to_zero=dtz)
        den.calls = 0
        sample(den, latents, solver=name, num_steps=n, afs=afs, denoise_to_zero=dtz)
        assert den.calls == spec.nfe(n, afs=afs, denoise_to_zero=dtz) == spec.nfe_for_sigmas(t, afs=afs), (afs, dtz)


def test_registry_nfe_formulas():
    assert slv.get_solver("heun").nfe(18) == 35
    assert slv.get_solver("euler").nfe(18) == 18
    assert slv.get_solver("dpmpp-2m").nfe(10) == 10
    assert slv.get_solver("ipndm").nfe(6) == 5
    assert slv.get_solver("ipndm").nfe(6, afs=True, denoise_to_zero=True) == 5
    assert [slv.get_solver("unipc").nfe(n) for n in (2, 3, 4, 5)] == [2, 3, 3, 4]


@pytest.mark.parametrize("name", slv.SOLVER_NAMES)
def test_steps_for_nfe_round_trips_or_says_why(name):
    spec = slv.get_solver(name)
    den, latents = gaussian(batch=1)
    for afs in (False, True) if spec.takes_afs else (False,):
        for k in range(1, 12):
            try:
                n = slv.steps_for_nfe(name, k, afs=afs)
            except InputError as err:
                assert "cannot spend exactly NFE" in str(err) and "nearest possible" in str(err)
                assert all(spec.nfe(m, afs=afs) != k for m in range(spec.min_points, k + 4))
                continue
            den.calls = 0
            sample(den, latents, solver=name, num_steps=n, afs=afs)
            assert den.calls == k, (afs, k, n)


def test_heun_nfe_is_always_odd():
    assert slv.steps_for_nfe("heun", 35) == 18
    with pytest.raises(InputError, match=r"heun cannot spend exactly NFE 10: its NFE is 2N - 1 \(always odd\).*9 or 11"):
        slv.steps_for_nfe("heun", 10)
    assert slv.steps_for_nfe("unipc", 3) == 4  # 3 and 4 time points both cost 3: take more steps
    assert slv.steps_for_nfe("dpmpp-3m", 5, afs=True) == 7
    with pytest.raises(InputError, match="nfe must be a positive integer"):
        slv.steps_for_nfe("euler", 0)


def test_registry_describes_every_solver():
    for name, spec in slv.SOLVER_REGISTRY.items():
        assert spec.name == name and callable(spec.fn) and spec.description and spec.reference and spec.nfe_formula
        assert spec.takes_churn == (name in ("euler", "heun")) and spec.appends_zero == (name in ("euler", "heun", "dpmpp-2m"))
        assert spec.takes_afs == (name in AFS_SOLVERS)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("heun", dict(afs=True), "afs does not apply to the heun solver"),
        ("dpmpp-2m", dict(afs=True), "afs does not apply"),
        ("dpmpp-3m", dict(S_churn=10), "S_churn does not apply to the dpmpp-3m solver \\(it applies to euler, heun\\)"),
        ("heun", dict(max_order=2), "max_order does not apply to the heun solver"),
        ("euler", dict(denoise_to_zero=True), "denoise_to_zero does not apply to the euler solver"),
        ("ipndm", dict(max_order=5), "max_order must be <= 4"),
        ("unipc", dict(max_order=4), "max_order must be an integer from 1 to 3"),
        ("rk45", {}, "unknown solver 'rk45'; choose one of euler, heun, dpmpp-2m"),
        ("ipndm", dict(bogus=1), "unknown sampler option 'bogus'"),
        ("heun", dict(S_churn=-1), "S_churn must be >= 0"),
        ("deis", dict(num_steps=1), "the deis solver needs at least 2 time points"),
        ("ipndm", dict(sigmas=[80, 1], num_steps=5), "num_steps does not apply when sigmas is given"),
        ("ipndm", dict(sigmas=[80, 1], rho=5), "rho does not apply when sigmas is given"),
        ("ipndm", dict(sigmas=[80, 1, 1]), "strictly decreasing"),
        ("ipndm", dict(discretization="logsnr", rho=3), "rho does not apply to the logsnr schedule"),
    ],
)
def test_options_that_do_not_apply_are_input_errors(name, kwargs, match):
    den, latents = gaussian(batch=1)
    with pytest.raises(InputError, match=match):
        sample(den, latents, solver=name, **kwargs)


def test_check_solver_options_accepts_what_applies():
    assert slv.check_solver_options("heun", {"S_churn": 1, "S_noise": 1.0}).name == "heun"
    assert slv.check_solver_options("deis", {"max_order": 3}, afs=True).name == "deis"


# --------------------------------------------------------------------------------------------
# The front end


def test_sample_defaults_are_edm_sampler_bit_for_bit():
    den, latents = gaussian()
    assert np.array_equal(sample(den, latents), edm_sampler(den, latents))
    kw = dict(num_steps=13, S_churn=20, S_min=0.05, S_max=30, S_noise=1.003)
    a = sample(den, latents, randn_like=StackedRandomGenerator(range(4)).randn_like, **kw)
    b = edm_sampler(den, latents, randn_like=StackedRandomGenerator(range(4)).randn_like, **kw)
    assert np.array_equal(a, b)


def test_sampling_sigmas_clamps_rounds_and_appends():
    class Ranged(GaussianDenoiser):
        sigma_min, sigma_max = 0.02, 50.0

    den = Ranged(1, 8)
    t = sampling_sigmas(den, "heun", num_steps=5)
    assert t[0] == 50.0 and t[-2] == pytest.approx(0.02) and t[-1] == 0 and len(t) == 6
    t = sampling_sigmas(den, "ipndm", num_steps=5, schedule="logsnr")
    assert len(t) == 5 and t[-1] == pytest.approx(0.02)
    assert sampling_sigmas(den, "ipndm", num_steps=5, denoise_to_zero=True)[-1] == 0
    # an explicit list is used as given (issue 22: one rule for every solver); a final 0 or denoise_to_zero adds the step
    assert sampling_sigmas(den, "heun", sigmas=[40, 1, 0.5]).tolist() == [40, 1, 0.5]
    assert sampling_sigmas(den, "heun", sigmas=[40, 1, 0.5], denoise_to_zero=True).tolist() == [40, 1, 0.5, 0]
    assert sampling_sigmas(den, "deis", sigmas=[40, 1, 0.5, 0]).tolist() == [40, 1, 0.5, 0]
    with pytest.raises(InputError, match=r"network's range \[0.02, 50\]"):
        sampling_sigmas(den, "heun", sigmas=[80, 1])


def test_table_rounded_levels_that_merge_are_refused_for_multistep_solvers():
    den, latents = finite_set(2)
    table = iddpm_sigma_table(dtype="float32")
    den.round_sigma = TableRound(table)
    den.sigma_min, den.sigma_max = float(table[-2]), float(table[0])
    with pytest.raises(InputError, match="distinct levels"):
        sample(den, latents, solver="ipndm", sigmas=[80, 79.99, 1])
    sample(den, latents, solver="heun", sigmas=[80, 79.99, 1])  # EDM takes a zero-length step, as the reference


def test_callback_payload():
    den, latents = gaussian()
    t = sch.edm_sigma_steps(6, 0.002, 80)
    for name in slv.SOLVER_NAMES:
        spec = slv.get_solver(name)
        sig = np.append(t, 0.0)
        seen = []
        out = spec.fn(den, latents * t[0], sig, callback=seen.append)
        assert [s.i for s in seen] == list(range(len(sig) - 1)), name
        assert all(s.num_steps == len(sig) - 1 for s in seen)
        assert [s.sigma_next for s in seen] == sig[1:].tolist() and [s.sigma for s in seen] == sig[:-1].tolist()
        assert seen[-1].x is out and all(s.denoised is not None and s.denoised.shape == out.shape for s in seen)


def test_edm_samplers_pass_the_step_payload():
    den, latents = gaussian()
    seen = []
    edm_sampler(den, latents, num_steps=5, callback=seen.append)
    assert [(s.i, s.num_steps) for s in seen] == [(i, 5) for i in range(5)] and seen[-1].sigma_next == 0
    seen.clear()
    ablation_sampler(den, latents, num_steps=4, schedule="vp", scaling="vp", callback=seen.append)
    assert [s.i for s in seen] == [0, 1, 2, 3] and isinstance(seen[0], slv.StepInfo)


# --------------------------------------------------------------------------------------------
# Batch invariance and a torch state


@pytest.mark.parametrize("name", slv.SOLVER_NAMES)
def test_batch_invariance_is_bit_exact(name):
    den, _ = finite_set(1)
    seeds = list(range(20))
    options = {"S_churn": 10} if slv.get_solver(name).takes_churn else {"afs": True} if name in AFS_SOLVERS else {}

    def images(batch):
        parts = []
        for start in range(0, len(seeds), batch):
            rnd = StackedRandomGenerator(seeds[start:start + batch])
            lat = rnd.randn((1, 8, 8))
            parts.append(sample(den, lat, solver=name, num_steps=7, randn_like=rnd.randn_like, **options))
        return np.concatenate(parts)

    ref = images(20)
    assert np.array_equal(images(1), ref) and np.array_equal(images(7), ref)


@pytest.mark.parametrize("name", slv.SOLVER_NAMES)
def test_torch_state_gives_the_numpy_result(name):
    torch = pytest.importorskip("torch")

    class TorchGaussian(GaussianDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float64
            s2 = torch.as_tensor(np.asarray(sigma), dtype=torch.float64).reshape(-1, 1, 1, 1) ** 2
            mu = torch.as_tensor(np.array(self.mu))
            return mu + self.std**2 / (self.std**2 + s2) * (x - mu)

    latents = StackedRandomGenerator(range(3)).randn((1, 8, 8))
    options = {"S_churn": 30} if slv.get_solver(name).takes_churn else {"afs": True} if name in AFS_SOLVERS else {}
    kw = dict(solver=name, num_steps=9, **options)
    ref = sample(GaussianDenoiser(1, 8, mu=0.3, std=0.5), latents, randn_like=StackedRandomGenerator(range(3)).randn_like, **kw)
    out = sample(TorchGaussian(1, 8, mu=0.3, std=0.5), torch.from_numpy(latents),
                 randn_like=StackedRandomGenerator(range(3)).randn_like, **kw)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# edm_sampler / ablation_sampler are bit for bit a fused loop of the reference's arithmetic


def frozen_edm_loop(net, latents, class_labels, randn_like, t_steps, solver, S_churn, S_min, S_max, S_noise):
    """The reference's sampler loop for sigma(t) = t, s(t) = 1, alpha = 1, fused in one function, its arithmetic
    in the reference's order.

    It lives in the tests so the step programs are held to these bits whatever becomes of the reference samplers (runtime/sampling/reference.py).
    """
    num_steps = len(t_steps) - 1

    def round_sigma(v):
        return float(np.asarray(net.round_sigma(np.array([v], dtype=np.float64))).reshape(-1)[0])

    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= float(t) <= S_max else 0.0 for t in t_steps[:-1]]
    stochastic = any(g > 0 for g in gammas)
    batch = latents.shape[0]

    def denoise(x, t):
        return to_float64(net(x, np.full(batch, float(t), dtype=np.float64), class_labels))

    t_next = float(t_steps[0])
    x_next = to_float64(latents) * (t_next * 1.0)
    for i in range(num_steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        x_cur = x_next
        gamma = gammas[i]
        sigma_cur = t_cur
        t_hat = round_sigma(sigma_cur + gamma * sigma_cur) if gamma > 0 else t_cur
        x_hat = x_cur
        if stochastic:
            eps = randn_like(x_cur)
            if gamma > 0:
                noise_std = math.sqrt(max(t_hat**2 - sigma_cur**2, 0.0)) * 1.0 * S_noise
                if isinstance(eps, np.ndarray):
                    eps = from_host(eps, x_cur)
                x_hat = x_hat + noise_std * eps
        h = t_next - t_hat
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            x_prime = x_hat + h * d_cur
            d_prime = (x_prime - denoise(x_prime, t_next)) / t_next
            w = 1 / (2 * 1.0)
            x_next = x_hat + h * ((1 - w) * d_cur + w * d_prime)
    return x_next


def iddpm_net(batch):
    """A finite-set oracle that snaps sigma onto the iDDPM table, as iDDPM networks do."""
    den, latents = finite_set(batch, seed0=100)
    table = iddpm_sigma_table(dtype="float32")
    den.round_sigma = TableRound(table)
    den.sigma_min, den.sigma_max = float(table[-2]), float(table[0])
    return den, latents


CHURN = [dict(), dict(S_churn=20, S_min=0.05, S_max=30, S_noise=1.003), dict(S_churn=80), dict(S_churn=5, S_min=500, S_max=600)]
NETS = {"gaussian": lambda: gaussian(batch=3), "finite": lambda: finite_set(3), "iddpm": lambda: iddpm_net(3)}


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("num_steps", [1, 2, 13, 256])
@pytest.mark.parametrize("churn", range(len(CHURN)))
def test_edm_sampler_is_bit_identical_to_the_fused_reference_loop(net, num_steps, churn):
    den, latents = NETS[net]()
    kw = CHURN[churn]
    lo, hi = max(0.002, den.sigma_min), min(80.0, den.sigma_max)
    t_steps = np.append(np.asarray(den.round_sigma(sch.edm_sigma_steps(num_steps, lo, hi, 7)), dtype=np.float64), 0.0)
    full = dict(S_churn=0, S_min=0, S_max=float("inf"), S_noise=1) | kw
    old = frozen_edm_loop(den, latents, None, StackedRandomGenerator([5, 6, 7]).randn_like, t_steps, "heun", **full)
    new = edm_sampler(den, latents, randn_like=StackedRandomGenerator([5, 6, 7]).randn_like, num_steps=num_steps, **kw)
    assert np.array_equal(new, old)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("disc", sch.DISCRETIZATIONS)
@pytest.mark.parametrize("churn", [0, 1])
def test_ablation_sampler_edm_form_is_bit_identical_to_the_fused_reference_loop(solver, disc, churn):
    den, latents = iddpm_net(3) if disc == "iddpm" else gaussian(batch=3)
    kw = CHURN[churn]
    lo, hi = sch.default_sigma_range(disc)
    lo, hi = max(lo, den.sigma_min), min(hi, den.sigma_max)
    levels = sch.sigma_steps(disc, 21, lo, hi)
    t_steps = np.append(np.asarray(den.round_sigma(levels), dtype=np.float64), 0.0)
    full = dict(S_churn=0, S_min=0, S_max=float("inf"), S_noise=1) | kw
    old = frozen_edm_loop(den, latents, None, StackedRandomGenerator([1, 2, 3]).randn_like, t_steps, solver, **full)
    new = ablation_sampler(den, latents, randn_like=StackedRandomGenerator([1, 2, 3]).randn_like, num_steps=21,
                           solver=solver, discretization=disc, **kw)
    assert np.array_equal(new, old)
