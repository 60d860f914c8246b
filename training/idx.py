"""The IDX format of the MNIST family (MNIST, Fashion-MNIST, KMNIST, EMNIST), read with bounds.

Why a reader of our own: the format is ten lines of spec (big-endian; bytes 0-1 zero, byte 2 the
element type, 0x08 = uint8, byte 3 the number of dimensions, one 4-byte size per dimension, then
the data in C order), and a generic loader would trust the header. Here the header's sizes are
checked before anything is allocated, a gzip stream is inflated only up to the size its header
declares (a decompression bomb stops there), and a short or over-long file is refused: each
problem is one `InputError` line naming the file.

Fashion-MNIST ships as the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from typing import BinaryIO, Optional

import numpy as np

from edm_deploy.runtime.core.errors import InputError, first_line
from edm_deploy.runtime.core.manifest import MAX_RESOLUTION

UBYTE = 0x08  # the only element type an image or label file of the family uses
MAX_IDX_ITEMS = 10_000_000  # 143x MNIST's 70,000: a header beyond it is corrupt or hostile
MAX_IDX_BYTES = 4 << 30  # what one file may inflate to (MNIST's training images: 47 MB)
_CHUNK = 1 << 20

# The installed Debian package, and the names its files carry.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set $EDM_DEPLOY_FASHION_MNIST to a folder of the IDX files"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def is_idx_name(path: str) -> bool:
    """Whether a file name looks like an IDX file (``...-idx3-ubyte`` or ``.idx3-ubyte``, optionally ``.gz``)."""
    return re.search(r"[-.]idx[1-4]-ubyte(\.gz)?$", os.path.basename(path)) is not None


def _open(path: str) -> BinaryIO:
    if not os.path.isfile(path):
        raise InputError(f"IDX file not found: {path}")
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")  # type: ignore[return-value]


def _read_exact(f: BinaryIO, count: int, path: str, what: str) -> bytes:
    out = bytearray()
    try:
        while len(out) < count:
            chunk = f.read(min(_CHUNK, count - len(out)))
            if not chunk:
                break
            out += chunk
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: corrupt compressed data ({first_line(exc)})") from exc
    if len(out) < count:
        raise InputError(f"{path}: truncated IDX file: the header promises {count:,} bytes of {what}, found {len(out):,}")
    return bytes(out)


def read_idx(path: str, ndim: Optional[int] = None) -> np.ndarray:
    """An IDX file (gzipped or not) -> a uint8 array of the shape its header gives.

    `ndim` (3 for images, 1 for labels) is the number of dimensions the caller expects.
    """
    with _open(path) as f:
        head = _read_exact(f, 4, path, "header")
        if head[0] != 0 or head[1] != 0:
            raise InputError(f"{path}: not an IDX file (magic number 0x{head.hex()}; IDX files start with two zero bytes)")
        if head[2] != UBYTE:
            raise InputError(f"{path}: IDX element type 0x{head[2]:02x} is not supported (only 0x08, unsigned bytes)")
        dims_n = head[3]
        if dims_n < 1 or (ndim is not None and dims_n != ndim):
            want = f"{ndim} dimension{'s' * (ndim != 1)}" if ndim is not None else "at least one dimension"
            raise InputError(f"{path}: the IDX header gives {dims_n} dimensions, expected {want} (magic 0x{head.hex()})")
        dims = struct.unpack(f">{dims_n}I", _read_exact(f, 4 * dims_n, path, "dimension sizes"))
        if dims[0] > MAX_IDX_ITEMS:
            raise InputError(f"{path}: the IDX header declares {dims[0]:,} items; at most {MAX_IDX_ITEMS:,} are read")
        if any(d > MAX_RESOLUTION for d in dims[1:]):
            raise InputError(f"{path}: the IDX header declares items of {'x'.join(map(str, dims[1:]))}; "
                             f"each side may be at most {MAX_RESOLUTION}")
        size = int(np.prod(dims, dtype=np.int64))
        if size > MAX_IDX_BYTES:
            raise InputError(f"{path}: the IDX header declares {size:,} bytes; at most {MAX_IDX_BYTES:,} are read")
        data = _read_exact(f, size, path, "data")
        try:
            extra = f.read(1)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt compressed data ({first_line(exc)})") from exc
        if extra:
            raise InputError(f"{path}: the file holds more data than its IDX header declares ({size:,} bytes); "
                             f"it is corrupt or not one IDX file")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def labels_file_for(images_path: str) -> Optional[str]:
    """The labels file beside an images file, by the family's naming (``train-images-idx3-ubyte`` ->
    ``train-labels-idx1-ubyte``, gzipped or not), or None when there is none."""
    folder, name = os.path.split(images_path)
    stem = re.sub(r"(\.gz)$", "", name)
    candidate = re.sub(r"images([-.])idx3", r"labels\1idx1", stem)
    if candidate == stem:
        return None
    for suffix in ("", ".gz"):
        path = os.path.join(folder, candidate + suffix)
        if os.path.isfile(path):
            return path
    return None


def read_idx_dataset(images_path: str, labels_path: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(uint8 [N,1,H,W] images, int64 [N] labels or None) from an IDX images file and its labels.

    Without `labels_path` the labels file beside the images (`labels_file_for`) is used when it
    exists. Image and label counts must agree.
    """
    images = read_idx(images_path, ndim=3)
    if len(images) == 0:
        raise InputError(f"{images_path}: the IDX file holds no images")
    labels_path = labels_path or labels_file_for(images_path)
    labels = None
    if labels_path is not None:
        raw = read_idx(labels_path, ndim=1)
        if len(raw) != len(images):
            raise InputError(f"{labels_path}: {len(raw):,} labels for {len(images):,} images in {images_path}")
        labels = raw.astype(np.int64)
    return images[:, None, :, :], labels


def pad_to(images: np.ndarray, resolution: int, where: str) -> np.ndarray:
    """uint8 [N,C,H,W] -> [N,C,R,R], centred on a zero (black) border. Fashion-MNIST's and MNIST's
    backgrounds are black, so the border continues the image rather than framing it."""
    _, _, h, w = images.shape
    if h > resolution or w > resolution:
        raise InputError(f"{where}: cannot pad {w}x{h} images to {resolution}x{resolution} (pad only enlarges)")
    top, left = (resolution - h) // 2, (resolution - w) // 2
    out = np.zeros((*images.shape[:2], resolution, resolution), dtype=np.uint8)
    out[:, :, top: top + h, left: left + w] = images
    return out


def fashion_mnist_dir() -> str:
    return os.environ.get("EDM_DEPLOY_FASHION_MNIST") or FASHION_MNIST_DIR


def fashion_mnist_file(split: str, kind: str) -> str:
    """The path of one Fashion-MNIST file (`split` train | t10k, `kind` images | labels), or an
    InputError that says what to install."""
    folder = fashion_mnist_dir()
    name = f"{split}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte"
    for suffix in (".gz", ""):
        path = os.path.join(folder, name + suffix)
        if os.path.isfile(path):
            return path
    raise InputError(f"Fashion-MNIST not found ({os.path.join(folder, name)}.gz): {FASHION_MNIST_HINT}")
