"""int8 (static QDQ) from an fp32 ONNX export: accuracy, what stays float, manifest, errors, TensorRT calls."""

from __future__ import annotations

import logging
import os
import sys
import types

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError, NumericalError
from tests.conftest import requires_onnx, requires_torch

pytestmark = [requires_torch, requires_onnx]

STEPS = 6  # 11 evaluations per trajectory: still sigma 80 -> 0.002, a third of the default's time
IMAGES = 8
# Per-row relative L2 error of int8 against fp32 on the tiny random networks: measured <= 0.02;
# quantising the whole graph (preconditioning and skip path included) measures 0.03 .. 3.6.
MAX_ROW_REL_L2 = 0.05
MEDIAN_ROW_REL_L2 = 0.02


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (fp32 path, int8 path, QuantizeResult), exported and quantised once per module."""
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.export.quantize import quantize_int8
    from tests.factories import tiny_network

    cache: dict = {}

    def get(arch: str = "ddpmpp"):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"int8-{arch}")
            net, network = tiny_network(arch)
            fp32 = str(folder / "model.onnx")
            export_onnx(net, network, fp32, max_batch=8)
            int8 = str(folder / "model-int8.onnx")
            cache[arch] = (fp32, int8, quantize_int8(fp32, int8, num_images=IMAGES, seed=3, steps=STEPS))
        return cache[arch]

    return get


def _feeds(batch: int, label_dim: int = 10, seed: int = 0):
    """x at the noise level of a per-row sigma spread log-uniformly over [0.002, 80]."""
    rng = np.random.default_rng(seed)
    u = (np.arange(batch) + rng.uniform(0, 1, batch)) / batch
    sigma = np.exp(np.log(0.002) + u * (np.log(80) - np.log(0.002))).astype(np.float32)
    y = np.clip(rng.standard_normal((batch, 1, 8, 8)) * 0.5, -1, 1)
    x = (y + sigma.reshape(-1, 1, 1, 1) * rng.standard_normal(y.shape)).astype(np.float32)
    labels = np.eye(label_dim, dtype=np.float32)[np.arange(batch) % label_dim] if label_dim else None
    return x, sigma, labels


def _row_errors(den_a, den_b, batches=(1, 5), label_dim=10) -> np.ndarray:
    errors = []
    for k, b in enumerate(batches):
        x, sigma, labels = _feeds(b, label_dim, seed=k)
        a = np.asarray(den_a(x, sigma, labels), dtype=np.float64).reshape(b, -1)
        ref = np.asarray(den_b(x, sigma, labels), dtype=np.float64).reshape(b, -1)
        assert a.shape == ref.shape and np.isfinite(a).all()
        errors += list(np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1))
    return np.array(errors)


def _producers(model):
    return {out: n for n in model.graph.node for out in n.output}


def _reads_dequantized(node, producer, depth=0) -> bool:
    """Whether a node reads a DequantizeLinear output, directly or through shape-only glue."""
    for name in node.input:
        p = producer.get(name)
        if p is None:
            continue
        if p.op_type == "DequantizeLinear":
            return True
        if p.op_type in ("Reshape", "Shape", "Squeeze", "Unsqueeze", "Transpose", "Cast") and depth < 4:
            if _reads_dequantized(p, producer, depth + 1):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# Runs, dynamic batch, accuracy


def test_int8_runs_at_batch_1_and_5_and_stays_close_to_fp32(models):
    from edm_deploy.loading import load

    fp32, int8, result = models("ddpmpp")
    den8, den32 = load(int8, device="cpu"), load(fp32, device="cpu")
    assert den8.manifest["precision"] == "int8"
    errors = _row_errors(den8, den32, batches=(1, 5))
    assert len(errors) == 6
    assert errors.max() <= MAX_ROW_REL_L2, errors
    assert np.median(errors) <= MEDIAN_ROW_REL_L2, errors
    assert errors.max() > 0  # really a different (quantised) computation, not a copy of fp32
    assert 0 < result.self_check_max_rel_l2 <= MAX_ROW_REL_L2
    assert os.path.getsize(int8) < 0.6 * os.path.getsize(fp32)  # int8 conv weights (embedding and biases stay fp32)


def test_the_tolerance_rejects_a_graph_quantised_everywhere(models, tmp_path):
    """Negative control: onnxruntime's defaults over the whole graph (preconditioning, skip mix,
    softmax, norms) on the same calibration feeds must fail the tolerance the real file passes."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edm_deploy.export.quantize import _reader, trajectory_feeds
    from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

    fp32, _, _ = models("ddpmpp")
    den32 = OnnxRuntimeDenoiser(fp32, device="cpu")
    broken = str(tmp_path / "everything-int8.onnx")
    logging.disable(logging.WARNING)
    try:
        quantize_static(fp32, broken, _reader(trajectory_feeds(den32, IMAGES, 3, STEPS)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True})
    finally:
        logging.disable(logging.NOTSET)
    import onnxruntime as ort

    session = ort.InferenceSession(broken, providers=["CPUExecutionProvider"])

    def run(x, sigma, labels):
        return session.run(None, {"x": x, "sigma": sigma, "class_labels": labels})[0]

    errors = _row_errors(run, den32, batches=(1, 5))
    assert errors.max() > MAX_ROW_REL_L2 or np.median(errors) > MEDIAN_ROW_REL_L2, errors


