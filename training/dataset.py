"""Training datasets: uint8 CHW images with integer class labels, from three kinds of source.

A *source spec* names where the images come from (this is what `--data` / `--source` take):

* ``digits`` - scikit-learn's handwritten digits (1797 real 8x8 grey images, 10 classes). It ships
  with scikit-learn, so training works without any download. ``digits`` is the fixed *train*
  split, ``digits-test`` the held-out test split and ``digits-all`` all 1797 images (see
  `load_digits_split`).
* a folder - image files found recursively (all formats PIL reads), sorted by relative path.
  Labels come from ``dataset.json`` at the folder root when present, otherwise from the top-level
  sub-folder names (sorted, mapped to 0..K-1) when every image lies in one; else no labels.
* a ``.zip`` - the reference dataset format: an uncompressed ZIP of PNGs
  (``00000/img00000000.png`` ...) plus ``dataset.json`` = ``{"labels": [[name, int], ...]}`` or
  ``{"labels": null}``. `write_dataset_zip` writes it.

Every dataset is checked when opened, so a bad source fails before any training starts, with one
clear `InputError` line: an empty source, mixed image sizes, non-square or non-power-of-two sizes,
mixed or unsupported channel counts, a corrupt ZIP, or missing labels when labels are required.
Images are decoded on first use and cached (the reference's `--cache=True` behaviour).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from edm_deploy.runtime.core.archives import (
    MAX_IMAGE_FILE_BYTES,
    ZIP_ERRORS,
    check_zip_sizes,
    first_bad_member,
    open_image,
    read_bounded,
)
from edm_deploy.runtime.core.errors import InputError, first_line
from edm_deploy.runtime.core.fileio import check_regular_file
from edm_deploy.runtime.core.jsonio import MAX_DATASET_JSON_BYTES, loads_bounded, read_json_file
from edm_deploy.runtime.core.manifest import MAX_CLASSES, MAX_RESOLUTION

# --------------------------------------------------------------------------------------------
# The built-in digits split.

DIGITS_SPLIT_SEED = 2022  # never change: the split is part of the published results
DIGITS_TEST_FRACTION = 0.2


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits in scikit-learn's order: uint8 [N,1,8,8] images and int64 [N] labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return digits_to_uint8(data.images)[:, None, :, :], np.asarray(data.target, dtype=np.int64)


def digits_split_indices(target: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into `sklearn.datasets.load_digits()`, fixed forever.

    A stratified split done here rather than with `sklearn.model_selection.train_test_split`, so it
    cannot move when scikit-learn changes its algorithm: for each class c in 0..9 (in order), the
    sorted indices of that class are permuted by one `np.random.RandomState(2022)` (the legacy
    Mersenne-Twister stream, whose output NumPy guarantees never to change) and the first
    round(0.2 * count) go to the test split. 1438 train / 359 test images; both index lists are
    returned sorted. A test pins the counts and a checksum of the test indices. `target` (the
    labels of all digits, in scikit-learn's order) is loaded when not given.
    """
    if target is None:
        target = _digits_arrays()[1]
    target = np.asarray(target)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.flatnonzero(target == c)
        perm = idx[rng.permutation(len(idx))]
        test.append(perm[: int(round(DIGITS_TEST_FRACTION * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(target)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn's 0..16 grey levels -> uint8 0..255 (x*255/16, rounded half away from zero)."""
    return np.floor(np.asarray(values, dtype=np.float64) * (255.0 / 16.0) + 0.5).astype(np.uint8)


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels): uint8 [N,1,8,8] and int64 [N]."""
    images, labels = _digits_arrays()
    train_idx, test_idx = digits_split_indices(labels)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


# --------------------------------------------------------------------------------------------
# Dataset classes.


class Dataset:
    """A fixed list of same-shaped uint8 images [C,R,R] with optional int labels.

    Subclasses provide `_count`, `_load(i)` and the label array; this base class validates the
    shape rules once and serves items and whole batches from a decoded cache.
    """

    def __init__(
        self, name: str, shape: Sequence[int], labels: Optional[np.ndarray], label_dim: Optional[int] = None
    ) -> None:
        self.name = name
        self.image_shape = tuple(int(s) for s in shape)  # (C, R, R)
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._label_dim = label_dim  # None: max label + 1
        self._cache: dict[int, np.ndarray] = {}
        check_image_shape(self.image_shape, name)
        if self._labels is not None:
            check_labels(self._labels, name)

    # -- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        return self.image_shape[1]

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def label_dim(self) -> int:
        """Number of classes (max label + 1 over the full source); 0 for an unlabelled dataset.

        A `Subset` (``--max-images``) keeps the label_dim of the source it was cut from, so a
        short debugging run builds the same network as the full one.
        """
        if self._labels is None or len(self._labels) == 0:
            return 0
        if self._label_dim is not None:
            return int(self._label_dim)
        return int(self._labels.max()) + 1

    @property
    def labels(self) -> Optional[np.ndarray]:
        return self._labels

    # -- items ---------------------------------------------------------------------------------
    def _load(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def image(self, index: int) -> np.ndarray:
        img = self._cache.get(index)
        if img is None:
            img = self._load(index)
            if img.shape != self.image_shape:
                raise InputError(
                    f"{self.name}: image {index} has shape {list(img.shape)}, expected {list(self.image_shape)}"
                )
            self._cache[index] = img
        return img

    def label(self, index: int) -> int:
        return -1 if self._labels is None else int(self._labels[index])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.image(index), self.label(index)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,C,R,R] and int64 [N] labels (-1 when unlabelled)."""
        images = np.stack([self.image(int(i)) for i in indices]) if len(indices) else np.zeros((0, *self.image_shape), np.uint8)
        labels = np.asarray([self.label(int(i)) for i in indices], dtype=np.int64)
        return images, labels

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]

    def describe(self) -> str:
        lab = f"{self.label_dim} classes" if self.has_labels else "no labels"
        c, r, _ = self.image_shape
        return f"{self.name}: {len(self)} images, {c}x{r}x{r}, {lab}"


class ArrayDataset(Dataset):
    """Images already in memory (the built-in digits)."""

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray], name: str = "array") -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise InputError(f"{name}: images must be uint8 [N,C,H,W], got {images.dtype} {list(images.shape)}")
        if len(images) == 0:
            raise InputError(f"{name}: the dataset holds no images")
        if labels is not None and len(labels) != len(images):
            raise InputError(f"{name}: {len(labels)} labels for {len(images)} images")
        super().__init__(name, images.shape[1:], labels)
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def _load(self, index: int) -> np.ndarray:
        return self._images[index]

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        labels = self._labels[idx] if self._labels is not None else np.full(len(idx), -1, np.int64)
        return self._images[idx], labels


