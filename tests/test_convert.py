"""`edm-deploy convert`: official EDM pickles become checkpoints, and nothing in them ever runs.

Reference-format pickles are written on the fly by `tests/helpers_edm_pickle.py` (no reference
code, no pretrained files). What is proven here:

* torch's own plain pickling of tensors (the path official files use) is read back bit-exactly;
* hand-made module trees and this project's real networks (when present) convert with every tensor
  identical and reference state-dict names, and `load_network` rebuilds a network that computes
  exactly what the original computes;
* pickles that try to run code (os.system / eval / subprocess.Popen, also nested inside a tensor
  storage blob, or code in the embedded module source) are refused or never executed, shown by a
  marker file that is never created while a control proves the same payload is live;
* truncated and foreign files give one clear error, and the CLI exits 1 with one ``error:`` line
  and no output file.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from edm_deploy.cli import main
from edm_deploy.export import official
from edm_deploy.runtime.core.errors import InputError
from edm_deploy.training.checkpoint import load_checkpoint, load_network
from tests import helpers_edm_pickle as H
from tests.conftest import run_cli

EXPECTED_TORCH_GLOBALS = {
    "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter", "torch.storage _load_from_bytes",
    "collections OrderedDict",
}
PROTO2_EXTRAS = {"_codecs encode", "__builtin__ set", "__builtin__ bytes"}


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _handmade_pickle(tmp_path, name="net.pkl", protocol=4, snapshot=True, **kw):
    torch.manual_seed(0)
    net = H.EDMPrecond()
    path = _write(tmp_path / name, H.reference_pickle(net, H.HANDMADE_KWARGS, protocol=protocol,
                                                      snapshot=snapshot, **kw))
    return net, path


# A real (small) network of this project, pickled the reference way: what convert may write.
REAL_SMALL = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def _real_pickle(tmp_path, name="net.pkl", protocol=4, snapshot=True, tree=None, **kw):
    """(net, path) of an EDMPrecond/SongUNet pickle; `tree(ema)` may edit the reference tree first."""
    from edm_deploy.training import precond

    torch.manual_seed(0)
    net = precond.EDMPrecond(**REAL_SMALL).eval()
    inner = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0)
    ema = H.to_reference(net, init_kwargs=REAL_SMALL, kwargs_by_class={"SongUNet": inner}, **kw)
    if tree is not None:
        tree(ema)
    return net, _write(tmp_path / name, H.dumps(H.snapshot_dict(ema) if snapshot else ema, protocol))


def _assert_same_tensors(expected: dict, got: dict):
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------------------------------------
# Tensors, the way this torch pickles them


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_torch_tensor_pickles_read_back_exactly(protocol):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = [
        base, base.t(), base[1:, 2:5], torch.randn(3, 2).half(), torch.randn(5).bfloat16(),
        torch.tensor([7, -1, 2**40], dtype=torch.int64), torch.tensor([True, False]), torch.zeros(0, 3),
        torch.tensor(2.5), torch.nn.Parameter(torch.randn(2, 2)),
    ]
    data = pickle.dumps(tensors, protocol=protocol)
    # The stream asks only for what the allowlist maps, in both protocols.
    assert H.globals_in(data) <= EXPECTED_TORCH_GLOBALS | (PROTO2_EXTRAS if protocol == 2 else set())
    assert "torch._utils _rebuild_tensor_v2" in H.globals_in(data)
    import io

    loaded, sources = official.safe_unpickle(io.BytesIO(data))
    assert sources == {}
    for want, got in zip(tensors, loaded):
        got = got.tensor
        assert type(got) is torch.Tensor and not got.requires_grad
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want.detach())


class _PatchedAfterwards:
    """Pickles as REDUCE(func, args) followed by BUILD(state): how a stream patches what it built."""

    def __init__(self, target, state):
        self.target, self.state = target, state

    def __reduce__(self):
        if self.target == "tensor":  # a real tensor, then Tensor.__setstate__ with a legacy set_() tuple
            func, args = torch._utils._rebuild_tensor_v2, (torch.ones(2)._typed_storage(), 0, (2,), (1,),
                                                            False, collections.OrderedDict())
        else:  # a valid persistent record, then its fields swapped after validation
            func = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
            args = (H.Persistent("Linear", {"_init_kwargs": {}}).meta,)
        return (func, args, self.state)


@pytest.mark.parametrize("target", ["tensor", "record"])
def test_stream_cannot_patch_loaded_objects(target):
    import io

    state = (torch.zeros(4), 0, (10**6,), (1,)) if target == "tensor" else {"class_name": 5, "state": None}
    data = H.dumps({"ema": _PatchedAfterwards(target, state)})
    with pytest.raises(InputError, match="tries to set the state"):
        official.safe_unpickle(io.BytesIO(data))


def test_tensor_view_outside_its_storage_is_refused():
    import io

    evil = H.Payload(torch._utils._rebuild_tensor_v2, torch.ones(4)._typed_storage(), 0, (10**9,), (1,),
                     False, collections.OrderedDict())
    with pytest.raises(InputError, match="outside its storage"):
        official.safe_unpickle(io.BytesIO(pickle.dumps(evil, protocol=4)))


def _helper_state():
    """What a stream could change in the importer's helpers: every allowlisted function's and class's attributes."""
    state = {}
    for name, target in official._ALLOWED_GLOBALS.items():
        if callable(target):
            state[name] = (getattr(target, "__defaults__", None), getattr(target, "__kwdefaults__", None),
                           dict(getattr(target, "__dict__", {})))
    return state


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


