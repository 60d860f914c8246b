"""GITS-style schedule search (`runtime/sampling/schedule_search.py`) and `edm-deploy schedule`.

* every solver's costed step is the solver's own update: on the solver's own trajectory as the
  "teacher", each step costs nothing (with its warm-up, lower-order-final, AFS and history);
* the dynamic programme finds the cheapest path (brute force on small grids), and the cost it
  reports is the exact cost of the path it returns;
* on analytic denoisers the searched schedule beats EDM's rho = 7 against the exact ODE
  solution; the path has exactly the NFE's steps, spans the fine grid, and spends the NFE;
* labels are drawn per seed as `sample` draws them; bad input is one InputError / error line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edm_deploy.runtime import (
    FiniteSetDenoiser,
    GaussianDenoiser,
    StackedRandomGenerator,
    draw_latents_and_labels,
)
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.schedules import edm_sigma_steps
from edm_deploy.runtime.sampling import schedule_search as ss
from edm_deploy.runtime.sampling import solvers as slv
from edm_deploy.runtime.sampling.planner import sample
from edm_deploy.runtime.sampling.schedule_file import read_schedule
from tests.conftest import requires_onnx, run_cli
from tests.search_oracles import brute_force_path, trajectory_moments

GRAM_SOLVERS = ("euler", "ipndm", "ipndm-v", "deis", "dpmpp-2m", "dpmpp-3m", "unipc")


def finite_set(label_dim=0):
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(12, 1, 8, 8))
    labels = np.arange(12) % 3 if label_dim else None
    return FiniteSetDenoiser(points, labels)


def own_trajectory(name, den, latents, sigmas, afs=False):
    """The solver's own states and the data predictions it used, as `Trajectories`."""
    n = len(sigmas)
    xs, ds = [None] * n, [None] * n

    def record(info):
        xs[info.i + 1] = info.x
        # UniPC's newest data prediction after step i is its corrector's, at sigma_{i+1}.
        ds[info.i + (1 if name == "unipc" else 0)] = info.denoised

    x0 = latents * sigmas[0]
    xs[0] = x0
    slv.get_solver(name).fn(den, x0, sigmas, callback=record, **({"afs": True} if afs else {}))
    for m in range(n):
        if ds[m] is None or (name == "unipc" and m == 0):
            ds[m] = den(xs[m], np.full(len(x0), sigmas[m]))
    return ss.Trajectories(np.asarray(sigmas), np.stack(xs), np.stack(ds))


CASES = [(name, k, afs) for name in GRAM_SOLVERS for k in (1, 2, 3, 4, 6)
         for afs in ((False, True) if slv.get_solver(name).takes_afs else (False,))]


@pytest.mark.parametrize("name,num_steps,afs", CASES)
def test_a_costed_step_is_the_solvers_own_update(name, num_steps, afs):
    den = finite_set()
    latents = StackedRandomGenerator(range(6)).randn((1, 8, 8)).astype(np.float64)
    sigmas = edm_sigma_steps(num_steps + 1, 0.002, 20.0, 7)
    traj = own_trajectory(name, den, latents, sigmas, afs)
    cost = ss.StepCosts(trajectory_moments(traj), name, num_steps, afs=afs, unipc_corrector=True)
    costs = ss.path_costs(cost, range(num_steps + 1))
    scale = float(np.sqrt(np.mean(np.square(traj.x[0]).reshape(6, -1).sum(1))))
    assert max(abs(c) for c in costs) < 1e-7 * scale, costs


def test_unipc_steps_are_costed_by_their_predictor_by_default():
    den = finite_set()
    latents = StackedRandomGenerator(range(6)).randn((1, 8, 8)).astype(np.float64)
    sigmas = edm_sigma_steps(6, 0.002, 20.0, 7)
    moments = trajectory_moments(own_trajectory("unipc", den, latents, sigmas))
    predictor = ss.path_costs(ss.StepCosts(moments, "unipc", 5), range(6))
    # The corrected steps (all but the last) differ from their predictions; the last has no corrector.
    assert min(predictor[:-1]) > 1e-4 and predictor[-1] < 1e-6