@pytest.mark.parametrize("method,label_dim", [("percentile", 10), ("minmax", 0)])
def test_dataset_calibration_and_other_methods(tmp_path, method, label_dim):
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.export.quantize import quantize_int8
    from edm_deploy.loading import load
    from tests.factories import tiny_network

    net, network = tiny_network("ddpmpp", label_dim=label_dim)
    fp32 = str(tmp_path / "m.onnx")
    export_onnx(net, network, fp32, max_batch=8)
    data = np.clip(np.random.default_rng(1).standard_normal((40, 1, 8, 8)) * 0.5, -1, 1).astype(np.float32)
    out = str(tmp_path / "m-int8.onnx")
    result = quantize_int8(fp32, out, num_images=12, seed=5, method=method, dataset=data, steps=STEPS)
    calib = result.manifest["quantization"]["calibration"]
    assert calib["source"] == "dataset plus noise" and calib["method"] == method
    assert calib["num_images"] == 12 and calib["seed"] == 5 and calib["dataset_images"] == 40
    assert calib["rows"] == 12 * (2 * STEPS - 1)
    lo, hi = calib["sigma_range"]
    assert 0.002 <= lo < 0.01 and 40 < hi <= 80  # stratified log-uniform rows reach both ends
    errors = _row_errors(load(out, device="cpu"), load(fp32, device="cpu"), label_dim=label_dim)
    assert errors.max() <= 2 * MAX_ROW_REL_L2, errors


