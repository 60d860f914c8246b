"""The export gate (`edm_deploy.export.verify`): it measures the ODE derivative error the sampler sees.

Both ways, for every preconditioner: correct fp32 and fp16 exports pass, and planted errors (a
perturbed weight in the ONNX or in the torch copy, a wrong c_skip) fail, with polygraphy's
comparator agreeing with the gate every time.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from tests.conftest import requires_onnx, requires_torch

pytestmark = [requires_torch, requires_onnx]

# (preconditioner, architecture): VP with ADM is the case whose absolute error near sigma = 80 is
# large although the export is right (an absolute gate of 1e-4 would fail it: the gate is relative);
# iDDPM needs DhariwalUNet's two output halves.
PRECONDS = [("EDMPrecond", "ddpmpp"), ("VPPrecond", "adm"), ("VEPrecond", "ncsnpp"), ("iDDPMPrecond", "adm")]


def _export(tmp_path, precond, arch, fp16=False):
    from edm_deploy.export.onnx_export import export_onnx
    from tests.factories import tiny_network

    net, network = tiny_network(arch, precond=precond)
    path = str(tmp_path / f"{precond}-{arch}{'-fp16' if fp16 else ''}.onnx")
    export_onnx(net, network, path, fp16=fp16, max_batch=8)
    return net, path


def _verify(path, net, precision):
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load

    report = verify_artifact(path, net, load(path, device="cpu"), precision, batches=[1, 5, 8])
    # polygraphy computes the gate's quantity on its own: both verdicts always agree.
    assert report.polygraphy_passed is (report.max_deriv <= report.tolerance and not report.nonfinite_rows)
    return report


def _last_conv(net):
    return [p for _, p in net.named_parameters() if p.ndim == 4][-1]


def _scaled(net, rel):
    """A copy of `net` whose last convolution's weights are (1 + rel) times too large."""
    import torch

    bad = copy.deepcopy(net)
    with torch.no_grad():
        _last_conv(bad).mul_(1 + rel)
    return bad


def _wrong_c_skip(net, delta):
    """A copy of `net` computing D with c_skip + delta (an error in the skip coefficient)."""
    bad = copy.deepcopy(net)
    forward = type(bad).forward

    def wrong(x, sigma, class_labels=None, **kwargs):
        return forward(bad, x, sigma, class_labels, **kwargs) + delta * x.float()

    bad.forward = wrong
    return bad


def _onnx_with_scaled_weight(path, net, rel):
    """The ONNX file with the initializer holding the last convolution's weights scaled by 1 + rel."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    want = _last_conv(net).detach().numpy()
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.shape == want.shape and np.allclose(value.astype(np.float32), want, rtol=1e-3, atol=1e-3):
            init.CopyFrom(numpy_helper.from_array((value * (1 + rel)).astype(value.dtype), init.name))
            break
    else:
        raise AssertionError("the last convolution's weights are not an initializer of the ONNX file")
    from tests.factories import save_as_exported

    return save_as_exported(model, path.replace(".onnx", "-perturbed.onnx"))


# ----------------------------------------------------------------------------------------------
# Correct exports pass, planted errors fail.


# Planted errors, per precision: sized so that they matter for sampling at that precision (a
# 1e-3 weight error is within fp16's own rounding, so fp16 gets a 10% one).
PLANTED = {"fp32": dict(weight=1e-3, c_skip=1e-3), "fp16": dict(weight=0.1, c_skip=1e-2)}


@pytest.mark.parametrize("precond,arch", PRECONDS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gate_passes_correct_exports_and_fails_planted_errors(tmp_path, precond, arch, precision):
    from edm_deploy.export.verify import TOLERANCES

    net, path = _export(tmp_path, precond, arch, fp16=precision == "fp16")
    report = _verify(path, net, precision)
    assert report.passed, report.table()
    assert report.tolerance == TOLERANCES[precision].derivative
    assert report.max_deriv <= report.tolerance / 10  # a correct export has ample headroom
    assert all(b.rows for b in report.bands) and sum(b.rows for b in report.bands) == 14
    table = report.table()
    assert "max deriv err" in table and "max rel L2" in table and "max abs err" in table
    assert table.splitlines()[-1] == "PASS"

    size = PLANTED[precision]
    planted = {
        "ONNX weight": _verify(_onnx_with_scaled_weight(path, net, size["weight"]), net, precision),
        "torch weight": _verify(path, _scaled(net, size["weight"]), precision),
        "c_skip": _verify(path, _wrong_c_skip(net, size["c_skip"]), precision),
    }
    for what, bad in planted.items():
        assert not bad.passed, (what, bad.table())
        assert any("derivative relative L2 error" in f for f in bad.failures), (what, bad.failures)
        assert "polygraphy comparator failed" in bad.failures


# ----------------------------------------------------------------------------------------------
# The metric itself, on a stand-in backend whose error is chosen exactly.


class _ErrorDen:
    """A backend that returns the torch network's output plus `error(x, sigma, D)`."""

    def __init__(self, net, error, max_batch=8):
        self.net, self.error, self.max_batch, self.manifest = net, error, max_batch, {}

    def describe(self) -> str:
        return "stand-in"

    def __call__(self, x, sigma, labels=None):
        import torch

        with torch.no_grad():
            d = self.net(torch.from_numpy(x), torch.from_numpy(sigma),
                         None if labels is None else torch.from_numpy(labels)).numpy()
        return d + self.error(x, sigma.reshape(-1, 1, 1, 1), d)


