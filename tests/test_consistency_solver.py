"""The consistency solver (ECT's sampler) against an exact consistency function.

For Gaussian data N(mu, s^2 I) the consistency function is known in closed form: the
probability-flow ODE transports x at sigma to mu + (x - mu) s / sqrt(s^2 + sigma^2) at sigma = 0.
A denoiser that returns it is a perfect consistency model, so one step from sigma_max must give
exact samples, and every further step (noise added back, denoised again) must keep them exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edm_deploy.runtime import GaussianDenoiser, StackedRandomGenerator
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling import solvers as slv
from edm_deploy.runtime.sampling.generate import generate, plan_sampling


class GaussianConsistency(GaussianDenoiser):
    """The exact consistency function of N(mu, std^2 I) data, flagged as a consistency-tuned model."""

    consistency_tuned = True

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        sig = self._sigma_column(sigma, x.shape[0])
        return self.mu + (np.asarray(x, dtype=np.float64) - self.mu) * (self.std / np.sqrt(self.std**2 + sig**2))


def test_nfe_picks_ects_time_points():
    den = GaussianConsistency(1, 8, mu=0.2, std=0.5)
    assert plan_sampling(den, {"solver": "consistency", "nfe": 1}).sigmas.tolist() == [80.0]
    two = plan_sampling(den, {"solver": "consistency", "nfe": 2})
    assert two.sigmas.tolist() == [80.0, slv.CONSISTENCY_MID_SIGMA] and two.nfe == 2 and not two.warnings
    three = plan_sampling(den, {"solver": "consistency", "nfe": 3}).sigmas
    assert three[0] == 80.0 and three[-1] == pytest.approx(0.821) and three[1] == pytest.approx(np.sqrt(80 * 0.821))
    exact = plan_sampling(den, {"solver": "consistency", "sigmas": [80.0, 2.0, 0.5]})
    assert exact.sigmas.tolist() == [80.0, 2.0, 0.5] and exact.nfe == 3


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_samples_have_the_data_distribution_and_cost_one_call_per_point(nfe):
    mu, std = 0.2, 0.5
    den = GaussianConsistency(1, 8, mu=mu, std=std)
    plan = plan_sampling(den, {"solver": "consistency", "nfe": nfe})
    rnd = StackedRandomGenerator(range(256))
    den.calls = 0
    x = plan.run(den, rnd.randn((1, 8, 8)), None, rnd.randn_like)
    assert den.calls == nfe
    # exact at NFE 1 up to sigma_max's tiny leftover; noise added back and removed keeps it exact
    assert abs(float(x.mean()) - mu) < 0.01 and abs(float(x.std()) - std * 80 / np.sqrt(80**2 + std**2) ) < 0.01


def test_an_image_depends_on_its_seed_only():
    den = GaussianConsistency(1, 8, mu=0.1, std=0.6)
    alone = generate(den, [7], solver="consistency", nfe=2)
    together = generate(den, [3, 7, 11], batch_size=3, solver="consistency", nfe=2)
    np.testing.assert_array_equal(together[1], alone[0])
    assert not np.array_equal(together[0], together[1])


def test_the_wrong_kind_of_model_is_a_warning_saying_why():
    plain = GaussianDenoiser(1, 8)
    with pytest.warns(UserWarning, match="expects a consistency-tuned model"):
        generate(plain, [0], solver="consistency", nfe=1)
    tuned = GaussianConsistency(1, 8)
    with pytest.warns(UserWarning, match="consistency-tuned: it no longer predicts"):
        generate(tuned, [0], solver="ipndm", nfe=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(tuned, [0], solver="consistency", nfe=2)


@pytest.mark.parametrize("options,match", [
    ({"afs": True}, "afs does not apply to the consistency solver"),
    ({"denoise_to_zero": True}, "every evaluation already predicts"),
    ({"S_churn": 1.0}, "S_churn does not apply to the consistency solver"),
    ({"max_order": 2}, "max_order does not apply"),
    ({"sigma_min": 0.1}, "sigma_min does not apply to the consistency solver's own time points for nfe"),
    ({"rho": 3}, "rho does not apply to the consistency solver's own time points for nfe"),
    ({"sigma_max": 0.5}, "sigma_max must be above 0.821, the last of the consistency solver's time points"),
])
def test_options_of_the_ode_solvers_are_refused(options, match):
    with pytest.raises(InputError, match=match):
        plan_sampling(GaussianConsistency(1, 8), {"solver": "consistency", "nfe": 2, **options})


def test_the_schedule_search_refuses_it_before_any_work():
    from edm_deploy.runtime.sampling.schedule_search import plan_search

    with pytest.raises(InputError, match="cannot be searched"):
        plan_search("consistency", 2)


def test_the_engine_serves_it_next_to_ode_requests():
    from edm_deploy.runtime.serving import Engine

    den = GaussianConsistency(1, 8, mu=0.3, std=0.4)
    with Engine(den, max_batch=8) as engine:
        a = engine.submit([0, 1], settings={"solver": "consistency", "nfe": 2})
        b = engine.submit([2], settings={"solver": "consistency", "nfe": 1})
        a, b = a.result(timeout=30), b.result(timeout=30)
    np.testing.assert_array_equal(a.images, generate(den, [0, 1], solver="consistency", nfe=2))
    np.testing.assert_array_equal(b.images, generate(den, [2], solver="consistency", nfe=1))
    assert a.nfe == 2 and not a.warnings