def _gaussian_moments(n=9, batch=16):
    den = GaussianDenoiser(1, 8, mu=0.3, std=0.5)
    latents = StackedRandomGenerator(range(batch)).randn((1, 8, 8))
    traj = ss.run_teacher(den, latents, None, edm_sigma_steps(n, 0.002, 80.0, 7), "ipndm")
    return trajectory_moments(traj)


@pytest.mark.parametrize("name,max_order", [("euler", None), ("dpmpp-2m", None), ("ipndm", 2), ("ipndm-v", 2),
                                            ("deis", 2), ("unipc", 2)])
@pytest.mark.parametrize("num_steps", [2, 3, 5])
def test_the_programme_finds_the_cheapest_path_when_steps_use_one_previous_point(name, max_order, num_steps):
    moments = _gaussian_moments()
    for metric in ss.METRICS:
        cost = ss.StepCosts(moments, name, num_steps, metric=metric, max_order=max_order)
        path, total = ss.dp_path(moments.n, num_steps, cost, 1.15)
        best, best_total = brute_force_path(moments.n, num_steps, cost, 1.15)
        assert total == pytest.approx(best_total, rel=1e-9, abs=1e-12) and path == best


@pytest.mark.parametrize("name", ["ipndm", "ipndm-v", "deis", "dpmpp-3m", "unipc"])
def test_with_longer_histories_the_reported_cost_is_that_of_the_returned_path(name):
    moments = _gaussian_moments()
    cost = ss.StepCosts(moments, name, 5)
    path, total = ss.dp_path(moments.n, 5, cost, 1.15)
    exact = sum(1.15**k * c for k, c in enumerate(ss.path_costs(cost, path)))
    _, best_total = brute_force_path(moments.n, 5, cost, 1.15)
    assert total == pytest.approx(exact, rel=1e-12) and total >= best_total - 1e-12
    assert total <= 1.05 * best_total  # near the optimum here


def test_the_programme_weights_step_k_by_coeff_to_the_k():
    want = np.array([0, 3, 6, 8])

    def cost(k, nd):  # 1 on the wanted path's steps, 10 elsewhere
        return np.where((nd.i == want[k]) & (nd.j == want[k + 1]), 1.0, 10.0)

    path, total = ss.dp_path(9, 3, cost, 2.0)
    assert path == want.tolist() and total == pytest.approx(1 + 2 + 4)
    with pytest.raises(InputError, match="impossible"):
        ss.dp_path(9, 9, cost, 2.0)


def _exact_end_error(den, latents, sigmas, solver, **options):
    x = slv.get_solver(solver).fn(den, latents * float(sigmas[0]), sigmas, **options)
    exact = den.ode_solution(latents * float(sigmas[0]), float(sigmas[0]), float(sigmas[-1]))
    return float(np.sqrt(np.mean(np.square(x - exact).reshape(len(x), -1).sum(1))))


@pytest.mark.parametrize("solver,nfe", [("ipndm", 4), ("ipndm", 6), ("dpmpp-3m", 5), ("deis", 5), ("ipndm-v", 5),
                                        ("dpmpp-2m", 6), ("euler", 8)])
def test_the_searched_schedule_beats_edm_rho7_against_the_exact_ode_solution(solver, nfe):
    den = GaussianDenoiser(1, 8, mu=0.3, std=0.5)
    result = ss.search_schedule(den, solver, nfe, num_latents=32, check=False)
    levels = result.sigmas[result.sigmas > 0]
    latents = StackedRandomGenerator(range(1000, 1032)).randn((1, 8, 8)).astype(np.float64)  # not the search's
    edm = edm_sigma_steps(levels.size, 0.002, 80.0, 7)
    searched, baseline = _exact_end_error(den, latents, levels, solver), _exact_end_error(den, latents, edm, solver)
    assert searched < 0.8 * baseline, (searched, baseline, levels)