# A stream that looks up an allowlisted global and then changes it: BUILD with a __dict__ state,
# BUILD with a slot state (setattr), SETITEM/APPEND/ADDITEMS onto it.
_STATE_ATTACKS = {
    "build-slotstate": lambda g: b"\x80\x04" + g + pickle.dumps((None, {"__defaults__": ("utf-7",)}), 4)[2:-1] + b"b.",
    "build-dictstate": lambda g: b"\x80\x04" + g + pickle.dumps({"__defaults__": ("utf-7",)}, 4)[2:-1] + b"b.",
    "setitem": lambda g: b"\x80\x04" + g + b"\x8c\x01k\x8c\x01vs.",
    "setitems": lambda g: b"\x80\x04" + g + b"(\x8c\x01k\x8c\x01vu.",
    "append": lambda g: b"\x80\x04" + g + b"\x8c\x01va.",
    "additems": lambda g: b"\x80\x04" + g + b"(\x8c\x01v\x90.",
}


@pytest.mark.parametrize("attack", sorted(_STATE_ATTACKS))
@pytest.mark.parametrize("target", ["_codecs encode", "collections OrderedDict", "dnnlib.util EasyDict",
                                    "torch._utils _rebuild_tensor_v2", "builtins set"])
def test_stream_cannot_change_the_importers_helpers(tmp_path, attack, target):
    import io

    before = _helper_state()
    data = _STATE_ATTACKS[attack](_global(*target.split()))
    with pytest.raises(InputError, match="tries to set the state of a global it looked up"):
        official.safe_unpickle(io.BytesIO(data))
    assert _helper_state() == before
    encode = official._ALLOWED_GLOBALS[("_codecs", "encode")]
    assert encode.__defaults__ == ("latin1",) and encode("\xe9") == b"\xe9"
    # A protocol-2 file (bytes spelled through _codecs.encode) still converts exactly afterwards.
    net, path = _handmade_pickle(tmp_path, protocol=2)
    _assert_same_tensors(net.state_dict(), official.read_official(path).state_dict)


