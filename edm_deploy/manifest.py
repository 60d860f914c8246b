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

# Preconditioner class name -> manifest `precond` kind.
PRECOND_KINDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}

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


def describe_denoiser(net: Any, precision: str = "fp32") -> dict[str, Any]:
    """The runtime fields of a manifest, read off a preconditioner module by duck typing.

    Shared by checkpoint export (`training.checkpoint.network_manifest`) and the torch backend's
    in-process wrapper, so both describe a network identically: shape, classes, sigma range
    (0 / inf become null), sigma_data, precond kind and the rounding rule (a discrete table `u`,
    as iDDPM has, becomes a table rule).
    """
    name = type(net).__name__
    table = getattr(net, "u", None)
    sigma_min = float(net.sigma_min)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "img_resolution": int(net.img_resolution),
        "img_channels": int(net.img_channels),
        "label_dim": int(net.label_dim),
        "sigma_min": encode_limit(sigma_min) if sigma_min > 0 else None,
        "sigma_max": encode_limit(float(net.sigma_max)),
        "sigma_data": float(net.sigma_data) if hasattr(net, "sigma_data") else None,
        "precond": PRECOND_KINDS.get(name, name),
        "sigma_rounding": {"kind": "identity"} if table is None
        else {"kind": "table", "values": [float(v) for v in table.detach().cpu().float().tolist()]},
        "precision": precision,
    }


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


# Temporary files are named `.tmp-<random>-<final name>.partial`: hidden, and never ending in the
# final name's extension, so a `*.png` (or `*.npz`, `*.onnx`) glob never picks up half a file.
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".partial"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary names (a killed writer may leave them)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def atomic_write_bytes(path: str, data: bytes, durable: bool = False) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.

    With `durable`, the data and the rename are flushed to disk (fsync of the file and the
    folder) before returning, so a power loss cannot leave an empty file under the final name;
    checkpoints use it, per-image PNG writes do not (it would cost a disk flush per image).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path) + TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
        if durable:
            _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: str) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds (Windows): the rename is as durable as it gets
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide and writer threads call atomic_write_bytes


def write_sidecar(path: str, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(path, (dumps(manifest) + "\n").encode(), durable=True)


def read_onnx_manifest(path: str) -> dict[str, Any]:
    """The manifest in an ONNX file's metadata, read without loading its weights.

    Uses the `onnx` package when installed; otherwise a minimal onnxruntime session (the
    runtime must work without onnx). Either way, no torch.
    """
    if not os.path.exists(path):
        raise InputError(f"file not found: {path}")
    try:
        import onnx
    except ModuleNotFoundError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:
            raise InputError(f"{path} is not a readable ONNX file ({_first_line(exc)})") from exc
        meta = {p.key: p.value for p in model.metadata_props}
    else:
        from edm_deploy.runtime.backends.onnxrt import import_onnxruntime, light_session_options

        ort = import_onnxruntime()
        try:
            session = ort.InferenceSession(path, sess_options=light_session_options(ort), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"{path} is not a readable ONNX file ({_first_line(exc)})") from exc
        meta = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in meta:
        raise InputError(f"{path} has no edm-deploy manifest; export it with `edm-deploy export`")
    return loads(meta[ONNX_METADATA_KEY], path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


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
