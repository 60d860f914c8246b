"""The artifact manifest schema: what a runtime needs to know about a denoiser, with no torch.

Every exported artifact carries one: ONNX files in `metadata_props` (key ``edm_deploy``, read by
the onnxruntime backend), TensorRT engines in a ``*.plan.json`` sidecar, checkpoints implicitly
through their network description. It records the data shape, the supported sigma range, the
preconditioner and its sigma rounding rule (iDDPM carries its discrete table), the precision,
batch limits, producer versions and the source checkpoint's hash; a consistency-tuned model also
its ``consistency`` record (`consistency_record`). Unbounded sigma limits are written as null
(JSON has no infinity).

This module also names the facts every artifact shares: the tensor names of the denoiser graph
and the preconditioner kinds.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional, Sequence, Union

from .errors import InputError
from .fileio import atomic_write_bytes
from .jsonio import MAX_MANIFEST_BYTES, loads_bounded, read_json_file

MANIFEST_FORMAT = "edm-deploy-manifest"
MANIFEST_VERSION = 1
ONNX_METADATA_KEY = "edm_deploy"
# The number formats a network may compute in (bf16: the torch backend's autocast path).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# An ONNX export's digest of its own content but the manifest (`runtime.core.onnx_file`).
DIGEST_KEY = "content_sha256"

# The tensors of every exported denoiser graph D(x, sigma, class_labels) -> denoised.
X, SIGMA, CLASS_LABELS, DENOISED = "x", "sigma", "class_labels", "denoised"


def input_names(label_dim: int) -> list[str]:
    """The graph's inputs in order: class_labels only for a conditional model."""
    return [X, SIGMA] + ([CLASS_LABELS] if label_dim else [])


# Preconditioner class name -> manifest `precond` kind (the reverse map is derived from it).
PRECOND_KINDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}

REQUIRED_KEYS = ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "precond", "sigma_rounding")

# The largest image side and the most classes any model or dataset of this project may have
# (datasets are checked against the same numbers in `training.dataset`). EDM networks train at
# 32-64 pixels (the paper's largest dataset is 64x64), and at 1024 one RGB image is already 12 MB
# as a float32 input; ImageNet-21k has 21,841 classes, and a label embedding of label_dim rows
# grows with it (a label of 10^9 would ask for a 128 GB embedding at 32 channels).
MAX_RESOLUTION = 1024
MAX_CLASSES = 100_000

# The largest batch an artifact may declare (export's --max-batch takes the same bound).
MAX_BATCH = 1 << 16
# The most entries a discrete sigma table may have (iDDPM's has M = 1000).
MAX_TABLE = 100_000

# The range each integer field may take (a manifest is read from a file: check it).
INT_FIELDS = {"img_resolution": (1, MAX_RESOLUTION), "img_channels": (1, 64), "label_dim": (0, MAX_CLASSES)}
SECTIONS = ("network", "io", "tensorrt", "quantization", "source", "producer")


# A consistency-tuned model (training/consistency.py) records how it was made: {"method": "ect",
# "from_checkpoint": name, "from_sha256": the teacher checkpoint's sha256, "from_kimg": ...}. The
# runtime reads it (`DenoiserBackend.consistency_tuned`): such a model maps a noisy image to a
# clean one in one evaluation and is sampled by the consistency sampler, not by an ODE solver.
CONSISTENCY_KEY = "consistency"
CONSISTENCY_METHODS = ("ect",)


def consistency_record(entry: Any, source: str = "manifest") -> Optional[dict[str, Any]]:
    """None for a plain denoiser, else the checked consistency record (method, teacher hash)."""
    if entry is None:
        return None
    sha = entry.get("from_sha256") if isinstance(entry, dict) else None
    if (not isinstance(entry, dict) or entry.get("method") not in CONSISTENCY_METHODS or not isinstance(sha, str)
            or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha)):
        raise InputError(f"{source}: the {CONSISTENCY_KEY} entry must name a method ({', '.join(CONSISTENCY_METHODS)}) "
                         f"and the 64-digit sha256 of the checkpoint it was tuned from, got {entry!r:.120}")
    return entry


# Time points searched for this model (`edm-deploy schedule`), embedded at export (`export --schedule`):
# {"<solver>@<nfe>": [sigma, ...]}. `sample --solver S --nfe K` uses the entry for S@K when no time
# points are given, so a consistency model's tuned mid point travels with the model.
SCHEDULES_KEY = "schedules"
MAX_SCHEDULES = 64
_SCHEDULE_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}@[1-9][0-9]{0,5}")


def schedule_key(solver: str, nfe: int) -> str:
    return f"{solver}@{int(nfe)}"