def test_records_may_still_take_their_state():
    import io

    # ModuleDict and EasyDict arrive as NEWOBJ + BUILD and dicts fill by SETITEMS: the importer's own
    # fresh objects, which the guard lets through.
    data = pickle.dumps([collections.OrderedDict(a=1), {"b": [1, 2]}, {3}], protocol=4)
    loaded, _ = official.safe_unpickle(io.BytesIO(data))
    assert loaded == [{"a": 1}, {"b": [1, 2]}, {3}]


# ---------------------------------------------------------------------------------------------
# Hand-made reference-layout trees


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot-dict", "bare-network"])
def test_handmade_tree_reads_exactly(tmp_path, protocol, snapshot):
    net, path = _handmade_pickle(tmp_path, protocol=protocol, snapshot=snapshot)
    got = official.read_official(path)

    # Every parameter and persistent buffer, reference names and order; None entries and the
    # non-persistent buffer are absent, exactly like torch's own state_dict.
    _assert_same_tensors(net.state_dict(), got.state_dict)
    assert "model.enc.8x8_conv.weight" in got.state_dict
    assert "model.enc.4x4_down.conv0.resample_filter" in got.state_dict
    assert "model.enc.8x8_conv.resample_filter" not in got.state_dict
    assert "model.scratch" not in got.state_dict

    kwargs = got.network["init_kwargs"]
    assert got.network["class_name"] == "EDMPrecond"
    assert type(kwargs["sigma_data"]) is float and kwargs["sigma_data"] == 0.5
    assert type(kwargs["dropout"]) is float and kwargs["dropout"] == 0.13
    assert kwargs["channel_mult"] == [1, 2] and kwargs["model_type"] == "SongUNet"
    assert got.key == ("ema" if snapshot else None)
    src_sha = hashlib.sha256(H.NETWORKS_SRC.encode()).hexdigest()
    assert {"EDMPrecond", "SongUNet", "UNetBlock", "Conv2d"} <= set(got.module_sources[src_sha])
    assert got.num_params == sum(p.numel() for p in net.parameters())
    # The loader never creates the reference modules (the writer removed its fakes too).
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot-dict", "bare-network"])
def test_real_pickle_converts_with_its_provenance(tmp_path, protocol, snapshot):
    net, path = _real_pickle(tmp_path, protocol=protocol, snapshot=snapshot)
    out = str(tmp_path / "ckpt.pt")
    result = official.convert_official(path, out=out, progress=False)
    _assert_same_tensors(net.state_dict(), load_network(out).state_dict())
    meta = load_checkpoint(out)["meta"]
    assert meta["source"]["file"] == "net.pkl"
    assert meta["source"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert meta["source"]["key"] == ("ema" if snapshot else None)
    src_sha = hashlib.sha256(H.NETWORKS_SRC.encode()).hexdigest()
    assert {"EDMPrecond", "SongUNet", "UNetBlock", "Conv2d"} <= set(meta["module_src_sha256"][src_sha])
    assert result.official.num_params == sum(p.numel() for p in net.parameters())


def _keep_one_child(ema):
    """The 1-tensor-of-N file: the inner network's tree cut down to its first layer with weights."""
    modules = ema.meta["state"]["_modules"]["model"].meta["state"]["_modules"]
    first = next(name for name, child in modules.items() if child is not None and
                 isinstance(child, H.Persistent) and child.meta["state"].get("_parameters"))
    for name in list(modules):
        if name != first:
            del modules[name]


@pytest.mark.parametrize("case", ["one-layer-left", "toy-tree", "wrong-shape"])
def test_weights_nothing_could_load_are_refused_before_writing(tmp_path, case):
    if case == "one-layer-left":
        _, path = _real_pickle(tmp_path, tree=_keep_one_child)
        match = r"missing \d+ tensors"
    elif case == "toy-tree":  # a tree that reads fine but is not the network its kwargs describe
        _, path = _handmade_pickle(tmp_path)
        match = "do not fit the described network"
    else:
        def widen(ema):
            ema.meta["state"]["_init_kwargs"]["model_channels"] = 32

        _, path = _real_pickle(tmp_path, tree=widen)
        match = "has shape"
    out = tmp_path / "ckpt.pt"
    with pytest.raises(InputError, match=match) as info:
        official.convert_official(path, out=str(out), progress=False)
    assert "refusing to write a checkpoint that nothing could load" in str(info.value)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["net.pkl"]


def test_numpy1_scalar_path_is_accepted(tmp_path):
    data = H.reference_pickle(H.EDMPrecond(), H.HANDMADE_KWARGS, protocol=2)
    assert b"cnumpy._core.multiarray\nscalar\n" in data
    data = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    got = official.read_official(_write(tmp_path / "np1.pkl", data))
    assert type(got.network["init_kwargs"]["dropout"]) is float


def test_positional_init_args_are_named(tmp_path):
    kwargs = {k: v for k, v in H.HANDMADE_KWARGS.items() if k not in ("img_resolution", "img_channels")}
    ema = H.to_reference(H.EDMPrecond(), init_kwargs=kwargs)
    ema.meta["state"]["_init_args"] = (8, 3)
    got = official.read_official(_write(tmp_path / "pos.pkl", H.dumps({"ema": ema})))
    assert got.network["init_kwargs"]["img_resolution"] == 8 and got.network["init_kwargs"]["img_channels"] == 3


def test_key_selection(tmp_path):
    _, path = _handmade_pickle(tmp_path)
    with pytest.raises(InputError, match="no 'net' entry.*'ema', 'loss_fn'.*--key"):
        official.read_official(path, key="net")
    with pytest.raises(InputError, match="unknown preconditioner class 'EDMLoss'"):
        official.read_official(path, key="loss_fn")
    with pytest.raises(InputError, match="'augment_pipe' is a NoneType, not a network"):
        official.read_official(path, key="augment_pipe")


@pytest.mark.parametrize("where, message", [
    ("precond", "unknown preconditioner class 'FooPrecond'"),
    ("inner", "unknown inner network class 'FooUNet'"),
    ("layer", "model.enc.4x4_down.conv0: unknown network class 'FooConv'"),
])
def test_unknown_classes_are_rejected(tmp_path, where, message):
    ema = H.to_reference(H.EDMPrecond(), init_kwargs=H.HANDMADE_KWARGS)
    inner = ema.meta["state"]["_modules"]["model"]
    target = {"precond": ema, "inner": inner,
              "layer": inner.meta["state"]["_modules"]["enc"]._modules["4x4_down"].meta["state"]["_modules"]["conv0"]}
    target[where].meta["class_name"] = {"precond": "FooPrecond", "inner": "FooUNet", "layer": "FooConv"}[where]
    with pytest.raises(InputError, match=message):
        official.read_official(_write(tmp_path / "x.pkl", H.dumps({"ema": ema})))


# ---------------------------------------------------------------------------------------------
# This project's networks: convert, rebuild, compute the same thing

def _precond_module():
    try:
        from edm_deploy.training import precond
    except ImportError:  # pragma: no cover - until training/precond.py lands
        return None
    return precond


SMALL = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
REAL_CONFIGS = {
    "edm-ddpmpp-cond": ("EDMPrecond", dict(SMALL, img_channels=3, label_dim=10, model_type="SongUNet",
                                           augment_dim=9, dropout=0.13)),
    "ve-ncsnpp": ("VEPrecond", dict(SMALL, img_channels=3, model_type="SongUNet", embedding_type="fourier",
                                    channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])),
    "vp-ddpmpp": ("VPPrecond", dict(SMALL, img_channels=1)),
    "iddpm-adm-cond": ("iDDPMPrecond", dict(SMALL, img_channels=3, label_dim=5, model_channels=64,
                                            model_type="DhariwalUNet")),
}


