"""`bench`: no ratio from unstable timings, and the one-line answer to "what should I run?".

A busy machine gave 29 to 447 ms for the same batch and an 83x "ratio" between backends; a
timing whose repeats disagree by more than `UNSTABLE_RATIO` is reported as unstable instead.
`bench --solvers` compares solvers x NFE x the precisions exported beside a model, speed next to
the end-point error against Heun NFE 35 on the same latents.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edm_deploy.benchmarking import UNSTABLE_RATIO, BackendResult, results_table, timing_is_stable
from tests.conftest import one_error_line, requires_onnx, run_main


def test_timings_whose_repeats_disagree_are_unstable():
    assert timing_is_stable([0.100, 0.104, 0.098, 0.130, 0.101])
    assert not timing_is_stable([0.029, 0.447, 0.031, 0.030, 0.200])  # the busy machine of issue 23
    assert not timing_is_stable([1.0, 1.0, UNSTABLE_RATIO * 1.0 + 1e-9])
    assert timing_is_stable([0.01, 1.0])  # two repeats cannot tell; the table says so


def _result(name, per_s, stable, repeats=5):
    return BackendResult(backend=name, batch=64, evals_per_s=per_s / 64, image_evals_per_s=per_s, spread=0.1,
                         stable=stable, repeats=repeats)


def test_the_table_prints_no_ratio_for_an_unstable_timing():
    table = results_table([_result("onnxruntime", 1000.0, True), _result("torch", 12.0, False)])
    rows = table.splitlines()
    assert "1.00x" in rows[1] and "unstable" in rows[2] and "x " not in rows[2].split("12.00")[1][:10]
    assert "note: unstable timings for torch at batch 64" in table and "83" not in table
    table = results_table([_result("onnxruntime", 1000.0, False), _result("torch", 900.0, True)])
    assert "unstable" in table.splitlines()[2]  # no ratio against an unstable first row either
    assert "fewer than 3 repeats" in results_table([_result("a", 1.0, True, repeats=2)])


@pytest.fixture
def oracle_family(tmp_path):
    """g.onnx and a slightly different g-int8.onnx beside it (an 'export' that is a little off)."""
    import onnx
    from onnx import helper

    from tests.onnx_oracles import gaussian_onnx

    base = gaussian_onnx(str(tmp_path / "g.onnx"), label_dim=10)
    off = gaussian_onnx(str(tmp_path / "off.onnx"), label_dim=10, mu=0.32)
    model = onnx.load(off)
    manifest = json.loads({p.key: p.value for p in model.metadata_props}["edm_deploy"])
    manifest["precision"] = "int8"
    del model.metadata_props[:]
    helper.set_model_props(model, {"edm_deploy": json.dumps(manifest)})
    onnx.save(model, str(tmp_path / "g-int8.onnx"))
    return base, str(tmp_path / "g-int8.onnx")


@requires_onnx
def test_the_solver_sweep_compares_every_setting_on_the_same_latents(oracle_family):
    from edm_deploy.sweep import precision_variants, sweep

    base, int8 = oracle_family
    assert precision_variants(int8) == precision_variants(base) == [base, int8]
    result = sweep(int8, ["ipndm", "heun", "euler"], [5, 6, 10], num_latents=8, batch=4, repeats=1)
    assert result.reference.model == base and result.reference.precision == "fp32"  # full precision first
    assert any("heun cannot spend exactly NFE 6" in s for s in result.skipped)
    settings = {(r.precision, r.solver, r.nfe) for r in result.rows}
    assert len(result.rows) == len(settings) == 2 * 7  # 2 precisions x (3 solvers x 3 NFEs - 2 impossible)
    by = {(r.precision, r.solver, r.nfe): r for r in result.rows}
    # a better solver and more evaluations approach the reference; the shifted model never reaches it
    assert by["fp32", "ipndm", 10].rms_error < by["fp32", "ipndm", 5].rms_error < by["fp32", "euler", 5].rms_error
    assert by["int8", "ipndm", 10].rms_error > 0.01 > by["fp32", "ipndm", 10].rms_error
    best = result.fastest(0.01)
    assert best is not None and best.rms_error <= 0.01 and best.precision == "fp32"
    assert all(r.images_per_s <= best.images_per_s for r in result.rows if r.rms_error <= 0.01 and r.stable)
    front = result.pareto()
    assert all(a.images_per_s >= b.images_per_s and a.rms_error > b.rms_error for a, b in zip(front, front[1:]))
    assert result.fastest(1e-12) is None


@requires_onnx
def test_bench_solvers_gives_the_answer_in_one_line(oracle_family, tmp_path, capsys):
    base, _ = oracle_family
    out = tmp_path / "sweep.json"
    code, stdout, err = run_main(["bench", base, "--solvers", "--solver", "ipndm", "--solver", "dpmpp-2m",
                                  "--nfe", "4", "--nfe", "10", "--latents", "8", "--batch", "8", "--repeats", "1",
                                  "--max-error", "0.5", "--json", str(out)], capsys)
    assert code == 0, err
    answer = [ln for ln in stdout.splitlines() if ln.startswith("fastest within RMS error 0.5: --solver")]
    assert len(answer) == 1, stdout
    assert stdout.rstrip().splitlines()[-1].startswith("note: the RMS error is a proxy"), stdout  # not FID: say so
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 8 and data["reference"]["solver"] == "heun" and data["reference"]["nfe"] == 35
    for args, message in [(["--nfe", "5"], "--nfe applies to bench --solvers only"),
                          (["--solvers", "--backend", "onnxruntime"], "drop --backend"),
                          (["--solvers", "--solver", "nope"], "Invalid value for '--solver'"),
                          (["--solvers", "--solver", "heun", "--nfe", "6"], "none of the settings asked for exists (heun cannot spend exactly NFE 6")]:
        code, _, err = run_main(["bench", base, *args], capsys)
        assert message in one_error_line(code, err), err


@requires_onnx
def test_a_model_with_a_name_of_its_own_is_compared_with_nothing_else(oracle_family, tmp_path):
    from edm_deploy.sweep import precision_variants

    base, _ = oracle_family
    lone = tmp_path / "custom-name.onnx"
    shutil.copy(base, lone)
    assert precision_variants(str(lone)) == [str(lone)]


@requires_onnx
def test_the_sweep_bounds_the_images_it_holds_before_drawing_them(tmp_path):
    from edm_deploy.runtime.core.errors import InputError
    from edm_deploy.sweep import sweep
    from tests.onnx_oracles import gaussian_onnx

    model = gaussian_onnx(str(tmp_path / "big.onnx"), channels=3, resolution=64)
    with pytest.raises(InputError, match="latents 30000 of 3x64x64 would hold 6.9 GiB") as info:
        sweep(model, ["ipndm"], [5], num_latents=30_000)
    assert info.value.param == "latents"
