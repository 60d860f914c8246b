"""The `ckpt.pt` checkpoint format: plain data that loads with `torch.load(weights_only=True)`.

A checkpoint never pickles classes. It is a dict::

    {
      "format": "edm-deploy-checkpoint", "version": 1,
      "network": {"class_name": "EDMPrecond", "init_kwargs": {...}},   # reference constructor kwargs
                                                # (+ "consistency": {...} when consistency-tuned)
      "ema": {state-dict name -> tensor},       # names follow the reference ("model.enc.32x32_conv.weight")
      "training_state": None | {...},           # only in resume points, see TRAINING_STATE_KEYS
      "meta": {"producer": ..., "created": ..., ...},
    }

`network.init_kwargs` are exactly the keyword arguments of the reference preconditioner
constructors (img_resolution, img_channels, label_dim, use_fp16, model_type and the inner
network's kwargs), which is also what an official pickle stores in `_init_kwargs`, so a converted
official model and a model trained here look the same. A consistency-tuned network's description
also holds its ``consistency`` record (`training.consistency`): how it was tuned and the sha256
of the checkpoint it was tuned from; `network_manifest` carries it into every manifest.

A resume point's `training_state` holds the raw network and optimizer state dicts (``net``,
``optimizer``), the counters ``cur_nimg`` and ``cur_tick``, one RNG state and one data-sampler
position per process (``rng``, ``sampler``, lists of length ``world_size``) and the run's
``options``; optionally ``total_time`` and ``device_type``. `load_checkpoint` checks all of this,
and every problem with a file - unreadable, foreign, incomplete, or weights that do not fit the
described network - is one `InputError` line.
"""

from __future__ import annotations

import datetime
import io
import math
import os
import re
import warnings
import zipfile
from typing import Any, Optional

from edm_deploy.runtime.backends.torch_backend import describe_denoiser
from edm_deploy.runtime.core.errors import InputError, first_line
from edm_deploy.runtime.core.fileio import atomic_write_bytes, sha256_file
from edm_deploy.runtime.core.manifest import CONSISTENCY_KEY, MAX_TABLE, PRECOND_KINDS, consistency_record
from edm_deploy.runtime.core.optional import require
from edm_deploy.runtime.core.version import __version__

from .presets import ARCHITECTURE_NAMES

CHECKPOINT_FORMAT = "edm-deploy-checkpoint"
CHECKPOINT_VERSION = 1

ARCHITECTURES = ARCHITECTURE_NAMES


def _torch():
    return require("torch", "reading .pt checkpoints")


# What bounds the work of building a network from its description on torch's meta device (its
# module count, its tables): every published EDM network is far inside (2-4 blocks per level,
# filters of 2-4 taps, M = 1000). The memory the network needs is bounded by the weights the
# file holds instead (`check_network_fits`).
STRUCTURE_LIMITS = {"num_blocks": 64, "attn_resolutions": 64, "resample_filter": 64, "channel_mult": 16,
                    "M": MAX_TABLE}
# Elements a network may hold beyond the weights its checkpoint stores (buffers that are rebuilt,
# not stored, such as resampling filters of a few taps).
MAX_UNSTORED_ELEMENTS = 1 << 20


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
    for key, limit in STRUCTURE_LIMITS.items():
        value = kwargs.get(key)
        size = len(value) if isinstance(value, (list, tuple)) else value
        if isinstance(size, int) and size > limit:
            what = f"{key} of {size:,} entries" if isinstance(value, (list, tuple)) else f"{key} {size:,}"
            raise InputError(f"{source}: network description has {what}; at most {limit:,} is read: the file "
                             "describes no network this project builds")
    consistency_record(network.get(CONSISTENCY_KEY), source)
    return network


def network_skeleton(network: dict, source: str = "checkpoint"):
    """The network a description implies, built on torch's meta device: every module and shape,
    no memory for weights and no initialisation, so its size is known before it is built."""
    torch = _torch()
    with torch.device("meta"):
        return build_network(network, source)