def test_the_gate_is_the_derivative_error_not_the_size_of_d():
    from edm_deploy.export.verify import verify_artifact
    from tests.factories import tiny_network

    net, _ = tiny_network("ddpmpp", precond="VPPrecond")
    # An error of 5e-5 of (x - D) in every row: large in absolute terms where sigma is large
    # (D ~ x ~ sigma * noise), tiny for the sampler's step. The old max-abs gate refused this.
    small = verify_artifact("a", net, _ErrorDen(net, lambda x, s, d: 5e-5 * (x - d)), "fp32", batches=[8])
    assert small.passed, small.table()
    assert small.max_abs > 1e-4 and small.max_deriv == pytest.approx(5e-5, rel=1e-2)
    # The same absolute size of error in the low-sigma rows changes their steps by far more.
    low = verify_artifact("a", net, _ErrorDen(net, lambda x, s, d: np.where(s < 0.05, 1e-5, 0.0)), "fp32",
                          batches=[8])
    assert not low.passed and low.max_abs < 1e-4
    # NaN rows fail on their own, whatever the metric.
    nan = verify_artifact("a", net, _ErrorDen(net, lambda x, s, d: np.where(s > 10, np.nan, 0.0)), "fp32",
                          batches=[8])
    assert nan.nonfinite_rows and not nan.passed and nan.polygraphy_passed is False


def test_every_precision_has_its_tolerance_in_one_table():
    from edm_deploy.export import verify as V
    from tests.factories import tiny_network

    assert set(V.TOLERANCES) == {"fp32", "fp16", "bf16", "int8"}
    assert (V.TOLERANCES["fp32"].derivative < V.TOLERANCES["fp16"].derivative < V.TOLERANCES["bf16"].derivative
            < V.TOLERANCES["int8"].derivative)
    assert "int8" in V.tolerance_summary() and "0.050 the trained digits model measures" in V.TOLERANCES["int8"].why
    # one measured int8 figure, stated the same way in the README and the benchmark record
    import os
    import re

    from tests.conftest import REPO

    for doc in ("README.md", os.path.join("benchmarks", "RESULTS.md")):
        text = open(os.path.join(REPO, doc), encoding="utf-8").read()
        assert "0.050" in text and not re.search(r"int8.{0,200}measures 0\.10\b", text, re.S), doc
    net, _ = tiny_network("ddpmpp")
    tol = V.TOLERANCES["int8"].derivative
    ok = V.verify_artifact("a", net, _ErrorDen(net, lambda x, s, d: 0.5 * tol * (x - d)), "int8", batches=[4])
    bad = V.verify_artifact("a", net, _ErrorDen(net, lambda x, s, d: 2 * tol * (x - d)), "int8", batches=[4])
    assert ok.passed and ok.tolerance == tol and not bad.passed


def test_bad_arguments_are_one_error_naming_the_parameter():
    from edm_deploy.export.verify import verify_artifact
    from tests.factories import tiny_network

    net, _ = tiny_network("ddpmpp")
    den = _ErrorDen(net, lambda x, s, d: 0.0)
    for kwargs, name in ((dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(batches=[0]), "batches"),
                         (dict(batches=[9]), "batches"), (dict(batches=[]), "batches"),
                         (dict(num_bands=0), "num_bands"), (dict(precision="fp8"), "precision")):
        args = dict(precision="fp32", **kwargs) if "precision" not in kwargs else kwargs
        with pytest.raises(InputError) as info:
            verify_artifact("a", net, den, **args)
        assert str(info.value).startswith(name) and "\n" not in str(info.value)


def test_verify_cli_refuses_bad_values_in_one_line(tmp_path, capsys):
    from edm_deploy.cli import main
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.training.checkpoint import load_checkpoint, load_network
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    loaded = load_checkpoint(ckpt)
    model = str(tmp_path / "ckpt.onnx")
    export_onnx(load_network(loaded), loaded["network"], model, max_batch=8)
    for args, match in ((["--seed", "-1"], "--seed must be a non-negative integer"),
                        (["--seed", "x"], "--seed"), (["--batches", "0"], "batches must be"),
                        (["--batches", "9"], "from 1 to 8"), (["--batches", "1,,2"], "--batches must"),
                        (["--batches", "-3"], "--batches must")):
        with pytest.raises(SystemExit) as exc:
            main(["verify", model, "--against", ckpt, *args])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and match in err[0], (args, err)
    main(["verify", model, "--against", ckpt, "--seed", "3", "--batches", "1,3"])
    out = capsys.readouterr().out
    assert "max deriv err" in out and out.strip().endswith("PASS")