@pytest.mark.parametrize("config", sorted(REAL_CONFIGS))
def test_real_network_round_trip(tmp_path, config):
    precond = _precond_module()
    if precond is None:
        pytest.skip("training/precond.py is not available yet")
    class_name, kwargs = REAL_CONFIGS[config]
    torch.manual_seed(1)
    net = getattr(precond, class_name)(**kwargs).eval()
    # The reference stores train.py's values; a numpy float64 among them must become a float.
    stored = dict(kwargs, **({"dropout": np.float64(kwargs["dropout"])} if "dropout" in kwargs else {}))
    inner_kwargs = dict(img_resolution=8, in_channels=net.img_channels, out_channels=net.model.out_channels
                        if hasattr(net.model, "out_channels") else net.img_channels, label_dim=net.label_dim)
    path = _write(tmp_path / f"{config}.pkl", H.reference_pickle(net, stored, inner_kwargs=inner_kwargs))
    out = str(tmp_path / "ckpt.pt")
    official.convert_official(path, out=out, progress=False)

    ckpt = load_checkpoint(out)
    _assert_same_tensors(net.state_dict(), ckpt["ema"])
    assert ckpt["network"] == {"class_name": class_name, "init_kwargs": kwargs}
    rebuilt = load_network(out)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.img_channels, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 7.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 3]), net.label_dim).float() if net.label_dim else None
    with torch.no_grad():
        assert torch.equal(rebuilt(x, sigma, labels), net(x, sigma, labels))


