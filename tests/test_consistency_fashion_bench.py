"""benchmarks/consistency_fashion.py: a second teacher's rows are read against that teacher's own Heun-35.

Why: whether the teacher matters (one trained with dropout against one without) is only readable if
each tuning is divided by the Heun-35 of the teacher it was tuned from; dividing by the first
teacher's would mix the teachers' quality into the tuning's.
"""

from __future__ import annotations

import pytest

from benchmarks import consistency_fashion as cf


def _scores(fd1: float, fd2: float, fd3: float) -> dict:
    return {str(n): {"classifier_fd": fd, "accuracy": 0.9, "sigmas": [80.0, 1.5][:n] + [0.4] * (n - 2)}
            for n, fd in ((1, fd1), (2, fd2), (3, fd3))}


def _row(what: str, fds) -> dict:
    return {"what": what, "cost_fraction": 0.12, "scores": _scores(*fds)}


def test_a_second_teachers_rows_are_divided_by_its_own_heun35():
    out = {"kimg": 20.0, "teacher_kimg": 300.0, "teacher_dropout": 0.0, "cost_fraction": 0.12, "step_cost": {"ratio": 1.73},
           "reference": {"classifier_fd": 20.0, "accuracy": 0.86},
           "rows": {"dropout0+lr1e-3": _row("dropout 0 + lr 1e-3", (90.0, 40.0, 30.0))}, "final": {},
           "other": {"teacher": "/cache/train-dropout0.1/ckpt.pt", "teacher_kimg": 300.0, "dropout": 0.1,
                     "reference": {"classifier_fd": 25.0, "accuracy": 0.87},
                     "rows": {"dropout0.1+lr1e-3@20": _row("dropout 0.1 + lr 1e-3", (50.0, 30.0, 27.5))}}}
    text = cf.markdown(out)
    first, other = text.split("another teacher")
    assert "trained with dropout 0)" in first and "4.50x" in first and "2.00x" in first  # 90 / 20, 40 / 20
    assert "dropout 0.1 for 300 kimg" in other and "1.25x the first teacher's" in other  # 25 / 20
    assert "2.00x (90%)" in other and "1.20x (90%)" in other and "1.10x (90%)" in other  # 50, 30, 27.5 / 25
    assert "train-dropout0.1" in other
    assert "another teacher" not in cf.markdown(dict(out, other=None))


def test_a_malformed_setting_is_one_error_line():
    assert cf.parse_final("dropout0+lr1e-3@86") == ("dropout0+lr1e-3", 86.0)
    with pytest.raises(SystemExit, match="expected ROWS@KIMG"):
        cf.parse_final("dropout0+lr1e-3")
    with pytest.raises(SystemExit, match="unknown rows nosuch"):
        cf.combined(["dropout0", "nosuch"])
