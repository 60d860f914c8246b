"""Training datasets: the fixed digits split, folders, the reference ZIP format, and their errors."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest

from tests.conftest import requires_torch

pytest.importorskip("sklearn")

from edm_deploy.runtime.core.errors import InputError  # noqa: E402
from edm_deploy.training import dataset as D  # noqa: E402

# The split is part of published results: these numbers must never change.
DIGITS_TEST_SHA256 = "b0ce90afac8fb14246ce6f886faeef4d62a6b41257585d8ceb2670ad0b6c08ab"


def _png(path, size=(8, 8), mode="L", value=0):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(path)


def test_digits_split_is_fixed_forever():
    train_idx, test_idx = D.digits_split_indices()
    assert len(train_idx) == 1438 and len(test_idx) == 359
    assert not set(train_idx) & set(test_idx)
    assert sorted(set(train_idx) | set(test_idx)) == list(range(1797))
    assert hashlib.sha256(test_idx.astype(np.int64).tobytes()).hexdigest() == DIGITS_TEST_SHA256
    tr_x, tr_y, te_x, te_y = D.load_digits_split()
    assert tr_x.shape == (1438, 1, 8, 8) and te_x.shape == (359, 1, 8, 8)
    assert tr_x.dtype == np.uint8 and tr_y.dtype == np.int64
    assert np.bincount(te_y).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert tr_x.max() == 255 and tr_x.min() == 0


def test_digits_uint8_conversion():
    assert D.digits_to_uint8(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]


def test_open_digits_specs():
    ds = D.open_dataset("digits", require_labels=True)
    assert len(ds) == 1438 and ds.label_dim == 10 and ds.resolution == 8 and ds.num_channels == 1
    assert len(D.open_dataset("digits-test")) == 359
    assert len(D.open_dataset("digits-all")) == 1797
    images, labels = ds.batch([0, 5, 7])
    assert images.shape == (3, 1, 8, 8) and labels.shape == (3,)
    assert len(D.open_dataset("digits", max_images=10)) == 10


def test_max_images_keeps_the_label_dim():
    # The first three train digits are 1, 2, 3: label_dim must still be 10 (the network's class
    # embedding must not depend on how many images a debugging run uses).
    ds = D.open_dataset("digits", max_images=3, require_labels=True)
    assert ds.labels.tolist() == [1, 2, 3] and ds.label_dim == 10
    assert "10 classes" in ds.describe()


def test_digits_all_is_the_split_reassembled():
    everything = D.open_dataset("digits-all")
    train_idx, test_idx = D.digits_split_indices()
    tr_x, tr_y, te_x, te_y = D.load_digits_split()
    x, y = everything.batch(train_idx)
    assert np.array_equal(x, tr_x) and np.array_equal(y, tr_y)
    x, y = everything.batch(test_idx)
    assert np.array_equal(x, te_x) and np.array_equal(y, te_y)


def test_zip_round_trip(tmp_path):
    dest = str(tmp_path / "d.zip")
    info = D.write_dataset_zip("digits", dest, max_images=25)
    assert info["images"] == 25 and info["labels"]
    with zipfile.ZipFile(dest) as zf:
        names = zf.namelist()
        assert "00000/img00000000.png" in names and "00000/img00000024.png" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        meta = json.loads(zf.read("dataset.json"))
    assert meta["labels"][3][0] == "00000/img00000003.png"
    ds = D.open_dataset(dest, require_labels=True)
    ref_x, ref_y, _, _ = D.load_digits_split()
    x, y = ds.batch(range(25))
    assert np.array_equal(x, ref_x[:25]) and np.array_equal(y, ref_y[:25])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_zip_resize_and_unlabelled(tmp_path):
    src = tmp_path / "imgs"
    _png(str(src / "a.png"), (12, 10), "RGB", 10)
    _png(str(src / "b.png"), (20, 20), "RGB", 200)
    dest = str(tmp_path / "out.zip")
    with pytest.raises(InputError, match="must be square"):
        D.write_dataset_zip(str(src), dest)
    assert not os.path.exists(dest)
    info = D.write_dataset_zip(str(src), dest, resolution=16)
    assert info["shape"] == [3, 16, 16] and not info["labels"]
    ds = D.open_dataset(dest)
    assert not ds.has_labels and ds.num_channels == 3
    with pytest.raises(InputError, match="no class labels"):
        D.open_dataset(dest, require_labels=True)


def test_folder_labels(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        for i in range(2):
            _png(str(tmp_path / "f" / cls / f"{i}.png"), value=value)
    ds = D.open_dataset(str(tmp_path / "f"), require_labels=True)
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.label_dim == 2
    assert ds[2][0].shape == (1, 8, 8) and int(ds[2][0][0, 0, 0]) == 200
    # dataset.json wins over folder names
    (tmp_path / "f" / "dataset.json").write_text(json.dumps(
        {"labels": [["cat/0.png", 3], ["cat/1.png", 3], ["dog/0.png", 1], ["dog/1.png", 0]]}))
    assert D.open_dataset(str(tmp_path / "f")).labels.tolist() == [3, 3, 1, 0]
    # images directly in the root: no labels
    _png(str(tmp_path / "g" / "x.png"))
    assert not D.open_dataset(str(tmp_path / "g")).has_labels


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", "holds no images"),
        ("mixed_sizes", "mixed image sizes"),
        ("non_square", "must be square"),
        ("non_pow2", "power of two"),
        ("mixed_channels", "mixed channel counts"),
        ("corrupt_zip", "not a readable ZIP"),
        ("truncated_zip", "not a readable ZIP|corrupt"),
        ("missing", "not found"),
        ("rgba", "unsupported image mode"),
    ],
)
def test_dataset_errors(tmp_path, case, match):
    root = tmp_path / "src"
    os.makedirs(root)
    spec = str(root)
    if case == "mixed_sizes":
        _png(str(root / "a.png"), (8, 8))
        _png(str(root / "b.png"), (16, 16))
    elif case == "non_square":
        _png(str(root / "a.png"), (8, 16))
    elif case == "non_pow2":
        _png(str(root / "a.png"), (12, 12))
    elif case == "mixed_channels":
        _png(str(root / "a.png"), mode="L")
        _png(str(root / "b.png"), mode="RGB")
    elif case == "rgba":
        _png(str(root / "a.png"), mode="RGBA")
    elif case == "corrupt_zip":
        spec = str(tmp_path / "bad.zip")
        with open(spec, "wb") as f:
            f.write(b"PK\x03\x04 this is not really a zip file")
    elif case == "truncated_zip":
        good = str(tmp_path / "good.zip")
        D.write_dataset_zip("digits", good, max_images=20)
        data = open(good, "rb").read()
        spec = str(tmp_path / "trunc.zip")
        with open(spec, "wb") as f:
            f.write(data[: len(data) // 2])
    elif case == "missing":
        spec = str(tmp_path / "nope")
    with pytest.raises(InputError, match=match) as info:
        D.open_dataset(spec)
    assert "\n" not in str(info.value)


def test_dataset_cli(tmp_path, capsys):
    from edm_deploy.cli import main

    dest = str(tmp_path / "d.zip")
    main(["dataset", "--source", "digits", "--dest", dest, "--max-images", "12"])
    assert "12 images" in capsys.readouterr().out
    assert len(D.open_dataset(dest)) == 12
    before = open(dest, "rb").read()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["dataset", "--source", str(empty), "--dest", dest])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no images" in err[0]
    assert open(dest, "rb").read() == before  # the existing file is untouched
    assert sorted(os.listdir(tmp_path)) == ["d.zip", "empty"]  # and no temp file is left


@requires_torch
def test_dataset_cli_help_has_example(cli_env):
    from tests.conftest import run_cli

    res = run_cli(["dataset", "--help"], env=cli_env)
    assert res.returncode == 0 and "Example" in res.stdout


def _dataset_cli_error(capsys, args) -> str:
    from edm_deploy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["dataset", *args])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], err
    return err[0]


def test_resolution_is_bounded_and_says_why(tmp_path, capsys):
    D.check_image_shape((3, D.MAX_RESOLUTION, D.MAX_RESOLUTION), "ok")
    with pytest.raises(InputError, match=f"at most {D.MAX_RESOLUTION}x{D.MAX_RESOLUTION}.*train at 32-64 pixels"):
        D.write_dataset_zip("digits", str(tmp_path / "d.zip"), resolution=2048)
    with pytest.raises(InputError, match="resolution must be an integer"):
        D.write_dataset_zip("digits", str(tmp_path / "d.zip"), resolution=64.0)
    message = _dataset_cli_error(capsys, ["--source", "digits", "--dest", str(tmp_path / "d.zip"),
                                          "--resolution", "65536"])
    assert "--resolution" in message and "at most 1024x1024" in message and "4,295 MB" in message
    # A folder of images larger than that is refused before anything is written.
    _png(str(tmp_path / "big" / "a.png"), (2048, 2048))
    assert "at most 1024x1024" in _dataset_cli_error(capsys, ["--source", str(tmp_path / "big"),
                                                              "--dest", str(tmp_path / "d.zip")])
    assert sorted(os.listdir(tmp_path)) == ["big"]


def test_dataset_never_writes_onto_its_source(tmp_path, capsys):
    src = str(tmp_path / "src.zip")
    D.write_dataset_zip("digits", src, max_images=5)
    before = open(src, "rb").read()
    link = tmp_path / "link.zip"
    link.symlink_to(src)
    for dest in (src, str(link)):
        assert "would overwrite --source" in _dataset_cli_error(capsys, ["--source", src, "--dest", dest])
        with pytest.raises(InputError, match="would overwrite source"):
            D.write_dataset_zip(src, dest)
    folder = tmp_path / "out.zip"
    folder.mkdir()
    assert "is a folder" in _dataset_cli_error(capsys, ["--source", "digits", "--dest", str(folder)])
    assert open(src, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["link.zip", "out.zip", "src.zip"] and not os.listdir(folder)


@pytest.mark.parametrize("entries, message", [
    ([["a.png", 1]], "labels 1 of 2 images"),  # b.png unlabelled: refused, not silently unconditional
    ([["a.png", 1], ["b.png", 2], ["c.png", 0]], "not images of the dataset (first: 'c.png')"),
    ([["a.png", 1], ["b.png", 2], ["../x.png", 0]], "not images of the dataset (first: '../x.png')"),
])
def test_dataset_json_that_labels_part_or_strangers_is_refused(tmp_path, entries, message):
    for n in ("a.png", "b.png"):
        _png(str(tmp_path / "src" / n))
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"labels": entries}))
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        D.open_dataset(str(tmp_path / "src"))
    with pytest.raises(InputError, match="not images|of 2 images"):
        D.write_dataset_zip(str(tmp_path / "src"), str(tmp_path / "out.zip"))
    assert not os.path.exists(tmp_path / "out.zip")


def test_dataset_dest_replaces_only_its_own_zips(tmp_path):
    for n in ("a.png", "b.png"):
        _png(str(tmp_path / "src" / n))
    foreign = tmp_path / "other.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("precious.txt", "not ours")
    before = foreign.read_bytes()
    with pytest.raises(InputError, match="was not written by edm-deploy dataset"):
        D.write_dataset_zip(str(tmp_path / "src"), str(foreign))
    assert foreign.read_bytes() == before
    ours = str(tmp_path / "ours.zip")
    D.write_dataset_zip(str(tmp_path / "src"), ours)
    D.write_dataset_zip(str(tmp_path / "src"), ours, max_images=1)  # a rebuild of our own output is allowed
    assert len(D.open_dataset(ours)) == 1
