"""The IDX reader (MNIST-family files), the fashion-mnist sources and `dataset --pad-to`.

Every file here is built by the test itself: the suite never needs the Debian package.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.training.idx import labels_file_for, pad_to, read_idx, read_idx_dataset
from tests.conftest import one_error_line, run_main


def assert_one_error(code, err, text):
    assert text in one_error_line(code, err), err


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    head = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write(path, data: bytes, gz: bool) -> str:
    path = str(path) + (".gz" if gz else "")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return path


def make_pair(folder, n=6, side=28, gz=True, prefix="train", labels=None):
    rng = np.random.RandomState(n)
    images = rng.randint(0, 256, size=(n, side, side)).astype(np.uint8)
    labels = rng.randint(0, 10, size=n).astype(np.uint8) if labels is None else labels
    img = write(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), idx_bytes(images), gz)
    lab = write(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), idx_bytes(labels), gz)
    return img, lab, images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_reads_images_and_the_labels_beside_them(tmp_path, gz):
    img, lab, images, labels = make_pair(tmp_path, gz=gz)
    assert labels_file_for(img) == lab
    x, y = read_idx_dataset(img)
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels.astype(np.int64))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "truncated IDX file"),
    (lambda b: b"\x01" + b[1:], "not an IDX file"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "element type 0x0d is not supported"),
    (lambda b: b[:3] + b"\x02" + b[4:], "gives 2 dimensions, expected 3"),
    (lambda b: b + b"\x00", "more data than its IDX header declares"),
    (lambda b: b[:4] + struct.pack(">I", 4_000_000_000) + b[8:], "at most 10,000,000 are read"),
    (lambda b: b[:8] + struct.pack(">I", 5000) + b[12:], "each side may be at most"),
])
@pytest.mark.parametrize("gz", [True, False])
def test_damaged_files_are_one_clear_error(tmp_path, damage, message, gz):
    images = np.zeros((3, 28, 28), np.uint8)
    path = write(tmp_path / "x-images-idx3-ubyte", damage(idx_bytes(images)), gz)
    with pytest.raises(InputError, match=message):
        read_idx(path, ndim=3)


def test_a_decompression_bomb_is_not_inflated(tmp_path):
    """A 3-image header followed by 64 MB of zeros: refused after the declared 2,352 bytes + 1."""
    path = str(tmp_path / "bomb-images-idx3-ubyte.gz")
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(zeros)
    assert os.path.getsize(path) < 200_000
    with pytest.raises(InputError, match="more data than its IDX header declares"):
        read_idx(path, ndim=3)


def test_a_corrupt_gzip_stream_is_one_clear_error(tmp_path):
    path = write(tmp_path / "c-images-idx3-ubyte", idx_bytes(np.zeros((20, 28, 28), np.uint8)), gz=True)
    data = bytearray(open(path, "rb").read())
    data[40:60] = b"\xff" * 20
    open(path, "wb").write(bytes(data))
    with pytest.raises(InputError, match="corrupt compressed data|truncated"):
        read_idx(path, ndim=3)


def test_label_and_image_counts_must_agree(tmp_path):
    img, _, _, _ = make_pair(tmp_path, n=6, labels=np.arange(5, dtype=np.uint8))
    with pytest.raises(InputError, match="5 labels for 6 images"):
        read_idx_dataset(img)


def test_pad_to_centres_on_black():
    x = np.full((2, 1, 28, 28), 200, np.uint8)
    y = pad_to(x, 32, "x")
    assert y.shape == (2, 1, 32, 32)
    assert (y[:, :, 2:30, 2:30] == 200).all() and y.sum() == x.sum()
    with pytest.raises(InputError, match="pad only enlarges"):
        pad_to(x, 16, "x")


def test_cli_dataset_from_idx_pads_to_32_and_keeps_labels(tmp_path, capsys):
    img, _, images, labels = make_pair(tmp_path)
    dest = str(tmp_path / "out.zip")
    code, out, err = run_main(["dataset", "--source", img, "--dest", dest, "--pad-to", "32"], capsys)
    assert code == 0, err
    assert "6 images, 1x32x32, with labels" in out
    from edm_deploy.training.dataset import open_dataset

    ds = open_dataset(dest)
    x, y = ds.batch(range(len(ds)))
    np.testing.assert_array_equal(x[:, 0, 2:30, 2:30], images)
    np.testing.assert_array_equal(y, labels)
    with zipfile.ZipFile(dest) as zf:
        assert "dataset.json" in zf.namelist()


def test_cli_dataset_from_28px_idx_without_pad_says_how(tmp_path, capsys):
    img, _, _, _ = make_pair(tmp_path)
    code, _, err = run_main(["dataset", "--source", img, "--dest", str(tmp_path / "o.zip")], capsys)
    assert_one_error(code, err, "--pad-to N")
    assert not os.path.exists(tmp_path / "o.zip")


def test_cli_dataset_truncated_idx_is_one_error_line(tmp_path, capsys):
    path = write(tmp_path / "t-images-idx3-ubyte", idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100], gz=True)
    code, _, err = run_main(["dataset", "--source", path, "--dest", str(tmp_path / "o.zip"), "--pad-to", "32"],
                            capsys)
    assert_one_error(code, err, "truncated IDX file")
    assert not os.path.exists(tmp_path / "o.zip")


def test_fashion_mnist_source_reads_the_package_folder(tmp_path, monkeypatch):
    make_pair(tmp_path, n=10, prefix="train")
    make_pair(tmp_path, n=4, prefix="t10k")
    monkeypatch.setenv("EDM_DEPLOY_FASHION_MNIST", str(tmp_path))
    from edm_deploy.training.dataset import open_dataset

    train, test = open_dataset("fashion-mnist", require_labels=True), open_dataset("fashion-mnist-test")
    assert (len(train), len(test)) == (10, 4)
    assert train.image_shape == (1, 32, 32) and train.has_labels


def test_fashion_mnist_missing_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDM_DEPLOY_FASHION_MNIST", str(tmp_path / "nowhere"))
    code, _, err = run_main(["dataset", "--source", "fashion-mnist", "--dest", str(tmp_path / "o.zip")], capsys)
    assert_one_error(code, err, "apt-get install dataset-fashion-mnist")


def test_fashion_demo_judge_scores_against_the_test_split(tmp_path, monkeypatch):
    """The fashion demo's judge on a small stand-in of the package: its classifier learns, its distance ranks."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    rng = np.random.RandomState(0)
    labels = np.arange(200, dtype=np.uint8) % 10
    images = (rng.randint(0, 40, size=(200, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)  # class = brightness
    for prefix, sl in (("train", slice(0, 150)), ("t10k", slice(150, 200))):
        write(tmp_path / f"{prefix}-images-idx3-ubyte", idx_bytes(images[sl]), gz=True)
        write(tmp_path / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels[sl]), gz=True)
    monkeypatch.setenv("EDM_DEPLOY_FASHION_MNIST", str(tmp_path))
    from edm_deploy.training.dataset import load_fashion_mnist
    from edm_deploy.training.fashion_eval import FashionDemoJudge

    judge = FashionDemoJudge(str(tmp_path / "clf"), echo=lambda line: None, epochs=25)
    assert judge.test_accuracy > 0.5 and judge.yardstick >= 0
    real, real_y = load_fashion_mnist("t10k")
    good = judge.score(real, real_y)
    noise = judge.score(rng.randint(0, 256, size=real.shape).astype(np.uint8), real_y)
    assert good["accuracy"] > noise["accuracy"] and good["fd_samples_test"] < noise["fd_samples_test"]
    assert len(good["per_class"]) == 10
