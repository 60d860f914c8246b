"""What a file declares is checked against what it is (issue 23, section 2).

A manifest is read from a file anyone can edit. Every field the graph also states (its inputs,
resolution, channels, classes, batch limit) is compared on load, by every backend and by `info`,
and a mismatch is one line, before anything is allocated from the forged field. `verify`
against another checkpoint than the artifact's source says so (the manifest records the
source's sha256) and measures only when told to.
"""

from __future__ import annotations

import json
import re

import pytest

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.manifest import check_against_graph
from tests.conftest import one_error_line, requires_onnx, requires_torch, run_main

pytestmark = requires_onnx  # the oracles are hand-built ONNX graphs


def oracle_manifest(*args, **kwargs):
    from tests.onnx_oracles import oracle_manifest

    return oracle_manifest(*args, **kwargs)


def _forged(src: str, dst: str, **changes) -> str:
    import onnx
    from onnx import helper

    model = onnx.load(src)
    manifest = json.loads({p.key: p.value for p in model.metadata_props}["edm_deploy"])
    for key, value in changes.items():
        if value is _DROP:
            manifest.pop(key)
        else:
            manifest[key] = value
    del model.metadata_props[:]
    helper.set_model_props(model, {"edm_deploy": json.dumps(manifest)})
    onnx.save(model, dst)
    return dst


_DROP = object()

# (model it starts from, forged fields, what the one line must say)
FORGERIES = {
    "label_dim 10^9 on a 10-class graph": ("cond", {"label_dim": 10**9}, "label_dim must be an integer from 0 to "
                                                                          "100,000, got 1000000000"),
    "label_dim 1000 on a 10-class graph": ("cond", {"label_dim": 1000}, "label_dim 1000, but the graph's "
                                                                        "class_labels input has 10"),
    "resolution past the limit": ("cond", {"img_resolution": 10**6}, "img_resolution must be an integer from 1 to "
                                                                     "1,024"),
    "resolution": ("cond", {"img_resolution": 64}, "img_resolution 64, but the graph's x input has 8"),
    "channels": ("uncond", {"img_channels": 3}, "img_channels 3, but the graph's x input has 1"),
    "unconditional manifest, conditional graph": ("cond", {"label_dim": 0}, "do not match the manifest"),
    "conditional manifest, unconditional graph": ("uncond", {"label_dim": 10}, "do not match the manifest"),
    "label_dim as text": ("cond", {"label_dim": "10"}, "label_dim must be an integer from 0 to 100,000, got '10'"),
    "negative batch limit": ("uncond", {"batch": {"min": 1, "opt": 1, "max": -5}}, "batch must hold integers 1 <="),
    "io section disagrees": ("uncond", {"io": {"inputs": {"x": ["batch", 3, 8, 8]}}}, "io section gives x"),
    "sigma limit as text": ("uncond", {"sigma_max": "80"}, "sigma_max must be a non-negative number"),
    "network as a list": ("uncond", {"network": [1, 2]}, "network must be an object"),
    "required field missing": ("uncond", {"sigma_rounding": _DROP}, "manifest lacks sigma_rounding"),
    "sigma table of text": ("uncond", {"sigma_rounding": {"kind": "table", "values": "abc"}}, "table must be a list"),
    "sigma table with nulls": ("uncond", {"sigma_rounding": {"kind": "table", "values": [1, None]}},
                               "table must be a list"),
    "unknown rounding": ("uncond", {"sigma_rounding": {"kind": "nope"}}, "sigma_rounding must be"),
    "empty sigma range": ("uncond", {"sigma_min": 80, "sigma_max": 0.002}, "sigma range is empty"),
    "batch past the limit": ("uncond", {"batch": {"min": 1, "opt": 8, "max": 10**12}}, "max <= 65,536"),
    "label dropout as text": ("cond", {"network": {"init_kwargs": {"label_dropout": "x"}}},
                              "label_dropout must be a number in [0, 1]"),
    "init kwargs as a list": ("uncond", {"network": {"init_kwargs": []}}, "init_kwargs must be an object"),
    "precision as a list": ("uncond", {"precision": ["fp32"]}, "precision must be a name"),
}


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    from tests.onnx_oracles import gaussian_onnx

    d = tmp_path_factory.mktemp("oracles")
    return {"uncond": gaussian_onnx(str(d / "u.onnx")), "cond": gaussian_onnx(str(d / "c.onnx"), label_dim=10)}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_a_manifest_that_disagrees_with_its_graph_is_refused_on_every_path(case, oracles, tmp_path, capsys):
    from edm_deploy.loading import load

    base, changes, message = FORGERIES[case]
    model = _forged(oracles[base], str(tmp_path / "forged.onnx"), **changes)
    for args in (["info", model], ["sample", model, "-n", "2", "--grid", str(tmp_path / "g.png")]):
        code, _, err = run_main(args, capsys)
        line = one_error_line(code, err)
        assert message in line and line.startswith(f"error: {model}"), (args, line)
    with pytest.raises(InputError, match=re.escape(message)):
        load(model, device="cpu")
    assert not (tmp_path / "g.png").exists()