# ------------------------------------------------------------------------------------------------
# What stays float


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_preconditioning_embedding_softmax_and_norms_stay_float(models, arch):
    import onnx
    from onnx import TensorProto

    from edm_deploy.export.quantize import float_kept_violations, quantization_summary

    fp32, int8, result = models(arch)
    model = onnx.load(int8)
    producer = _producers(model)
    init = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)

    precond = [n for n in nodes if not n.name.startswith("/net/model/") and n.op_type not in ("QuantizeLinear",
                                                                                             "DequantizeLinear")]
    assert {"Log", "Sqrt", "Reciprocal"} <= {n.op_type for n in precond}  # c_noise, c_out, c_in are there
    for n in precond:
        assert not _reads_dequantized(n, producer), f"preconditioning node {n.name} reads a quantised value"
    # the final skip mix reads the graph input x itself
    final = producer["denoised"]
    assert final.op_type == "Add" and not final.name.startswith("/net/model/")

    kept = [n for n in nodes if n.op_type in ("Softmax", "InstanceNormalization")]
    assert any(n.op_type == "Softmax" for n in kept) and any(n.op_type == "InstanceNormalization" for n in kept)
    for n in kept:
        assert not _reads_dequantized(n, producer), f"{n.op_type} {n.name} reads a quantised value"

    embedding = [n for n in nodes if n.op_type == "Gemm"]
    assert embedding and all("/map_" in n.name or "/affine" in n.name for n in embedding)
    for n in embedding:
        assert not _reads_dequantized(n, producer), f"embedding {n.name} is quantised"
        assert init[n.input[1]].data_type == TensorProto.FLOAT

    # every inner convolution and the attention products are int8 (weights int8 per channel)
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs and all(n.name.startswith("/net/model/") for n in convs)
    for n in convs:
        w = producer[n.input[1]]
        assert w.op_type == "DequantizeLinear" and init[w.input[0]].data_type == TensorProto.INT8
        assert len(init[w.input[1]].dims) == 1 and init[w.input[1]].dims[0] > 0  # one scale per channel
        assert len(n.input) < 3 or n.input[2] in init and init[n.input[2]].data_type == TensorProto.FLOAT
    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    assert matmuls and all(producer[i].op_type == "DequantizeLinear" for n in matmuls for i in n.input)
    assert not [n for n in nodes if n.op_type.startswith("QLinear")]

    summary = quantization_summary(model)
    assert summary["zero_point_types"] == ["INT8"] and not summary["nonzero_zero_points"]
    assert not summary["int32_dequantize"] and summary["scales_finite_positive"]
    assert float_kept_violations(model) == []
    assert len(result.quantized_nodes) == len(convs) + len(matmuls)


