"""Import official EDM network pickles (NVlabs/edm) without executing anything stored in them.

Why this exists: the reference loader rebuilds every network class by ``exec()``-ing the Python
source that the pickle carries (``torch_utils.persistence``), so opening an untrusted ``.pkl``
the reference way runs arbitrary code. This module reads the same files with a *restricted*
unpickler instead:

* ``find_class`` knows only the handful of globals such a file legitimately asks for (see
  ``_ALLOWED_GLOBALS``) and maps each to a local replacement that builds plain data. Every other
  global (``posix.system``, ``builtins.eval``, ``subprocess.Popen`` ...) is refused with an
  :class:`~edm_deploy.runtime.core.errors.InputError` that names it, before anything is called.
* Nothing a stream did not create itself can be changed by it: BUILD (state setting) reaches only
  fresh instances of the importer's own record classes, SETITEM(S)/APPEND(S)/ADDITEMS only fresh
  dicts, lists and sets; a stream that aims them at an allowlisted helper (``_codecs.encode``
  with new ``__defaults__``, say) is refused before the opcode applies (``_GuardedUnpickler``).
* A persistent object becomes a :class:`PersistentRecord` (class name, ``__dict__`` state, init
  kwargs, sha256 of its embedded module source). The source text is hashed, never executed.
* Tensors are rebuilt from raw bytes: the nested legacy ``torch.save`` blob behind
  ``torch.storage._load_from_bytes`` is parsed by a second restricted unpickler plus a
  ``persistent_load`` hook, never handed to ``torch.load``.

The record tree under ``data[key]`` (default ``'ema'``) is then walked through ``_modules`` into a
flat state dict with the reference names (``model.enc.32x32_conv.weight`` ...) and the network
description ``{"class_name", "init_kwargs"}`` that :mod:`edm_deploy.training.checkpoint` stores.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import hashlib
import inspect
import io
import os
import pickle
import types
import urllib.parse
from typing import Any, BinaryIO, Optional

import torch

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.fileio import refuse_foreign_file, refuse_overwriting_inputs, write_target
from edm_deploy.training import precond as precond_module
from edm_deploy.training.presets import ARCHITECTURE_NAMES

# --------------------------------------------------------------------------------------------
# What a legitimate file contains
# --------------------------------------------------------------------------------------------

#: Preconditioners a network pickle may hold at its top, with their positional parameter order
#: (used only if a file stored positional ``_init_args``, which train.py never does).
PRECOND_POSITIONAL = {
    "EDMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "sigma_data", "model_type"),
    "VPPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M",
                  "epsilon_t", "model_type"),
    "VEPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                  "model_type"),
    "iDDPMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "C_1", "C_2", "M",
                     "model_type"),
}
#: model_type when a pickle's kwargs omit it: the preconditioner constructor's own default.
DEFAULT_MODEL_TYPE = {name: inspect.signature(getattr(precond_module, name)).parameters["model_type"].default
                      for name in PRECOND_POSITIONAL}
INNER_CLASSES = ARCHITECTURE_NAMES
LAYER_CLASSES = ("Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding")

PERSISTENCE_VERSION = 6  # the only version the reference loader accepts
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DEPTH = 64
# The most nodes (values of init kwargs, modules, tensors) one file's walk may visit. A depth
# limit alone does not bound the work: a 14 KB pickle of shared references (``a = [a, a]``
# forty times, a "billion laughs") is a tree of 2^40 nodes only 41 levels deep. The largest
# official network (ImageNet-64 ADM) has about 2,000 tensors and 1,000 modules.
_MAX_NODES = 200_000
# How many bytes of weights may be named beyond the bytes actually stored: one stored tensor
# named under many names would otherwise be copied once per name when the checkpoint is saved.
_MAX_SHARED_BYTES = 16 << 20

# torch.<Name>Storage in the nested legacy blob -> element dtype
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# numpy dtype codes a pickled scalar may use (numeric only: no object/str/void scalars)
_NUMPY_SCALAR_CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


# --------------------------------------------------------------------------------------------
# Plain-data stand-ins for the objects a file describes
# --------------------------------------------------------------------------------------------

class _NoState:
    """Refuses pickle BUILD: these objects are made whole by our own code, never patched by the file.

    (Without this a stream could BUILD onto a record and swap its validated fields, or onto a tensor,
    whose own ``__setstate__`` can re-point or resize its storage.)
    """

    def __setstate__(self, state: Any) -> None:
        raise InputError(f"malformed pickle: it tries to set the state of a {type(self).__name__.lstrip('_')}")


@dataclasses.dataclass
class PersistentRecord(_NoState):
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have rebuilt, as data."""

    class_name: str
    state: dict
    init_args: tuple
    init_kwargs: dict
    module_src_sha256: str