def test_the_graph_check_compares_fixed_dimensions_and_the_batch_limits():
    manifest = oracle_manifest(channels=3, resolution=32, label_dim=10, max_batch=64)
    good = {"x": ["batch", 3, 32, 32], "sigma": ["batch"], "class_labels": ["batch", 10],
            "denoised": ["batch", 3, 32, 32]}
    check_against_graph(manifest, good, "m")
    check_against_graph(manifest, {**good, "x": [-1, 3, None, "h"]}, "m")  # unknown sizes are not contradictions
    check_against_graph(manifest, good, "m", batch_range=(1, 64))
    refused = {
        "a fixed batch of 8": ({**good, "x": [8, 3, 32, 32]}, None, "takes batches of exactly 8"),
        "rank": ({**good, "sigma": ["batch", 1]}, None, "sigma has 2 dimensions"),
        "output size": ({**good, "denoised": ["batch", 3, 16, 16]}, None, "img_resolution 32, but the graph's "
                                                                          "denoised"),
        "engine profile below the manifest": (good, (1, 16), "engine accepts 1..16"),
        "missing output": ({k: v for k, v in good.items() if k != "denoised"}, None, "do not match"),
    }
    for name, (tensors, batch_range, message) in refused.items():
        with pytest.raises(InputError, match=message):
            check_against_graph(manifest, tensors, f"m ({name})", batch_range=batch_range)


class _FakeTRT:
    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class DataType:
        FLOAT, HALF = "f32", "f16"


class _FakeEngine:
    """The few engine queries the TensorRT backend makes, answering from a dict of tensors."""

    def __init__(self, tensors: dict, profile_max: int = 64, dtype: str = "f32"):
        self.tensors, self.profile_max, self.dtype = tensors, profile_max, dtype
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_shape(self, name):
        return self.tensors[name]

    def get_tensor_mode(self, name):
        return _FakeTRT.TensorIOMode.OUTPUT if name == "denoised" else _FakeTRT.TensorIOMode.INPUT

    def get_tensor_profile_shape(self, name, profile):
        shape = self.tensors[name]
        return [(1, *shape[1:]), (8, *shape[1:]), (self.profile_max, *shape[1:])]

    def get_tensor_dtype(self, name):
        return self.dtype