class _FileDataset(Dataset):
    """Images stored as files (a folder or a ZIP): headers checked at open, pixels decoded lazily.

    `opener(name)` returns a file's bytes (bounded by `MAX_IMAGE_FILE_BYTES`), `stream(name)` an
    open binary file, from which only the header is read when the dataset is checked.
    """

    def __init__(self, name: str, names: list[str], opener: Callable[[str], bytes], labels_json, label_source: str,
                 stream: Callable[[str], BinaryIO]):
        if not names:
            raise InputError(f"{name}: no images found")
        self._names = names
        self._opener = opener
        shape = _common_shape(name, names, stream)
        labels = _resolve_labels(name, names, labels_json, label_source)
        super().__init__(name, shape, labels)

    def __len__(self) -> int:
        return len(self._names)

    def _load(self, index: int) -> np.ndarray:
        return decode_image(self._opener(self._names[index]), f"{self.name}/{self._names[index]}")


class ImageFolderDataset(_FileDataset):
    """Every image file under a folder (recursive), sorted by relative path."""

    def __init__(self, path: str) -> None:
        super().__init__(*_folder_listing(path))


class ZipDataset(_FileDataset):
    """The reference dataset ZIP (uncompressed PNGs + dataset.json)."""

    def __init__(self, path: str) -> None:
        super().__init__(*_zip_listing(path))


def _member_limit(name: str) -> int:
    """What one file of a dataset may hold: its labels file more than an image."""
    return MAX_DATASET_JSON_BYTES if name == "dataset.json" else MAX_IMAGE_FILE_BYTES


