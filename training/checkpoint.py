"""The `ckpt.pt` checkpoint format: plain data that loads with `torch.load(weights_only=True)`.

A checkpoint never pickles classes. It is a dict::

    {
      "format": "edm-deploy-checkpoint", "version": 1,
      "network": {"class_name": "EDMPrecond", "init_kwargs": {...}},   # reference constructor kwargs
      "ema": {state-dict name -> tensor},       # names follow the reference ("model.enc.32x32_conv.weight")
      "training_state": None | {...},           # only in resume points (net, optimizer, counters, RNG)
      "meta": {"producer": ..., "created": ..., ...},
    }

`network.init_kwargs` are exactly the keyword arguments of the reference preconditioner
constructors (img_resolution, img_channels, label_dim, use_fp16, model_type and the inner
network's kwargs), which is also what an official pickle stores in `_init_kwargs`, so a converted
official model and a model trained here look the same.
"""

from __future__ import annotations

import datetime
import io
import math
import os
from typing import Any, Optional

from edm_deploy import __version__
from edm_deploy.errors import InputError
from edm_deploy.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    atomic_write_bytes,
    encode_limit,
    sha256_file,
)

CHECKPOINT_FORMAT = "edm-deploy-checkpoint"
CHECKPOINT_VERSION = 1

PRECOND_KINDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}
ARCHITECTURES = ("SongUNet", "DhariwalUNet")


def _torch():
    try:
        import torch
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise InputError("reading .pt checkpoints needs torch: pip install 'edm-deploy[train]'") from exc
    return torch


def check_network_description(network: Any, source: str = "checkpoint") -> dict:
    """The network entry must name a known preconditioner and architecture."""
    if not isinstance(network, dict) or "class_name" not in network or "init_kwargs" not in network:
        raise InputError(f"{source}: network description is missing or malformed")
    if network["class_name"] not in PRECOND_KINDS:
        raise InputError(
            f"{source}: unknown preconditioner {network['class_name']!r} "
            f"(known: {', '.join(PRECOND_KINDS)})"
        )
    kwargs = network["init_kwargs"]
    default_arch = "DhariwalUNet" if network["class_name"] in ("EDMPrecond", "iDDPMPrecond") else "SongUNet"
    arch = kwargs.get("model_type", default_arch)
    if arch not in ARCHITECTURES:
        raise InputError(f"{source}: unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    for key in ("img_resolution", "img_channels"):
        if key not in kwargs:
            raise InputError(f"{source}: network description lacks {key}")
    return network


def build_network(network: dict):
    """Instantiate the preconditioned network (randomly initialised) from its description."""
    from edm_deploy.training import precond

    check_network_description(network)
    cls = getattr(precond, network["class_name"])
    return cls(**network["init_kwargs"])


def save_checkpoint(
    path: str,
    network: dict,
    ema_state: dict,
    training_state: Optional[dict] = None,
    meta: Optional[dict] = None,
) -> None:
    """Write a checkpoint atomically (temporary file + rename)."""
    torch = _torch()
    check_network_description(network)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "network": network,
        "ema": {k: v.detach().cpu().clone() for k, v in ema_state.items()},
        "training_state": training_state,
        "meta": {
            "producer": f"edm-deploy {__version__}",
            "torch": str(torch.__version__),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(meta or {}),
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str) -> dict:
    """Read and validate a checkpoint; every failure is one clear InputError."""
    torch = _torch()
    if not os.path.exists(path):
        raise InputError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable edm-deploy checkpoint ({first[:200]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"{path} is not an edm-deploy checkpoint (for an official EDM .pkl, run `edm-deploy convert` first)"
        )
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt.get('version')} is newer than this edm-deploy supports")
    check_network_description(ckpt.get("network"), path)
    if not isinstance(ckpt.get("ema"), dict) or not ckpt["ema"]:
        raise InputError(f"{path}: checkpoint holds no network weights")
    return ckpt


def load_network(source, device: str = "cpu"):
    """A checkpoint path (or loaded dict) -> the EMA network in eval mode without gradients."""
    ckpt = load_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    net = build_network(ckpt["network"])
    missing, unexpected = net.load_state_dict(ckpt["ema"], strict=False)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        raise InputError(f"checkpoint weights do not fit the described network: {'; '.join(detail)}")
    return net.eval().requires_grad_(False).to(device)


def network_manifest(net, network: dict, source_path: Optional[str] = None, precision: str = "fp32") -> dict:
    """The runtime manifest of a preconditioned network (see `edm_deploy.manifest`)."""
    torch = _torch()
    kind = PRECOND_KINDS[network["class_name"]]
    if kind == "iddpm":
        rounding = {"kind": "table", "values": [float(v) for v in net.u.detach().cpu().float().tolist()]}
    else:
        rounding = {"kind": "identity"}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "img_resolution": int(net.img_resolution),
        "img_channels": int(net.img_channels),
        "label_dim": int(net.label_dim),
        "sigma_min": encode_limit(float(net.sigma_min)) if float(net.sigma_min) > 0 else None,
        "sigma_max": encode_limit(float(net.sigma_max)),
        "sigma_data": float(net.sigma_data) if hasattr(net, "sigma_data") else None,
        "precond": kind,
        "sigma_rounding": rounding,
        "precision": precision,
        "network": sanitize_for_json(network),
        "producer": {"edm_deploy": __version__, "torch": torch.__version__.split("+")[0]},
    }
    if source_path is not None:
        manifest["source"] = {"checkpoint": os.path.basename(source_path), "sha256": sha256_file(source_path)}
    return manifest


def sanitize_for_json(value: Any) -> Any:
    """Replace infinities (EDMPrecond's sigma_max default) by None in nested kwargs."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: sanitize_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize_for_json(v) for v in value]
    return value
