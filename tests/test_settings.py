"""`SamplerSettings`: one typed, checked description of a run for the CLI, the API and the server.

Unknown names, wrong types and values the network cannot represent are one clear error each;
options that would change nothing are refused; explicit time points are used exactly as given;
the time points of every discretization are known up front (the run record holds them).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edm_deploy.runtime import GaussianDenoiser
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling.generate import generate, plan_sampling, run_record
from edm_deploy.runtime.sampling.settings import SamplerSettings


class Levels(GaussianDenoiser):
    """A Gaussian oracle recording the noise levels it is evaluated at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.levels = []

    def __call__(self, x, sigma, class_labels=None):
        self.levels.append(float(np.asarray(sigma).reshape(-1)[0]))
        return super().__call__(x, sigma, class_labels)


@pytest.mark.parametrize("options,match", [
    ({"steps": 4}, "unknown sampler option 'steps' \\(the API calls it num_steps\\)"),
    ({"foo": 1}, "unknown sampler option 'foo'"),
    ({"nfe": "5"}, "nfe must be an integer, got '5'"),
    ({"num_steps": 2.5}, "num_steps must be an integer"),
    ({"num_steps": True}, "num_steps must be an integer"),
    ({"rho": "7"}, "rho must be a number"),
    ({"afs": 1}, "afs must be True or False"),
    ({"solver": "heun2"}, "unknown solver 'heun2'"),
    ({"sigma_max": float("nan")}, "sigma_max must be a finite number"),
    ({"sigma_max": 1e308}, "sigma_max 1e\\+308 is beyond the float32 range"),
    ({"sigma_min": 1e-300}, "sigma_min 1e-300 is below the smallest float32 noise level"),
    ({"S_churn": -1.0}, "S_churn must be >= 0"),
    ({"S_min": 2.0, "S_max": 1.0}, "S_min \\(2\\) must not exceed S_max"),
    ({"sigmas": [80, 1e39, 1]}, "strictly decreasing"),
    ({"sigmas": [1e39, 1.0]}, "beyond the float32 range"),
    ({"num_steps": 200_000}, "num_steps must be <= 100000"),
])
def test_bad_options_are_one_error_naming_the_option(options, match):
    with pytest.raises(InputError, match=match):
        SamplerSettings.from_options(**options)


@pytest.mark.parametrize("options,match", [
    ({"discretization": "vp", "rho": 5.0}, "rho does not apply to the vp discretization here"),
    ({"discretization": "ve", "rho": 5.0}, "rho does not apply to the ve discretization"),
    ({"solver": "euler", "discretization": "iddpm", "epsilon_s": 1e-4}, "epsilon_s does not apply"),
    ({"C_1": 0.002}, "C_1 does not apply to the edm discretization"),
    ({"solver": "ipndm", "discretization": "logsnr", "rho": 7.0}, "rho does not apply to the logsnr schedule"),
    ({"solver": "ipndm", "nfe": 5, "num_steps": 3}, "not both"),
    ({"solver": "ipndm", "sigmas": [80.0, 1.0], "sigma_max": 50.0}, "sigma_max does not apply when sigmas"),
])
def test_options_that_would_change_nothing_are_refused(options, match):
    with pytest.raises(InputError, match=match):
        SamplerSettings.from_options(**options)


def test_options_that_apply_are_kept_typed_and_serialise_into_the_record():
    s = SamplerSettings.from_options(solver="heun", discretization="vp", epsilon_s=1e-4, num_steps=np.int64(7),
                                     S_churn=10, S_max=float("inf"))
    assert s.num_steps == 7 and type(s.num_steps) is int and s.S_churn == 10.0 and type(s.S_churn) is float
    record = run_record("0" * 64, None, s, batch_size=4)
    assert record["sampler"] == {"solver": "heun", "discretization": "vp", "epsilon_s": 1e-4, "num_steps": 7,
                                 "S_churn": 10.0}
    assert json.loads(json.dumps(record)) == record
    assert SamplerSettings.coerce({"solver": "ipndm", "nfe": 5}) == SamplerSettings(solver="ipndm", nfe=5)


def test_generate_refuses_unknown_options_with_every_solver():
    den = GaussianDenoiser(1, 8)
    for solver in ("heun", "ipndm"):
        with pytest.raises(InputError, match="unknown sampler option 'steps' \\(the API calls it num_steps\\)"):
            generate(den, [0], solver=solver, steps=99, foo=1)
        with pytest.raises(InputError, match="unknown sampler option 'foo'"):
            generate(den, [0], solver=solver, num_steps=9, foo=1)


@pytest.mark.parametrize("disc", ["edm", "vp", "ve", "iddpm"])
def test_the_time_points_of_every_discretization_are_known_and_visited(disc):
    den = Levels(1, 8)
    den.sigma_max = 200.0
    plan = plan_sampling(den, {"solver": "euler", "discretization": disc, "num_steps": 6})
    den.levels = []
    plan.run(den, np.zeros((1, 1, 8, 8)), None, None)
    assert plan.sigmas[-1] == 0 and np.allclose(den.levels, plan.sigmas[:-1], rtol=1e-12)


def test_an_explicit_list_is_used_exactly_as_given_by_every_solver():
    den = Levels(1, 8, mu=0.3, std=0.5)
    listed = [80.0, 10.0, 1.0, 0.002]
    cases = [("dpmpp-2m", listed, False, 3), ("dpmpp-2m", listed + [0.0], False, 4), ("dpmpp-2m", listed, True, 4),
             ("heun", listed, False, 6), ("heun", listed + [0.0], False, 7), ("heun", listed, True, 7),
             ("euler", listed, False, 3), ("ipndm", listed, False, 3), ("ipndm", listed, True, 4)]
    for solver, sigmas, dtz, nfe in cases:
        plan = plan_sampling(den, {"solver": solver, "sigmas": sigmas, "denoise_to_zero": dtz})
        assert plan.nfe == nfe, (solver, sigmas, dtz)
        assert plan.sigmas.tolist() == (sigmas + [0.0] if dtz else sigmas)
        den.levels, den.calls = [], 0
        plan.run(den, np.ones((1, 1, 8, 8)), None, None)
        assert den.calls == nfe and max(den.levels) == 80.0 and set(den.levels) <= set(sigmas)
    # ending at sigma_min without the last step leaves that level's noise; with it, D(x; sigma_min)
    lat = np.ones((1, 1, 8, 8))
    end = plan_sampling(den, {"solver": "dpmpp-2m", "sigmas": listed}).run(den, lat, None, None)
    final = plan_sampling(den, {"solver": "dpmpp-2m", "sigmas": listed + [0.0]}).run(den, lat, None, None)
    np.testing.assert_allclose(final, den(end, np.full(1, 0.002)), rtol=0, atol=1e-12)


def test_every_cli_sampler_flag_comes_from_a_settings_field():
    from click.testing import CliRunner

    from edm_deploy.cli import cli
    from edm_deploy.commands.common import API_ONLY_OPTIONS

    text = CliRunner().invoke(cli, ["sample", "--help"], terminal_width=200).output
    for f in dataclasses.fields(SamplerSettings):
        if f.name not in API_ONLY_OPTIONS:
            assert (f.metadata["flag"] or f"--{f.name}") in text, f.name
    assert "--max-order" in text