def check_network_fits(network: dict, state: Any, source: str = "checkpoint", what: str = "checkpoint weights"):
    """Refuse, before any memory is spent on it, a description that does not fit the weights the
    file holds: other tensor names or shapes, or more elements than stored (a description with
    ``model_channels`` 16384 beside 11 MB of weights would otherwise allocate gigabytes). So a
    network built from a file never takes more memory than the file's own weights. Returns the
    skeleton (`network_skeleton`)."""
    skeleton = network_skeleton(network, source)
    check_weights_fit(skeleton, state, source, what)
    implied = sum(t.numel() for t in (*skeleton.parameters(), *skeleton.buffers()))
    stored = sum(int(t.numel()) for t in state.values())
    if implied > stored + MAX_UNSTORED_ELEMENTS:
        raise InputError(f"{source}: the network description implies {implied:,} numbers, the file stores {stored:,}: "
                         "the description does not belong to these weights")
    return skeleton


def build_network(network: dict, source: str = "checkpoint"):
    """Instantiate the preconditioned network (randomly initialised) from its description.

    A description the constructors reject (an unknown keyword, a value of the wrong type, an
    impossible combination) is one InputError naming the class and the constructor's complaint.
    """
    from . import precond

    check_network_description(network, source)
    cls = getattr(precond, network["class_name"])
    kwargs = network["init_kwargs"]
    if not isinstance(kwargs, dict):
        raise InputError(f"{source}: network init_kwargs must be a dict, got {type(kwargs).__name__}")
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AssertionError, RuntimeError, ZeroDivisionError) as exc:
        raise InputError(
            f"{source}: cannot build {network['class_name']} from the stored description ({first_line(exc)})"
        ) from exc


def load_weights(module, state: Any, source: str = "checkpoint", what: str = "weights") -> None:
    """`module.load_state_dict(state)` with every mismatch as one InputError.

    Names are compared first (missing / unexpected tensors), then shapes, so the message names
    the first offending tensor and both shapes instead of PyTorch's multi-line RuntimeError.
    """
    check_weights_fit(module, state, source, what)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a dtype that cannot be copied
        raise InputError(f"{source}: {what} do not load into the network ({first_line(exc)})") from exc