def test_onnxruntime_runs_softmax_and_norms_in_float_and_convs_in_int8(models, tmp_path):
    """The graph onnxruntime actually executes: int8 kernels for the convolutions, float softmax."""
    import onnx
    import onnxruntime as ort

    _, int8, _ = models("ddpmpp")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(int8, sess_options=options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "QLinearConv" in ops  # the convolutions really run in int8
    assert "Softmax" in ops and "QLinearSoftmax" not in ops
    assert "InstanceNormalization" in ops and not {"QLinearAdd", "QLinearMul", "QLinearSigmoid"} & ops


def test_scopes_found_on_a_real_export(models):
    """The inner network's nodes carry the torch exporter's module scope; the embedding is recognised."""
    import onnx

    from edm_deploy.export.quantize import is_embedding_node, select_quantized_nodes

    fp32, _, _ = models("ddpmpp")
    model = onnx.load(fp32)
    names = [n.name for n in model.graph.node]
    assert any(n.startswith("/net/model/map_noise/") for n in names)
    assert any(n.startswith("/net/model/") and "/affine" in n for n in names)
    assert not any(n.startswith("/net/model/") for n in names if "Log" in n)  # c_noise lives in the precond
    chosen = select_quantized_nodes(model)
    assert chosen and not any(is_embedding_node(n) for n in chosen)
    assert is_embedding_node("/net/model/8x8_block0/affine_1/Gemm") and is_embedding_node("/net/model/map_layer0/Gemm")
    assert not is_embedding_node("/net/model/8x8_block0/conv0/Conv") and not is_embedding_node("/net/Mul_2")


# ------------------------------------------------------------------------------------------------
# Manifest


def test_manifest_says_int8_and_how_it_was_calibrated(models):
    import onnx

    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    fp32, int8, result = models("ddpmpp")
    manifest, source = read_onnx_manifest(int8), read_onnx_manifest(fp32)
    assert manifest == result.manifest
    assert manifest["precision"] == "int8" and source["precision"] == "fp32"
    q = manifest["quantization"]
    assert q["format"] == "QDQ" and q["quantized_op_types"] == ["Conv", "MatMul", "Gemm"]
    calib = q["calibration"]
    assert calib["method"] == "minmax" and calib["num_images"] == IMAGES and calib["seed"] == 3
    assert calib["source"] == "sampler trajectories" and calib["steps"] == STEPS
    assert calib["evaluations"] == 2 * STEPS - 1 and calib["rows"] == IMAGES * (2 * STEPS - 1)
    assert calib["sigma_range"][0] == pytest.approx(0.002, rel=1e-4) and calib["sigma_range"][1] == pytest.approx(80)
    assert len(q["fp32_sha256"]) == 64 and q["self_check_max_rel_l2"] == result.self_check_max_rel_l2
    for key in ("img_resolution", "label_dim", "sigma_min", "io", "batch"):
        assert manifest[key] == source[key]
    model = onnx.load(int8)
    assert [p.key for p in model.metadata_props] == ["edm_deploy"]
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


# ------------------------------------------------------------------------------------------------
# Bad input


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f != "model.onnx"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_images=0), "num_images must be"),
    (dict(num_images=2.5), "num_images must be"),
    (dict(seed=-1), "seed must be"),
    (dict(method="kl"), "unknown calibration method 'kl'"),
    (dict(steps=0), "steps must be"),
    (dict(method="percentile", percentile=101), "percentile must lie"),
    (dict(dataset=np.zeros((10, 3, 8, 8), np.float32)), r"dataset must be an array of images \[N, 1, 8, 8\]"),
    (dict(dataset=np.zeros((10, 8, 8), np.float32)), "dataset must be an array"),
    (dict(dataset=np.full((10, 1, 8, 8), 2.0, np.float32)), r"must lie in \[-1, 1\]"),
    (dict(dataset=np.zeros((3, 1, 8, 8), np.float32), num_images=4), "exceeds the 3 images"),
])
def test_bad_calibration_options_raise_one_clear_error(models, tmp_path, kwargs, match):
    from edm_deploy.export.quantize import quantize_int8

    fp32, _, _ = models("ddpmpp")
    out = str(tmp_path / "bad-int8.onnx")
    with pytest.raises(InputError, match=match):
        quantize_int8(fp32, out, **{"num_images": 2, "steps": 2, **kwargs})
    assert os.listdir(tmp_path) == []


def test_bad_files_and_paths(models, tmp_path):
    import onnx

    from edm_deploy.export.quantize import quantize_int8

    fp32, int8, _ = models("ddpmpp")
    with pytest.raises(InputError, match="output folder does not exist"):
        quantize_int8(fp32, str(tmp_path / "missing" / "m.onnx"), num_images=1, steps=2)
    with pytest.raises(InputError, match="would overwrite"):
        quantize_int8(fp32, fp32, num_images=1, steps=2)
    with pytest.raises(InputError, match="starts from an fp32 export"):
        quantize_int8(int8, str(tmp_path / "twice.onnx"), num_images=1, steps=2)
    with pytest.raises(InputError, match="file not found"):
        quantize_int8(str(tmp_path / "nope.onnx"), str(tmp_path / "x.onnx"))
    # a graph whose node names lost the module scopes: refused rather than quantised blindly
    model = onnx.load(fp32)
    for k, node in enumerate(model.graph.node):
        node.name = f"node{k}"
    from tests.factories import save_as_exported

    anonymous = save_as_exported(model, str(tmp_path / "anonymous.onnx"))
    with pytest.raises(InputError, match="no convolution under the inner network's scope"):
        quantize_int8(anonymous, str(tmp_path / "anonymous-int8.onnx"), num_images=1, steps=2)
    assert sorted(os.listdir(tmp_path)) == ["anonymous.onnx"]


