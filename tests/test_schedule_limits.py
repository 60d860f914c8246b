"""The schedule search's bounds: memory sized before the teacher runs, and advice that can be followed."""

from __future__ import annotations

import pytest

from edm_deploy.runtime import GaussianDenoiser
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.sampling import schedule_search as ss
from tests.conftest import one_error_line, requires_onnx, run_cli


def test_a_teacher_that_would_not_fit_in_memory_is_refused_before_any_call():
    den = GaussianDenoiser(1, 8)
    den.calls = 0
    with pytest.raises(InputError, match="lower batch_size 100000 \\(at most \\d+ fit\\)") as info:
        ss.search_schedule(den, "ipndm", 5, num_latents=100_000, batch_size=100_000)
    assert info.value.param == "batch_size"
    with pytest.raises(InputError, match="lower num_latents 9000000 \\(at most \\d+ fit\\)") as info:
        ss.search_schedule(den, "ipndm", 5, num_latents=9_000_000, batch_size=16)
    assert info.value.param == "num_latents"
    assert den.calls == 0


def test_an_nfe_beyond_any_fine_grid_says_what_is_possible():
    with pytest.raises(InputError, match="at most 200 steps: use a smaller NFE"):
        ss.plan_search("ipndm", 99_999)  # (NFE 100,000 needs more time points than any schedule has)
    with pytest.raises(InputError, match="more than 70 fine points"):
        ss.plan_search("ipndm", 70, fine_points=61)


@requires_onnx
def test_the_cli_names_its_flags(tmp_path):
    from tests.onnx_oracles import gaussian_onnx

    model = gaussian_onnx(str(tmp_path / "g.onnx"))
    res = run_cli(["schedule", model, "--nfe", "5", "--latents", "100000", "--batch", "100000", "--out", str(tmp_path / "s.json")])
    assert "--batch 100000" in one_error_line(res.returncode, res.stderr)
    assert not (tmp_path / "s.json").exists()
