"""The artifact manifest: what a runtime needs to know about a denoiser, with no torch.

Every exported artifact carries one: ONNX files in `metadata_props` (key ``edm_deploy``), TensorRT
engines in a ``*.plan.json`` sidecar, checkpoints implicitly through their network description.
It records the data shape, the supported sigma range, the preconditioner and its sigma rounding
rule (iDDPM carries its discrete table), the precision, batch limits, producer versions and the
source checkpoint's hash. Unbounded sigma limits are written as null (JSON has no infinity).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Any, Optional

from edm_deploy.errors import InputError

MANIFEST_FORMAT = "edm-deploy-manifest"
MANIFEST_VERSION = 1
ONNX_METADATA_KEY = "edm_deploy"

REQUIRED_KEYS = ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "precond", "sigma_rounding")


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
    return manifest


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)


def loads(text: str, source: str = "manifest") -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: manifest is not valid JSON ({exc})") from exc
    return validate(data, source)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide and writer threads call atomic_write_bytes


def write_sidecar(path: str, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(path, (dumps(manifest) + "\n").encode())


def read_sidecar(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise InputError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        return loads(f.read(), path)


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """Human-readable lines for `edm-deploy info`."""
    def limit(v):
        return "unbounded" if v is None else f"{v:g}"

    lines = [
        f"model       : {manifest.get('network', {}).get('class_name', '?')} / "
        f"{manifest.get('network', {}).get('init_kwargs', {}).get('model_type', '?')} ({manifest['precond']} preconditioning)",
        f"data        : {manifest['img_channels']}x{manifest['img_resolution']}x{manifest['img_resolution']}, "
        f"{'unconditional' if not manifest['label_dim'] else str(manifest['label_dim']) + ' classes'}",
        f"sigma range : [{limit(manifest['sigma_min'])}, {limit(manifest['sigma_max'])}]"
        + (f", sigma_data {manifest['sigma_data']:g}" if manifest.get("sigma_data") is not None else ""),
        f"rounding    : {manifest['sigma_rounding'].get('kind')}"
        + (f" ({len(manifest['sigma_rounding']['values'])} levels)" if manifest['sigma_rounding'].get('kind') == 'table' else ""),
        f"precision   : {manifest.get('precision', '?')}",
    ]
    batch = manifest.get("batch")
    if batch:
        lines.append(f"batch       : min {batch.get('min')}, opt {batch.get('opt')}, max {batch.get('max')}")
    if manifest.get("tensorrt"):
        trt = manifest["tensorrt"]
        lines.append(f"tensorrt    : {trt.get('version')} on {trt.get('gpu')} (sm {trt.get('compute_capability')})")
    prod = manifest.get("producer", {})
    if prod:
        lines.append("producer    : " + ", ".join(f"{k} {v}" for k, v in sorted(prod.items())))
    src = manifest.get("source", {})
    if src:
        lines.append(f"source      : {src.get('checkpoint', '?')} (sha256 {str(src.get('sha256', '?'))[:16]}...)")
    return lines
