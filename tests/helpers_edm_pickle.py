"""Write network pickles in the reference (NVlabs/edm) layout, for tests, without reference code.

Why: the converter must be tested on files that look exactly like official ``.pkl`` files, but no
pretrained file is reachable here and the reference code may not be copied. The layout (facts
section 3) is reproduced from its description:

* every persistent object pickles as REDUCE of ``torch_utils.persistence._reconstruct_persistent_obj``
  with one ``meta`` dict {type: 'class', version: 6, module_src, class_name, state};
* ``state`` is the module's ``__dict__`` (``_parameters``, ``_buffers`` with None entries,
  ``_modules``, hook OrderedDicts, plain attributes such as a numpy float64 ``skip_scale``) plus
  ``_init_args`` / ``_init_kwargs``;
* ``enc`` / ``dec`` are real ``torch.nn.ModuleDict`` objects (NEWOBJ + BUILD), and tensors are real
  torch tensors / Parameters, so they go through torch's own plain-pickle path
  (``_rebuild_tensor_v2`` + ``torch.storage._load_from_bytes``) of the installed torch.

The fake ``torch_utils.persistence`` and ``dnnlib.util`` modules exist in ``sys.modules`` only
while a pickle is being *written* (see :func:`fake_reference_modules`), so the loader under test
can never import them. Their reconstruct function raises if anything ever calls it.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
import sys
import types
from typing import Any, Optional

import numpy as np
import torch

NETWORKS_SRC = "# training/networks.py stand-in\nclass EDMPrecond: pass\n"
LOSS_SRC = "# training/loss.py stand-in\nclass EDMLoss: pass\n"

_FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


def _never_called(meta):  # pragma: no cover - only referenced by name in the pickle stream
    raise AssertionError("the converter must never call the reference reconstruct function")


@contextlib.contextmanager
def fake_reference_modules():
    """Register the reference module names pickle needs for writing; removed on exit."""
    saved = {name: sys.modules.get(name) for name in _FAKE_MODULES}
    persistence = types.ModuleType("torch_utils.persistence")
    _never_called.__module__ = "torch_utils.persistence"
    _never_called.__qualname__ = _never_called.__name__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _never_called
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    sys.modules.update({
        "torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util,
    })
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:  # pragma: no cover
                sys.modules[name] = module


class EasyDict(dict):
    """Pickles as dnnlib.util.EasyDict (a dict subclass)."""


EasyDict.__module__ = "dnnlib.util"
EasyDict.__qualname__ = "EasyDict"


class Persistent:
    """Pickles exactly like a reference persistent object: REDUCE(_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, class_name: str, state: dict, module_src: str = NETWORKS_SRC):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,), None)


