"""The artifact manifest schema: what a runtime needs to know about a denoiser, with no torch.

Every exported artifact carries one: ONNX files in `metadata_props` (key ``edm_deploy``, read by
the onnxruntime backend), TensorRT engines in a ``*.plan.json`` sidecar, checkpoints implicitly
through their network description. It records the data shape, the supported sigma range, the
preconditioner and its sigma rounding rule (iDDPM carries its discrete table), the precision,
batch limits, producer versions and the source checkpoint's hash. Unbounded sigma limits are
written as null (JSON has no infinity).

This module also names the facts every artifact shares: the tensor names of the denoiser graph
and the preconditioner kinds.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence, Union

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import atomic_write_bytes
from edm_deploy.runtime.jsonio import MAX_MANIFEST_BYTES, loads_bounded, read_json_file

MANIFEST_FORMAT = "edm-deploy-manifest"
MANIFEST_VERSION = 1
ONNX_METADATA_KEY = "edm_deploy"

# The tensors of every exported denoiser graph D(x, sigma, class_labels) -> denoised.
X, SIGMA, CLASS_LABELS, DENOISED = "x", "sigma", "class_labels", "denoised"


def input_names(label_dim: int) -> list[str]:
    """The graph's inputs in order: class_labels only for a conditional model."""
    return [X, SIGMA] + ([CLASS_LABELS] if label_dim else [])


# Preconditioner class name -> manifest `precond` kind (the reverse map is derived from it).
PRECOND_KINDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}
PRECOND_CLASSES = {kind: name for name, kind in PRECOND_KINDS.items()}

REQUIRED_KEYS = ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "precond", "sigma_rounding")

# The largest image side and the most classes any model or dataset of this project may have
# (datasets are checked against the same numbers in `training.dataset`). EDM networks train at
# 32-64 pixels (the paper's largest dataset is 64x64), and at 1024 one RGB image is already 12 MB
# as a float32 input; ImageNet-21k has 21,841 classes, and a label embedding of label_dim rows
# grows with it (a label of 10^9 would ask for a 128 GB embedding at 32 channels).
MAX_RESOLUTION = 1024
MAX_CLASSES = 100_000

# The range each integer field may take (a manifest is read from a file: check it).
INT_FIELDS = {"img_resolution": (1, MAX_RESOLUTION), "img_channels": (1, 64), "label_dim": (0, MAX_CLASSES)}


def encode_limit(value: float) -> Optional[float]:
    """float('inf') -> None so the manifest stays valid JSON."""
    return None if value is None or math.isinf(value) else float(value)


