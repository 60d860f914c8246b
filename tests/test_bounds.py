"""Every bounded resource is bounded before it is allocated (issue 23, section 1).

One test per class of unbounded work, each driven by the hostile input that used to cost
minutes or gigabytes: deeply nested JSON wherever JSON is read, explicit time-point lists far
beyond --steps, pickles of shared references (a "billion laughs"), ZIP and pixel bombs in a
dataset, a grid scaled past any image size, and SIGTERM during a long C call. Each must fail in
one clear line, fast, without allocating what it asks for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.jsonio import MAX_JSON_DEPTH, loads_bounded, nesting_depth, read_json_file
from tests.conftest import REPO, has_module, one_error_line, requires_onnx, requires_torch, run_main

DEEP = 100_000  # far past Python's recursion limit: a RecursionError anywhere would show


def _deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


# -- deeply nested JSON, wherever JSON is read ------------------------------------------------


def test_the_bounded_reader_measures_depth_without_recursion_and_refuses_what_json_has_not():
    assert nesting_depth('{"a": [1, {"b": "[[[[not brackets]]]"}]}') == 3
    assert nesting_depth('"\\"[[[" ') == 0
    with pytest.raises(InputError, match=f"nested {DEEP} levels deep; at most {MAX_JSON_DEPTH}"):
        loads_bounded(_deep(), "x.json")
    assert loads_bounded(_deep(MAX_JSON_DEPTH), "x.json") is not None
    with pytest.raises(InputError, match="NaN is not a JSON number"):
        loads_bounded("[1, NaN]", "x.json")
    with pytest.raises(InputError, match="more than a schedule file holds"):
        loads_bounded(b"[" + b"1," * 600 + b"1]", "x.json", max_bytes=1000, what="schedule")
    with pytest.raises(InputError, match="not UTF-8"):
        loads_bounded(b"\xff\xfe[]", "x.json")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_bytes(b" " * 2048)
    read = []
    real_open = open

    def spying_open(file, mode="r", *args, **kwargs):
        read.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spying_open)
    with pytest.raises(InputError, match="2,048 bytes is more than a JSON file holds"):
        read_json_file(str(path), max_bytes=1024)
    assert str(path) not in read


def _forge_onnx(src: str, dst: str, manifest_text: str) -> str:
    import onnx
    from onnx import helper

    model = onnx.load(src)
    del model.metadata_props[:]
    helper.set_model_props(model, {"edm_deploy": manifest_text})
    onnx.save(model, dst)
    return dst


def _deep_dataset_folder(root) -> str:
    from PIL import Image

    os.makedirs(root)
    Image.new("L", (8, 8)).save(os.path.join(root, "a.png"))
    with open(os.path.join(root, "dataset.json"), "w") as f:
        f.write('{"labels": ' + _deep() + "}")
    return str(root)


DEEP_JSON_PLACES = ["schedule file", "onnx manifest (info)", "onnx manifest (sample)", "plan sidecar",
                    "dataset.json in a folder", "dataset.json in a zip", "calibration data"]


@pytest.mark.parametrize("place", DEEP_JSON_PLACES)
def test_deeply_nested_json_is_one_clear_error_everywhere_it_is_read(place, tmp_path, capsys):
    if "onnx" in place or place in ("schedule file", "plan sidecar"):
        if not (has_module("onnx") and has_module("onnxruntime")):
            pytest.skip("needs onnx/onnxruntime")
        from tests.onnx_oracles import gaussian_onnx

        model = gaussian_onnx(str(tmp_path / "g.onnx"))
    if place == "schedule file":
        sched = tmp_path / "s.json"
        sched.write_text('{"sigmas": ' + _deep() + "}")
        args = ["sample", model, "-n", "2", "--grid", str(tmp_path / "o.png"), "--sigmas", str(sched)]
    elif place.startswith("onnx manifest"):
        forged = _forge_onnx(model, str(tmp_path / "deep.onnx"), '{"a": ' * 5000 + "1" + "}" * 5000)
        args = (["info", forged] if "info" in place
                else ["sample", forged, "-n", "2", "--grid", str(tmp_path / "o.png")])
    elif place == "plan sidecar":
        plan = tmp_path / "m.plan"
        plan.write_bytes(b"engine bytes")
        (tmp_path / "m.plan.json").write_text(_deep())
        args = ["info", str(plan)]
    elif place == "dataset.json in a folder":
        args = ["dataset", "--source", _deep_dataset_folder(tmp_path / "src"), "--dest", str(tmp_path / "d.zip")]
    elif place == "dataset.json in a zip":
        from edm_deploy.training.dataset import open_dataset

        src = _deep_dataset_folder(tmp_path / "src")
        zpath = tmp_path / "d.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.write(os.path.join(src, "a.png"), "00000/img00000000.png")
            zf.write(os.path.join(src, "dataset.json"), "dataset.json")
        with pytest.raises(InputError, match="nested 100001 levels deep"):
            open_dataset(str(zpath))  # what train, fid ref and export --calib-data open
        return
    else:  # export --calib-data reads its dataset the same way, before any torch work
        if not has_module("torch"):
            pytest.skip("needs torch")
        from tests.factories import tiny_checkpoint

        ckpt = tiny_checkpoint(tmp_path / "c.pt", label_dim=0)
        args = ["export", ckpt, "--int8", "--calib-data", _deep_dataset_folder(tmp_path / "src"),
                "--out", str(tmp_path / "m.onnx")]
    code, _, err = run_main(args, capsys)
    line = one_error_line(code, err)
    assert "levels deep; at most 64" in line and "RecursionError" not in err, line


@requires_onnx
def test_a_deep_run_record_is_treated_as_foreign_not_as_a_crash(tmp_path, capsys):
    from tests.onnx_oracles import gaussian_onnx

    model = gaussian_onnx(str(tmp_path / "g.onnx"))
    out = tmp_path / "o"
    out.mkdir()
    (out / ".edm-deploy-sample.json").write_text(_deep())
    code, _, err = run_main(["sample", model, "-n", "2", "--steps", "3", "--outdir", str(out)], capsys)
    assert code == 0, err  # a record of a run that made no images is replaced
    assert json.loads((out / ".edm-deploy-sample.json").read_text())["model_sha256"]


def test_class_labels_cost_rows_times_classes_not_classes_squared():
    from edm_deploy.runtime.core.manifest import MAX_CLASSES
    from edm_deploy.runtime.sampling.noise import one_hot

    labels = one_hot(np.array([0, MAX_CLASSES - 1]), MAX_CLASSES)  # np.eye(100,000) would be 40 GB
    assert labels.shape == (2, MAX_CLASSES) and labels.sum() == 2 and labels[1, -1] == 1


# -- explicit time-point lists are capped like --steps ----------------------------------------


def test_time_point_lists_are_capped_before_they_are_converted():
    from edm_deploy.runtime.core import schedules as sch
    from edm_deploy.runtime.sampling.schedule_file import parse_sigmas

    huge = list(np.linspace(80, 0.002, sch.MAX_STEPS + 2))
    # entries that are not numbers: converting them would be a different error, so these are refused by counting
    for attempt in (lambda: sch.check_sigma_list(huge), lambda: sch.check_sigma_list(np.asarray(huge)),
                    lambda: sch.check_sigma_list(["x"] * (sch.MAX_STEPS + 2)),
                    lambda: parse_sigmas(",".join(["1"] * (sch.MAX_STEPS + 2))),
                    lambda: parse_sigmas(",".join(["x"] * (sch.MAX_STEPS + 2))),
                    lambda: parse_sigmas(",".join(["x"] * 10_000_000))):
        with pytest.raises(InputError, match="at most 100,000") as info:
            attempt()
        assert info.value.param == "sigmas"
    with pytest.raises(InputError, match="num_steps must be at most 100,000"):
        sch.check_num_steps(sch.MAX_STEPS + 1)
    assert len(sch.check_sigma_list(list(np.linspace(80, 0.002, sch.MAX_STEPS)) + [0.0])) == sch.MAX_STEPS + 1


def test_a_schedule_file_of_ten_million_entries_is_refused_unread(tmp_path):
    from edm_deploy.runtime.sampling.schedule_file import read_schedule

    path = tmp_path / "s.json"
    with open(path, "w") as f:
        f.write("[" + "x," * 10_000_000 + "1]")  # 20 MB, not JSON: parsing it would be a different error
    with pytest.raises(InputError, match="bytes is more than a JSON schedule file holds"):
        read_schedule(str(path))


# -- pickles of shared references ("billion laughs") ------------------------------------------


def _laugh(levels: int):
    node: list = [1]
    for _ in range(levels):
        node = [node, node]
    return node


@requires_torch
@pytest.mark.parametrize("where", ["init kwargs", "module tree", "one tensor under many names"])
def test_pickles_of_shared_references_are_refused_by_the_work_they_describe(where, tmp_path):
    import collections

    import torch

    from edm_deploy.export import official
    from tests import helpers_edm_pickle as H

    kwargs = dict(H.HANDMADE_KWARGS)
    if where == "init kwargs":
        kwargs["laugh"] = _laugh(60)  # 2^60 nodes, 61 levels deep: within the depth limit
    ema = H.to_reference(H.EDMPrecond(), init_kwargs=kwargs)
    modules = ema.meta["state"]["_modules"]["model"].meta["state"]["_modules"]
    if where == "module tree":
        node = modules["map_layer0"]
        for _ in range(60):
            md = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
            md.__dict__.update(_parameters={}, _buffers={}, _modules=collections.OrderedDict(a=node, b=node),
                               training=False)
            node = md
        modules["map_layer0"] = node
    elif where == "one tensor under many names":
        big = H.to_reference(H.Linear(1024, 1024, bias=False))  # 4 MB of weights, stored once
        modules["enc"]._modules.update({f"shared{i}": big for i in range(8)})
    path = tmp_path / "laugh.pkl"
    path.write_bytes(H.dumps(H.snapshot_dict(ema)))
    assert path.stat().st_size < 6_000_000
    with pytest.raises(InputError) as info:
        official.read_official(str(path))
    message = str(info.value)
    assert ("more than 200,000 values and modules" in message if where != "one tensor under many names"
            else "names 33.6 MB of weights but stores 4.2 MB" in message), message


# -- ZIP and pixel bombs in a dataset ---------------------------------------------------------


def _png_bytes(size=(8, 8)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="png")
    return buf.getvalue()


class _Inflater:
    """Writes a deflated ZIP entry of `size` zero bytes without holding them in memory."""

    @staticmethod
    def write(zf: zipfile.ZipFile, name: str, size: int, head: bytes = b"") -> None:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as f:
            f.write(head)
            block = bytes(1 << 20)
            left = size - len(head)
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)


@pytest.mark.parametrize("bomb", ["one huge entry", "forged small size", "many entries", "pixel bomb",
                                  "pixel bomb in a folder"])
def test_dataset_bombs_are_refused_before_they_inflate(bomb, tmp_path, capsys, monkeypatch):
    from edm_deploy.runtime.core import archives
    from edm_deploy.training import dataset as D

    path = tmp_path / "bomb.zip"
    source = str(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("00000/img00000000.png", _png_bytes())
        if bomb == "one huge entry":
            _Inflater.write(zf, "00000/img00000001.png", D.MAX_IMAGE_FILE_BYTES + 1, _png_bytes())
        elif bomb == "forged small size":
            monkeypatch.setattr(D, "MAX_IMAGE_FILE_BYTES", 4 << 20)  # keep the test's inflating small
            monkeypatch.setattr(archives, "MAX_IMAGE_FILE_BYTES", 4 << 20)
            _Inflater.write(zf, "00000/img00000001.png", 6 << 20, _png_bytes())
        elif bomb == "many entries":
            for i in range(3):
                _Inflater.write(zf, f"00000/img0000001{i}.png", 100 << 20, _png_bytes())
        elif bomb == "pixel bomb":
            zf.writestr("00000/img00000001.png", _png_bytes((10_000, 10_000)))  # 100 M pixels in ~100 KB
    if bomb == "forged small size":  # the directory says 100 bytes: only streaming can tell
        _forge_declared_size(path, "00000/img00000001.png", 100)
        assert zipfile.ZipFile(path).getinfo("00000/img00000001.png").file_size == 100
    if bomb == "pixel bomb in a folder":
        folder = tmp_path / "photos"
        folder.mkdir()
        (folder / "a.png").write_bytes(_png_bytes())
        (folder / "b.png").write_bytes(_png_bytes((10_000, 10_000)))
        source = str(folder)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = run_main(["dataset", "--source", source, "--dest", str(tmp_path / "out.zip"),
                             "--resolution", "8"], capsys)
    line = one_error_line(code, err)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    expected = {"one huge entry": "inflates to 268,435,457 bytes", "forged small size": "fails its CRC check",
                "many entries": "more than 200x", "pixel bomb": "100,000,000 pixels",
                "pixel bomb in a folder": "100,000,000 pixels"}[bomb]
    assert expected in line, line
    assert grown_mb < 150, grown_mb  # nothing was inflated or decoded whole
    assert not (tmp_path / "out.zip").exists()
    with pytest.raises(InputError):
        D.open_dataset(source)  # what train reads refuses it the same way
    if bomb in ("one huge entry", "many entries", "pixel bomb in a folder"):
        from edm_deploy.runtime.fid.fid import open_images

        with pytest.raises(InputError, match=expected.split(" bytes")[0]):  # and what fid ref/calc read
            src = open_images(source)
            list(src.iter_batches(range(len(src)), 2))


def test_an_encrypted_archive_is_one_clear_error_for_datasets_and_fid(tmp_path, capsys):
    import struct

    from edm_deploy.runtime.fid.fid import open_images

    path = tmp_path / "enc.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", _png_bytes())
        zf.writestr("b.png", _png_bytes())
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the "encrypted" flag bit
        pos = data.find(signature)
        while pos != -1:
            struct.pack_into("<H", data, pos + offset, 1)
            pos = data.find(signature, pos + 4)
    path.write_bytes(bytes(data))
    code, _, err = run_main(["dataset", "--source", str(path), "--dest", str(tmp_path / "d.zip")], capsys)
    assert "is encrypted" in one_error_line(code, err)
    with pytest.raises(InputError, match="is encrypted"):
        list(open_images(str(path)).iter_batches([0, 1], 2))


def _forge_declared_size(path, name: str, size: int) -> None:
    """Rewrite the declared uncompressed size of `name` in its central directory entry (what
    ZipFile reads), keeping its CRC: a forged archive that only streaming can catch."""
    import struct

    data = bytearray(open(path, "rb").read())
    encoded = name.encode()
    central = data.find(b"PK\x01\x02")
    while central != -1:
        n = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + n] == encoded:
            struct.pack_into("<I", data, central + 24, size)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    assert central != -1
    open(path, "wb").write(bytes(data))


# -- a grid cannot be scaled past any image size ----------------------------------------------


def test_grid_scale_is_checked_before_anything_is_sampled(tmp_path):
    from edm_deploy.runtime.output.writers import GridWriter, check_output, grid_size

    out = str(tmp_path / "g.png")
    assert grid_size(64, (8, 8), scale=8) == (521, 521)
    check_output(64, {"grid": out}, grid_scale=8, image_shape=(8, 8, 1))
    for scale, match in [(0, "from 1 to 64"), (65, "from 1 to 64"), (2.5, "from 1 to 64"), (True, "from 1 to 64"),
                         (64, "at most 16383 px a side")]:
        with pytest.raises(InputError, match=match) as info:
            check_output(4096, {"grid": out}, grid_scale=scale, image_shape=(64, 64, 3))
        assert info.value.param == "grid_scale"
    writer = GridWriter(out, 4, columns=2, scale=3, image_shape=(2, 2, 1))
    writer.submit(np.arange(16, dtype=np.uint8).reshape(4, 2, 2, 1), [0, 1, 2, 3])
    writer.close()
    from PIL import Image

    grid = np.asarray(Image.open(out))
    assert grid.shape == grid_size(4, (2, 2), columns=2, scale=3)
    assert (grid[1:7, 1:7] == np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2), np.ones((3, 3), np.uint8))).all()


# -- SIGTERM during a long C call ---------------------------------------------------------------


def test_sigterm_stops_a_run_stuck_in_a_long_call_promptly(tmp_path):
    """The Python-level handler waits for the running C call to return; the watchdog does not."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        import numpy as np
        from edm_deploy import sigterm
        sigterm.SIGTERM_GRACE_S = 0.5
        sigterm.exit_cleanly_on_sigterm()
        a = np.ones((6000, 6000))
        print("ready", flush=True)
        for _ in range(100):
            a @ a  # BLAS releases the GIL for seconds per call
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.perf_counter() - start
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 143, err
    assert took < 3, took
    assert err.count("error:") <= 1 and "Traceback" not in err