class _ModuleDictRecord:
    """Stands in for torch.nn.ModuleDict (pickled as NEWOBJ + BUILD with the module's __dict__)."""

    def __init__(self) -> None:
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise InputError("malformed ModuleDict state in the pickle")
        self.state = state


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict: a dict, nothing more."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)
        elif state is not None:
            raise InputError("malformed EasyDict state in the pickle")


class _DTypeSpec:
    """Stands in for numpy.dtype(code, align, copy) + BUILD(state); only read by `_numpy_scalar`."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True) -> None:
        self.code = code
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]
        else:
            raise InputError("malformed numpy dtype state in the pickle")


@dataclasses.dataclass
class TensorRecord(_NoState):
    """A tensor rebuilt from raw bytes; wrapped so the stream cannot BUILD onto the tensor itself."""

    tensor: torch.Tensor


@dataclasses.dataclass
class _Storage(_NoState):
    """A storage rebuilt from raw bytes: a flat 1-D tensor of its dtype."""

    data: torch.Tensor


@dataclasses.dataclass
class _StorageType(_NoState):
    name: str
    dtype: torch.dtype


@dataclasses.dataclass
class _PendingStorage(_NoState):
    key: str


# --------------------------------------------------------------------------------------------
# Safe replacements for the allowed globals
# --------------------------------------------------------------------------------------------

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> TensorRecord:
    """The tensor a strided view into `storage` describes, bounds checked, as a TensorRecord.

    A view covering its whole storage is returned as is; anything else is copied, so no tensor
    we hand out aliases bytes it does not own.
    """
    if not isinstance(storage, _Storage):
        raise InputError("malformed tensor in the pickle (its storage is not a tensor storage)")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(v) is int and v >= 0 for v in (storage_offset, *size, *stride))):
        raise InputError("malformed tensor in the pickle (bad offset, size or stride)")
    numel = 1
    for s in size:
        numel *= s
    available = storage.data.numel()
    if numel:
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= available or numel > available:
            raise InputError("malformed tensor in the pickle (it reaches outside its storage)")
    view = torch.as_strided(storage.data, tuple(size), tuple(stride), storage_offset)
    if storage_offset == 0 and numel == available and view.is_contiguous():
        return TensorRecord(view)  # the usual case (the tensor is its whole storage): no second copy
    return TensorRecord(view.clone())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> TensorRecord:
    """A Parameter is just its data for our purposes."""
    if not isinstance(data, TensorRecord):
        raise InputError("malformed parameter in the pickle")
    return data


def _numpy_scalar(dtype, raw=None):
    """numpy.core.multiarray.scalar(dtype, bytes) -> the Python number it holds."""
    if not isinstance(dtype, _DTypeSpec) or dtype.code not in _NUMPY_SCALAR_CODES or not isinstance(raw, bytes):
        code = getattr(dtype, "code", dtype)
        raise InputError(f"refusing to load: the pickle holds a numpy scalar of unsupported type {code!r}")
    import numpy as np

    np_dtype = np.dtype(dtype.code).newbyteorder("=" if dtype.byteorder == "|" else dtype.byteorder)
    if len(raw) != np_dtype.itemsize:
        raise InputError("malformed numpy scalar in the pickle")
    return np.frombuffer(raw, dtype=np_dtype)[0].item()


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode(str, 'latin1'): how protocol-2 pickles spell bytes objects."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise InputError("refusing to load: the pickle calls _codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise InputError("refusing to load: the pickle calls builtins.bytes with arguments")
    return b""


def _make_set(items=()):
    return set(items)


def _make_frozenset(items=()):
    return frozenset(items)


# --------------------------------------------------------------------------------------------
# Restricted unpicklers
# --------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): "persistent",  # bound per unpickler
    ("collections", "OrderedDict"): dict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): "storage",  # bound per unpickler
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DTypeSpec,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("builtins", "set"): _make_set,
    ("builtins", "frozenset"): _make_frozenset,
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol < 3 streams spell globals the Python 2 way (__builtin__.set, commands.Popen).

    pickle's own find_class translates them; an override sees them raw, so translate the same way
    before matching the allowlist or naming a refused global.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _refuse(module: str, name: str) -> InputError:
    module, name = _python3_name(module, name)
    return InputError(
        f"refusing to load: the pickle asks for {module}.{name}, which an EDM network pickle never "
        f"needs (loading it could run code); nothing from the file was executed"
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return "a global it looked up (one of the allowlisted functions and classes)"
    return f"a {type(obj).__name__.lstrip('_')}"


def _state_setter(opcode: bytes, depth: int, allowed: str):
    """A guarded version of one of pickle's state-setting opcodes (BUILD, SETITEM(S), APPEND(S), ADDITEMS).

    The object it would change - `depth` below the top of the stack, or (depth 0) the object
    below the last MARK - must be of a type in the unpickler's `allowed` attribute, *exactly*;
    anything else is refused before the opcode applies.
    """
    apply = pickle._Unpickler.dispatch[opcode[0]]

    def guarded(self: _GuardedUnpickler) -> None:
        below = (self.metastack[-1] if self.metastack else []) if depth == 0 else self.stack
        index = -1 if depth == 0 else -depth
        if len(below) >= -index and type(below[index]) not in getattr(self, allowed):
            raise InputError(
                f"malformed pickle: it tries to set the state of {_describe(below[index])}, which is not a "
                f"record this importer created (refused before anything was changed)"
            )
        apply(self)

    return guarded


class _GuardedUnpickler(pickle._Unpickler):
    """pickle's own (pure-Python) unpickler, with every opcode that changes an existing object guarded.

    BUILD (``__setstate__``, ``__dict__`` or slot updates) may reach only a fresh instance of one
    of the importer's record classes (`buildable`), and SETITEM(S)/APPEND(S)/ADDITEMS only a
    fresh dict, list or set (`fillable`): the exact types, so neither the helper functions and
    classes that `find_class` hands out nor any object outside the stream can be changed. (The C
    unpickler cannot be hooked per opcode; without this a stream could BUILD
    ``{'__defaults__': ...}`` onto an allowlisted helper and change it for the rest of the process.)
    """

    buildable: tuple = ()
    fillable: tuple = (dict, list, set)
    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _state_setter(pickle.BUILD, 2, "buildable")
    dispatch[pickle.SETITEM[0]] = _state_setter(pickle.SETITEM, 3, "fillable")
    dispatch[pickle.APPEND[0]] = _state_setter(pickle.APPEND, 2, "fillable")
    dispatch[pickle.SETITEMS[0]] = _state_setter(pickle.SETITEMS, 0, "fillable")
    dispatch[pickle.APPENDS[0]] = _state_setter(pickle.APPENDS, 0, "fillable")
    dispatch[pickle.ADDITEMS[0]] = _state_setter(pickle.ADDITEMS, 0, "fillable")


class _NoGlobalsUnpickler(_GuardedUnpickler):
    """Plain values only (ints, strings, lists, dicts): the headers of the legacy storage blob."""

    def find_class(self, module: str, name: str) -> Any:
        raise _refuse(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise InputError("malformed pickle: unexpected persistent id")


class _StorageUnpickler(_NoGlobalsUnpickler):
    """The object pickle of a legacy torch.save blob: one storage reference, nothing else."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, tuple[_StorageType, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise _refuse(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise InputError("malformed tensor storage in the pickle (unexpected persistent id)")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise InputError("malformed tensor storage in the pickle")
        if view_metadata is not None:
            raise InputError("unsupported tensor storage in the pickle (legacy storage views)")
        self.storages[key] = (stype, numel)
        return _PendingStorage(key)


