"""Hand-built ONNX graphs of analytic denoisers, with edm-deploy manifests.

They let the onnxruntime backend, `edm-deploy sample` and `info` be tested end to end against
the exact NumPy oracles, with no torch export involved. Built with onnx.helper only.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from edm_deploy.runtime.core.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, ONNX_METADATA_KEY


def oracle_manifest(channels: int, resolution: int, label_dim: int = 0, max_batch: int = 64) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "img_resolution": resolution,
        "img_channels": channels,
        "label_dim": label_dim,
        "sigma_min": None,
        "sigma_max": None,
        "sigma_data": None,
        "precond": "edm",
        "sigma_rounding": {"kind": "identity"},
        "precision": "fp32",
        "batch": {"min": 1, "opt": min(8, max_batch), "max": max_batch},
        "network": {"class_name": "GaussianOracle", "init_kwargs": {}},
        "producer": {"tests": "onnx_oracles"},
    }


def gaussian_onnx(path: str, channels: int = 1, resolution: int = 8, mu: float = 0.3, std: float = 0.5,
                  label_dim: int = 0, max_batch: int = 64) -> str:
    """D(x; sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu), with an optional (ignored) label input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, resolution, resolution])
    sigma = helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"])
    out = helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["batch", channels, resolution, resolution])
    inits = [
        helper.make_tensor("mu", TensorProto.FLOAT, [], [mu]),
        helper.make_tensor("var", TensorProto.FLOAT, [], [std * std]),
        helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1]),
    ]
    nodes = [
        helper.make_node("Reshape", ["sigma", "shape4"], ["s4"]),
        helper.make_node("Mul", ["s4", "s4"], ["s2"]),
        helper.make_node("Add", ["var", "s2"], ["den"]),
        helper.make_node("Div", ["var", "den"], ["w"]),
        helper.make_node("Sub", ["x", "mu"], ["xc"]),
        helper.make_node("Mul", ["w", "xc"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mu"], ["denoised"]),
    ]
    inputs = [x, sigma]
    if label_dim:
        inputs.append(helper.make_tensor_value_info("class_labels", TensorProto.FLOAT, ["batch", label_dim]))
        # Consume the labels (times zero) so the input stays in the graph.
        inits.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
        inits.append(helper.make_tensor("axes1", TensorProto.INT64, [1], [1]))
        nodes[-1] = helper.make_node("Add", ["scaled", "mu"], ["pre"])
        nodes += [
            helper.make_node("ReduceSum", ["class_labels", "axes1"], ["lsum"], keepdims=0),
            helper.make_node("Mul", ["lsum", "zero"], ["lzero"]),
            helper.make_node("Reshape", ["lzero", "shape4"], ["l4"]),
            helper.make_node("Add", ["pre", "l4"], ["denoised"]),
        ]
    graph = helper.make_graph(nodes, "gaussian_oracle", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = oracle_manifest(channels, resolution, label_dim, max_batch)
    helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(manifest)})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def nan_onnx(path: str, resolution: int = 4) -> str:
    """A denoiser that returns NaN wherever x > 2.5 (to test the NaN error path)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, resolution, resolution])
    sigma = helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"])
    out = helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["batch", 1, resolution, resolution])
    inits = [
        helper.make_tensor("limit", TensorProto.FLOAT, [], [2.5 * 80]),
        helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1]),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["xmax"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Greater", ["xmax", "limit"], ["bad"]),
        helper.make_node("Mul", ["x", "half"], ["xh"]),
        helper.make_node("Where", ["bad", "nan", "xh"], ["pre"]),
        helper.make_node("Reshape", ["sigma", "shape4"], ["s4"]),
        helper.make_node("Mul", ["s4", "half"], ["unused"]),
        helper.make_node("Sub", ["unused", "unused"], ["zero"]),
        helper.make_node("Add", ["pre", "zero"], ["denoised"]),
    ]
    graph = helper.make_graph(nodes, "nan_oracle", [x, sigma], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(oracle_manifest(1, resolution))})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def reference_gaussian(channels=1, resolution=8, mu=0.3, std=0.5):
    from edm_deploy.runtime import GaussianDenoiser

    return GaussianDenoiser(channels, resolution, mu=mu, std=std)


__all__ = ["gaussian_onnx", "nan_onnx", "oracle_manifest", "reference_gaussian", "np"]
