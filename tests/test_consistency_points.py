"""A consistency model's few-step time points: chosen per model, carried in its manifest, used by sample."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.manifest import schedules_record
from edm_deploy.runtime.sampling.analytic import _AnalyticBase
from edm_deploy.runtime.sampling.consistency_points import candidates, choose_consistency_points
from edm_deploy.runtime.sampling.planner import plan_sampling
from tests.conftest import one_error_line, requires_onnx, requires_torch, run_main

BEST = 1.5  # on the grid


class LevelModel(_AnalyticBase):
    """A stand-in 'consistency model' whose images say the noise level they were made at: every pixel
    is log(sigma) / 10, whatever x is. Two-step samples made with mid point m are log(m) / 10."""

    consistency_tuned = True

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return np.broadcast_to(np.log(self._sigma_column(sigma, x.shape[0])) / 10, x.shape).copy()


def mean_pixel(images_uint8):
    """A one-dimensional feature: the mean pixel in [-1, 1]."""
    return (images_uint8.reshape(len(images_uint8), -1).astype(np.float64) / 127.5 - 1).mean(1, keepdims=True)


def test_the_candidate_closest_to_the_reference_wins():
    den = LevelModel(1, 4)
    target = (np.array([np.log(BEST) / 10]), np.eye(1) * 1e-4)
    choice = choose_consistency_points(den, 2, mean_pixel, target, seeds=range(20), batch_size=8)
    assert choice.sigmas == [80.0, BEST]
    assert len(choice.tried) == len(candidates(2, 80.0)) == 6
    assert {tuple(r["sigmas"]) for r in choice.tried} == {tuple(c) for c in candidates(2, 80.0)}
    fd = {r["sigmas"][1]: r["fd"] for r in choice.tried}
    assert fd[BEST] == min(fd.values()) and fd[0.2] > fd[0.821] > fd[BEST]  # ranked by distance to the target
    meta = choice.metadata()
    assert meta["solver"] == "consistency" and meta["nfe"] == 2 and len(meta["search"]["tried"]) == 6


def test_candidates_are_decreasing_and_bounded():
    for nfe in (1, 2, 3):
        for c in candidates(nfe, 5.0):
            assert len(c) == nfe and c[0] == 5.0 and all(a > b for a, b in zip(c, c[1:]))
    assert candidates(3, 5.0)[0] == [5.0, 3.0, 1.5]  # points above sigma_max are dropped
    with pytest.raises(InputError, match="NFE 1 to 4"):
        candidates(5, 80.0)


def test_manifest_schedules_become_the_models_default_for_that_solver_and_nfe():
    den = LevelModel(1, 4)
    den.schedules = schedules_record({"consistency@2": [80, BEST]}, "test")
    plan = plan_sampling(den, {"solver": "consistency", "nfe": 2})
    assert plan.from_manifest and list(plan.sigmas) == [80.0, BEST] and plan.nfe == 2
    for other in ({"solver": "consistency", "nfe": 3}, {"solver": "consistency", "nfe": 2, "sigma_max": 40},
                  {"solver": "consistency", "sigmas": [80, 0.5]}):
        assert not plan_sampling(den, other).from_manifest  # anything but exactly S@K keeps its own points
    den.schedules = {"consistency@2": [80.0, 2.0, 1.0]}  # an entry that spends 3 evaluations
    with pytest.raises(InputError, match="spend 3 evaluations"):
        plan_sampling(den, {"solver": "consistency", "nfe": 2})


@pytest.mark.parametrize("entry, message", [
    ({"consistency": [80, 1]}, "is not 'solver@nfe'"),
    ({"ipndm@5": "80,1"}, "must be a list"),
    ({"ipndm@5": [1, 80]}, "decreasing"),
    ([80, 1], "must map at most"),
])
def test_malformed_manifest_schedules_are_one_clear_error(entry, message):
    with pytest.raises(InputError, match=message):
        schedules_record(entry, "model.onnx")


@requires_torch
@requires_onnx
def test_export_carries_a_schedule_file_that_sample_and_info_use(tmp_path, capsys):
    from edm_deploy.runtime.sampling.schedule_file import write_schedule
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(str(tmp_path / "ckpt.pt"))
    good = str(tmp_path / "ipndm3.json")
    write_schedule(good, [80.0, 5.0, 0.5, 0.002], solver="ipndm", nfe=3)
    wrong = str(tmp_path / "wrong.json")
    write_schedule(wrong, [80.0, 5.0, 0.5, 0.002], solver="ipndm", nfe=4)
    out = str(tmp_path / "m.onnx")
    code, _, err = run_main(["export", ckpt, "--out", out, "--schedule", wrong, "--no-verify"], capsys)
    assert "spend 3 evaluations with ipndm, not the NFE 4" in one_error_line(code, err) and not os.path.exists(out)
    code, _, err = run_main(["export", ckpt, "--out", out, "--schedule", good, "--no-verify"], capsys)
    assert code == 0, err
    code, text, _ = run_main(["info", out], capsys)
    assert "schedule    : ipndm@3 at 80, 5, 0.5, 0.002" in text
    code, _, err = run_main(["sample", out, "--seeds", "0-1", "--solver", "ipndm", "--nfe", "3",
                             "--npz", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    assert "the model's own for ipndm at NFE 3" in err


@requires_onnx
def test_schedule_consistency_needs_a_reference_and_refuses_gits_options(tmp_path, capsys):
    model = str(tmp_path / "m.onnx")
    open(model, "wb").write(b"x")
    code, _, err = run_main(["schedule", model, "--solver", "consistency", "--nfe", "2", "--out",
                             str(tmp_path / "c.json")], capsys)
    assert "needs --ref" in one_error_line(code, err)
    code, _, err = run_main(["schedule", model, "--solver", "consistency", "--nfe", "2", "--afs", "--out",
                             str(tmp_path / "c.json")], capsys)
    assert "--afs does not apply to --solver consistency" in one_error_line(code, err)
    code, _, err = run_main(["schedule", model, "--solver", "ipndm", "--nfe", "4", "--ref", "r.npz", "--out",
                             str(tmp_path / "c.json")], capsys)
    assert "apply to --solver consistency" in one_error_line(code, err)


@requires_torch
@requires_onnx
def test_schedule_consistency_end_to_end_writes_a_file_export_accepts(tmp_path, capsys):
    """The CLI glue on a tiny exported model with the suite's stand-in detector and a reference of real digits."""
    from edm_deploy.runtime.fid.fid import load_detector
    from edm_deploy.runtime.fid.fid_stats import FeatureStats, save_ref
    from edm_deploy.runtime.sampling.schedule_file import read_schedule
    from edm_deploy.training.dataset import load_digits_split
    from tests.factories import tiny_checkpoint
    from tests.test_fid import build_standin

    ckpt = tiny_checkpoint(str(tmp_path / "ckpt.pt"))
    model = str(tmp_path / "m.onnx")
    assert run_main(["export", ckpt, "--out", model, "--no-verify"], capsys)[0] == 0
    detector = build_standin(str(tmp_path / "det.pt"))
    images = load_digits_split()[0][:64]
    stats = FeatureStats()
    stats.update(load_detector(detector)(images.repeat(3, axis=1)))
    ref = str(tmp_path / "ref.npz")
    save_ref(ref, *stats.mean_cov())
    out = str(tmp_path / "c2.json")
    code, text, err = run_main(["schedule", model, "--solver", "consistency", "--nfe", "2", "--ref", ref,
                                "--detector", detector, "--latents", "12", "--out", out], capsys)
    assert code == 0, err
    assert "not consistency-tuned" in err  # the tiny model is a plain one: said, not refused
    sigmas, meta = read_schedule(out)
    assert meta["solver"] == "consistency" and meta["nfe"] == 2 and len(meta["search"]["tried"]) == 6
    assert list(sigmas) == min(meta["search"]["tried"], key=lambda r: r["fd"])["sigmas"]
    assert run_main(["export", ckpt, "--out", str(tmp_path / "m2.onnx"), "--schedule", out, "--no-verify"],
                    capsys)[0] == 0