def _load_legacy_storage(blob: Any) -> _Storage:
    """Parse the legacy torch.save stream behind torch.storage._load_from_bytes, by hand.

    Layout: magic, protocol 1001, sys_info, the storage pickle (a persistent id), the list of
    storage keys, then per key an int64 element count followed by the raw little-endian bytes.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise InputError("malformed tensor storage in the pickle (not a byte string)")
    stream = io.BytesIO(blob)
    if _NoGlobalsUnpickler(stream).load() != _LEGACY_MAGIC:
        raise InputError("malformed tensor storage in the pickle (bad magic number)")
    if _NoGlobalsUnpickler(stream).load() != _LEGACY_PROTOCOL:
        raise InputError("unsupported tensor storage in the pickle (unknown legacy protocol)")
    sys_info = _NoGlobalsUnpickler(stream).load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise InputError("unsupported tensor storage in the pickle (only little-endian files are supported)")
    inner = _StorageUnpickler(stream)
    obj = inner.load()
    keys = _NoGlobalsUnpickler(stream).load()
    if not isinstance(obj, _PendingStorage) or not isinstance(keys, list) or keys != [obj.key]:
        raise InputError("malformed tensor storage in the pickle (unexpected layout)")
    stype, numel = inner.storages[obj.key]
    view = memoryview(blob)
    pos = stream.tell()
    if len(blob) < pos + 8 or int.from_bytes(view[pos:pos + 8], "little", signed=True) != numel:
        raise InputError("malformed tensor storage in the pickle (element count mismatch)")
    pos += 8
    nbytes = numel * torch.empty((), dtype=stype.dtype).element_size()
    if len(blob) != pos + nbytes:
        raise InputError("malformed tensor storage in the pickle (data length mismatch)")
    if numel == 0:
        return _Storage(torch.empty(0, dtype=stype.dtype))
    return _Storage(torch.frombuffer(bytearray(view[pos:pos + nbytes]), dtype=stype.dtype))


class _OfficialUnpickler(_GuardedUnpickler):
    """The outer reader: allowlisted globals only, each mapped to a data-building replacement."""

    buildable = (_ModuleDictRecord, _EasyDict, _DTypeSpec)
    fillable = (dict, list, set, _EasyDict)

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.module_sources: dict[str, list[str]] = {}  # sha256 of module_src -> class names using it

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get(_python3_name(module, name))
        if target is None:
            raise _refuse(module, name)
        if target == "persistent":
            return self._reconstruct_persistent_obj
        if target == "storage":
            return _load_legacy_storage
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise InputError("malformed pickle: unexpected persistent id")

    def _reconstruct_persistent_obj(self, meta: Any) -> PersistentRecord:
        """Record what the reference would exec; the module source is hashed, never run."""
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise InputError("malformed persistent object in the pickle (meta is not a class record)")
        if meta.get("version") != PERSISTENCE_VERSION:
            raise InputError(f"unsupported persistent object version {meta.get('version')!r} (expected 6)")
        class_name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src")
        if not isinstance(class_name, str) or not isinstance(state, dict) or not isinstance(src, str):
            raise InputError("malformed persistent object in the pickle (class_name/state/module_src)")
        digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        users = self.module_sources.setdefault(digest, [])
        if class_name not in users:
            users.append(class_name)
        init_args = state.get("_init_args", ())
        init_kwargs = state.get("_init_kwargs", {})
        if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
            raise InputError(f"malformed persistent object {class_name} (its init arguments)")
        return PersistentRecord(class_name, state, tuple(init_args), dict(init_kwargs), digest)


def safe_unpickle(file: BinaryIO) -> tuple[Any, dict[str, list[str]]]:
    """Unpickle an EDM network file as plain data; returns (data, {module_src sha256: class names}).

    Persistent objects come back as :class:`PersistentRecord`, tensors as :class:`TensorRecord`,
    OrderedDicts as dicts, numpy scalars as Python numbers.
    Raises InputError for refused globals and for anything that is not a readable pickle.
    """
    unpickler = _OfficialUnpickler(file)
    try:
        data = unpickler.load()
    except InputError:
        raise
    except RecursionError as exc:
        raise InputError("the pickle is nested too deeply to be an EDM network") from exc
    except MemoryError as exc:
        raise InputError("the pickle asks for more memory than is available") from exc
    except Exception as exc:  # truncated or foreign data: pickle raises many types
        raise InputError(_unreadable_pickle(file, exc)) from exc
    return data, unpickler.module_sources


def _unreadable_pickle(file: BinaryIO, exc: Exception) -> str:
    """Why the bytes are not a pickle, in our words (pickle's own are opcode numbers and memo keys)."""
    if isinstance(exc, EOFError) or "truncated" in str(exc):
        return "not a readable pickle: it is truncated (the data ends before the pickle does)"
    try:
        where = f" at byte {file.tell()}"
    except (OSError, ValueError):
        where = ""
    return (f"not a readable pickle: the bytes are not valid pickle data (the stream breaks{where}, "
            f"{type(exc).__name__}); the file is damaged or in another format")


# --------------------------------------------------------------------------------------------
# From records to a state dict and a network description
# --------------------------------------------------------------------------------------------

class _Budget:
    """The work one file may cause: every node a walk visits is spent here (see `_MAX_NODES`)."""

    def __init__(self, limit: int = _MAX_NODES) -> None:
        self.limit, self.spent = limit, 0

    def spend(self, where: str) -> None:
        self.spent += 1
        if self.spent > self.limit:
            raise InputError(f"{where}: the pickle describes more than {self.limit:,} values and modules (shared "
                             "references repeated into an exponentially large tree?); an EDM network has a few "
                             "thousand, so it was refused before the walk could use the memory it asks for")


def _plain(value: Any, where: str, depth: int = 0, budget: Optional[_Budget] = None) -> Any:
    """Init kwargs as plain Python values (numpy scalars were already turned into numbers)."""
    budget = budget or _Budget()
    budget.spend(where)
    if depth > _MAX_DEPTH:
        raise InputError(f"{where} is nested too deeply (or refers to itself)")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where, depth + 1, budget) for v in value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(f"{where} has a non-string key {k!r}")
            out[k] = _plain(v, f"{where}[{k!r}]", depth + 1, budget)
        return out
    raise InputError(f"{where} holds a value of unsupported type {type(value).__name__}")