def check_weights_fit(module, state: Any, source: str = "checkpoint", what: str = "weights") -> None:
    """The names and shapes of `state` must be exactly those of `module`'s state dict (no loading).

    Works on a network built on the meta device, so a file can be checked before any memory is
    spent or anything is written.
    """
    if not isinstance(state, dict):
        raise InputError(f"{source}: {what} must be a dict of tensors, got {type(state).__name__}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        raise InputError(f"{source}: {what} do not fit the described network: {'; '.join(detail)}")
    for name, tensor in own.items():
        value = state[name]
        shape = getattr(value, "shape", None)
        if shape is None:
            raise InputError(f"{source}: {what} entry {name} is a {type(value).__name__}, not a tensor")
        if tuple(shape) != tuple(tensor.shape):
            raise InputError(
                f"{source}: {what} do not fit the described network: {name} has shape {list(shape)} "
                f"in the file, {list(tensor.shape)} in the network"
            )


def save_checkpoint(
    path: str,
    network: dict,
    ema_state: dict,
    training_state: Optional[dict] = None,
    meta: Optional[dict] = None,
) -> None:
    """Write a checkpoint atomically and durably (temporary file, fsync, rename, fsync of the folder).

    A crash or power loss leaves either the previous file or the complete new one, never an
    empty or half-written file under the final name.
    """
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
    atomic_write_bytes(path, buffer.getvalue(), durable=True)


def is_checkpoint_file(path: str, max_pickle_bytes: int = 64 << 20) -> bool:
    """Whether `path` is an edm-deploy checkpoint, told without torch or unpickling: a torch.save zip
    whose pickle names `CHECKPOINT_FORMAT` (what `convert --out` may replace); never raises."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.file_size <= max_pickle_bytes]
            return any(CHECKPOINT_FORMAT.encode() in zf.read(i) for i in pickles[:1])
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError):
        return False


def load_checkpoint(path: str) -> dict:
    """Read and validate a checkpoint; every failure is one clear InputError."""
    torch = _torch()
    if not os.path.exists(path):
        raise InputError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle of a file it then refuses; we say why
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from exc
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise InputError(f"{path} is not a readable edm-deploy checkpoint: {unreadable_reason(path, exc)}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"{path} is not an edm-deploy checkpoint (for an official EDM .pkl, run `edm-deploy convert` first)"
        )
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt.get('version')} is newer than this edm-deploy supports")
    check_network_description(ckpt.get("network"), path)
    if not isinstance(ckpt.get("ema"), dict) or not ckpt["ema"]:
        raise InputError(f"{path}: checkpoint holds no network weights")
    check_training_state(ckpt.get("training_state"), path)
    return ckpt


def unreadable_reason(path: str, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, told from the file itself.

    torch's own text is pages long, is cut mid-sentence by a one-line error, and for a refused
    file ends in the advice to retry with ``weights_only=False``, which would run whatever code
    the file carries; so it is never passed on. What it refused (``GLOBAL module.name``) is.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if not head:
        return "the file is empty"
    if refused:
        name = refused.group(1)
        hint = (" (it looks like an official EDM network pickle: convert it with `edm-deploy convert`)"
                if name.split(".")[0] in ("torch_utils", "dnnlib") else "")
        return (f"it asks for the Python object {name}, which a checkpoint never holds; loading it could run "
                f"code, so it was refused and nothing from the file ran{hint}")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a damaged or truncated zip archive (torch.save files are zip archives)"
        if not any(n.endswith("/data.pkl") for n in names):
            return "a zip archive, but not one written by torch.save"
        return "a torch.save archive whose contents are damaged or hold objects a checkpoint never holds"
    if head[:1] == b"\x80":
        return "a pickle, but not a torch.save file, or a damaged one"
    return "neither a zip archive nor a pickle, so not a torch.save file at all"


# What a resume point's training_state must hold, and the type of each entry.
TRAINING_STATE_KEYS = {
    "net": dict, "optimizer": dict, "cur_nimg": int, "cur_tick": int, "rng": list, "sampler": list,
    "world_size": int, "options": dict,
}


def check_training_state(state: Any, source: str = "checkpoint") -> None:
    """None (a weights-only snapshot) or a complete resume state; anything else is an InputError."""
    if state is None:
        return
    if not isinstance(state, dict):
        raise InputError(f"{source}: training_state must be a dict or absent, got {type(state).__name__}")
    missing = [k for k in TRAINING_STATE_KEYS if k not in state]
    if missing:
        raise InputError(f"{source}: training_state is incomplete (lacks {', '.join(missing)}); it cannot resume")
    for key, kind in TRAINING_STATE_KEYS.items():
        value = state[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(
                f"{source}: training_state[{key!r}] must be {kind.__name__}, got {type(value).__name__}"
            )
    world = state["world_size"]
    if world < 1 or len(state["rng"]) != world or len(state["sampler"]) != world:
        raise InputError(
            f"{source}: training_state holds {len(state['rng'])} RNG states and {len(state['sampler'])} "
            f"sampler positions for world_size {world}"
        )
    if state["cur_nimg"] < 0 or state["cur_tick"] < 0:
        raise InputError(f"{source}: training_state has negative counters")


def load_network(source, device: str = "cpu"):
    """A checkpoint path (or loaded dict) -> the EMA network in eval mode without gradients."""
    if isinstance(source, (str, os.PathLike)):
        name, ckpt = os.fspath(source), load_checkpoint(source)
    else:
        name, ckpt = "checkpoint", source
    check_network_fits(ckpt["network"], ckpt["ema"], name)
    net = build_network(ckpt["network"], name)
    load_weights(net, ckpt["ema"], name, "checkpoint weights")
    return net.eval().requires_grad_(False).to(device)


def network_manifest(net, network: dict, source_path: Optional[str] = None, precision: str = "fp32") -> dict:
    """The runtime manifest of a preconditioned network (schema in `edm_deploy.runtime.core.manifest`)."""
    torch = _torch()
    manifest = describe_denoiser(net, precision=precision)
    manifest["network"] = sanitize_for_json({k: v for k, v in network.items() if k != CONSISTENCY_KEY})
    if network.get(CONSISTENCY_KEY) is not None:
        manifest[CONSISTENCY_KEY] = sanitize_for_json(network[CONSISTENCY_KEY])
    manifest["producer"] = {"edm_deploy": __version__, "torch": torch.__version__.split("+")[0]}
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