# ---------------------------------------------------------------------------------------------
# Pickles that try to run code


def _touch_payloads(marker: str) -> dict:
    return {
        "os.system": (H.Payload(os.system, f"touch {marker}"), os.system.__module__ + ".system"),
        "builtins.eval": (H.Payload(eval, f"open({marker!r}, 'w').close()"), "builtins.eval"),
        "subprocess.Popen": (H.Payload(subprocess.Popen, ["touch", marker]), "subprocess.Popen"),
    }


def test_payloads_are_live_when_loaded_the_unsafe_way(tmp_path):
    """Control: the same streams do run code under plain pickle, so the refusals below mean something."""
    for name, (payload, _) in _touch_payloads(str(tmp_path / "control-{}")).items():
        marker = str(tmp_path / f"control-{name}")
        payload = _touch_payloads(marker)[name][0]
        result = pickle.loads(pickle.dumps(payload, protocol=4))  # noqa: S301 - deliberate, in a test
        if isinstance(result, subprocess.Popen):
            result.wait()
        assert os.path.exists(marker), name


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("place", ["top-level", "inside-module-state", "inside-storage-blob"])
def test_code_running_pickles_are_refused(tmp_path, name, place):
    marker = str(tmp_path / "pwned")
    payload, global_name = _touch_payloads(marker)[name]
    ema = H.to_reference(H.EDMPrecond(), init_kwargs=H.HANDMADE_KWARGS)
    extra = {}
    if place == "top-level":
        extra["augment_pipe"] = payload
    elif place == "inside-module-state":
        ema.meta["state"]["_modules"]["model"].meta["state"]["_buffers"]["table"] = payload
    else:  # a storage whose nested legacy torch.save blob carries the payload
        blob = H.legacy_storage_blob(payload)
        ema.meta["state"]["_buffers"]["evil"] = H.Payload(torch.storage._load_from_bytes, blob)
    path = _write(tmp_path / "evil.pkl", H.dumps(H.snapshot_dict(ema, extra)))
    out = tmp_path / "evil.pt"
    with pytest.raises(InputError) as info:
        official.convert_official(path, out=str(out), progress=False)
    message = str(info.value)
    assert "refusing to load" in message and global_name in message and "\n" not in message
    assert not os.path.exists(marker)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["evil.pkl"]


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = str(tmp_path / "pwned")
    evil_src = f"open({marker!r}, 'w').close()\nclass EDMPrecond: pass\n"
    net, path = _real_pickle(tmp_path, module_src=evil_src)
    out = str(tmp_path / "ckpt.pt")
    official.convert_official(path, out=out, progress=False)
    assert not os.path.exists(marker)
    ckpt = load_checkpoint(out)
    _assert_same_tensors(net.state_dict(), ckpt["ema"])
    # The source is recorded by hash, so a user can tell it is not the official networks.py.
    assert hashlib.sha256(evil_src.encode()).hexdigest() in ckpt["meta"]["module_src_sha256"]