# -- a FIFO where a file is read never blocks ---------------------------------------------------


@pytest.fixture
def fails_after_10s():
    """A hang becomes a test failure: opening a FIFO blocks in a call that SIGALRM interrupts."""
    def hung(signum, frame):
        raise AssertionError("blocked reading a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("place", ["a dataset image", "a dataset.json", "a plan sidecar", "an FID image"])
def test_a_fifo_where_a_file_is_read_is_refused_not_waited_on(place, tmp_path, capsys, fails_after_10s):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.new("L", (8, 8)).save(src / "a.png")
    if place == "a plan sidecar":
        (tmp_path / "m.plan").write_bytes(b"engine")
        os.mkfifo(tmp_path / "m.plan.json")
        args = ["info", str(tmp_path / "m.plan")]
    elif place == "an FID image":
        from edm_deploy.runtime.fid.fid import open_images

        os.mkfifo(src / "b.png")
        with pytest.raises(InputError, match="b.png is a FIFO, not a regular file"):
            open_images(str(src))
        return
    else:
        os.mkfifo(src / ("b.png" if place == "a dataset image" else "dataset.json"))
        args = ["dataset", "--source", str(src), "--dest", str(tmp_path / "d.zip")]
    code, _, err = run_main(args, capsys)
    assert "is a FIFO, not a regular file" in one_error_line(code, err)


# -- corrupt or out-of-range values that the parsers let through --------------------------------


def test_a_corrupt_deflate_stream_in_a_dataset_zip_is_one_error(tmp_path):
    import zipfile

    from edm_deploy.training import dataset as D

    src = str(tmp_path / "ok.zip")
    D.write_dataset_zip("digits", src, max_images=8)
    bad = str(tmp_path / "bad.zip")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name) * 4)
    raw = bytearray(open(bad, "rb").read())
    with zipfile.ZipFile(bad) as zf:
        info = zf.getinfo("00000/img00000000.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 5:start + 9] = b"\xff\xff\xff\xff"  # inside the deflate stream: zlib fails before the CRC check
    open(bad, "wb").write(bytes(raw))
    with pytest.raises(InputError, match="bad.zip"):
        D.open_dataset(bad)


def test_json_numbers_beyond_a_float_are_refused():
    from edm_deploy.runtime.core.jsonio import loads_bounded

    with pytest.raises(InputError, match="1e400 is beyond the range of a float"):
        loads_bounded("[80, 1e400]", "schedule.json")
    assert loads_bounded("[80, 1e-400]", "schedule.json") == [80, 0.0]


def test_an_output_name_near_the_length_limit_is_written(tmp_path):
    from edm_deploy.runtime.core.fileio import atomic_write_bytes

    path = tmp_path / ("x" * 245 + ".npz")
    atomic_write_bytes(str(path), b"data")
    assert path.read_bytes() == b"data" and os.listdir(tmp_path) == [path.name]
