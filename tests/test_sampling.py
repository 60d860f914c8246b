"""The samplers against analytic oracles: exact endpoints, convergence order, knobs, invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edm_deploy.runtime import (
    FiniteSetDenoiser,
    GaussianDenoiser,
    StackedRandomGenerator,
    ablation_sampler,
    edm_sampler,
    nfe,
)
from edm_deploy.runtime.core.errors import InputError

SIGMA_MIN = 1e-3


def gaussian_case(batch=4, seed0=0):
    den = GaussianDenoiser(img_channels=1, img_resolution=8, mu=0.3, std=0.5)
    latents = StackedRandomGenerator(range(seed0, seed0 + batch)).randn((1, 8, 8))
    return den, latents


def gaussian_reference(den, latents, sigma_max=80.0, sigma_min=SIGMA_MIN):
    """Exact ODE solution down to sigma_min followed by the sampler's final Euler step to 0."""
    x_min = den.ode_solution(latents.astype(np.float64) * sigma_max, sigma_max, sigma_min)
    return den(x_min, np.full(len(latents), sigma_min))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_gaussian_endpoint_matches_closed_form_at_high_nfe():
    den, latents = gaussian_case()
    out = edm_sampler(den, latents, num_steps=4096, sigma_min=SIGMA_MIN)
    assert rel_err(out, gaussian_reference(den, latents)) < 1e-6


@pytest.mark.parametrize("solver,order", [("heun", 2.0), ("euler", 1.0)])
def test_convergence_order_under_step_doubling(solver, order):
    den, latents = gaussian_case()
    ref = gaussian_reference(den, latents)
    errs = [rel_err(ablation_sampler(den, latents, num_steps=n, sigma_min=SIGMA_MIN, solver=solver), ref) for n in (64, 128, 256)]
    measured = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    for m in measured:
        assert abs(m - order) < 0.2, (solver, errs, measured)


def test_nfe_counts_network_calls():
    den, latents = gaussian_case()
    edm_sampler(den, latents, num_steps=18)
    assert den.calls == nfe(18, "heun") == 35
    den.calls = 0
    ablation_sampler(den, latents, num_steps=18, solver="euler")
    assert den.calls == nfe(18, "euler") == 18


def test_ablation_defaults_equal_edm_sampler_exactly():
    den, latents = gaussian_case(batch=3)
    kwargs = dict(num_steps=13, S_churn=20, S_min=0.05, S_max=30, S_noise=1.003)
    a = edm_sampler(den, latents, randn_like=StackedRandomGenerator([5, 6, 7]).randn_like, **kwargs)
    b = ablation_sampler(den, latents, randn_like=StackedRandomGenerator([5, 6, 7]).randn_like,
                         solver="heun", discretization="edm", schedule="linear", scaling="none", **kwargs)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "disc,schedule,scaling",
    [("vp", "vp", "vp"), ("ve", "ve", "none"), ("ve", "linear", "none"), ("edm", "vp", "vp"), ("iddpm", "linear", "none")],
)
def test_ablation_combinations_reach_the_gaussian_endpoint(disc, schedule, scaling):
    """Every (discretization, schedule, scaling) integrates the same ODE: all reach the oracle."""
    from edm_deploy.runtime import sigma_steps

    den, latents = gaussian_case()
    levels = sigma_steps(disc, 1024, 0.002, 80)  # iDDPM snaps the ends to its table
    out = ablation_sampler(den, latents, num_steps=1024, discretization=disc, schedule=schedule, scaling=scaling,
                           sigma_min=0.002, sigma_max=80)
    ref = gaussian_reference(den, latents, sigma_max=float(levels[0]), sigma_min=float(levels[-1]))
    assert rel_err(out, ref) < 5e-4


def test_iddpm_discretization_uses_table_levels():
    from edm_deploy.runtime import iddpm_sigma_steps, iddpm_sigma_table

    steps = iddpm_sigma_steps(18, 0.002, 81)
    table = iddpm_sigma_table()
    assert all(np.isclose(table, s).any() for s in steps)
    assert steps[0] <= 81 and steps[-1] == pytest.approx(table[999])
    assert table[1] == pytest.approx(641.66, rel=1e-4) and table[500] == pytest.approx(1.0124, rel=1e-4)


def finite_set_case(batch=200):
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(10, 1, 8, 8))
    latents = StackedRandomGenerator(range(batch)).randn((1, 8, 8))
    return FiniteSetDenoiser(points), latents


def test_finite_set_deterministic_samples_land_on_data_points():
    den, latents = finite_set_case()
    out = edm_sampler(den, latents, num_steps=64)
    close = den.nearest_distance(out) < 1e-3
    assert close.mean() >= 0.99


