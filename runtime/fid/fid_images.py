"""Image sources for FID: a PNG tree, a dataset ZIP, or the `.npz` written by `edm-deploy sample`.

Why these rules: to reproduce the reference `fid.py` number, the *same images* must be picked in
the *same order* as its `ImageFolderDataset`:

* a folder is walked recursively and a ZIP is listed; every file whose extension PIL knows is an
  image; files are sorted by their relative path (so `00000/img00000000.png`, or `000123.png` from
  `sample`, come in seed order); `dataset.json` and other non-image files are ignored;
* with more images than requested, a subset is chosen exactly like the reference's `max_size`:
  ``RandomState(seed % 2**31).shuffle(arange(n))``, keep the first `num`, sort them again;
  with fewer than requested it is an error (the reference refuses too);
* images are uint8; 1-channel images are repeated to 3 channels; the detector gets NCHW at native
  resolution.

Images are read lazily and handed out in batches, so memory stays bounded by the batch size
whatever the image count (the `.npz` reader streams rows straight out of the archive instead of
loading the array). Mixed resolutions are one clear error naming two offending files. Only 8-bit
greyscale ('L') and RGB images are accepted: other PIL modes (palette, alpha, 16-bit) would be
silently misread by the reference and are refused here with a hint to convert them.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Iterator, Optional, Sequence

import numpy as np

from ..core.archives import (
    MAX_IMAGE_FILE_BYTES,
    ZIP_ERRORS,
    check_zip_sizes,
    open_image,
    read_bounded,
)
from ..core.errors import InputError, first_line
from ..core.fileio import check_regular_file

_EXTENSIONS: Optional[frozenset] = None


def image_extensions() -> frozenset:
    """The file extensions PIL can open (lower case, with dot) - the reference's image filter."""
    global _EXTENSIONS
    if _EXTENSIONS is None:
        import PIL.Image

        PIL.Image.init()
        _EXTENSIONS = frozenset(ext.lower() for ext in PIL.Image.EXTENSION)
    return _EXTENSIONS


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def _decode(data: bytes | str, name: str) -> np.ndarray:
    """Decode one image file to HWC uint8 with C in {1, 3}."""
    try:
        with open_image(io.BytesIO(data) if isinstance(data, bytes) else data, name) as img:
            mode = img.mode
            if mode not in ("L", "RGB"):
                raise InputError(
                    f"{name}: image mode {mode!r} is not supported; FID needs 8-bit RGB or greyscale "
                    f"images (convert it, e.g. PIL: img.convert('RGB'))"
                )
            arr = np.asarray(img, dtype=np.uint8)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: cannot read image ({exc})") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


def _to_nchw3(batch_nhwc: np.ndarray) -> np.ndarray:
    """uint8 NHWC with 1 or 3 channels -> contiguous uint8 NCHW RGB (grey repeated, as the reference)."""
    if batch_nhwc.shape[3] == 1:
        batch_nhwc = np.repeat(batch_nhwc, 3, axis=3)
    return np.ascontiguousarray(batch_nhwc.transpose(0, 3, 1, 2))


