"""`sample`'s newer options: one class per seed, the grid's scale, the schedule file's warnings for the settings
the run really uses, the consistency solver's warning on a plain model."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import one_error_line, requires_onnx, run_cli

pytestmark = requires_onnx


@pytest.fixture(scope="module")
def conditional_model(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    return gaussian_onnx(str(tmp_path_factory.mktemp("m") / "cond.onnx"), label_dim=10)


def test_one_class_per_seed_or_one_for_all(conditional_model, tmp_path):
    per_seed = tmp_path / "a.npz"
    res = run_cli(["sample", conditional_model, "--seeds", "0-4", "--class", "0-3,9", "--steps", "3", "--npz", str(per_seed)])
    assert res.returncode == 0, res.stderr
    assert np.load(per_seed)["labels"].tolist() == [0, 1, 2, 3, 9]
    same = tmp_path / "b.npz"
    assert run_cli(["sample", conditional_model, "-n", "3", "--class", "7", "--steps", "3", "--npz", str(same)]).returncode == 0
    assert np.load(same)["labels"].tolist() == [7, 7, 7]
    for classes, match in [("0-3", "lists 4 classes for 5 seeds"), ("x", "must be a class number"),
                           ("3-1", "ends before it starts"), ("12", "out of range")]:
        res = run_cli(["sample", conditional_model, "--seeds", "0-4", "--class", classes, "--npz", str(tmp_path / "c.npz")])
        assert match in one_error_line(res.returncode, res.stderr)
    assert not (tmp_path / "c.npz").exists()


def test_the_grid_scale_enlarges_every_image(conditional_model, tmp_path):
    from PIL import Image

    for scale in (1, 3):
        grid = tmp_path / f"g{scale}.png"
        res = run_cli(["sample", conditional_model, "-n", "4", "--grid-cols", "2", "--grid-scale", str(scale), "--steps", "3",
                       "--grid", str(grid)])
        assert res.returncode == 0, res.stderr
        assert Image.open(grid).size[0] >= 2 * 8 * scale
    assert Image.open(tmp_path / "g3.png").size[0] > 2.5 * Image.open(tmp_path / "g1.png").size[0]


def test_a_schedule_searched_with_afs_warns_when_used_without(conditional_model, tmp_path):
    from edm_deploy.runtime.sampling.schedule_file import write_schedule

    sched = tmp_path / "s.json"
    write_schedule(str(sched), [80, 10.98, 3.88, 1.58, 0.57, 0.002], solver="ipndm", nfe=4, afs=True, model_sha256="0" * 64)
    res = run_cli(["sample", conditional_model, "-n", "2", "--solver", "ipndm", "--sigmas", str(sched), "--npz",
                   str(tmp_path / "o.npz")])
    assert res.returncode == 0, res.stderr
    assert "searched with afs" in res.stderr and "this run samples without it" in res.stderr
    assert "searched for NFE 4; this run spends 5" in res.stderr
    quiet = run_cli(["sample", conditional_model, "-n", "2", "--solver", "ipndm", "--afs", "--sigmas", str(sched), "--npz",
                     str(tmp_path / "p.npz")])
    assert quiet.returncode == 0 and "afs" not in quiet.stderr


def test_the_consistency_solver_on_a_plain_model_says_why_it_will_be_poor(conditional_model, tmp_path):
    res = run_cli(["sample", conditional_model, "-n", "2", "--solver", "consistency", "--nfe", "2", "--npz",
                   str(tmp_path / "c.npz")])
    assert res.returncode == 0, res.stderr
    assert "warning: the consistency solver expects a consistency-tuned model" in res.stderr
    assert "consistency NFE 2/image" in res.stdout
