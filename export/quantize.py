"""fp32 ONNX denoiser -> int8 (static QDQ) with onnxruntime's quantisation tooling.

Only the inner UNet's convolutions and attention products run in int8 (`select_quantized_nodes`),
calibrated by default on what the sampler really feeds the network (`trajectory_feeds`); the
preconditioning, the embedding, softmax and normalisation stay float32, because that is where
int8 loses the images (`keep_float_readers_float`). The graph is onnxruntime's
(`_quantize_graph`) in the form TensorRT's explicit quantisation accepts; only EDM
preconditioning has been measured on a trained model (`quantize_int8`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edm_deploy.runtime.core.errors import (
    BackendUnavailableError,
    EdmDeployError,
    InputError,
    NumericalError,
    first_line,
)
from edm_deploy.runtime.core.manifest import CLASS_LABELS, DENOISED, SIGMA, X
from edm_deploy.runtime.sampling.seeds import SEED_LIMIT

from .onnx_export import embed_manifest

INNER_SCOPE = "/net/model/"
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
NORM_OP_TYPES = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
GLUE_OP_TYPES = ("Reshape", "Shape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Cast", "Identity")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_NUM_IMAGES = 16
DEFAULT_STEPS = 18
MAX_CALIBRATION_BATCH = 64
# A module-scope component of the embedding: map_noise, map_label, map_augment, map_layer0/1 and
# the per-block affine projection, with the exporter's "_<n>" suffix for repeated scopes.
_EMBEDDING_COMPONENT = re.compile(r"^(map_[a-z]+\d*|affine)(_\d+)?$")


@dataclass
class QuantizeResult:
    path: str
    manifest: dict
    seconds: float
    size_bytes: int
    quantized_nodes: list[str]
    calibration_rows: int
    self_check_max_rel_l2: float
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Which nodes are quantised


def is_inner_node(name: str) -> bool:
    return name.startswith(INNER_SCOPE)


def is_embedding_node(name: str) -> bool:
    """A node of the noise/label embedding (map_*) or of a block's affine projection of it."""
    if not is_inner_node(name):
        return False
    components = name[len(INNER_SCOPE):].split("/")[:-1]  # module scopes; the last part is the op
    return any(_EMBEDDING_COMPONENT.match(c) for c in components)


def select_quantized_nodes(model) -> list[str]:
    """Names of the nodes to run in int8: the inner UNet's Conv/MatMul/Gemm outside the embedding.

    Inner nodes are those under ``/net/model/``, the scope the torch exporter gives every node of
    ``precond.model`` (checked on real exports by the tests). Weights are then int8 per output
    channel, activations int8 per tensor, both symmetric (zero point 0), biases float: what
    TensorRT's explicit quantisation accepts, and what onnxruntime's CPU provider fuses into
    QLinearConv / QLinearMatMul. Inputs and outputs stay float32 with the symbolic batch.

    Raises InputError when the graph does not carry the exporter's module scopes (a graph from
    another exporter, or one whose node names were stripped): quantising blindly would take the
    preconditioning with it.
    """
    names = [n.name for n in model.graph.node]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise InputError("the graph's node names are missing or not unique; export it with `edm-deploy export`")
    inner_convs = [n for n in model.graph.node if n.op_type == "Conv" and is_inner_node(n.name)]
    if not inner_convs:
        raise InputError(
            f"found no convolution under the inner network's scope {INNER_SCOPE!r} in this graph, so the "
            "preconditioning cannot be told apart from the UNet; quantise an fp32 file written by `edm-deploy export`"
        )
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OP_TYPES and is_inner_node(n.name) and not is_embedding_node(n.name)]


# ------------------------------------------------------------------------------------------------
# Calibration data