@pytest.mark.parametrize("solver,nfe,options,points", [
    ("ipndm", 5, {}, 6), ("ipndm", 5, {"afs": True}, 7), ("ipndm", 5, {"denoise_to_zero": True}, 5),
    ("unipc", 5, {}, 6), ("dpmpp-2m", 5, {}, 5), ("euler", 6, {}, 6), ("heun", 5, {}, 3), ("deis", 3, {"max_order": 2}, 4),
])
def test_the_path_has_the_nfes_steps_spans_the_fine_grid_and_spends_the_nfe(solver, nfe, options, points):
    den = finite_set()
    result = ss.search_schedule(den, solver, nfe, num_latents=8, fine_points=21, check=False, **options)
    assert len(result.path) == points and result.path[0] == 0 and result.path[-1] == 20
    assert all(a < b for a, b in zip(result.path, result.path[1:]))
    levels = result.sigmas[result.sigmas > 0]
    np.testing.assert_array_equal(levels, result.fine_sigmas[result.path])
    assert levels[0] == pytest.approx(80) and levels[-1] == pytest.approx(0.002)
    ends_at_zero = slv.get_solver(solver).appends_zero or options.get("denoise_to_zero", False)
    assert (result.sigmas[-1] == 0) == ends_at_zero
    assert len(result.step_costs) == points - 1
    den.calls = 0
    latents = StackedRandomGenerator(range(2)).randn((1, 8, 8))
    sample(den, latents, solver=solver, sigmas=result.sigmas, **options)
    assert den.calls == nfe


def test_the_check_compares_the_solver_on_both_schedules_against_the_teacher():
    den = finite_set()
    result = ss.search_schedule(den, "ipndm", 5, num_latents=16)
    c = result.check
    assert c["searched_rms"] < c["edm_rho7_rms"] and len(c["edm_rho7_sigmas"]) == 6 and c["latents"] == 8
    assert set(result.seconds) == {"teacher", "search", "refine", "check"}
    meta = result.metadata()
    assert meta["solver"] == "ipndm" and meta["nfe"] == 5 and meta["search"]["coeff"] == 1.15
    assert meta["search"]["fine_points"] == 61 and meta["search"]["num_latents"] == 16
    assert meta["search"]["seeds"] == "0-15" and meta["search"]["teacher"] == "ipndm"
    assert meta["search"]["refine"]["latents"] == 8
    json.dumps(meta)  # serialisable as it is


def test_the_polish_lowers_the_solvers_real_error_and_can_be_turned_off():
    den = finite_set()
    run = ss.run_teacher_search_data(den, num_latents=32, fine_points=31)
    plain = ss.search_schedule(den, "ipndm", 4, teacher_run=run, refine_latents=0)
    polished = ss.search_schedule(den, "ipndm", 4, teacher_run=run, refine_latents=16)
    refine = polished.settings["refine"]
    assert plain.settings["refine"] is None and "refine" not in plain.seconds and plain.check["latents"] == 32
    assert refine["dp_path"] == plain.path and refine["end_rms"] <= refine["dp_end_rms"]
    assert 1 < refine["evaluations"] <= 20 * 4 and polished.check["latents"] == 16
    assert polished.cost == pytest.approx(sum(1.15**k * c for k, c in enumerate(polished.step_costs)))


def test_refine_path_moves_inner_points_while_the_error_falls():
    target = [0, 4, 7, 10]
    path, best, first, evaluations = ss.refine_path(lambda p: float(np.abs(np.subtract(p, target)).sum()), [0, 2, 8, 10])
    assert path == target and best == 0 and first == 3 and evaluations > 3
    _, _, _, capped = ss.refine_path(lambda p: float(np.abs(np.subtract(p, target)).sum()), [0, 2, 8, 10], 2)
    assert capped == 2