def decode_limit(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(manifest: dict[str, Any], source: str = "manifest") -> dict[str, Any]:
    """Check format tag, version, required keys and their types; return the manifest unchanged.

    Types are checked because a manifest is read from a file anyone can edit: a label_dim of
    ``"10"`` or a batch limit of -1 is one clear error here rather than a traceback later.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{source}: not an edm-deploy manifest")
    version = manifest.get("version", 0)
    if not _is_int(version):
        raise InputError(f"{source}: manifest version must be an integer, got {version!r}")
    if version > MANIFEST_VERSION:
        raise InputError(
            f"{source}: manifest version {manifest.get('version')} is newer than this edm-deploy "
            f"understands ({MANIFEST_VERSION}); upgrade edm-deploy"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InputError(f"{source}: manifest lacks {', '.join(missing)}")
    for key, (lowest, highest) in INT_FIELDS.items():
        if not _is_int(manifest[key]) or not lowest <= manifest[key] <= highest:
            raise InputError(f"{source}: manifest {key} must be an integer from {lowest} to {highest:,}, "
                             f"got {manifest[key]!r}")
    for key in ("sigma_min", "sigma_max"):
        value = manifest[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise InputError(f"{source}: manifest {key} must be a non-negative number or null, got {value!r}")
    if not isinstance(manifest["sigma_rounding"], dict):
        raise InputError(f"{source}: manifest sigma_rounding must be an object, got {manifest['sigma_rounding']!r}")
    batch = manifest.get("batch")
    if batch is not None:
        if not isinstance(batch, dict) or not all(_is_int(batch.get(k, 1)) and batch.get(k, 1) >= 1
                                                  for k in ("min", "opt", "max")):
            raise InputError(f"{source}: manifest batch must hold positive integers min, opt, max; got {batch!r}")
    for key in ("network", "io", "tensorrt", "quantization", "source", "producer"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise InputError(f"{source}: manifest {key} must be an object, got a {type(manifest[key]).__name__}")
    return manifest


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)


def loads(text: Union[str, bytes], source: str = "manifest") -> dict[str, Any]:
    """A manifest from JSON text (an ONNX file's metadata, a sidecar), bounded and validated."""
    return validate(loads_bounded(text, source, max_bytes=MAX_MANIFEST_BYTES, what="manifest JSON"), source)


def write_sidecar(path: str, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(path, (dumps(manifest) + "\n").encode(), durable=True)


def read_sidecar(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise InputError(f"manifest not found: {path}")
    return validate(read_json_file(path, max_bytes=MAX_MANIFEST_BYTES, what="manifest JSON"), path)


# --------------------------------------------------------------------------------------------
# The manifest against the graph it describes


Dim = Union[int, str, None]  # a graph dimension: a fixed size, or symbolic / dynamic (a name, None or -1)


def _fixed(dim: Dim) -> Optional[int]:
    return dim if _is_int(dim) and dim >= 0 else None


def expected_shapes(manifest: dict[str, Any]) -> dict[str, tuple]:
    """The tensor shapes the manifest's fields imply, batch dimension as None."""
    c, r, k = manifest["img_channels"], manifest["img_resolution"], manifest["label_dim"]
    shapes = {X: (None, c, r, r), SIGMA: (None,), DENOISED: (None, c, r, r)}
    if k:
        shapes[CLASS_LABELS] = (None, k)
    return shapes


_FIELD_OF_DIM = {(X, 1): "img_channels", (X, 2): "img_resolution", (X, 3): "img_resolution",
                 (DENOISED, 1): "img_channels", (DENOISED, 2): "img_resolution", (DENOISED, 3): "img_resolution",
                 (CLASS_LABELS, 1): "label_dim"}


def check_against_graph(manifest: dict[str, Any], tensors: dict[str, Sequence[Dim]], source: str,
                        batch_range: Optional[tuple[int, int]] = None) -> None:
    """Refuse, in one line, a manifest that disagrees with the graph it came with.

    `tensors` maps each graph input and output name to its shape as the graph states it (fixed
    sizes as ints; symbolic or dynamic ones as a name, None or -1); `batch_range` is the
    (min, max) batch the graph itself accepts where it says (a TensorRT profile). Compared:
    the tensor names (class_labels exactly when label_dim > 0), ranks, every fixed dimension
    against img_channels, img_resolution and label_dim, the manifest's own ``io`` section, and
    the batch limits. A file whose manifest was edited, or copied from another model, fails
    here instead of allocating what the forged fields ask for or failing deep in a backend.
    """
    wanted = expected_shapes(manifest)
    inputs = sorted(n for n in tensors if n != DENOISED)
    if inputs != sorted(input_names(manifest["label_dim"])) or DENOISED not in tensors:
        raise InputError(f"{source}: the graph's tensors {sorted(tensors)} do not match the manifest (label_dim "
                         f"{manifest['label_dim']} means {sorted(wanted)}); the file was altered or is not an "
                         "edm-deploy export")
    batch = manifest.get("batch") or {}
    for name, want in wanted.items():
        got = tuple(tensors[name])
        if len(got) != len(want):
            raise InputError(f"{source}: the graph's {name} has {len(got)} dimensions, the manifest implies "
                             f"{len(want)}; the file was altered or is not an edm-deploy export")
        for axis, (g, w) in enumerate(zip(got, want)):
            g = _fixed(g)
            if g is None:
                continue
            if axis == 0:
                if batch.get("max") is not None and not batch.get("min", 1) == batch["max"] == g:
                    raise InputError(f"{source}: the graph takes batches of exactly {g}, but the manifest says "
                                     f"batch {batch.get('min', 1)}..{batch['max']}; the file was altered")
                continue
            if g != w:
                field = _FIELD_OF_DIM[(name, axis)]
                raise InputError(f"{source}: the manifest says {field} {manifest[field]}, but the graph's {name} "
                                 f"input has {g} there (shape {list(tensors[name])}); the manifest was altered or "
                                 "belongs to another model: re-export it")
    declared = (manifest.get("io") or {})
    for group in ("inputs", "outputs"):
        for name, shape in (declared.get(group) or {}).items():
            if name not in wanted or not isinstance(shape, list) or len(shape) != len(wanted[name]) or any(
                    _fixed(d) is not None and d != w for d, w in zip(shape[1:], wanted[name][1:])):
                raise InputError(f"{source}: the manifest's io section gives {name} as {shape!r}, which disagrees "
                                 f"with its own img_channels/img_resolution/label_dim; the manifest was altered")
    if batch_range is not None and batch.get("max") is not None:
        lo, hi = batch_range
        if batch["max"] > hi or batch.get("min", 1) < lo:
            raise InputError(f"{source}: the manifest says batch {batch.get('min', 1)}..{batch['max']}, but the "
                             f"engine accepts {lo}..{hi}; the manifest was altered or belongs to another engine")