def test_a_tensorrt_sidecar_is_checked_against_its_engine():
    from edm_deploy.runtime.backends.tensorrt import check_engine_io

    manifest = {**oracle_manifest(1, 8, label_dim=10, max_batch=64), "tensorrt": {"profile": {"max": 64}}}
    tensors = {"x": [-1, 1, 8, 8], "sigma": [-1], "class_labels": [-1, 10], "denoised": [-1, 1, 8, 8]}
    check_engine_io(_FakeEngine(tensors), _FakeTRT, manifest, "m.plan")
    for engine, message in [
        (_FakeEngine({**tensors, "class_labels": [-1, 1000]}), "label_dim 10, but the graph's class_labels"),
        (_FakeEngine({**tensors, "x": [-1, 3, 8, 8]}), "img_channels 1, but the graph's x"),
        (_FakeEngine(tensors, profile_max=16), "engine accepts 1..16"),
        (_FakeEngine({k: v for k, v in tensors.items() if k != "class_labels"}), "do not match the manifest"),
        (_FakeEngine(tensors, dtype="f16"), "not float32"),
    ]:
        with pytest.raises(InputError, match=message):
            check_engine_io(engine, _FakeTRT, manifest, "m.plan")
    bigger = {**manifest, "batch": {"min": 1, "opt": 8, "max": 32}, "tensorrt": {"profile": {"max": 32}}}
    with pytest.raises(InputError, match="profile says max batch 32, the engine's profile 64"):
        check_engine_io(_FakeEngine(tensors), _FakeTRT, bigger, "m.plan")


@requires_torch
def test_a_torch_module_and_a_manifest_from_another_model_are_refused():
    from edm_deploy.runtime.backends.torch_backend import TorchDenoiser, describe_denoiser
    from tests.factories import tiny_network

    net, _ = tiny_network(label_dim=10)
    manifest = describe_denoiser(net)
    TorchDenoiser(net, manifest, device="cpu").close()
    for key, value, message in [("label_dim", 1000, "label_dim 1000, but the network has 10"),
                                ("img_resolution", 32, "img_resolution 32, but the network has 8"),
                                ("precond", "vp", "vp preconditioning, but the network is a EDMPrecond")]:
        with pytest.raises(InputError, match=message):
            TorchDenoiser(net, {**manifest, key: value}, device="cpu")


@requires_torch
def test_verify_against_another_checkpoint_says_so_and_measures_only_when_told(tmp_path, capsys):
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.training.checkpoint import load_checkpoint, load_network
    from tests.factories import tiny_checkpoint

    source = tiny_checkpoint(tmp_path / "source.pt", seed=0)
    other = tiny_checkpoint(tmp_path / "other.pt", seed=1)
    unconditional = tiny_checkpoint(tmp_path / "uncond.pt", label_dim=0)
    loaded = load_checkpoint(source)
    model = str(tmp_path / "m.onnx")
    export_onnx(load_network(loaded), loaded["network"], model, max_batch=4, source_path=source)

    code, out, err = run_main(["verify", model, "--against", source, "--batches", "1,3"], capsys)
    assert code == 0 and out.strip().endswith("PASS"), err
    code, out, err = run_main(["verify", model, "--against", other, "--batches", "1,3"], capsys)
    line = one_error_line(code, err)
    assert f"{other} is not the checkpoint this was exported from" in line and "--other-checkpoint" in line
    assert "source.pt" in line and out == ""
    code, out, err = run_main(["verify", model, "--against", other, "--batches", "1,3", "--other-checkpoint"], capsys)
    assert "max deriv err" in out and "measuring anyway" in err  # measured, and (other weights) failing the gate
    assert code == 1 and "does not match" in err
    code, out, err = run_main(["verify", model, "--against", unconditional, "--other-checkpoint"], capsys)
    line = one_error_line(code, err)
    assert "label_dim is 10 in the artifact and 0 in the checkpoint" in line


def test_info_tells_a_sidecar_copied_beside_another_engine(tmp_path, capsys):
    import hashlib

    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")
    manifest = {**oracle_manifest(1, 8), "tensorrt": {"profile": {"max": 64}, "version": "10.13",
                                                      "plan_sha256": hashlib.sha256(b"engine bytes").hexdigest()}}
    (tmp_path / "m.plan.json").write_text(json.dumps(manifest))
    code, out, err = run_main(["info", str(plan)], capsys)
    assert code == 0 and "1x8x8" in out, err
    plan.write_bytes(b"another engine")
    code, _, err = run_main(["info", str(plan)], capsys)
    assert "describes another engine than" in one_error_line(code, err)