def schedules_record(entry: Any, source: str = "manifest") -> dict[str, list[float]]:
    """{} when absent, else the checked {"solver@nfe": time points} of a manifest."""
    from .schedules import check_sigma_list

    if entry is None:
        return {}
    if not isinstance(entry, dict) or len(entry) > MAX_SCHEDULES:
        raise InputError(f"{source}: the {SCHEDULES_KEY} entry must map at most {MAX_SCHEDULES} names "
                         f"'solver@nfe' to lists of time points, got {entry!r:.120}")
    out = {}
    for key, sigmas in entry.items():
        if not isinstance(key, str) or not _SCHEDULE_KEY.fullmatch(key):
            raise InputError(f"{source}: {SCHEDULES_KEY} key {key!r:.40} is not 'solver@nfe' (e.g. consistency@2)")
        if not isinstance(sigmas, list):
            raise InputError(f"{source}: {SCHEDULES_KEY}[{key}] must be a list of time points")
        try:
            out[key] = [float(v) for v in check_sigma_list(sigmas)]
        except InputError as exc:
            raise InputError(f"{source}: {SCHEDULES_KEY}[{key}]: {exc}") from None
    return out


def encode_limit(value: float) -> Optional[float]:
    """float('inf') -> None so the manifest stays valid JSON."""
    return None if value is None or math.isinf(value) else float(value)


def decode_limit(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(manifest: dict[str, Any], source: str = "manifest") -> dict[str, Any]:
    """Check format tag, version, required keys and every field's type and range; return it unchanged.

    A manifest is read from a file anyone can edit, so a label_dim of ``"10"``, a batch limit of
    -1, a sigma table of text or sigma_min above sigma_max is one clear error here, naming the
    file and the field, rather than a traceback (or a misleading message) later.
    """
    _check_header(manifest, source)
    for key, (lowest, highest) in INT_FIELDS.items():
        if not _is_int(manifest[key]) or not lowest <= manifest[key] <= highest:
            raise InputError(f"{source}: manifest {key} must be an integer from {lowest} to {highest:,}, "
                             f"got {manifest[key]!r}")
    _check_sigma_range(manifest, source)
    _check_rounding(manifest["sigma_rounding"], source)
    _check_batch(manifest.get("batch"), source)
    for key in SECTIONS:
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise InputError(f"{source}: manifest {key} must be an object, got a {type(manifest[key]).__name__}")
    if manifest.get("precision") is not None and manifest["precision"] not in PRECISIONS:
        raise InputError(f"{source}: manifest precision must be a name, one of {', '.join(PRECISIONS)}; "
                         f"got {manifest['precision']!r:.40}")
    digest = manifest.get(DIGEST_KEY)
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise InputError(f"{source}: manifest {DIGEST_KEY} must be 64 hexadecimal digits, got {digest!r:.80}")
    kwargs = (manifest.get("network") or {}).get("init_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InputError(f"{source}: manifest network.init_kwargs must be an object, got a {type(kwargs).__name__}")
    dropout = (kwargs or {}).get("label_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout <= 1):
        raise InputError(f"{source}: manifest label_dropout must be a number in [0, 1], got {dropout!r}")
    consistency_record(manifest.get(CONSISTENCY_KEY), source)
    schedules_record(manifest.get(SCHEDULES_KEY), source)
    return manifest


def check_precision(manifest: dict[str, Any], graph_precision: str, source: str) -> None:
    """The precision a manifest claims must be the one its graph computes in (told from the graph)."""
    claimed = manifest.get("precision", "fp32")
    if claimed != graph_precision:
        raise InputError(f"{source}: the manifest says {claimed}, but the graph computes in {graph_precision}; the "
                         "manifest was altered or belongs to another export: export the model again")


def _check_header(manifest: Any, source: str) -> None:
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


def _check_sigma_range(manifest: dict[str, Any], source: str) -> None:
    for key in ("sigma_min", "sigma_max"):
        value = manifest[key]
        if value is not None and not (_is_number(value) and value >= 0):
            raise InputError(f"{source}: manifest {key} must be a non-negative number or null, got {value!r}")
    lo, hi = manifest["sigma_min"], manifest["sigma_max"]
    if lo is not None and hi is not None and not lo < hi:
        raise InputError(f"{source}: the manifest's sigma range is empty (sigma_min {lo:g} >= sigma_max {hi:g})")


def _check_rounding(rule: Any, source: str) -> None:
    if not isinstance(rule, dict) or rule.get("kind", "identity") not in ("identity", "table"):
        raise InputError(f"{source}: manifest sigma_rounding must be {{'kind': 'identity'}} or a table, got {rule!r}"[:300])
    if rule.get("kind") == "table":
        values = rule.get("values")
        if not (isinstance(values, list) and 2 <= len(values) <= MAX_TABLE
                and all(_is_number(v) and v >= 0 for v in values)):
            raise InputError(f"{source}: manifest sigma_rounding table must be a list of 2 to {MAX_TABLE:,} "
                             "non-negative numbers")


def _check_batch(batch: Any, source: str) -> None:
    if batch is None:
        return
    values = [batch.get(k, 1) for k in ("min", "opt", "max")] if isinstance(batch, dict) else None
    if values is None or not all(_is_int(v) and 1 <= v <= MAX_BATCH for v in values) or not values[0] <= values[2]:
        raise InputError(f"{source}: manifest batch must hold integers 1 <= min <= max <= {MAX_BATCH:,} "
                         f"(and opt); got {batch!r}"[:300])


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