def test_churn_knobs_each_change_the_result():
    den, latents = gaussian_case(batch=16)

    def run(**kw):
        return edm_sampler(den, latents, randn_like=StackedRandomGenerator(range(16)).randn_like, num_steps=32, **kw)

    def differs(a, b):
        return float(np.abs(a - b).max()) > 1e-3

    base = run()
    churn = run(S_churn=40)
    assert differs(base, churn)
    window = run(S_churn=40, S_min=0.05, S_max=1.0)
    assert differs(churn, window) and differs(base, window)
    noisy = run(S_churn=40, S_noise=1.05)
    assert differs(churn, noisy)
    # An empty churn window is exactly the deterministic sampler.
    assert np.array_equal(run(S_churn=40, S_min=500, S_max=600), base)


def test_stochastic_sampler_stays_on_the_gaussian_marginal():
    """Churn preserves the marginal for an exact denoiser: sample std stays the data std."""
    den = GaussianDenoiser(img_channels=1, img_resolution=16, mu=0.0, std=0.5)
    rnd = StackedRandomGenerator(range(256))
    latents = rnd.randn((1, 16, 16))
    out = edm_sampler(den, latents, randn_like=rnd.randn_like, num_steps=64, S_churn=60)
    assert abs(out.std() - 0.5) < 0.01
    inflated = edm_sampler(den, latents, randn_like=StackedRandomGenerator(range(256)).randn_like,
                           num_steps=64, S_churn=60, S_noise=1.2)
    assert inflated.std() > out.std() + 0.01


def test_batch_invariance_is_bit_exact():
    den, _ = finite_set_case()
    seeds = list(range(64))

    def sample(batch):
        parts = []
        for start in range(0, len(seeds), batch):
            chunk = seeds[start:start + batch]
            rnd = StackedRandomGenerator(chunk)
            lat = rnd.randn((1, 8, 8))
            parts.append(edm_sampler(den, lat, randn_like=rnd.randn_like, num_steps=10, S_churn=10))
        return np.concatenate(parts)

    ref = sample(64)
    assert np.array_equal(sample(1), ref)
    assert np.array_equal(sample(7), ref)


def test_class_conditional_finite_set_respects_labels():
    rng = np.random.default_rng(1)
    points = rng.uniform(-1, 1, size=(6, 1, 4, 4))
    den = FiniteSetDenoiser(points, point_labels=[0, 0, 1, 1, 2, 2])
    latents = StackedRandomGenerator(range(30)).randn((1, 4, 4))
    labels = np.eye(3, dtype=np.float32)[np.arange(30) % 3]
    out = edm_sampler(den, latents, labels, num_steps=32)
    flat = out.reshape(30, 1, -1)
    nearest = np.abs(flat - den.flat[None]).max(axis=2).argmin(axis=1)
    assert np.array_equal(den.point_labels[nearest], np.arange(30) % 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=-3), "num_steps"),
        (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
        (dict(sigma_min=5.0, sigma_max=5.0), "sigma_min"),
        (dict(S_churn=-1), "S_churn"),
    ],
)
def test_bad_sampler_settings_raise_one_clear_error(kwargs, match):
    den, latents = gaussian_case()
    with pytest.raises(InputError, match=match):
        edm_sampler(den, latents, **kwargs)


def test_wrong_latent_shape_and_unexpected_labels_are_rejected():
    den, latents = gaussian_case()
    with pytest.raises(InputError, match="latents must have shape"):
        edm_sampler(den, latents[:, :, :4, :4])
    with pytest.raises(InputError, match="unconditional"):
        edm_sampler(den, latents, class_labels=np.eye(4, dtype=np.float32))
    with pytest.raises(InputError, match="unknown solver"):
        ablation_sampler(den, latents, solver="rk4")
    with pytest.raises(InputError, match="unknown discretization"):
        ablation_sampler(den, latents, discretization="cosine")


def test_single_step_is_one_euler_step_to_zero():
    den, latents = gaussian_case()
    out = edm_sampler(den, latents, num_steps=1)
    np.testing.assert_allclose(out, den(latents.astype(np.float64) * 80, np.full(4, 80.0)), rtol=1e-12)


def test_sampler_runs_unchanged_on_torch_tensors():
    """The array-namespace promise: the same sampler drives a torch state (as on a GPU)."""
    torch = pytest.importorskip("torch")

    class TorchGaussian(GaussianDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float64
            s2 = torch.as_tensor(np.asarray(sigma), dtype=torch.float64).reshape(-1, 1, 1, 1) ** 2
            mu = torch.as_tensor(self.mu)
            return mu + self.std**2 / (self.std**2 + s2) * (x - mu)

    den_np = GaussianDenoiser(1, 8, mu=0.3, std=0.5)
    den_t = TorchGaussian(1, 8, mu=0.3, std=0.5)
    latents = StackedRandomGenerator(range(5)).randn((1, 8, 8))
    kwargs = dict(num_steps=12, S_churn=30, S_noise=1.01)
    ref = edm_sampler(den_np, latents, randn_like=StackedRandomGenerator(range(5)).randn_like, **kwargs)
    out = edm_sampler(den_t, torch.from_numpy(latents), randn_like=StackedRandomGenerator(range(5)).randn_like, **kwargs)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