def test_a_teacher_run_is_reusable_and_the_labels_are_drawn_per_seed_as_sample_draws_them():
    den = finite_set(label_dim=3)
    seeds = [5, 6, 7, 100]
    run = ss.run_teacher_search_data(den, seeds=seeds, fine_points=11, batch_size=3)
    latents, labels = draw_latents_and_labels(StackedRandomGenerator(seeds), (1, 8, 8), 3)
    np.testing.assert_array_equal(run.latents, latents)
    np.testing.assert_array_equal(run.labels, labels)
    assert run.moments.count == 4 and run.nfe_per_latent == 11
    a = ss.search_schedule(den, "ipndm", 4, teacher_run=run, check=False)
    b = ss.search_schedule(den, "ipndm", 4, seeds=seeds, fine_points=11, batch_size=2, check=False)
    assert a.path == b.path and a.cost == pytest.approx(b.cost, rel=1e-9)
    fixed = ss.run_teacher_search_data(den, seeds=seeds, fine_points=11, class_idx=2)
    assert (fixed.labels.argmax(1) == 2).all()
    with pytest.raises(InputError, match="teacher_run"):
        ss.search_schedule(den, "ipndm", 4, teacher_run=run, fine_points=21)


def test_heun_costs_its_second_stage_with_the_network():
    den = finite_set()
    result = ss.search_schedule(den, "heun", 7, num_latents=64, fine_points=11)
    assert len(result.path) == 4 and result.settings["heun_cost_latents"] == ss.HEUN_COST_LATENTS
    assert result.check["searched_rms"] < result.check["edm_rho7_rms"]


def test_gits_own_cost_is_an_euler_step_whatever_the_solver():
    moments = _gaussian_moments()
    euler = ss.StepCosts(moments, "euler", 4)
    as_gits = ss.StepCosts(moments, "ipndm", 4, step="euler")
    path = [0, 2, 4, 6, 8]
    assert ss.path_costs(euler, path) == ss.path_costs(as_gits, path)
    assert ss.path_costs(ss.StepCosts(moments, "ipndm", 4), path) != ss.path_costs(as_gits, path)


@pytest.mark.parametrize("kwargs,match", [
    ({"solver": "heun", "nfe": 4}, "heun cannot spend exactly NFE 4.*nearest possible: 3 or 5"),
    ({"solver": "ipndm", "nfe": 61}, "takes 61 steps, more than the 60 intervals"),
    ({"solver": "ipndm", "nfe": 11, "fine_points": 11}, "more than 11 fine points"),
    ({"solver": "euler", "nfe": 1}, "single time point"),
    ({"solver": "ipndm", "nfe": 0}, "nfe must be a positive integer"),
    ({"solver": "nope", "nfe": 5}, "unknown solver 'nope'"),
    ({"solver": "euler", "nfe": 5, "afs": True}, "afs does not apply to the euler solver"),
    ({"solver": "euler", "nfe": 5, "max_order": 2}, "max_order does not apply to the euler solver"),
    ({"solver": "unipc", "nfe": 5, "max_order": 4}, "max_order must be an integer from 1 to 3"),
    ({"solver": "ipndm", "nfe": 5, "teacher": "unipc"}, "teacher must be one of"),
    ({"solver": "ipndm", "nfe": 5, "coeff": 0.0}, "coeff must be a finite number > 0"),
    ({"solver": "ipndm", "nfe": 5, "coeff": math.nan}, "coeff must be a finite number > 0"),
    ({"solver": "ipndm", "nfe": 5, "metric": "l1"}, "metric must be one of l2, dev"),
    ({"solver": "ipndm", "nfe": 5, "step": "heun"}, "step must be one of solver, euler"),
    ({"solver": "ipndm", "nfe": 5, "fine_points": 2}, "fine_points must be an integer from 3"),
])
def test_bad_settings_are_one_input_error_before_any_network_call(kwargs, match):
    den = finite_set()
    with pytest.raises(InputError, match=match):
        ss.search_schedule(den, **kwargs)
    assert den.calls == 0