def test_unknown_class_with_code_in_its_source_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    evil = H.Persistent("Backdoor", {"_init_args": (), "_init_kwargs": {}},
                        module_src=f"import os\nos.system('touch {marker}')\nclass Backdoor: pass\n")
    path = _write(tmp_path / "evil.pkl", H.dumps({"ema": evil}))
    with pytest.raises(InputError, match="unknown preconditioner class 'Backdoor'"):
        official.convert_official(path, out=str(tmp_path / "evil.pt"), progress=False)
    assert not os.path.exists(marker) and not (tmp_path / "evil.pt").exists()


# ---------------------------------------------------------------------------------------------
# Broken and foreign files


def _broken_files(tmp_path) -> dict:
    good = H.reference_pickle(H.EDMPrecond(), H.HANDMADE_KWARGS)
    torch.save({"a": torch.ones(2)}, str(tmp_path / "zip.pt"))
    return {
        "truncated-half": good[: len(good) // 2],
        "truncated-tiny": good[:10],
        "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "text": b"this is not a pickle\n",
        "empty": b"",
        "zip": open(tmp_path / "zip.pt", "rb").read(),
        "plain-int": pickle.dumps(42, protocol=4),
    }


@pytest.mark.parametrize("kind", ["truncated-half", "truncated-tiny", "random", "text", "empty", "zip", "plain-int"])
def test_broken_files_give_one_clear_error(tmp_path, kind):
    path = _write(tmp_path / f"{kind}.pkl", _broken_files(tmp_path)[kind])
    with pytest.raises(InputError) as info:
        official.convert_official(path, out=str(tmp_path / "out.pt"), progress=False)
    message = str(info.value)
    assert message.startswith(path) and "\n" not in message
    assert any(word in message for word in ("truncated", "not a readable pickle", "not an EDM", "zip", "empty"))
    if kind in ("random", "text"):  # random bytes are not "an EDM pickle" of any kind
        assert "not a readable pickle" in message and "EDM" not in message
    assert not (tmp_path / "out.pt").exists()


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        official.convert_official(str(tmp_path / "nope.pkl"), progress=False)
    with pytest.raises(InputError, match="folder"):
        official.convert_official(str(tmp_path), out=str(tmp_path / "x.pt"), progress=False)


def test_output_may_not_overwrite_input(tmp_path):
    _, path = _real_pickle(tmp_path)
    link = tmp_path / "link.pkl"
    link.symlink_to(path)
    before = open(path, "rb").read()
    for out in (path, str(link)):
        with pytest.raises(InputError, match="would overwrite source"):
            official.convert_official(path, out=out, progress=False)
    assert open(path, "rb").read() == before
    with pytest.raises(InputError, match="is a folder"):
        official.convert_official(path, out=str(tmp_path), progress=False)
    with pytest.raises(InputError, match="output folder does not exist"):
        official.convert_official(path, out=str(tmp_path / "no" / "x.pt"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["link.pkl", "net.pkl"]


# ---------------------------------------------------------------------------------------------
# Download from an http(s) URL


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("EDM_DEPLOY_CACHE", str(tmp_path / "cache"))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_convert_from_url(http_root, tmp_path, monkeypatch):
    root, base = http_root
    net, path = _real_pickle(root, name="edm-tiny.pkl")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = official.convert_official(f"{base}/edm-tiny.pkl", sha256=digest, progress=False)
    assert result.out == str(work / "edm-tiny.pt")
    ckpt = load_checkpoint(result.out)
    _assert_same_tensors(net.state_dict(), ckpt["ema"])
    assert ckpt["meta"]["source"]["url"] == f"{base}/edm-tiny.pkl"
    assert ckpt["meta"]["source"]["sha256"] == digest

    with pytest.raises(InputError, match="sha256"):
        official.convert_official(f"{base}/edm-tiny.pkl", out=str(work / "bad.pt"), sha256="0" * 64, progress=False)
    with pytest.raises(InputError, match="could not download"):
        official.convert_official(f"{base}/missing.pkl", out=str(work / "bad.pt"), progress=False)
    assert not (work / "bad.pt").exists()


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_convert_prints_what_it_found(tmp_path, monkeypatch, capsys):
    net, path = _real_pickle(tmp_path)
    monkeypatch.chdir(tmp_path)
    main(["convert", path])
    stdout = capsys.readouterr().out
    assert "EDMPrecond wrapping SongUNet" in stdout and "8x8, 3 channels, unconditional" in stdout
    assert f"{sum(p.numel() for p in net.parameters()):,} parameters" in stdout
    assert f"wrote {tmp_path / 'net.pt'}" in stdout
    assert (tmp_path / "net.pt").exists()


def test_cli_help_has_an_example(capsys):
    try:
        main(["convert", "--help"])
    except SystemExit as exc:  # click may exit 0 after printing help
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "Example" in out and "edm-deploy convert https://" in out and "--key" in out


def test_cli_refusal_is_one_error_line_and_no_output(tmp_path, cli_env):
    marker = tmp_path / "pwned"
    ema = H.to_reference(H.EDMPrecond(), init_kwargs=H.HANDMADE_KWARGS)
    path = _write(tmp_path / "evil.pkl", H.dumps(H.snapshot_dict(ema, {"x": _touch_payloads(str(marker))["os.system"][0]})))
    out = tmp_path / "evil.pt"
    res = run_cli(["convert", path, "--out", str(out)], env=cli_env, timeout=120)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refusing to load" in lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pkl"]


def test_cli_output_problems_name_the_flags_and_write_nothing(tmp_path, capsys):
    _, path = _real_pickle(tmp_path)
    before = open(path, "rb").read()
    junk = _write(tmp_path / "junk.pkl", bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)))
    for args, pattern in (([path, "--out", path], f"--out {path} would overwrite NETWORK {path}"),
                          ([path, "--out", str(tmp_path)], "is a directory"),
                          ([junk, "--out", str(tmp_path / "j.pt")], "not a readable pickle")):
        with pytest.raises(SystemExit) as exc:
            main(["convert", *args])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and pattern in err[0], (args, err)
    assert open(path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["junk.pkl", "net.pkl"]


@pytest.mark.slow
def test_full_size_cifar10_ddpmpp_pickle_converts(tmp_path, request):
    """A file the size of edm-cifar10-32x32-cond-vp.pkl (~223 MB) converts with the published counts."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("paper-size file (~20 s); run with -m slow")
    precond = _precond_module()
    if precond is None:
        pytest.skip("training/precond.py is not available yet")
    kwargs = dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, model_type="SongUNet",
                  embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                  augment_dim=9, dropout=0.13)
    torch.manual_seed(0)
    net = precond.EDMPrecond(**kwargs).eval()
    path = _write(tmp_path / "edm-cifar10-32x32-cond-vp.pkl", H.reference_pickle(net, kwargs))
    result = official.convert_official(path, out=str(tmp_path / "ckpt.pt"), progress=False)
    assert result.official.num_params == 55_735_299  # the count of edm-cifar10-32x32-cond-vp.pkl
    assert len(result.official.state_dict) == 427 and result.official.num_buffers == 8
    _assert_same_tensors(net.state_dict(), load_checkpoint(result.out)["ema"])