def _folder_listing(path: str):
    """(name, sorted image names, opener, parsed dataset.json, label source, stream) of a folder."""
    if not os.path.isdir(path):
        raise InputError(f"dataset folder not found: {path}")
    names = sorted(
        os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
        for root, _dirs, files in os.walk(path)
        for f in files
        if _is_image_name(f)
    )
    if not names:
        raise InputError(f"{path}: the folder holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    for name in names:
        check_regular_file(os.path.join(path, name), "image")
    meta = os.path.join(path, "dataset.json")
    labels_json, source = None, "folders"
    if os.path.lexists(meta):
        labels_json = _parse_dataset_json(read_json_file(meta, max_bytes=MAX_DATASET_JSON_BYTES, what="dataset.json"),
                                          meta)
        source = "json"

    def stream(rel: str) -> BinaryIO:
        return open(os.path.join(path, rel), "rb")

    def opener(rel: str) -> bytes:
        with stream(rel) as f:
            return read_bounded(f, MAX_IMAGE_FILE_BYTES, f"{path}/{rel}")

    return path, names, opener, labels_json, source, stream


def _zip_listing(path: str):
    """The same for a ZIP; a truncated or corrupt archive is an InputError here, not later."""
    if not os.path.isfile(path):
        raise InputError(f"dataset ZIP not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
        check_zip_sizes(zf, path, _member_limit)
        bad = first_bad_member(zf, path, _member_limit)
    except ZIP_ERRORS as exc:
        raise InputError(f"{path} is not a readable ZIP file ({first_line(exc)})") from exc
    if bad is not None:
        raise InputError(f"{path} is corrupt: member {bad} fails its CRC check")
    members = set(zf.namelist())
    names = sorted(n for n in members if _is_image_name(n))
    if not names:
        raise InputError(f"{path}: the ZIP holds no images")
    labels_json, source = None, "none"
    if "dataset.json" in members:
        where = f"{path}:dataset.json"
        with zf.open("dataset.json") as f:
            text = read_bounded(f, MAX_DATASET_JSON_BYTES, where)
        labels_json = _parse_dataset_json(loads_bounded(text, where, max_bytes=MAX_DATASET_JSON_BYTES,
                                                        what="dataset.json"), where)
        source = "json"

    def opener(name: str) -> bytes:
        try:
            with zf.open(name) as f:
                return read_bounded(f, MAX_IMAGE_FILE_BYTES, f"{path}:{name}")
        except ZIP_ERRORS as exc:
            raise InputError(f"{path}: cannot read {name} ({first_line(exc)})") from exc

    def stream(name: str) -> BinaryIO:
        return zf.open(name)  # type: ignore[return-value]

    return path, names, opener, labels_json, source, stream


# --------------------------------------------------------------------------------------------
# Opening a source spec.

DIGITS_SPECS = ("digits", "digits-test", "digits-all")
# Fashion-MNIST from its Debian package, padded from 28x28 to 32x32 with the images' own black
# background: 32 keeps the power-of-two rule every layer of edm-deploy relies on and gives the
# 32/16/8 U-Net of the `fashion-mnist` preset, at 1.31x the pixels of 28x28 (see training/idx.py).
FASHION_SPECS = {"fashion-mnist": "train", "fashion-mnist-test": "t10k"}
FASHION_RESOLUTION = 32
BUILTIN_SPECS = (*DIGITS_SPECS, *FASHION_SPECS)


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's `split` (train | t10k) from the installed package: uint8 [N,1,32,32], int64 [N]."""
    from .idx import fashion_mnist_file, pad_to, read_idx_dataset

    images_path = fashion_mnist_file(split, "images")
    images, labels = read_idx_dataset(images_path, fashion_mnist_file(split, "labels"))
    return pad_to(images, FASHION_RESOLUTION, images_path), labels


def _idx_dataset(path: str) -> ArrayDataset:
    from .idx import read_idx_dataset

    images, labels = read_idx_dataset(path)
    side = images.shape[-1]
    if side & (side - 1) or images.shape[-2] != side:
        raise InputError(
            f"{path}: {images.shape[-1]}x{images.shape[-2]} images; EDM networks here take square power-of-two sizes: "
            f"build a dataset with `edm-deploy dataset --source {path} --dest OUT.zip --pad-to 32`"
        )
    return ArrayDataset(images, labels, path)


def open_dataset(spec: str, require_labels: bool = False, max_images: Optional[int] = None) -> Dataset:
    """A source spec (``digits``, ``fashion-mnist``, a folder, a .zip or an IDX file) -> a validated dataset.

    `require_labels` turns an unlabelled source into an InputError (class-conditional training);
    `max_images` keeps the first N images (in sorted order), as the reference dataset tool does.
    """
    spec = str(spec)
    if spec in DIGITS_SPECS:
        if spec == "digits-all":  # the same arrays the split is cut from, in scikit-learn's order
            ds: Dataset = ArrayDataset(*_digits_arrays(), "digits-all")
        else:
            tr_x, tr_y, te_x, te_y = load_digits_split()
            ds = ArrayDataset(tr_x, tr_y, "digits") if spec == "digits" else ArrayDataset(te_x, te_y, "digits-test")
    elif spec in FASHION_SPECS:
        ds = ArrayDataset(*load_fashion_mnist(FASHION_SPECS[spec]), spec)
    elif _is_idx(spec):
        ds = _idx_dataset(spec)
    elif os.path.isdir(spec):
        ds = ImageFolderDataset(spec)
    elif spec.lower().endswith(".zip"):
        ds = ZipDataset(spec)
    elif os.path.exists(spec):
        raise InputError(f"{spec}: a dataset must be a folder of images, a .zip, an IDX images file "
                         f"(...-images-idx3-ubyte[.gz]) or one of {', '.join(BUILTIN_SPECS)}")
    else:
        raise InputError(f"dataset not found: {spec} (give a folder, a .zip, an IDX images file or one of "
                         f"{', '.join(BUILTIN_SPECS)})")
    if require_labels and not ds.has_labels:
        raise InputError(
            f"{ds.name} has no class labels, but --cond needs them (add dataset.json or one sub-folder per class)"
        )
    if max_images is not None:
        if max_images < 1:
            raise InputError(f"max_images must be at least 1, got {max_images}", param="max_images")
        if max_images < len(ds):
            ds = Subset(ds, range(max_images))
    return ds


class Subset(Dataset):
    """The first N (or any listed) items of another dataset."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self._base = base
        self._idx = np.asarray(list(indices), dtype=np.int64)
        labels = None if base.labels is None else base.labels[self._idx]
        super().__init__(base.name, base.image_shape, labels, label_dim=base.label_dim if base.has_labels else None)

    def __len__(self) -> int:
        return len(self._idx)

    def _load(self, index: int) -> np.ndarray:
        return self._base.image(int(self._idx[index]))


# --------------------------------------------------------------------------------------------
# Validation and decoding helpers.

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_CHANNELS = {"1": 1, "L": 1, "I": 1, "F": 1, "I;16": 1, "P": 3, "RGB": 3, "YCbCr": 3}


def _is_idx(spec: str) -> bool:
    from .idx import is_idx_name

    return is_idx_name(spec) and os.path.isfile(spec)


class _UncheckedArrays(ArrayDataset):
    """In-memory images of any size, for the dataset tool to pad or resize before the checks."""

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray], name: str) -> None:
        self.name, self._images, self._labels, self._label_dim, self._cache = name, images, labels, None, {}
        self.image_shape = tuple(int(s) for s in images.shape[1:])


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not os.path.basename(name).startswith(".")


# The largest image side a dataset may have is the largest a model may have (`MAX_RESOLUTION`
# of the manifest schema): at 1024 an RGB image is already a 3 MB uncompressed PNG in the ZIP,
# and far above it (--resolution 65536: one 12.9 GB PNG per RGB image) a dataset cannot be
# written, let alone trained on.


def check_image_shape(shape: Sequence[int], source: str) -> None:
    """The reference rules: 1 or 3 channels, square, power-of-two resolution; plus at most `MAX_RESOLUTION`."""
    c, h, w = shape
    if c not in (1, 3):
        raise InputError(f"{source}: images must have 1 or 3 channels, got {c}")
    if h != w:
        raise InputError(f"{source}: images must be square, got {w}x{h} (use `edm-deploy dataset --resolution N`, or `--pad-to N` to pad)")
    if h < 4 or h & (h - 1):
        raise InputError(
            f"{source}: image size must be a power of two >= 4, got {w}x{h} (use `edm-deploy dataset --resolution N`, or `--pad-to N` to pad)"
        )
    if h > MAX_RESOLUTION:
        raise InputError(
            f"{source}: image size must be at most {MAX_RESOLUTION}x{MAX_RESOLUTION}, got {w}x{h}: EDM networks "
            f"train at 32-64 pixels, and one {w}x{h} image is {c * w * h / 1e6:,.0f} MB uncompressed "
            f"(use `edm-deploy dataset --resolution N` to shrink them)"
        )


def _open_pil(data: bytes, where: str):
    try:
        img = open_image(io.BytesIO(data), where)
        img.size  # noqa: B018 - force header parsing
        return img
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{where} is not a readable image ({exc})") from exc


def image_channels(mode: str, where: str) -> int:
    if mode not in _CHANNELS:
        raise InputError(f"{where}: unsupported image mode {mode} (use greyscale or RGB without alpha)")
    return _CHANNELS[mode]


def _header_shape(stream: Callable[[str], BinaryIO], name: str, where: str) -> tuple[int, int, int]:
    """(channels, height, width) from an image file's header: only the header is read."""
    try:
        with stream(name) as f:
            with open_image(f, where) as img:
                channels, size = image_channels(img.mode, where), img.size
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{where} is not a readable image ({exc})") from exc
    return channels, size[1], size[0]


def _common_shape(name: str, names: list[str], stream: Callable[[str], BinaryIO]) -> tuple[int, int, int]:
    """Check that every image has one size and one channel count (headers only)."""
    first = None
    for n in names:
        shape = _header_shape(stream, n, f"{name}/{n}")
        if first is None:
            first = (n, shape)
        elif shape[1:] != first[1][1:]:
            raise InputError(
                f"{name}: mixed image sizes ({first[0]} is {first[1][2]}x{first[1][1]}, {n} is {shape[2]}x{shape[1]}); "
                f"use `edm-deploy dataset --resolution N` to resize"
            )
        elif shape[0] != first[1][0]:
            raise InputError(
                f"{name}: mixed channel counts ({first[0]} has {first[1][0]}, {n} has {shape[0]}); "
                f"convert all images to greyscale or all to RGB"
            )
    assert first is not None
    return first[1]


def pil_to_array(img, channels: int) -> np.ndarray:
    """A PIL image -> uint8 [C,H,W] with the given channel count."""
    mode = "L" if channels == 1 else "RGB"
    if img.mode in ("I", "I;16", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    else:
        arr = np.asarray(img.convert(mode), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_image(data: bytes, where: str) -> np.ndarray:
    img = _open_pil(data, where)
    channels = image_channels(img.mode, where)
    try:
        return pil_to_array(img, channels)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{where} is not a readable image ({exc})") from exc


def _parse_dataset_json(meta: Any, where: str):
    """Parsed dataset.json -> {name: label} or None (labels: null).

    Labels must be JSON integers in [0, `MAX_CLASSES`): ``"3"``, 3.7 or true are refused rather
    than read as 3, 3 and 1.
    """
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputError(f'{where}: expected {{"labels": [[file, label], ...]}} or {{"labels": null}}')
    labels = meta["labels"]
    if labels is None:
        return None
    pairs_error = InputError(f"{where}: labels must be a list of [file name, integer] pairs")
    if not isinstance(labels, list):
        raise pairs_error
    out = {}
    for entry in labels:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise pairs_error
        name, label = entry
        check_label(label, f"{where}: the label of {name}")
        out[name.replace("\\", "/")] = label
    return out


# Labels lie in [0, MAX_CLASSES) (the manifest schema's limit, so what `dataset` writes `train`
# can build and a runtime can load).


def check_label(label: Any, where: str) -> None:
    """One class label: an integer (not a bool, float or text) in [0, `MAX_CLASSES`)."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise InputError(f"{where} must be an integer class label, got {label!r}")
    if not 0 <= label < MAX_CLASSES:
        raise InputError(f"{where} is {label}; class labels must lie in 0..{MAX_CLASSES - 1}")


def check_labels(labels: np.ndarray, source: str) -> None:
    """Every label of a dataset in [0, `MAX_CLASSES`): what `dataset` writes, `train` reads."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= MAX_CLASSES:
        bad = lo if lo < 0 else hi
        raise InputError(f"{source}: class label {bad} is out of range; labels must lie in 0..{MAX_CLASSES - 1}")


def _resolve_labels(name: str, names: list[str], labels_json, source: str,
                    all_names: Optional[list[str]] = None) -> Optional[np.ndarray]:
    """The labels of `names` (a prefix of `all_names` under --max-images), or None when unlabelled.

    A dataset.json that labels some images but not all, or names files that are not images of
    the dataset (a missing file, a path out of it), is refused: silently dropping every label
    would turn a conditional dataset into an unconditional one.
    """
    if source == "json":
        if labels_json is None:
            return None
        known = set(names if all_names is None else all_names)
        strange = [n for n in labels_json if n not in known]
        if strange:
            raise InputError(f"{name}: dataset.json labels {len(strange)} file(s) that are not images of the dataset "
                             f"(first: {strange[0]!r}); every entry must name an image in it")
        missing = [n for n in names if n not in labels_json]
        if missing:
            raise InputError(f"{name}: dataset.json labels {len(names) - len(missing)} of {len(names)} images (first "
                             f"unlabelled: {missing[0]}); label every image, or write {{\"labels\": null}} for an "
                             f"unconditional dataset")
        return np.asarray([labels_json[n] for n in names], dtype=np.int64)
    if source == "folders":
        tops = [n.split("/", 1)[0] if "/" in n else None for n in names]
        if any(t is None for t in tops):
            return None
        classes = {t: i for i, t in enumerate(sorted(set(tops)))}
        return np.asarray([classes[t] for t in tops], dtype=np.int64)
    return None


# --------------------------------------------------------------------------------------------
# Writing the reference ZIP format.


def archive_name(index: int) -> str:
    """The reference layout: images grouped by thousand, e.g. ``00000/img00000000.png``."""
    idx = f"{index:08d}"
    return f"{idx[:5]}/img{idx}.png"


def resize_square(img: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [C,H,W] -> [C,R,R]: centre-crop to a square, then resize with PIL's Lanczos filter."""
    from PIL import Image

    c, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top: top + s, left: left + s]
    if s == resolution:
        return np.ascontiguousarray(img)
    pil = Image.fromarray(img[0] if c == 1 else img.transpose(1, 2, 0))
    pil = pil.resize((resolution, resolution), Image.LANCZOS)
    arr = np.asarray(pil, dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [C,H,W] -> PNG bytes, uncompressed (compress_level=0) as the reference tool writes."""
    from PIL import Image

    pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def iter_source_images(spec: str, max_images: Optional[int] = None):
    """(count, has_labels, iterator of (uint8 [C,H,W], label or -1)) for the dataset tool.

    Unlike `open_dataset`, sizes need not agree here (the caller may resize); the channel count
    must still be the same for every image, which is checked (headers only) before anything is
    written.
    """
    if max_images is not None and max_images < 1:
        raise InputError(f"max_images must be at least 1, got {max_images}", param="max_images")
    if spec in BUILTIN_SPECS or _is_idx(spec):
        from .idx import read_idx_dataset

        if _is_idx(spec):  # any size here: the dataset tool may pad or resize
            images, labels = read_idx_dataset(spec)
            ds: Dataset = _UncheckedArrays(images, labels, spec)
        else:
            ds = open_dataset(spec)
        count = len(ds) if max_images is None else min(len(ds), max_images)
        return count, ds.has_labels, (ds[i] for i in range(count))
    if os.path.isdir(spec):
        name, names, opener, labels_json, source, stream = _folder_listing(spec)
    elif spec.lower().endswith(".zip") and os.path.isfile(spec):
        name, names, opener, labels_json, source, stream = _zip_listing(spec)
    else:
        open_dataset(spec)  # raises the right InputError
        raise AssertionError("unreachable")
    all_names = names
    if max_images is not None:
        names = names[:max_images]
    labels = _resolve_labels(name, names, labels_json, source, all_names)
    if labels is not None:
        check_labels(labels, name)
    channels = None
    for n in names:
        c = _header_shape(stream, n, f"{name}/{n}")[0]
        if channels is None:
            channels = c
        elif c != channels:
            raise InputError(
                f"{name}: mixed channel counts ({names[0]} has {channels}, {n} has {c}); "
                f"convert all images to greyscale or all to RGB"
            )

    def gen():
        for i, n in enumerate(names):
            yield decode_image(opener(n), f"{name}/{n}"), (-1 if labels is None else int(labels[i]))

    return len(names), labels is not None, gen()


# The comment `write_dataset_zip` puts on its ZIPs: an existing --dest is replaced only when it carries it.
ZIP_COMMENT = b"written by edm-deploy dataset"


def _written_by_us(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.comment == ZIP_COMMENT
    except ZIP_ERRORS:
        return False


def check_zip_arguments(source: str, dest: str, resolution: Optional[int] = None,
                        labels: tuple[str, ...] = ("source", "dest", "resolution", "pad"),
                        pad: Optional[int] = None) -> None:
    """What `write_dataset_zip` checks before any work, with the names to call the arguments by.

    `dest` must be a .zip path in an existing folder, not a folder, and not the source itself
    (symlinks resolved); `resolution` an integer that `check_image_shape` accepts.
    """
    from edm_deploy.runtime.core.fileio import refuse_overwriting_inputs

    source_label, dest_label, resolution_label, pad_label = labels
    if not dest.lower().endswith(".zip"):
        raise InputError(f"{dest_label} must name a .zip file, got {dest}")
    if os.path.isdir(dest):
        raise InputError(f"{dest_label} {dest} is a folder; name the .zip file to write")
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            raise InputError(f"{resolution_label} must be an integer, got {resolution!r}")
        check_image_shape((1, resolution, resolution), resolution_label)
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, int):
            raise InputError(f"{pad_label} must be an integer, got {pad!r}")
        if resolution is None:
            check_image_shape((1, pad, pad), pad_label)
        elif not 1 <= pad <= 4 * MAX_RESOLUTION:
            raise InputError(f"{pad_label} must be between 1 and {4 * MAX_RESOLUTION}, got {pad}")
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    if source not in BUILTIN_SPECS:
        refuse_overwriting_inputs({source_label: source}, {dest_label: dest})
    if os.path.exists(dest) and not _written_by_us(dest):  # a dangling link is written through
        raise InputError(f"{dest_label} {dest} already exists and was not written by edm-deploy dataset; choose "
                         f"another name or delete it")


def write_dataset_zip(
    source: str,
    dest: str,
    resolution: Optional[int] = None,
    max_images: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    pad: Optional[int] = None,
) -> dict:
    """Build a reference-format dataset ZIP from a source spec, atomically (temp file + rename).

    Without `resolution` every image must already share one square power-of-two size; with it,
    each image is centre-cropped to a square and resized (Lanczos). `pad` first centres each image
    on a black square of that side (28x28 MNIST-family images -> 32x32). Returns a summary dict.
    The destination appears only when complete; an error or Ctrl-C leaves no partial file.
    """
    from edm_deploy.runtime.core.fileio import atomic_path, write_target

    check_zip_arguments(source, dest, resolution, pad=pad)
    named, dest = dest, write_target(dest)  # a symlinked dest is written through
    count, has_labels, items = iter_source_images(source, max_images)
    shape = None
    labels: list = []
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for i, (img, label) in enumerate(items):
                if pad is not None:
                    from .idx import pad_to

                    img = pad_to(img[None], pad, source)[0]
                if resolution is not None:
                    img = resize_square(img, resolution)
                if shape is None:
                    shape = img.shape
                    check_image_shape(shape, source)
                elif img.shape != shape:
                    raise InputError(
                        f"{source}: mixed image sizes ({shape[2]}x{shape[1]} and {img.shape[2]}x{img.shape[1]}); "
                        f"pass --resolution N to resize every image"
                    )
                name = archive_name(i)
                zf.writestr(name, encode_png(img))
                labels.append([name, int(label)])
                if progress is not None:
                    progress(i + 1, count)
            if shape is None:
                raise InputError(f"{source}: no images found")
            meta = {"labels": labels if has_labels else None}
            zf.writestr("dataset.json", json.dumps(meta))
            zf.comment = ZIP_COMMENT
    return {"images": len(labels), "shape": list(shape), "labels": has_labels, "dest": named}