def _network_description(precond: PersistentRecord, budget: _Budget) -> dict:
    name = precond.class_name
    kwargs = _plain(precond.init_kwargs, f"{name} init kwargs", budget=budget)
    if precond.init_args:
        names = PRECOND_POSITIONAL[name]
        if len(precond.init_args) > len(names):
            raise InputError(f"{name} was built with {len(precond.init_args)} positional arguments; "
                             f"at most {len(names)} are known")
        for arg_name, value in zip(names, precond.init_args):
            if arg_name in kwargs:
                raise InputError(f"{name} init argument {arg_name!r} is given twice")
            kwargs[arg_name] = _plain(value, f"{name} init argument {arg_name!r}", budget=budget)
    for key in ("img_resolution", "img_channels"):
        if key not in kwargs:
            raise InputError(f"{name} init kwargs lack {key}; cannot describe the network")
    return {"class_name": name, "init_kwargs": kwargs}


@dataclasses.dataclass
class _Collected:
    tensors: dict
    num_params: int = 0
    num_buffers: int = 0


def _collect(node: Any, prefix: str, out: _Collected, depth: int, allowed: tuple, budget: _Budget) -> None:
    """Depth-first walk in state_dict order: own parameters, own buffers, then children.

    `allowed` names the classes this node may be: the precond at depth 0, the inner network
    (SongUNet/DhariwalUNet) at depth 1 and the reference layer classes below it. Every module
    and tensor visited is spent from `budget`, so shared subtrees cannot multiply the work.
    """
    where = prefix[:-1] or "network"
    budget.spend(where)
    if depth > _MAX_DEPTH:
        raise InputError(f"{where}: module tree is nested too deeply (or refers to itself)")
    if isinstance(node, PersistentRecord):
        if node.class_name not in allowed:
            raise InputError(f"{where}: unknown network class {node.class_name!r} "
                             f"(expected one of {', '.join(allowed)})")
        state = node.state
    elif isinstance(node, _ModuleDictRecord) and "ModuleDict" in allowed:
        state = getattr(node, "state", None)  # NEWOBJ without BUILD leaves it unset
    else:
        raise InputError(f"{where}: unexpected {type(node).__name__} where a network module belongs")
    if not isinstance(state, dict):
        raise InputError(f"{where}: malformed module state")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise InputError(f"{where}: malformed {group}")
        for name, tensor in entries.items():
            if tensor is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(name, str) or not isinstance(tensor, TensorRecord):
                raise InputError(f"{where}: malformed entry {name!r} in {group}")
            budget.spend(prefix + name)
            tensor = tensor.tensor
            out.tensors[prefix + name] = tensor
            if group == "_parameters":
                out.num_params += tensor.numel()
            else:
                out.num_buffers += 1
    children = state.get("_modules") or {}
    if not isinstance(children, dict):
        raise InputError(f"{where}: malformed _modules")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(name, str) or not name or "." in name:
            raise InputError(f"{where}: malformed child module name {name!r}")
        below = INNER_CLASSES if depth == 0 else LAYER_CLASSES + ("ModuleDict",)
        _collect(child, f"{prefix}{name}.", out, depth + 1, below, budget)


