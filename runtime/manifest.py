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
from typing import Any, Optional

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import atomic_write_bytes

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


def encode_limit(value: float) -> Optional[float]:
    """float('inf') -> None so the manifest stays valid JSON."""
    return None if value is None or math.isinf(value) else float(value)


def decode_limit(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def validate(manifest: dict[str, Any], source: str = "manifest") -> dict[str, Any]:
    """Check format tag, version and required keys; return the manifest unchanged."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{source}: not an edm-deploy manifest")
    if int(manifest.get("version", 0)) > MANIFEST_VERSION:
        raise InputError(
            f"{source}: manifest version {manifest.get('version')} is newer than this edm-deploy "
            f"understands ({MANIFEST_VERSION}); upgrade edm-deploy"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InputError(f"{source}: manifest lacks {', '.join(missing)}")
    consistency_record(manifest.get(CONSISTENCY_KEY), source)
    return manifest


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)


def loads(text: str, source: str = "manifest") -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: manifest is not valid JSON ({exc})") from exc
    return validate(data, source)


def write_sidecar(path: str, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(path, (dumps(manifest) + "\n").encode(), durable=True)


def read_sidecar(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise InputError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        return loads(f.read(), path)