@pytest.mark.parametrize("use_dataset", [False, True])
def test_non_finite_activations_are_a_numerical_error(tmp_path, use_dataset):
    import torch

    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.export.quantize import quantize_int8
    from tests.factories import tiny_network

    net, network = tiny_network("ddpmpp")
    with torch.no_grad():
        net.model.dec["4x4_block0"].conv0.weight.fill_(float("inf"))  # inner activations overflow
    fp32 = str(tmp_path / "model.onnx")
    export_onnx(net, network, fp32, max_batch=8)
    data = np.zeros((6, 1, 8, 8), np.float32) if use_dataset else None
    with pytest.raises(NumericalError, match="NaN/Inf"):
        quantize_int8(fp32, str(tmp_path / "model-int8.onnx"), num_images=4, steps=2, dataset=data)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_ranges_that_are_not_finite_are_named(models, tmp_path, method):
    from edm_deploy.export.quantize import calibrate

    fp32, _, _ = models("ddpmpp")
    x, sigma, labels = _feeds(4)
    good = {"x": x, "sigma": sigma, "class_labels": labels}
    bad = dict(good, x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x).astype(np.float32))
    if method == "minmax":
        ranges = calibrate(fp32, [good], method, 99.999, str(tmp_path))
        assert ranges and all(np.isfinite(v.range_value).all() for v in ranges.values())
    with pytest.raises(NumericalError, match="non-finite"):
        calibrate(fp32, [good, bad], method, 99.999, str(tmp_path))


def test_entropy_and_percentile_really_differ_from_minmax(models, tmp_path):
    """Histogram methods get real histograms (onnxruntime's quantize_static default of 128 bins for
    128 quantised bins would make entropy return the MinMax range)."""
    from edm_deploy.export.quantize import calibrate

    fp32, _, _ = models("ddpmpp")
    feeds = []
    for k in range(3):
        x, sigma, labels = _feeds(5, seed=k)
        feeds.append({"x": x, "sigma": sigma, "class_labels": labels})
    got = {m: calibrate(fp32, feeds, m, 99.9, str(tmp_path)) for m in ("minmax", "entropy", "percentile")}
    for method in ("entropy", "percentile"):
        narrower = [name for name in got["minmax"].keys()
                    if got[method][name].range_value[1] < 0.999 * got["minmax"][name].range_value[1]]
        assert len(narrower) > len(got["minmax"].keys()) // 4, method


# ------------------------------------------------------------------------------------------------
# TensorRT: explicit quantisation in a strongly typed network (stand-in module; no GPU here)