def _check_shared_bytes(tensors: dict) -> None:
    """Refuse weights that name far more bytes than they store (one tensor under many names):
    saving the checkpoint copies each name's tensor, so the copies would multiply the file."""
    named = sum(t.numel() * t.element_size() for t in tensors.values())
    stored = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors.values()}.values())
    if named > stored + _MAX_SHARED_BYTES:
        raise InputError(f"the pickle names {named / 1e6:,.1f} MB of weights but stores {stored / 1e6:,.1f} MB (one "
                         "tensor reused under many names); an EDM network shares no weights, so it was refused")


@dataclasses.dataclass
class OfficialNetwork:
    """A parsed official pickle: everything a checkpoint needs, as plain data."""

    network: dict                       # {"class_name": ..., "init_kwargs": {...}}
    state_dict: dict                    # reference names -> tensors (parameters and buffers)
    inner_class: str                    # SongUNet or DhariwalUNet
    num_params: int
    num_buffers: int
    module_sources: dict                # sha256 of embedded module_src -> class names using it
    key: Optional[str]                  # the top-level key used (None: the file is the network itself)
    top_level_keys: list = dataclasses.field(default_factory=list)

    def summary_lines(self) -> list[str]:
        kw = self.network["init_kwargs"]
        res, ch, labels = kw.get("img_resolution"), kw.get("img_channels"), int(kw.get("label_dim", 0) or 0)
        cond = f"conditional, {labels} classes" if labels else "unconditional"
        lines = [
            f"network: {self.network['class_name']} wrapping {self.inner_class}"
            + (f" (from key {self.key!r})" if self.key is not None else ""),
            f"images: {res}x{res}, {ch} channels, {cond}" + (", use_fp16" if kw.get("use_fp16") else ""),
            f"weights: {self.num_params:,} parameters, {len(self.state_dict)} tensors "
            f"({self.num_buffers} buffers)",
        ]
        for digest, classes in self.module_sources.items():
            names = ", ".join(classes[:4]) + (f" and {len(classes) - 4} more" if len(classes) > 4 else "")
            lines.append(f"embedded module source sha256 {digest[:16]}... (never executed) for {names}")
        return lines