class _Recorder:
    """A denoiser that forwards to the fp32 one and keeps every input the sampler passes it."""

    def __init__(self, den: Any):
        self._den = den
        for attr in ("sigma_min", "sigma_max", "round_sigma", "img_channels", "img_resolution", "label_dim"):
            setattr(self, attr, getattr(den, attr))
        self.max_batch = None
        self.feeds: list[dict[str, np.ndarray]] = []
        self.seeds: list[int] = []

    def __call__(self, x, sigma, class_labels=None):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        s32 = np.broadcast_to(np.asarray(sigma, dtype=np.float32).reshape(-1), (x32.shape[0],)).copy()
        if not np.isfinite(x32).all():
            raise NumericalError(f"the fp32 model's sampling trajectory went non-finite before sigma {s32.min():.4g} "
                                 f"(seeds {self.seeds[0]}..{self.seeds[-1]}); it cannot be calibrated")
        out = self._den(x32, s32, class_labels)
        if not np.isfinite(out).all():
            raise NumericalError(f"the fp32 model returned NaN/Inf at sigma {s32.min():.4g} during calibration "
                                 f"(seeds {self.seeds[0]}..{self.seeds[-1]}); its activations have no finite range")
        feed = {X: x32, SIGMA: s32}
        if self.label_dim:
            feed[CLASS_LABELS] = np.ascontiguousarray(class_labels, dtype=np.float32)
        self.feeds.append(feed)
        return out


