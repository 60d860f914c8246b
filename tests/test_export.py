"""Export fidelity and robustness: torch -> ONNX (fp32/fp16), manifest, CLI errors, TensorRT builder."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from tests.conftest import requires_onnx, requires_torch, run_cli

pytestmark = [requires_torch, requires_onnx]


def _export(tmp_path, arch="ddpmpp", fp16=False, name=None, **kwargs):
    from edm_deploy.export.onnx_export import export_onnx
    from tests.factories import tiny_network

    net, network = tiny_network(arch, **kwargs)
    path = str(tmp_path / (name or f"{arch}{'-fp16' if fp16 else ''}.onnx"))
    result = export_onnx(net, network, path, fp16=fp16, max_batch=8)
    return net, path, result


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_fp32_onnx_matches_torch(tmp_path, arch):
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load

    net, path, _ = _export(tmp_path, arch)
    report = verify_artifact(path, net, load(path, device="cpu"), "fp32", batches=[1, 3, 8])
    assert report.passed, report.table()
    assert report.max_rel_l2 <= 1e-5 and report.max_abs <= 1e-4
    assert sum(b.rows for b in report.bands) == 12
    assert report.polygraphy_passed is True


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_fp16_onnx_is_really_fp16_and_accurate(tmp_path, arch):
    import onnx

    from edm_deploy.export.onnx_export import fp16_initializer_fraction
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load

    net, path, result = _export(tmp_path, arch, fp16=True)
    assert result.manifest["precision"] == "fp16"
    assert fp16_initializer_fraction(path) > 0.5
    model = onnx.load(path)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = verify_artifact(path, net, load(path, device="cpu"), "fp16", batches=[1, 5, 8])
    assert report.passed, report.table()
    assert report.nonfinite_rows == 0
    for band in report.bands:
        assert band.rows and band.max_rel_l2 <= 1e-2


def test_one_file_serves_batch_1_5_32(tmp_path):
    import torch

    from edm_deploy.loading import load

    net, path, _ = _export(tmp_path, "ddpmpp")
    den = load(path, device="cpu")
    for b in (1, 5, 32):
        x = np.random.default_rng(b).standard_normal((b, 1, 8, 8)).astype(np.float32)
        s = np.full(b, 1.3, dtype=np.float32)
        labels = np.eye(10, dtype=np.float32)[np.arange(b) % 10]
        out = den(x, s, labels)
        with torch.no_grad():
            ref = net(torch.from_numpy(x), torch.from_numpy(s), torch.from_numpy(labels)).numpy()
        assert out.shape == (b, 1, 8, 8)
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_unconditional_export_has_no_label_input_and_manifest_rides_along(tmp_path):
    import onnx

    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    _, path, _ = _export(tmp_path, "ddpmpp", label_dim=0, name="uncond.onnx")
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["x", "sigma"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)
    manifest = read_onnx_manifest(path)
    assert manifest["label_dim"] == 0 and manifest["precond"] == "edm"
    assert manifest["batch"]["max"] == 8 and manifest["sigma_data"] == 0.5


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond", "iDDPMPrecond"])
def test_other_preconditioners_export(tmp_path, precond):
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load

    arch = "adm" if precond == "iDDPMPrecond" else "ddpmpp"
    net, path, result = _export(tmp_path, arch, precond=precond, name=f"{precond}.onnx")
    den = load(path, device="cpu")
    report = verify_artifact(path, net, den, "fp32", batches=[1, 4])
    assert report.passed, report.table()
    assert den.sigma_min == pytest.approx(float(net.sigma_min), rel=1e-6)
    if precond == "iDDPMPrecond":
        assert result.manifest["sigma_rounding"]["kind"] == "table"
        assert den.round_sigma(np.array([1.0]))[0] == pytest.approx(float(net.round_sigma(1.0)), rel=1e-6)


def test_export_cli_end_to_end_and_info(tmp_path, cli_env):
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    res = run_cli(["export", ckpt, "--max-batch", "8", "--format", "onnx"], env=cli_env)
    assert res.returncode == 0, res.stderr
    assert "PASS" in res.stdout and "sigma band" in res.stdout
    assert os.path.exists(tmp_path / "ckpt.onnx")
    res = run_cli(["info", str(tmp_path / "ckpt.onnx")], env=cli_env)
    assert res.returncode == 0 and "10 classes" in res.stdout and "fp32" in res.stdout
    res = run_cli(["verify", str(tmp_path / "ckpt.onnx"), "--against", ckpt, "--batches", "1,3"], env=cli_env)
    assert res.returncode == 0 and "PASS" in res.stdout
    res = run_cli(["sample", str(tmp_path / "ckpt.onnx"), "-n", "4", "--steps", "3", "--grid", str(tmp_path / "g.png")], env=cli_env)
    assert res.returncode == 0, res.stderr


def test_export_cli_bad_inputs_leave_nothing_behind(tmp_path, cli_env):
    import torch

    from tests.factories import tiny_checkpoint

    good = tiny_checkpoint(tmp_path / "good.pt")
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(open(good, "rb").read()[:3000])
    foreign = tmp_path / "foreign.pt"
    ckpt = torch.load(good, weights_only=True)
    ckpt["network"]["init_kwargs"]["model_type"] = "TransformerNet"
    torch.save(ckpt, foreign)
    cases = [
        ([str(not_ckpt)], "not a readable edm-deploy checkpoint"),
        ([str(truncated)], "not a readable edm-deploy checkpoint"),
        ([str(foreign)], "unknown architecture"),
        ([good, "--out", str(tmp_path / "missing" / "m.onnx")], "output folder does not exist"),
        ([good, "--max-batch", "0"], "--max-batch"),
        ([good, "--format", "trt"], "--format trt"),
    ]
    before = set(os.listdir(tmp_path))
    for args, match in cases:
        res = run_cli(["export", *args, "--format", "onnx"] if "--format" not in args else ["export", *args], env=cli_env)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert match in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
        assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert set(os.listdir(tmp_path)) == before


def test_verification_detects_a_wrong_model(tmp_path):
    from edm_deploy.export.verify import verify_artifact
    from edm_deploy.loading import load
    from tests.factories import tiny_network

    _, path, _ = _export(tmp_path, "ddpmpp")
    other, _ = tiny_network("ddpmpp", seed=1)
    report = verify_artifact(path, other, load(path, device="cpu"), "fp32", batches=[2])
    assert not report.passed and "relative L2" in " ".join(report.failures)


# --- TensorRT: everything that runs without a GPU -------------------------------------------


def test_profile_shapes_cover_every_input():
    from edm_deploy.export.tensorrt_build import profile_shapes

    manifest = {"img_channels": 3, "img_resolution": 32, "label_dim": 10}
    shapes = profile_shapes(manifest, 1, 64, 256)
    assert shapes["x"] == ((1, 3, 32, 32), (64, 3, 32, 32), (256, 3, 32, 32))
    assert shapes["sigma"] == ((1,), (64,), (256,))
    assert shapes["class_labels"] == ((1, 10), (64, 10), (256, 10))
    assert "class_labels" not in profile_shapes({**manifest, "label_dim": 0}, 1, 1, 1)
    with pytest.raises(InputError):
        profile_shapes(manifest, 1, 300, 256)


class _FakeTRT:
    """A stand-in `tensorrt` module recording the builder calls (no GPU needed)."""

    __version__ = "10.13.0"

    def __init__(self, parse_ok=True, build_ok=True):
        self.calls = []
        rec = self.calls

        class Enum:
            STRONGLY_TYPED = 3

        class Logger:
            WARNING = 2

            def __init__(self, level):
                rec.append(("logger", level))

        class Profile:
            def set_shape(self, name, lo, mid, hi):
                rec.append(("set_shape", name, tuple(lo), tuple(mid), tuple(hi)))

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            builder_optimization_level = None

            def add_optimization_profile(self, p):
                rec.append(("add_profile",))

            def create_timing_cache(self, data):
                rec.append(("timing_cache_in", data))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                rec.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return Cache()

            def set_memory_pool_limit(self, pool, size):
                rec.append(("workspace", size))

            def clear_flag(self, flag):
                rec.append(("clear_flag", flag))

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.append(("parse", os.path.basename(path)))
                return parse_ok

            def get_error(self, i):
                return "In node 7 (Conv): unsupported"

        class Builder:
            def __init__(self, logger):
                self.config = Config()

            def create_network(self, flags):
                rec.append(("network_flags", flags))
                return object()

            def create_builder_config(self):
                return self.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.append(("build", config.builder_optimization_level))
                return b"PLAN-BYTES" if build_ok else None

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.NetworkDefinitionCreationFlag = Enum
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS=1)


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kwargs):
        fake = _FakeTRT(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr("edm_deploy.runtime.backends.gpu_info.detect_gpu", lambda device_id=0: ("NVIDIA H100 80GB HBM3", "9.0"))
        return fake

    return install


def test_engine_builder_calls_and_manifest(tmp_path, fake_trt):
    from edm_deploy.export.tensorrt_build import build_engine
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    _, onnx_path, _ = _export(tmp_path, "ddpmpp")
    fake = fake_trt()
    plan = str(tmp_path / "model.plan")
    cache = str(tmp_path / "trt.cache")
    manifest = build_engine(onnx_path, plan, read_onnx_manifest(onnx_path), max_batch=16, opt_batch=8,
                            timing_cache=cache, optimization_level=4)
    assert ("network_flags", 1 << 3) in fake.calls
    assert ("set_shape", "x", (1, 1, 8, 8), (8, 1, 8, 8), (16, 1, 8, 8)) in fake.calls
    assert ("set_shape", "class_labels", (1, 10), (8, 10), (16, 10)) in fake.calls
    assert ("build", 4) in fake.calls and ("timing_cache_in", b"") in fake.calls
    assert ("clear_flag", "TF32") in fake.calls  # an fp32 engine must not compute in TF32
    assert open(plan, "rb").read() == b"PLAN-BYTES" and open(cache, "rb").read() == b"timing-cache"
    sidecar = json.load(open(plan + ".json"))
    assert sidecar == manifest
    info = sidecar["tensorrt"]
    assert info["version"] == "10.13.0" and info["compute_capability"] == "9.0"
    assert info["profile"] == {"min": 1, "opt": 8, "max": 16} and len(info["plan_sha256"]) == 64


def test_engine_builder_errors_leave_no_plan(tmp_path, fake_trt):
    from edm_deploy.export.tensorrt_build import build_engine
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    _, onnx_path, _ = _export(tmp_path, "ddpmpp")
    manifest = read_onnx_manifest(onnx_path)
    fake_trt(parse_ok=False)
    with pytest.raises(InputError, match="could not parse.*Conv"):
        build_engine(onnx_path, str(tmp_path / "a.plan"), manifest)
    fake_trt(build_ok=False)
    with pytest.raises(InputError, match="failed to build"):
        build_engine(onnx_path, str(tmp_path / "b.plan"), manifest)
    assert not any(f.endswith((".plan", ".json")) for f in os.listdir(tmp_path))


def test_runtime_refuses_engines_for_another_machine():
    from edm_deploy.runtime.backends.tensorrt import check_engine_compat

    manifest = {"tensorrt": {"version": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "onnx": "m.onnx"}}
    assert check_engine_compat(manifest, "10.13.0", "NVIDIA H100", "9.0") == []
    with pytest.raises(InputError, match="TensorRT 10.13.0.*10.14.1.*rebuild"):
        check_engine_compat(manifest, "10.14.1", "NVIDIA H100", "9.0")
    with pytest.raises(InputError, match="compute capability 9.0.*8.6.*export m.onnx --format trt"):
        check_engine_compat(manifest, "10.13.0", "NVIDIA A10", "8.6")
    warnings = check_engine_compat(manifest, "10.13.0", "NVIDIA H200", "9.0")
    assert warnings and "same architecture" in warnings[0]
    portable = {"tensorrt": {**manifest["tensorrt"], "hardware_compatibility_level": "ampere_plus"}}
    assert check_engine_compat(portable, "10.13.0", "NVIDIA A100", "8.0")


def test_torch_backend_matches_onnx(tmp_path):
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.generate import generate
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.training.checkpoint import load_checkpoint, load_network

    raw = load_checkpoint(ckpt)
    export_onnx(load_network(raw), raw["network"], str(tmp_path / "c.onnx"), max_batch=8)
    a = generate(load(ckpt, device="cpu"), seeds=range(6), num_steps=6)
    b = generate(load(str(tmp_path / "c.onnx"), device="cpu"), seeds=range(6), num_steps=6)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_large_models_use_external_data(tmp_path, monkeypatch):
    """Above the protobuf limit the weights go to <name>.onnx.data; lowering the limit proves the path."""
    import onnx

    from edm_deploy.export import onnx_export
    from edm_deploy.loading import load

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 10_000)
    net, path, result = _export(tmp_path, "ddpmpp", name="big.onnx")
    assert result.external_data and os.path.exists(path + ".data")
    assert os.path.getsize(path) < os.path.getsize(path + ".data")
    model = onnx.load(path, load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    den = load(path, device="cpu")
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    labels = np.eye(10, dtype=np.float32)[:2]
    assert np.isfinite(den(x, np.array([0.5, 2.0]), labels)).all()
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_torch_backend_with_device_resident_state(tmp_path):
    """With the state kept as torch tensors (the CUDA path, here on the CPU) images are unchanged."""
    import torch

    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.generate import generate
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    host = generate(load(ckpt, device="cpu"), seeds=range(4), num_steps=5, S_churn=5)
    den = load(ckpt, device="cpu")
    den.to_device = lambda array: torch.from_numpy(array)  # what a CUDA device does, minus the copy
    resident = generate(den, seeds=range(4), num_steps=5, S_churn=5)
    assert np.abs(host.astype(int) - resident.astype(int)).max() <= 1