def parse_official(data: Any, module_sources: dict, key: Optional[str] = "ema") -> OfficialNetwork:
    """Turn unpickled plain data into an :class:`OfficialNetwork` (state dict + description)."""
    top_keys: list = []
    used_key: Optional[str] = None
    if isinstance(data, PersistentRecord):
        precond = data
    elif isinstance(data, dict):
        top_keys = [k for k in data if isinstance(k, str)]
        if key not in data:
            raise InputError(f"the pickle has no {key!r} entry (it has: {', '.join(map(repr, top_keys)) or 'none'}); "
                             f"choose one with --key")
        precond, used_key = data[key], key
        if not isinstance(precond, PersistentRecord):
            raise InputError(f"entry {key!r} is a {type(precond).__name__}, not a network")
    else:
        raise InputError(f"the pickle holds a {type(data).__name__}, not an EDM network or snapshot dict")
    if precond.class_name not in PRECOND_POSITIONAL:
        raise InputError(f"unknown preconditioner class {precond.class_name!r} "
                         f"(expected one of {', '.join(PRECOND_POSITIONAL)})")
    budget = _Budget()
    network = _network_description(precond, budget)
    children = precond.state.get("_modules") or {}
    inner = children.get("model") if isinstance(children, dict) else None
    if not isinstance(inner, PersistentRecord):
        raise InputError(f"{precond.class_name} has no inner network 'model'")
    if inner.class_name not in INNER_CLASSES:
        raise InputError(f"unknown inner network class {inner.class_name!r} (expected one of {', '.join(INNER_CLASSES)})")
    model_type = network["init_kwargs"].get("model_type", DEFAULT_MODEL_TYPE[precond.class_name])
    if model_type != inner.class_name:
        raise InputError(f"{precond.class_name} says model_type={model_type!r} but holds a {inner.class_name}")
    for name, child in children.items():
        if child is not None and name != "model":
            raise InputError(f"{precond.class_name} has an unexpected child module {name!r}")
    collected = _Collected(tensors={})
    _collect(precond, "", collected, 0, (precond.class_name,), budget)
    if not collected.tensors:
        raise InputError("the network holds no weights")
    _check_shared_bytes(collected.tensors)
    return OfficialNetwork(network, collected.tensors, inner.class_name, collected.num_params,
                           collected.num_buffers, dict(module_sources), used_key, top_keys)