def trajectory_feeds(den: Any, num_images: int, seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    """Every input the deterministic EDM sampler (``steps`` steps) passes `den` while it samples the given seeds:
    the default calibration, on what the sampler really feeds the network."""
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator, draw_latents_and_labels
    from edm_deploy.runtime.sampling.reference import edm_sampler

    recorder = _Recorder(den)
    seeds = seed + np.arange(num_images)
    shape = (den.img_channels, den.img_resolution, den.img_resolution)
    for start in range(0, num_images, MAX_CALIBRATION_BATCH):
        chunk = [int(s) for s in seeds[start:start + MAX_CALIBRATION_BATCH]]
        recorder.seeds = chunk
        rnd = StackedRandomGenerator(chunk)
        latents, labels = draw_latents_and_labels(rnd, shape, den.label_dim)
        edm_sampler(recorder, latents, labels, randn_like=rnd.randn_like, num_steps=steps)
    return recorder.feeds


def dataset_feeds(den: Any, dataset: np.ndarray, num_images: int, seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    """`num_images` dataset images plus noise at per-row log-uniform sigma over the sampler's range, one round
    per evaluation of ``steps`` EDM sampler steps."""
    from edm_deploy.runtime.sampling.reference import nfe

    rng = np.random.default_rng(seed)
    lo, hi = calibration_sigma_range(den)
    images = dataset[rng.choice(len(dataset), size=num_images, replace=False)].astype(np.float32)
    labels = None
    if den.label_dim:
        labels = np.eye(den.label_dim, dtype=np.float32)[rng.integers(den.label_dim, size=num_images)]
    feeds = []
    for _ in range(nfe(steps)):
        u = (np.arange(num_images) + rng.uniform(0, 1, num_images)) / num_images  # stratified over the range
        sigma = np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        sigma = np.asarray(den.round_sigma(sigma), dtype=np.float32).reshape(num_images)
        x = images + sigma.reshape(-1, 1, 1, 1) * rng.standard_normal(images.shape).astype(np.float32)
        feed = {X: np.ascontiguousarray(x, dtype=np.float32), SIGMA: sigma}
        if labels is not None:
            feed[CLASS_LABELS] = labels
        feeds.append(feed)
    return feeds


def calibration_sigma_range(den: Any) -> tuple[float, float]:
    """The sampler's default range [0.002, 80] clamped to the model's own limits."""
    return max(0.002, float(den.sigma_min)), min(80.0, float(den.sigma_max))


class FeedReader:
    """onnxruntime `CalibrationDataReader` over recorded feeds (with the range protocol that
    strided MinMax calibration uses to merge ranges feed by feed)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.start, self.end = 0, len(feeds)
        self.position = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.position >= self.end:
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self):
        return self

    def __next__(self):
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.feeds))
        self.position = start_index


def _reader(feeds):
    """A FeedReader that is also an `onnxruntime.quantization.CalibrationDataReader`."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(FeedReader, CalibrationDataReader):
        pass

    return Reader(feeds)


def _calibration_enum(name: str):
    def get():
        from onnxruntime.quantization import CalibrationMethod

        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[name]
    return get


CALIBRATION_ENUM = {name: _calibration_enum(name) for name in CALIBRATION_METHODS}
# Histograms: onnxruntime's quantize_static would build entropy histograms of 128 bins for 128
# quantised levels, which leaves the full (MinMax) range as the only candidate; 512 bins give
# entropy 448 thresholds to choose from (its search is quadratic in the bins: 2048 takes ~50 s per
# call on the test network), percentile is linear and gets 2048.
PERCENTILE_BINS = 2048
ENTROPY_BINS = 512
ENTROPY_QUANTIZED_BINS = 128


def check_onnxruntime() -> None:
    """The calibration ranges reach quantize_static through its calibration cache (newer onnxruntime)."""
    from onnxruntime import __version__
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise BackendUnavailableError(
            f"int8 quantisation needs an onnxruntime whose quantize_static takes calibration_cache_path (1.32 does); "
            f"this is {__version__}: pip install -U onnxruntime"
        )


def calibrate(model_path: str, feeds: list[dict[str, np.ndarray]], method: str, percentile: float, workdir: str):
    """Activation ranges of every Conv/MatMul/Gemm input and output over `feeds` (onnxruntime's calibrator).

    The calibrator is fed one recorded batch at a time and merges as it goes (MinMax ranges,
    entropy/percentile histograms), so memory does not grow with the number of feeds. Raises
    NumericalError naming the tensors whose range is not finite.
    """
    from onnxruntime.quantization import create_calibrator

    options: dict[str, Any] = {"symmetric": True}
    if method == "entropy":
        options.update(num_bins=ENTROPY_BINS, num_quantized_bins=ENTROPY_QUANTIZED_BINS)
    elif method == "percentile":
        options.update(num_bins=PERCENTILE_BINS, percentile=float(percentile))
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", RuntimeWarning)
            calibrator = create_calibrator(
                model_path, list(QUANTIZED_OP_TYPES), augmented_model_path=os.path.join(workdir, "augmented.onnx"),
                calibrate_method=CALIBRATION_ENUM[method](), providers=["CPUExecutionProvider"], extra_options=options,
            )
            for feed in feeds:
                calibrator.collect_data(_reader([feed]))
            ranges = calibrator.compute_data()
    except Exception as exc:
        message = first_line(exc, 300)
        if re.search(r"\bnan\b|\binf|finite", message, re.IGNORECASE):
            raise NumericalError(f"calibration met non-finite activations ({message})") from exc
        raise InputError(f"onnxruntime calibration failed: {message}") from exc
    bad = []
    for name, value in ranges.items():
        lo, hi = value.range_value if hasattr(value, "range_value") else value
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            bad.append(name)
    if bad:
        raise NumericalError(f"calibration produced non-finite activation ranges (NaN/Inf) for {len(bad)} tensors, "
                             f"e.g. {', '.join(bad[:3])}; the model cannot be quantised")
    return ranges


# ------------------------------------------------------------------------------------------------
# Input checks


def check_options(num_images: Any, seed: Any, method: Any, steps: Any, percentile: Any) -> str:
    """Validate the calibration options; returns the normalised method name."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(num_images) or num_images < 1:
        raise InputError(f"num_images must be a whole number >= 1, got {num_images!r}")
    if not is_int(seed) or seed < 0:
        raise InputError(f"seed must be a non-negative whole number, got {seed!r}")
    if seed + num_images > SEED_LIMIT:
        raise InputError(f"seed {seed} with {num_images} images needs seeds up to {seed + num_images - 1}, past the "
                         f"last seed {SEED_LIMIT - 1}; choose seed <= {SEED_LIMIT - num_images}", param="seed")
    if not is_int(steps) or steps < 1:
        raise InputError(f"steps must be a whole number >= 1, got {steps!r}")
    name = str(method).lower() if isinstance(method, str) else None
    if name not in CALIBRATION_METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if not (isinstance(percentile, (int, float)) and not isinstance(percentile, bool) and 50 < percentile <= 100):
        raise InputError(f"percentile must lie in (50, 100], got {percentile!r}")
    return name


def check_dataset(dataset: Any, manifest: dict, num_images: int) -> np.ndarray:
    """A float array [N, C, R, R] of the model's image shape, finite, in [-1, 1], N >= num_images."""
    c, r = int(manifest["img_channels"]), int(manifest["img_resolution"])
    array = np.asarray(dataset)
    if array.ndim != 4 or array.shape[1:] != (c, r, r):
        raise InputError(f"dataset must be an array of images [N, {c}, {r}, {r}] (NCHW) for this model, "
                         f"got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"dataset must hold float images in [-1, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise InputError("dataset contains NaN or Inf")
    lo, hi = float(array.min()), float(array.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise InputError(f"dataset images must lie in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]")
    if len(array) < num_images:
        raise InputError(f"num_images ({num_images}) exceeds the {len(array)} images in the dataset")
    return array


# ------------------------------------------------------------------------------------------------
# Graph surgery after quantize_static: float-kept readers read float


def _is_sensitive(node, consumers: dict, depth: int = 0) -> bool:
    """Readers that must see the float value: preconditioning, embedding, softmax, normalisation
    (and the shape glue on the way into a softmax or a normalisation)."""
    if not is_inner_node(node.name) or is_embedding_node(node.name):
        return True
    if node.op_type == "Softmax" or node.op_type in NORM_OP_TYPES:
        return True
    if node.op_type in GLUE_OP_TYPES and depth < 4:
        return any(_is_sensitive(c, consumers, depth + 1) for out in node.output for c in consumers.get(out, []))
    return False


def graph_links(graph) -> tuple[dict, dict]:
    """(tensor -> the node producing it, tensor -> the nodes reading it) of an ONNX graph."""
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return producer, consumers


def keep_float_readers_float(model, quantized: set[str]) -> dict[str, int]:
    """Point float-kept readers of DequantizeLinear(QuantizeLinear(t)) back at t; drop dead Q/DQ.

    onnxruntime lets every reader of a quantised tensor read the DequantizeLinear output and
    quantises Conv/MatMul outputs for their readers' sake. Kept float, with no Q/DQ round trip
    on their inputs: the preconditioning (every node outside ``/net/model/``: c_in, c_skip,
    c_out, c_noise and the final skip mix), the noise and label embedding (``map_*`` and every
    block's ``affine`` projection, which carry sigma into each block), attention ``Softmax``
    and normalisation (GroupNorm is exported as Reshape -> InstanceNormalization -> Reshape ->
    Mul -> Add) with the shape glue feeding it. The rest (SiLU, residual additions,
    ConvTranspose, concatenations) computes in float32 on what it reads.

    For a tensor t that onnxruntime quantised: if t is not the output of an int8 node (it was
    quantised as an int8 node's input), every other reader reads t itself. If t is the output of
    an int8 node, its readers keep the int8-rounded value (the node then runs int8 in and out),
    unless one of them is preconditioning, embedding, softmax or normalisation: then all of them
    read t. Returns counts for the log.
    """
    graph = model.graph
    producer, consumers = graph_links(graph)
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}

    # every activation pair: t -> QuantizeLinear -> DequantizeLinear(s) -> readers
    rewired = 0
    pairs: dict[str, list] = {}
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers:
            continue
        pairs.setdefault(q.input[0], []).append(dq)
    for tensor, dqs in pairs.items():
        source = producer.get(tensor)
        from_int8_node = source is not None and source.name in quantized
        readers = [(dq, r) for dq in dqs for r in consumers.get(dq.output[0], []) if r.name not in quantized]
        if not readers:
            continue
        if from_int8_node and not any(_is_sensitive(r, consumers) for _, r in readers):
            continue
        for dq, reader in readers:
            for k, name in enumerate(reader.input):
                if name == dq.output[0]:
                    reader.input[k] = tensor
                    rewired += 1

    # drop Q/DQ nodes nothing reads any more (and their now unused initializers)
    removed = 0
    while True:
        read = {name for n in graph.node for name in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)
    read = {name for n in graph.node for name in n.input}
    unused = [i for i in graph.initializer if i.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    return {"rewired_inputs": rewired, "removed_qdq_nodes": removed}


def float_kept_violations(model) -> list[str]:
    """Float-kept nodes that read a DequantizeLinear output, directly or through shape glue.

    Empty for a graph written by `quantize_int8`; the tests and `tensorrt_build` use it.
    """
    graph = model.graph
    producer, consumers = graph_links(graph)

    def reads_dequantized(node, depth=0) -> bool:
        for name in node.input:
            p = producer.get(name)
            if p is None:
                continue
            if p.op_type == "DequantizeLinear":
                return True
            if p.op_type in GLUE_OP_TYPES and depth < 4 and reads_dequantized(p, depth + 1):
                return True
        return False

    bad = []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type in GLUE_OP_TYPES:
            continue
        keep_float = (not is_inner_node(node.name) or is_embedding_node(node.name)
                      or node.op_type == "Softmax" or node.op_type in NORM_OP_TYPES)
        if keep_float and reads_dequantized(node):
            bad.append(f"{node.op_type} {node.name}")
    return bad


def quantization_summary(model) -> dict[str, Any]:
    """What a QDQ graph quantises: int8 node names, Q/DQ counts, zero points all zero, int32 biases."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    nonzero_zp, types, scales_ok = [], set(), True
    for n in qdq:
        if len(n.input) > 2 and n.input[2] in init:
            zp = init[n.input[2]]
            types.add(TensorProto.DataType.Name(zp.data_type))
            if np.any(numpy_helper.to_array(zp) != 0):
                nonzero_zp.append(n.name)
        if n.input[1] in init:
            s = numpy_helper.to_array(init[n.input[1]])
            scales_ok &= bool(np.all(np.isfinite(s)) and np.all(s > 0))
    int8_nodes = []
    for n in graph.node:
        if n.op_type in QUANTIZED_OP_TYPES and any(
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2]):
            int8_nodes.append(n.name)
    int32_dq = [n.name for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in init
                and init[n.input[0]].data_type == TensorProto.INT32]
    return {"qdq_nodes": len(qdq), "int8_nodes": int8_nodes, "zero_point_types": sorted(types),
            "nonzero_zero_points": nonzero_zp, "int32_dequantize": int32_dq, "scales_finite_positive": scales_ok}


# ------------------------------------------------------------------------------------------------
# The entry point


def quantize_int8(
    fp32_onnx_path: str,
    out_path: str,
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = 0,
    method: str = "minmax",
    dataset: Optional[np.ndarray] = None,
    steps: int = DEFAULT_STEPS,
    percentile: float = 99.999,
    threads: Optional[int] = None,
) -> QuantizeResult:
    """Calibrate and quantise `fp32_onnx_path` (an `edm-deploy export` fp32 file) into `out_path`.

    num_images: calibration images (seeds seed..seed+num_images-1, or dataset rows);
    seed: first seed (trajectories) or the dataset sampling seed; method: minmax, entropy or
    percentile; dataset: optional float images [N, C, R, R] in [-1, 1] to calibrate on data plus
    noise instead of sampler trajectories; steps: EDM sampler steps of the calibration; percentile:
    for the percentile method. Nothing appears under `out_path` unless the whole run succeeds.

    Measured (trained digits EDM, 16 trajectories): largest derivative error
    ``||D - D_ref|| / ||x - D_ref||`` 0.11 with MinMax, 0.14 with Percentile, 0.29 with Entropy,
    all at sigma < 0.07 (<= 0.06 above); samples score as fp32 (benchmarks/precision.py). The
    random-weight VP/VE/iDDPM test networks reach 0.2-1.8, so check such exports with the verify
    gate.
    """
    import onnx

    from edm_deploy.runtime.core.fileio import atomic_path, refuse_overwriting_inputs

    method = check_options(num_images, seed, method, steps, percentile)
    check_onnxruntime()
    refuse_overwriting_inputs({"fp32_onnx_path": fp32_onnx_path}, {"out_path": out_path})
    manifest, dataset = _check_source(fp32_onnx_path, out_path, dataset, num_images)
    start = time.perf_counter()
    calib = _calibration_inputs(fp32_onnx_path, dataset, num_images, seed, steps, threads)
    with tempfile.TemporaryDirectory(prefix="edm-deploy-int8-") as tmp:
        model, quantized = _quantize_graph(fp32_onnx_path, calib.feeds, method, percentile, tmp)
        surgery = keep_float_readers_float(model, set(quantized))
        summary = _checked_summary(model)
        int8_manifest = _int8_manifest(manifest, summary, method, num_images, seed, steps, percentile, calib, dataset,
                                       fp32_onnx_path)
        staged = os.path.join(tmp, "staged.onnx")
        embed_manifest(model, int8_manifest)
        onnx.save_model(model, staged)
        onnx.checker.check_model(staged, full_check=True)
        worst = _self_check(staged, calib.feeds, calib.check_indices, calib.reference, threads)
        int8_manifest["quantization"]["self_check_max_rel_l2"] = worst
        embed_manifest(model, int8_manifest)
        with atomic_path(out_path) as tmp_out:
            onnx.save_model(model, tmp_out)
    notes = [f"rewired {surgery['rewired_inputs']} float-kept inputs, removed {surgery['removed_qdq_nodes']} Q/DQ nodes"]
    if worst > 0.1:
        notes.append(f"int8 differs from fp32 by up to {worst:.1%} (relative L2 per image) on its calibration inputs; "
                     "check it with the verify gate before use")
    return QuantizeResult(
        path=out_path, manifest=int8_manifest, seconds=time.perf_counter() - start, size_bytes=os.path.getsize(out_path),
        quantized_nodes=summary["int8_nodes"], calibration_rows=int(calib.sigmas.size), self_check_max_rel_l2=worst,
        notes=notes,
    )


def _check_source(fp32_onnx_path: str, out_path: str, dataset: Optional[np.ndarray], num_images: int
                  ) -> tuple[dict, Optional[np.ndarray]]:
    """Stage 1: an fp32 edm-deploy export with its weights inside, an existing output folder, a fitting dataset."""
    from edm_deploy.runtime.backends.onnxrt import read_onnx_manifest

    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"output folder does not exist: {out_dir}")
    manifest = read_onnx_manifest(fp32_onnx_path)
    if manifest.get("precision", "fp32") != "fp32":
        raise InputError(f"{fp32_onnx_path} is a {manifest.get('precision')} export; int8 quantisation starts "
                         "from an fp32 export")
    if os.path.exists(fp32_onnx_path + ".data"):
        raise InputError(f"{fp32_onnx_path} keeps its weights in external data (> 2 GB); int8 quantisation of "
                         "such models is not supported")
    return manifest, None if dataset is None else check_dataset(dataset, manifest, num_images)


@dataclass
class _Calibration:
    """What the network is fed while calibrating, and the fp32 answers the self-check compares against."""

    feeds: list
    source: str
    sigmas: np.ndarray
    check_indices: list
    reference: list


def _calibration_inputs(fp32_onnx_path: str, dataset: Optional[np.ndarray], num_images: int, seed: int, steps: int,
                        threads: Optional[int]) -> _Calibration:
    """Stage 2: the network's real inputs (sampler trajectories, or data plus noise) and its fp32 outputs on a few."""
    from edm_deploy.runtime.backends.onnxrt import OnnxRuntimeDenoiser

    with OnnxRuntimeDenoiser(fp32_onnx_path, device="cpu", threads=threads) as den:
        if dataset is None:
            feeds, source = trajectory_feeds(den, num_images, seed, steps), "sampler trajectories"
        else:
            feeds, source = dataset_feeds(den, dataset, num_images, seed, steps), "dataset plus noise"
        check_indices = sorted({0, len(feeds) // 2, len(feeds) - 1})
        reference = [np.asarray(den(feeds[i][X], feeds[i][SIGMA], feeds[i].get(CLASS_LABELS))) for i in check_indices]
    if not all(np.isfinite(r).all() for r in reference):
        raise NumericalError("the fp32 model returns NaN/Inf on the calibration inputs; its activations have no finite range")
    return _Calibration(feeds, source, np.concatenate([f[SIGMA] for f in feeds]), check_indices, reference)


# onnxruntime's QDQ options for a graph TensorRT can build: symmetric, float bias, one Q/DQ pair per reader.
QDQ_OPTIONS = {
    "ActivationSymmetric": True,        # zero point 0: TensorRT's int8 is symmetric
    "WeightSymmetric": True,
    "QuantizeBias": False,              # float bias: TensorRT rejects int32 DequantizeLinear
    "DedicatedQDQPair": True,           # one Q/DQ pair per int8 reader (TensorRT cannot share them)
}


def _quantize_graph(fp32_onnx_path: str, feeds: list, method: str, percentile: float, tmp: str) -> tuple[Any, list]:
    """Stage 3: onnxruntime's static QDQ quantisation of the chosen nodes; its failures said in one line.

    ``quant_pre_process``, then ``quantize_static`` (QDQ, per-channel weights, the chosen nodes)
    reading the ranges `calibrate` computed through its ``calibration_cache_path`` (onnxruntime
    1.32 has it), then `keep_float_readers_float`. No quantisation parameter is computed here.
    """
    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
        save_tensors_data,
    )

    pre = os.path.join(tmp, "pre.onnx")
    raw = os.path.join(tmp, "int8.onnx")
    try:
        quant_pre_process(fp32_onnx_path, pre)
    except Exception as exc:
        raise InputError(f"onnxruntime could not prepare {fp32_onnx_path} for quantisation: {first_line(exc, 300)}") from exc
    prepared = onnx.load(pre)
    quantized = select_quantized_nodes(prepared)
    excluded = [n.name for n in prepared.graph.node if n.name not in set(quantized)]
    del prepared
    ranges = calibrate(pre, feeds, method, percentile, tmp)
    cache = os.path.join(tmp, "ranges.json")
    save_tensors_data(ranges, cache)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", RuntimeWarning)
            quantize_static(
                pre, raw, None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=quantized, nodes_to_exclude=excluded,
                calibrate_method=CALIBRATION_ENUM[method](), extra_options=dict(QDQ_OPTIONS),
                calibration_cache_path=cache,
            )
    except EdmDeployError:
        raise
    except Exception as exc:
        message = first_line(exc, 300)
        if re.search(r"\bnan\b|\binf|finite|scale", message, re.IGNORECASE):
            raise NumericalError(f"quantisation found non-finite activation ranges ({message})") from exc
        raise InputError(f"onnxruntime quantisation failed: {message}") from exc
    return onnx.load(raw), quantized


def _checked_summary(model: Any) -> dict:
    """Stage 4: the int8 graph is what it must be (finite scales, int8 nodes, float-kept nodes float, fp32 I/O)."""
    summary = quantization_summary(model)
    if not summary["scales_finite_positive"]:
        raise NumericalError("calibration produced non-finite or zero activation ranges (NaN/Inf in the recorded "
                             "activations); the model cannot be quantised")
    if not summary["int8_nodes"]:
        raise InputError("quantisation left no node in int8; nothing to gain from this file")
    violations = float_kept_violations(model)
    if violations:
        raise InputError(f"internal: float-kept nodes read quantised values: {violations[:3]}; this is a bug")
    if summary["nonzero_zero_points"] or summary["int32_dequantize"]:
        raise InputError("internal: the int8 graph is not symmetric with float biases; this is a bug")
    _check_io(model)
    return summary


def _int8_manifest(manifest: dict, summary: dict, method: str, num_images: int, seed: int, steps: int,
                   percentile: float, calib: _Calibration, dataset: Optional[np.ndarray], fp32_onnx_path: str) -> dict:
    """Stage 5: the fp32 manifest with the precision and how the file was quantised and calibrated."""
    import onnxruntime

    from edm_deploy.runtime.core.fileio import sha256_file
    from edm_deploy.runtime.sampling.reference import nfe

    out = dict(manifest)
    out["precision"] = "int8"
    out["quantization"] = {
        "format": "QDQ",
        "activations": "int8, per tensor, symmetric",
        "weights": "int8, per output channel, symmetric",
        "bias": "float32",
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "quantized_nodes": len(summary["int8_nodes"]),
        "kept_float": ["preconditioning (c_in, c_skip, c_out, c_noise) and the final skip mix",
                       "noise/label embedding and per-block affine", "softmax", "normalisation"],
        "calibration": {
            "method": method,
            "num_images": int(num_images),
            "seed": int(seed),
            "source": calib.source,
            "steps": int(steps),
            "evaluations": int(nfe(steps)),  # per image
            "batches": len(calib.feeds),
            "rows": int(calib.sigmas.size),
            "sigma_range": [float(calib.sigmas.min()), float(calib.sigmas.max())],
            **({"percentile": float(percentile)} if method == "percentile" else {}),
            **({"dataset_images": int(len(dataset))} if dataset is not None else {}),
        },
        "tool": f"onnxruntime.quantization {onnxruntime.__version__}",
        "fp32_sha256": sha256_file(fp32_onnx_path),
    }
    out["producer"] = dict(out.get("producer") or {}, quantizer=f"onnxruntime {onnxruntime.__version__}")
    return out


def _check_io(model) -> None:
    """fp32 inputs and output with the symbolic batch dimension, as in the fp32 export."""
    from onnx import TensorProto

    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in (X, SIGMA, CLASS_LABELS, DENOISED):
            continue
        t = value.type.tensor_type
        if t.elem_type != TensorProto.FLOAT or t.shape.dim[0].dim_param != "batch":
            raise InputError(f"internal: {value.name} lost its float32 type or symbolic batch; this is a bug")


def _self_check(path: str, feeds: list, indices: list[int], reference: list, threads: Optional[int]) -> float:
    """Run the int8 file on a few calibration feeds; largest per-row relative L2 error vs fp32."""
    import onnxruntime

    from edm_deploy.runtime.backends.onnxrt import usable_cpus

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads) if threads else usable_cpus()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"internal: onnxruntime cannot load the int8 graph ({first_line(exc)}); this is a bug") from exc
    worst = 0.0
    for i, want in zip(indices, reference):
        got = session.run([DENOISED], feeds[i])[0]
        if not np.isfinite(got).all():
            raise NumericalError("the int8 model returns NaN/Inf on its own calibration inputs")
        for a, b in zip(got.astype(np.float64), want.astype(np.float64)):
            worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return worst


__all__ = ["CALIBRATION_METHODS", "QUANTIZED_OP_TYPES", "QuantizeResult", "float_kept_violations",
           "is_embedding_node", "quantization_summary", "quantize_int8", "select_quantized_nodes"]
