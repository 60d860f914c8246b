"""The fast solver family on the command line and in the embedding API: --solver, --nfe,
--sigmas (a list or a schedule file), --afs, --denoise-to-zero, --disc; inapplicable options are
errors; the run record holds the solver and the time points."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edm_deploy.runtime import GaussianDenoiser, StackedRandomGenerator
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling.generate import generate, plan_sampling, quantize_uint8
from tests.conftest import requires_onnx, run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    return gaussian_onnx(str(tmp_path_factory.mktemp("m") / "gauss.onnx"))


def _line(res, prefix):
    return next(ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith(prefix))


def _error(res):
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


def test_the_api_plan_states_the_nfe_it_spends():
    den = GaussianDenoiser(1, 8)
    for kwargs, want in [({}, 35), ({"solver": "ipndm", "nfe": 5}, 5), ({"solver": "unipc", "num_steps": 7}, 6),
                         ({"solver": "deis", "nfe": 4, "afs": True}, 4), ({"solver": "euler", "num_steps": 10}, 10),
                         ({"solver": "dpmpp-3m", "sigmas": [80, 5, 1, 0.1, 0.002]}, 4),
                         ({"solver": "ipndm", "nfe": 6, "denoise_to_zero": True}, 6)]:
        plan = plan_sampling(den, kwargs)
        den.calls = 0
        plan.run(den, np.zeros((2, 1, 8, 8)), None, StackedRandomGenerator([0, 1]).randn_like)
        assert plan.nfe == den.calls == want, kwargs


def test_the_default_and_the_reference_flags_keep_the_reference_samplers():
    from edm_deploy.runtime import edm_sampler

    den = GaussianDenoiser(1, 8, mu=0.1, std=0.6)
    rnd = StackedRandomGenerator(range(4))
    latents = rnd.randn((1, 8, 8))
    want = quantize_uint8(edm_sampler(den, latents, num_steps=12))
    np.testing.assert_array_equal(generate(den, range(4), num_steps=12), want)
    np.testing.assert_array_equal(generate(den, range(4), num_steps=12, solver="heun", discretization="edm"), want)


def test_inapplicable_options_are_refused_in_the_api():
    den = GaussianDenoiser(1, 8)
    cases = [({"solver": "ipndm", "S_churn": 5}, "S_churn does not apply to the ipndm solver"),
             ({"solver": "heun", "afs": True}, "afs does not apply to the heun solver"),
             ({"solver": "ipndm", "schedule": "vp"}, "schedule .an ablation option"),
             ({"solver": "heun", "nfe": 10}, "heun cannot spend exactly NFE 10"),
             ({"solver": "ipndm", "nfe": 5, "num_steps": 6}, "not both"),
             ({"solver": "ipndm", "sigmas": [80, 90, 1]}, "strictly decreasing"),
             ({"solver": "ipndm", "sigmas": [80, 1], "num_steps": 4}, "num_steps does not apply when sigmas"),
             ({"solver": "dpmpp-2m", "discretization": "logsnr", "rho": 7}, "rho does not apply to the logsnr")]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            plan_sampling(den, kwargs)


@requires_onnx
def test_cli_fast_solvers_report_their_nfe_and_match_the_api(model, tmp_path, cli_env):
    from edm_deploy.loading import load

    npz = tmp_path / "i.npz"
    res = run_cli(["sample", model, "-n", "8", "--solver", "ipndm", "--nfe", "5", "--npz", str(npz)], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "ipndm NFE 5/image" in _line(res, "done:")
    with load(model) as den:
        want = generate(den, range(8), solver="ipndm", nfe=5)
    np.testing.assert_array_equal(np.load(npz)["images"], want)
    for args, nfe in [(["--solver", "unipc", "--disc", "logsnr", "--steps", "6"], 5),
                      (["--solver", "dpmpp-2m", "--steps", "8"], 8),
                      (["--solver", "deis", "--nfe", "4", "--afs"], 4),
                      (["--solver", "ipndm-v", "--nfe", "6", "--denoise-to-zero"], 6),
                      (["--solver", "dpmpp-3m", "--sigmas", "80,10.98,3.88,1.58,0.57,0.17,0.002"], 6)]:
        out = tmp_path / "-".join(args).replace(",", "_").replace("--", "")
        res = run_cli(["sample", model, "-n", "4", *args, "--outdir", str(out)], env=cli_env)
        assert res.returncode == 0, (args, res.stderr)
        assert f"NFE {nfe}/image" in _line(res, "done:"), args


@requires_onnx
@pytest.mark.parametrize("args,match", [
    (["--solver", "ipndm", "--S_churn", "10"], "--S_churn does not apply to the ipndm solver"),
    (["--solver", "heun", "--afs"], "--afs does not apply to the heun solver"),
    (["--solver", "heun", "--nfe", "10"], "nearest possible: 9 or 11"),
    (["--solver", "ipndm", "--schedule", "vp"], "--schedule (an ablation option"),
    (["--solver", "ipndm", "--sigmas", "80,90,1"], "strictly decreasing"),
    (["--solver", "ipndm", "--sigmas", "80,1", "--steps", "4"], "--steps does not apply when sigmas"),
    (["--sigmas", "80,abc"], "comma-separated numbers"),
    (["--solver", "ipndm", "--sigmas", "80"], "needs at least 2 time points"),
])
def test_cli_option_errors_are_one_line_naming_the_flag(model, tmp_path, cli_env, args, match):
    out = tmp_path / "o"
    line = _error(run_cli(["sample", model, "-n", "2", *args, "--outdir", str(out)], env=cli_env))
    assert match in line, line
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".png")]


@requires_onnx
def test_schedule_files_are_used_exactly_and_the_record_holds_solver_and_time_points(model, tmp_path, cli_env):
    from edm_deploy.runtime.output.writers import RUN_RECORD
    from edm_deploy.runtime.sampling.schedule_file import write_schedule

    sched = tmp_path / "s.json"
    write_schedule(str(sched), [80, 10.98, 3.88, 1.58, 0.57, 0.002], solver="ipndm", nfe=5, model_sha256="0" * 64)
    out = tmp_path / "o"
    res = run_cli(["sample", model, "-n", "4", "--solver", "ipndm", "--sigmas", str(sched), "--outdir", str(out)],
                  env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "searched for another model" in res.stderr and "ipndm NFE 5/image" in res.stdout
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["solver"] == "ipndm" and record["time_points"] == [80, 10.98, 3.88, 1.58, 0.57, 0.002]
    res = run_cli(["sample", model, "-n", "4", "--solver", "unipc", "--sigmas", str(sched), "--outdir", str(out)],
                  env=cli_env)
    assert "other settings" in _error(res) and "solver" in _error(res)
    other = run_cli(["sample", model, "-n", "4", "--solver", "unipc", "--sigmas", str(sched), "--outdir",
                     str(tmp_path / "u")], env=cli_env)
    assert "searched for the ipndm solver, not unipc" in other.stderr