def read_official(path: str, key: Optional[str] = "ema") -> OfficialNetwork:
    """Read a local official pickle without executing any of its contents."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a network pickle")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head.startswith(b"PK"):
                raise InputError(f"{path} is a zip archive (a torch.save file?), not an EDM network pickle")
            if not head:
                raise InputError(f"{path} is empty, not an EDM network pickle")
            f.seek(0)
            data, sources = safe_unpickle(f)
    except InputError as exc:
        message = str(exc)
        raise InputError(message if message.startswith(path) else f"{path}: {message}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return parse_official(data, sources, key)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Conversion to a checkpoint
# --------------------------------------------------------------------------------------------

def check_loadable(official: OfficialNetwork, source: str) -> None:
    """Refuse, before anything is written, weights that the described network could not load.

    The network is built from its description on the meta device (shapes only, no memory) and
    the state dict is matched against it by name and shape: a file whose tree lacks tensors, has
    extra ones or has them in other shapes would give a checkpoint that nothing can load.
    """
    from edm_deploy.training.checkpoint import check_network_fits

    try:
        check_network_fits(official.network, official.state_dict, source, "the weights in the pickle")
    except InputError as exc:
        raise InputError(f"{exc}; refusing to write a checkpoint that nothing could load") from exc


@dataclasses.dataclass
class ConversionResult:
    out: str
    official: OfficialNetwork
    source_sha256: str


def default_output(source: str) -> str:
    """`<basename without extension>.pt` in the current folder, for a path or a URL."""
    from edm_deploy.runtime.core.download import is_url

    name = os.path.basename(urllib.parse.urlparse(source).path if is_url(source) else source) or "network"
    stem = os.path.splitext(name)[0] or "network"
    return os.path.join(os.getcwd(), stem + ".pt")


def convert_official(source: str, out: Optional[str] = None, key: str = "ema", sha256: Optional[str] = None,
                     progress: bool = True) -> ConversionResult:
    """Convert an official EDM pickle (local path or http(s) URL) into a `ckpt.pt` checkpoint.

    The output is written atomically, so a failure never leaves a partial file behind.
    """
    from edm_deploy.runtime.core.download import fetch, is_url
    from edm_deploy.runtime.core.fileio import sha256_file
    from edm_deploy.training.checkpoint import is_checkpoint_file, save_checkpoint

    out = os.path.abspath(write_target(out or default_output(source)))  # a symlinked out is written through
    if os.path.isdir(out):
        raise InputError(f"out {out} is a folder; name the checkpoint file to write")
    if not os.path.isdir(os.path.dirname(out)):
        raise InputError(f"output folder does not exist: {os.path.dirname(out)}")
    if not is_url(source):
        refuse_overwriting_inputs({"source": source}, {"out": out})
    refuse_foreign_file(out, "out", is_checkpoint_file, "an edm-deploy checkpoint")
    local = fetch(source, sha256=sha256, progress=progress)
    refuse_overwriting_inputs({"source": local}, {"out": out})  # a URL's cached download, too
    official = read_official(local, key)
    check_loadable(official, local)
    digest = sha256_file(local)
    meta = {
        "source": {
            "file": os.path.basename(urllib.parse.urlparse(source).path if is_url(source) else source),
            "url": source if is_url(source) else None,
            "sha256": digest,
            "key": official.key,
            "importer": "edm_deploy.export.official (restricted unpickler, no code executed)",
        },
        "module_src_sha256": {d: list(classes) for d, classes in official.module_sources.items()},
    }
    save_checkpoint(out, official.network, official.state_dict, meta=meta)
    return ConversionResult(out, official, digest)