class ImageSource:
    """An ordered, indexable collection of images that can be streamed in batches."""

    path: str
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        """A short human name for image `index` (used in messages and --min-of labels)."""
        return self.names[index]

    def _iter_images(self, indices: Sequence[int]) -> Iterator[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_batches(self, indices: Sequence[int], batch: int) -> Iterator[np.ndarray]:
        """Yield uint8 NCHW RGB batches of at most `batch` images, in the order of `indices`."""
        if batch < 1:
            raise InputError(f"batch size must be at least 1, got {batch}")
        first_shape: Optional[tuple[int, int]] = None
        first_name = ""
        pending: list[np.ndarray] = []
        for index, img in zip(indices, self._iter_images(indices)):
            if img.ndim != 3 or img.shape[2] not in (1, 3):
                raise InputError(f"{self.describe(index)}: expected 1 or 3 channels, got shape {list(img.shape)}")
            hw = (int(img.shape[0]), int(img.shape[1]))
            if first_shape is None:
                first_shape, first_name = hw, self.describe(index)
            elif hw != first_shape:
                raise InputError(
                    f"mixed image sizes in {self.path}: {first_name} is {first_shape[1]}x{first_shape[0]} "
                    f"but {self.describe(index)} is {hw[1]}x{hw[0]}; FID needs all images at one resolution"
                )
            if img.shape[2] == 1:
                img = np.repeat(img, 3, axis=2)
            pending.append(img)
            if len(pending) == batch:
                yield _to_nchw3(np.stack(pending))
                pending = []
        if pending:
            yield _to_nchw3(np.stack(pending))


class FolderSource(ImageSource):
    """A directory tree of image files, sorted by relative path (recursive, like the reference)."""

    def __init__(self, path: str) -> None:
        self.path = path
        names = []
        for root, _dirs, files in os.walk(path):
            for fname in files:
                rel = os.path.relpath(os.path.join(root, fname), start=path)
                if _is_image_name(rel):
                    check_regular_file(os.path.join(root, fname), "image")
                    names.append(rel)
        self.names = sorted(names)

    def _iter_images(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        for i in indices:
            yield _decode(os.path.join(self.path, self.names[i]), os.path.join(self.path, self.names[i]))


class ZipSource(ImageSource):
    """A dataset ZIP (dataset_tool format); `dataset.json` and directories are ignored."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                check_zip_sizes(zf, path)  # a ZIP bomb is refused from its directory, before inflating
                self.names = sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image_name(n))
        except ZIP_ERRORS as exc:
            raise InputError(f"{path}: not a valid ZIP file ({first_line(exc)})") from exc

    def describe(self, index: int) -> str:
        return f"{self.path}:{self.names[index]}"

    def _iter_images(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as zf:
            for i in indices:
                try:
                    with zf.open(self.names[i]) as f:
                        data = read_bounded(f, MAX_IMAGE_FILE_BYTES, self.describe(i))
                except ZIP_ERRORS as exc:
                    raise InputError(f"{self.describe(i)}: cannot read it ({first_line(exc)})") from exc
                yield _decode(data, self.describe(i))


class NpzSource(ImageSource):
    """The `images` array (uint8 NHWC) of an `edm-deploy sample` .npz, streamed row by row.

    The npy header inside the archive is parsed by hand so rows can be read in batch-sized chunks
    without ever materialising the whole array (50,000 ImageNet-64 images are 600 MB).
    """

    KEY = "images"

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                members = {os.path.splitext(n)[0]: n for n in zf.namelist()}
                if self.KEY not in members:
                    raise InputError(
                        f"{path}: no 'images' array (found {sorted(members) or 'nothing'}); expected the "
                        f".npz written by `edm-deploy sample` (uint8 images [N, H, W, C])"
                    )
                self._member = members[self.KEY]
                with zf.open(self._member) as f:
                    shape, dtype, self._offset = self._read_header(f)
                self.seeds: Optional[np.ndarray] = None
                if "seeds" in members:
                    with np.load(path, allow_pickle=False) as data:
                        seeds = np.asarray(data["seeds"])
                    if seeds.shape == (shape[0],):
                        self.seeds = seeds
        except zipfile.BadZipFile as exc:
            raise InputError(f"{path}: not a valid .npz file ({exc})") from exc
        if dtype != np.uint8:
            raise InputError(f"{path}: 'images' has dtype {dtype}; FID needs uint8 images [N, H, W, C]")
        if len(shape) == 3:
            shape = (*shape, 1)
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise InputError(
                f"{path}: 'images' has shape {list(shape)}; expected uint8 NHWC with 1 or 3 channels"
            )
        self.shape = tuple(int(s) for s in shape)
        self.names = [f"images[{i}]" for i in range(self.shape[0])]

    def _read_header(self, f) -> tuple[tuple, np.dtype, int]:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
        except ValueError as exc:
            raise InputError(f"{self.path}: 'images' is not a valid .npy array ({exc})") from exc
        if fortran:
            raise InputError(f"{self.path}: 'images' is stored in Fortran order; re-save it with np.ascontiguousarray")
        return shape, dtype, f.tell()

    def __len__(self) -> int:
        return self.shape[0]

    def describe(self, index: int) -> str:
        if self.seeds is not None:
            return f"{self.path}:images[{index}] (seed {int(self.seeds[index])})"
        return f"{self.path}:images[{index}]"

    def iter_batches(self, indices: Sequence[int], batch: int) -> Iterator[np.ndarray]:
        if batch < 1:
            raise InputError(f"batch size must be at least 1, got {batch}")
        _, h, w, c = self.shape
        row = h * w * c
        indices = np.asarray(indices, dtype=np.int64)
        with zipfile.ZipFile(self.path) as zf, zf.open(self._member) as f:
            pos = 0  # next row the stream would deliver
            f.seek(self._offset)
            for start in range(0, len(indices), batch):
                chunk = indices[start:start + batch]
                out = np.empty((len(chunk), h, w, c), dtype=np.uint8)
                k = 0
                while k < len(chunk):
                    # read the longest run of consecutive rows starting at chunk[k]
                    run = 1
                    while k + run < len(chunk) and chunk[k + run] == chunk[k] + run:
                        run += 1
                    if chunk[k] != pos:
                        f.seek(self._offset + int(chunk[k]) * row)
                    data = f.read(run * row)
                    if len(data) != run * row:
                        raise InputError(f"{self.path}: 'images' is truncated")
                    out[k:k + run] = np.frombuffer(data, dtype=np.uint8).reshape(run, h, w, c)
                    pos = int(chunk[k]) + run
                    k += run
                yield _to_nchw3(out)


def open_images(path: str) -> ImageSource:
    """Open a PNG tree (folder), a dataset ZIP or a `sample` .npz as an `ImageSource`."""
    if os.path.isdir(path):
        source: ImageSource = FolderSource(path)
    elif os.path.isfile(path):
        if path.lower().endswith(".npz"):
            source = NpzSource(path)
        elif zipfile.is_zipfile(path):
            source = ZipSource(path)
        else:
            raise InputError(f"{path}: not a folder, a ZIP or an .npz of images")
    else:
        raise InputError(f"images not found: {path}")
    return source


def select_indices(total: int, num: Optional[int], seed: int = 0, source: str = "images") -> np.ndarray:
    """Indices of the images to use: all, or the reference's seeded subset; too few is an error."""
    if total < 2:
        raise InputError(f"{source} has {total} image(s); FID needs at least 2")
    if num is None:
        num = total
    if num < 2:
        raise InputError(f"FID needs at least 2 images, got num {num}", param="num")
    if total < num:
        raise InputError(
            f"{source} has {total} images but {num} were requested; generate more, or pass --num {total} "
            f"(the reference protocol uses 50000)"
        )
    idx = np.arange(total, dtype=np.int64)
    if total > num:
        np.random.RandomState(int(seed) % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx


def split_blocks(total: int, parts: int, num: int, source: str = "images") -> list[np.ndarray]:
    """`parts` consecutive blocks of `num` images (seed ranges when files are named by seed)."""
    if parts < 1:
        raise InputError(f"min_of must be at least 1, got {parts}", param="min_of")
    if total < parts * num:
        raise InputError(
            f"{source} has {total} images, fewer than the {parts} x {num} needed to split it into "
            f"{parts} sets of --num {num}"
        )
    return [np.arange(k * num, (k + 1) * num, dtype=np.int64) for k in range(parts)]