def test_bad_latents_and_classes_are_input_errors():
    with pytest.raises(InputError, match="num_latents must be a positive integer"):
        ss.search_schedule(finite_set(), num_latents=0)
    with pytest.raises(InputError, match="no seeds"):
        ss.search_schedule(finite_set(), seeds=[])
    with pytest.raises(InputError, match="unconditional"):
        ss.search_schedule(finite_set(), class_idx=1, num_latents=2)
    with pytest.raises(InputError, match="out of range"):
        ss.search_schedule(finite_set(label_dim=3), class_idx=3, num_latents=2)


def test_the_library_imports_no_torch():
    code = "import sys, edm_deploy.runtime.sampling.schedule_search; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def gauss_model(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    return gaussian_onnx(str(tmp_path_factory.mktemp("m") / "gauss.onnx"))


def _error(res):
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


@requires_onnx
def test_cli_writes_a_schedule_file_sample_uses(gauss_model, tmp_path, cli_env):
    from edm_deploy.runtime.core.fileio import sha256_file

    out = tmp_path / "ipndm5.json"
    res = run_cli(["schedule", gauss_model, "--solver", "ipndm", "--nfe", "5", "--out", str(out), "--latents", "16",
                   "--fine-points", "31"], env=cli_env)
    assert res.returncode == 0, res.stderr
    sigmas, meta = read_schedule(str(out))
    assert len(sigmas) == 6 and sigmas[0] == pytest.approx(80) and sigmas[-1] == pytest.approx(0.002)
    assert meta["solver"] == "ipndm" and meta["nfe"] == 5 and meta["model_sha256"] == sha256_file(gauss_model)
    search = meta["search"]
    assert search["fine_points"] == 31 and search["num_latents"] == 16 and search["coeff"] == 1.15
    assert search["metric"] == "l2" and search["step"] == "solver" and search["teacher"] == "ipndm"
    assert "check: end-point RMS error" in res.stdout and "output: " in res.stdout
    npz = tmp_path / "s.npz"
    used = run_cli(["sample", gauss_model, "-n", "4", "--solver", "ipndm", "--sigmas", str(out), "--npz", str(npz)],
                   env=cli_env)
    assert used.returncode == 0 and "NFE 5/image" in used.stdout and "warning" not in used.stderr, used.stderr


@requires_onnx
@pytest.mark.parametrize("args,match", [
    (["--solver", "heun", "--nfe", "4"], "heun cannot spend exactly NFE 4"),
    (["--nfe", "61"], "--nfe 61 of the ipndm solver takes 61 steps, more than the 60 intervals"),
    (["--nfe", "9", "--fine-points", "9"], "more than the 8 intervals of the 9-point fine grid"),
    (["--solver", "euler", "--nfe", "5", "--max-order", "2"], "--max-order does not apply to the euler solver"),
    (["--nfe", "5", "--latents", "4", "--seeds", "0-3"], "either --latents or --seeds"),
    (["--nfe", "5", "--class", "1"], "unconditional"),
])
def test_cli_bad_settings_are_one_error_line(gauss_model, tmp_path, cli_env, args, match):
    line = _error(run_cli(["schedule", gauss_model, *args, "--out", str(tmp_path / "s.json")], env=cli_env))
    assert match in line, line
    assert not (tmp_path / "s.json").exists()


@requires_onnx
def test_cli_refuses_outputs_it_cannot_write(gauss_model, tmp_path, cli_env):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, match in [(gauss_model, "would overwrite MODEL"), (str(tmp_path / "s.txt"), "must end in .json"),
                       (str(blocker / "s.json"), "it is a file")]:
        line = _error(run_cli(["schedule", gauss_model, "--nfe", "5", "--out", out], env=cli_env))
        assert match in line, line


def test_the_solvers_benchmark_replaces_only_its_own_section(tmp_path):
    from benchmarks.solvers import BEGIN, END, write_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Someone else's section\n\nkept\n")
    write_section(f"{BEGIN}\nfirst\n{END}\n", str(path))
    write_section(f"{BEGIN}\nsecond\n{END}\n", str(path))
    text = path.read_text()
    assert text.startswith("# Results\n\n## Someone else's section\n\nkept\n")
    assert "second" in text and "first" not in text and text.count(BEGIN) == 1