class Payload:
    """An object whose unpickling calls `func(*args)`: how a malicious pickle runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


_SIMPLE = (bool, int, float, str, type(None), np.floating, np.integer)


def _keep(value: Any) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (list, tuple)):
        return all(_keep(v) for v in value)
    return False


def to_reference(module: torch.nn.Module, module_src: str = NETWORKS_SRC, init_kwargs: Optional[dict] = None,
                 kwargs_by_class: Optional[dict] = None, numpy_skip_scale: bool = True, _depth: int = 0):
    """Mirror a torch module tree as reference-layout persistent objects (ModuleDicts stay real)."""
    kwargs_by_class = kwargs_by_class or {}
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = collections.OrderedDict(
                (name, None if child is None else to_reference(child, module_src, None, kwargs_by_class,
                                                               numpy_skip_scale, _depth + 1))
                for name, child in value.items()
            )
        elif key in ("_parameters", "_buffers", "_non_persistent_buffers_set") or key.endswith("hooks") \
                or key == "_is_full_backward_hook" or key == "training":
            state[key] = value
        elif key == "skip_scale" and numpy_skip_scale and isinstance(value, float):
            state[key] = np.float64(value)  # the reference stores np.sqrt(0.5)
        elif not key.startswith("_") and _keep(value):
            state[key] = value
    state["training"] = False
    if isinstance(module, torch.nn.ModuleDict):
        md = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
        md.__dict__.update(state)
        return md
    name = type(module).__name__
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs if init_kwargs is not None else kwargs_by_class.get(name, {}))
    return Persistent(name, state, module_src)


def snapshot_dict(ema, extra: Optional[dict] = None) -> dict:
    """The top-level dict of a `network-snapshot-*.pkl` (facts 3.1)."""
    data = dict(
        ema=ema,
        loss_fn=Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=np.float64(0.5),
                                           _init_args=(), _init_kwargs={}), LOSS_SRC),
        augment_pipe=None,
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                                use_labels=True, xflip=False, cache=True, resolution=32, max_size=50000),
    )
    data.update(extra or {})
    return data


def dumps(obj: Any, protocol: int = 4) -> bytes:
    """pickle.dumps with the fake reference modules registered for the duration."""
    with fake_reference_modules():
        return pickle.dumps(obj, protocol=protocol)


def reference_pickle(net: torch.nn.Module, init_kwargs: dict, protocol: int = 4, snapshot: bool = True,
                     inner_kwargs: Optional[dict] = None, module_src: str = NETWORKS_SRC,
                     extra: Optional[dict] = None) -> bytes:
    """Bytes of a reference-format network pickle holding `net` (as 'ema' of a snapshot dict)."""
    kwargs_by_class = {}
    model = getattr(net, "model", None)
    if model is not None:
        kwargs_by_class[type(model).__name__] = dict(inner_kwargs or {})
    ema = to_reference(net, module_src, init_kwargs, kwargs_by_class)
    return dumps(snapshot_dict(ema, extra) if snapshot else ema, protocol)


def legacy_storage_blob(obj: Any) -> bytes:
    """A legacy torch.save stream header followed by a pickled `obj` (for nested-blob attacks)."""
    header = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2), pickle.dumps(header, 2)]
    return b"".join(parts) + pickle.dumps(obj, 2)


# ----------------------------------------------------------------------------------------------
# A small hand-made module tree with the reference class and attribute names.


class Linear(torch.nn.Module):
    def __init__(self, fin: int, fout: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = fin, fout
        self.weight = torch.nn.Parameter(torch.randn(fout, fin))
        self.bias = torch.nn.Parameter(torch.randn(fout)) if bias else None  # plain None attribute


class Conv2d(torch.nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, down: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = cin, cout, False, down
        self.weight = torch.nn.Parameter(torch.randn(cout, cin, kernel, kernel)) if kernel else None
        self.bias = torch.nn.Parameter(torch.randn(cout)) if kernel else None
        f = torch.tensor([1.0, 1.0])
        self.register_buffer("resample_filter", (f.ger(f) / f.sum() ** 2)[None, None] if down else None)


class GroupNorm(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.num_groups, self.eps = 2, 1e-6
        self.weight = torch.nn.Parameter(torch.randn(c))
        self.bias = torch.nn.Parameter(torch.randn(c))


class UNetBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, down: bool = False):
        super().__init__()
        self.skip_scale = float(np.sqrt(0.5))
        self.num_heads = 0
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, down=down)
        self.affine = Linear(8, cout)
        self.skip = Conv2d(cin, cout, 0, down=down) if down else None


class PositionalEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = 4, 10000, True


class SongUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.map_noise = PositionalEmbedding()
        self.map_label = None
        self.map_layer0 = Linear(4, 8)
        self.enc = torch.nn.ModuleDict({"8x8_conv": Conv2d(3, 4, 3), "4x4_down": UNetBlock(4, 4, down=True)})
        self.dec = torch.nn.ModuleDict({"4x4_in0": UNetBlock(4, 6), "8x8_aux_norm": GroupNorm(6)})
        # Parameter registered as None, a non-contiguous buffer, an int64 buffer, a non-persistent one.
        self.register_parameter("unused", None)
        self.register_buffer("table", torch.arange(12, dtype=torch.float32).reshape(3, 4).t())
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


class EDMPrecond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = 8, 3, 0, False
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), np.float64(0.5)
        self.model = SongUNet()


HANDMADE_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                       sigma_data=np.float64(0.5), dropout=np.float64(0.13), channel_mult=[1, 2],
                       resample_filter=[1, 1], augment_dim=9)


def globals_in(data: bytes) -> set:
    """The 'module name' globals a pickle stream asks for, found by an opcode scan (nothing runs)."""
    import pickletools

    found, memo, recent = set(), {}, []
    for op, arg, _pos in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{recent[-2]} {recent[-1]}")
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            recent.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = recent[-1] if recent else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(arg))
        elif op.name not in ("FRAME", "PROTO"):
            recent.append(None)
    # Global names are a module/name pair; a None element means a non-string operand.
    return {g for g in found if "None" not in g.split(" ")}