class _FakeTRT:
    """A stand-in `tensorrt` whose parser turns each ONNX node into a layer of the matching type."""

    __version__ = "10.13.0"

    def __init__(self):
        self.calls = []
        self.drop_qdq = False  # a parser that loses the Q/DQ nodes
        rec, fake = self.calls, self
        layer_type = types.SimpleNamespace(QUANTIZE="QUANTIZE", DEQUANTIZE="DEQUANTIZE", OTHER="OTHER")
        self.LayerType = layer_type

        class Network:
            def __init__(self):
                self.layers = []

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                import onnx

                rec.append(("parse", os.path.basename(path)))
                kinds = {"QuantizeLinear": layer_type.QUANTIZE, "DequantizeLinear": layer_type.DEQUANTIZE}
                for node in onnx.load(path).graph.node:
                    if fake.drop_qdq and node.op_type in kinds:
                        continue
                    self.network.layers.append(types.SimpleNamespace(type=kinds.get(node.op_type, layer_type.OTHER)))
                return True

        class Config:
            builder_optimization_level = None

            def add_optimization_profile(self, profile):
                rec.append(("add_profile",))

            def set_flag(self, flag):
                rec.append(("set_flag", flag))

            def clear_flag(self, flag):
                rec.append(("clear_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                rec.append(("workspace", size))

        class Profile:
            def set_shape(self, name, lo, mid, hi):
                rec.append(("set_shape", name, tuple(lo), tuple(mid), tuple(hi)))

        class Builder:
            def __init__(self, logger):
                self.config = Config()

            def create_network(self, flags):
                rec.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return self.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.append(("build", network.num_layers))
                return b"INT8-PLAN"

        class Logger:
            WARNING = 2

            def __init__(self, level):
                rec.append(("logger", level))

        self.Logger = Logger
        self.Builder, self.OnnxParser = Builder, Parser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32", INT8="INT8", FP16="FP16")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS=1)


@pytest.fixture
def fake_trt(monkeypatch):
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr("edm_deploy.runtime.backends.gpu_info.detect_gpu", lambda device_id=0: ("NVIDIA H100", "9.0"))
    return fake


def test_int8_engine_is_built_strongly_typed_from_the_qdq_graph(models, tmp_path, fake_trt):
    import json

    from edm_deploy.export.tensorrt_build import build_engine
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    _, int8, result = models("ddpmpp")
    plan = str(tmp_path / "model-int8.plan")
    manifest = build_engine(int8, plan, read_onnx_manifest(int8), max_batch=8, opt_batch=4)
    calls = fake_trt.calls
    assert ("network_flags", 1 << 3) in calls  # STRONGLY_TYPED: the Q/DQ nodes fix the precision
    assert not [c for c in calls if c[0] == "set_flag"]  # no INT8/FP16 precision flags with strong typing
    assert ("clear_flag", "TF32") in calls  # the float-kept parts compute in fp32
    assert ("set_shape", "x", (1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8)) in calls
    assert open(plan, "rb").read() == b"INT8-PLAN"
    sidecar = json.load(open(plan + ".json"))
    assert sidecar == manifest and sidecar["precision"] == "int8" and sidecar["tensorrt"]["precision"] == "int8"
    eq = sidecar["tensorrt"]["explicit_quantization"]
    assert eq["qdq_layers"] > 0 and eq["int8_nodes"] == len(result.quantized_nodes)
    assert sidecar["quantization"]["calibration"]["method"] == "minmax"


def test_int8_engine_refuses_graphs_tensorrt_cannot_take(models, tmp_path, fake_trt):
    import onnx
    from onnx import numpy_helper

    from edm_deploy.export.tensorrt_build import build_engine
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    fp32, int8, _ = models("ddpmpp")
    manifest = read_onnx_manifest(int8)
    # an fp32 graph that claims int8: no Q/DQ at all
    with pytest.raises(InputError, match="no quantised Conv"):
        build_engine(fp32, str(tmp_path / "a.plan"), manifest)
    # asymmetric (uint8, non-zero zero point) quantisation: TensorRT's int8 is symmetric
    model = onnx.load(int8)
    for init in model.graph.initializer:
        if init.name.endswith("_zero_point") and init.data_type == onnx.TensorProto.INT8:
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, 128, np.uint8), init.name))
    asymmetric = str(tmp_path / "asym.onnx")
    onnx.save(model, asymmetric)
    with pytest.raises(InputError, match="zero point 0"):
        build_engine(asymmetric, str(tmp_path / "b.plan"), manifest)
    # a parser that drops every Q/DQ node
    fake_trt.drop_qdq = True
    with pytest.raises(InputError, match="without any Quantize/Dequantize layer"):
        build_engine(int8, str(tmp_path / "c.plan"), manifest)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".plan", ".json"))]


def test_fp32_engine_path_is_unchanged_by_int8_support(models, tmp_path, fake_trt):
    from edm_deploy.export.tensorrt_build import build_engine
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    fp32, _, _ = models("ddpmpp")
    manifest = build_engine(fp32, str(tmp_path / "m.plan"), read_onnx_manifest(fp32), max_batch=8)
    assert "explicit_quantization" not in manifest["tensorrt"] and manifest["precision"] == "fp32"
    assert ("clear_flag", "TF32") in fake_trt.calls and not [c for c in fake_trt.calls if c[0] == "set_flag"]
