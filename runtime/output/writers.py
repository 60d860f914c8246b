"""Output writers for sampled images: a PNG tree, one `.npz`, or a grid image.

Every file appears atomically (temporary name + rename; see `runtime.core.fileio`), so a killed run
never leaves a truncated image under a final name. A rerun with the same settings skips what is
complete, and checks what it counts as complete: a PNG must be a regular file that decodes to an
image of the model's shape, an npz part must load with the right shapes; anything damaged is
redone. PNG encoding runs on worker threads while the next batch is sampled; at most a few
batches are in flight, so memory does not grow with the number of images. The `.npz` writer
stages batches as small part files and assembles the final archive by streaming.

Each format is declared once in `OUTPUT_KINDS` (its `sample` flag, its checks, how it is
opened, its bytes for one batch); every writer follows the `ImageWriter` protocol. Outputs are
given as ``{kind: path}``; `open_output` is the one entry point for files: it takes the
output's locks and checks the run record (`runtime.output.run_record`), and returns the writer;
`encode_output` gives one batch as bytes (what a server answers). A new format is a writer
class and one `OutputKind` entry.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import shutil
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.fileio import (
    atomic_path,
    atomic_write_bytes,
    exclusive_output,
    refuse_foreign_file,
    write_target,
)
from ..core.jsonio import MAX_RECORD_BYTES, loads_bounded
from ..core.version import __version__
from . import run_record
from .run_record import RUN_RECORD  # noqa: F401  (the record's name, as callers know it)

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # grid suffix -> PIL format
# A grid names its maker in its EXIF Software tag (PNG, JPEG and WebP all carry EXIF), which is how
# a rerun tells its own earlier grid, which it may replace, from an image it must not touch.
EXIF_SOFTWARE = 0x0131
SOFTWARE = "edm-deploy"


def ensure_writable_dir(path: str) -> None:
    """Create `path` if needed and prove we can write into it, with one clear error otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot use {path} as an output folder: it is a file")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise InputError(f"cannot create {path}: {parent} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"")
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write to {path}: {exc.strerror or exc}") from exc


def check_writable_dir(path: str) -> None:
    """What `ensure_writable_dir` will need, checked without creating anything."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise InputError(f"cannot use {path} as an output folder: it is a file")
    ancestor = target
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise InputError(f"cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {path}: {ancestor} is not writable")


def to_pil(image: np.ndarray):
    from PIL import Image

    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise InputError(f"images must be HxWx1 or HxWx3 uint8, got shape {image.shape}")
    if image.shape[2] == 1:
        return Image.fromarray(image[:, :, 0], "L")
    return Image.fromarray(image, "RGB")


def encode_image(image: np.ndarray, fmt: str = "PNG", compress_level: int = 1, signed: bool = False) -> bytes:
    """`image` encoded as `fmt`; `signed` names edm-deploy as its maker (`written_by_us`)."""
    from PIL import Image

    buffer = io.BytesIO()
    options: dict[str, Any] = {"compress_level": compress_level} if fmt == "PNG" else {"quality": 95}
    if signed:
        exif = Image.Exif()
        exif[EXIF_SOFTWARE] = f"{SOFTWARE} {__version__}"
        options["exif"] = exif
    to_pil(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def written_by_us(path: str) -> bool:
    """Whether the image at `path` names edm-deploy as its maker (a grid it wrote); never raises."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return str(img.getexif().get(EXIF_SOFTWARE, "")).split(" ")[0] == SOFTWARE
    except Exception:  # not an image, unreadable, a decompression bomb: not ours
        return False


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    return encode_image(image, "PNG", compress_level)


def image_format_for(path: str) -> str:
    """The PIL format an image path's suffix asks for; an unknown suffix is one clear error."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise InputError(f"{path}: an image file must end in {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[ext]


def is_valid_image(path: str, shape: Optional[tuple[int, int, int]]) -> bool:
    """A regular file that decodes completely, with the expected (H, W, C) when given."""
    from PIL import Image

    try:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return False
        with Image.open(path) as img:
            img.load()
            if shape is None:
                return True
            channels = {"L": 1, "RGB": 3}.get(img.mode)
            return channels == shape[2] and img.size == (shape[1], shape[0])
    except Exception:  # truncated, not an image, unreadable: not done
        return False


class PngTreeWriter:
    """`{seed:06d}.png` files, optionally in one folder per 1000 seeds (`--subdirs`)."""

    def __init__(self, outdir: str, subdirs: bool = False, workers: int = 2, max_pending: int = 3,
                 image_shape: Optional[tuple[int, int, int]] = None):
        ensure_writable_dir(outdir)
        self.outdir = outdir
        self.subdirs = subdirs
        self.image_shape = image_shape
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="png")
        self.pending: list[Future] = []
        self.max_pending = max(max_pending, workers + 1)  # keep every worker busy
        self.written = 0

    def path_for(self, seed: int) -> str:
        if self.subdirs:
            return os.path.join(self.outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")
        return os.path.join(self.outdir, f"{seed:06d}.png")

    def is_done(self, seed: int) -> bool:
        """Complete and undamaged; a damaged file is removed so the seed is sampled again."""
        path = self.path_for(seed)
        if not os.path.lexists(path):
            return False
        if os.path.isdir(path) and not os.path.islink(path):
            raise InputError(f"{path} is a folder, not an image; move it away to sample seed {seed} there")
        if is_valid_image(path, self.image_shape):
            return True
        os.unlink(path)
        return False

    def _write_batch(self, images: np.ndarray, seeds: Sequence[int]) -> int:
        for image, seed in zip(images, seeds):
            path = self.path_for(int(seed))
            if self.subdirs:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(path, encode_png(image))
        return len(seeds)

    def submit(self, images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None) -> None:
        # Bound the queue: wait for the oldest batch before queueing more than max_pending.
        while len(self.pending) >= self.max_pending:
            self.written += self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._write_batch, images, list(seeds)))

    def close(self) -> None:
        try:
            for fut in self.pending:
                self.written += fut.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        """After a failure: finish the images already queued (each is complete), then stop."""
        self.pool.shutdown(wait=True)
        self.pending = []


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def parts_dir_for(npz_path: str) -> str:
    return npz_path + ".parts"


class NpzWriter:
    """One `.npz` with `images` (uint8 NHWC), `seeds` and `labels` (-1 when unconditional).

    Batches are staged under ``<file>.parts/`` (each part atomic, so a rerun resumes) and the
    archive is streamed together at the end in the requested seed order.
    """

    def __init__(self, path: str, seeds: Sequence[int], image_shape: Optional[tuple[int, int, int]] = None,
                 record: Optional[dict] = None):
        directory = os.path.dirname(os.path.abspath(path))
        ensure_writable_dir(directory)
        if os.path.isdir(path):
            raise InputError(f"{path} is a folder; an .npz output needs a file name")
        self.path = path
        self.record = record  # stored in the archive, so a finished file still says what made it
        self.parts_dir = parts_dir_for(path)
        self.order = [int(s) for s in seeds]
        self.image_shape = image_shape
        self.done: dict[int, str] = {}
        for part in glob.glob(os.path.join(self.parts_dir, "part-*.npz")):
            seeds_in = self._valid_part(part)
            if seeds_in is None:
                os.unlink(part)  # damaged or foreign: its seeds are sampled again
                continue
            for s in seeds_in:
                self.done[s] = part
        self.written = 0

    def _valid_part(self, part: str) -> Optional[list[int]]:
        try:
            with np.load(part) as data:
                images, seeds, labels = data["images"], data["seeds"], data["labels"]
                ok = (images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(seeds) == len(labels)
                      and (self.image_shape is None or tuple(images.shape[1:]) == tuple(self.image_shape)))
                return [int(s) for s in seeds.tolist()] if ok else None
        except Exception:
            return None

    def is_done(self, seed: int) -> bool:
        return int(seed) in self.done

    def submit(self, images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None) -> None:
        seeds = np.asarray(seeds, dtype=np.int64)
        os.makedirs(self.parts_dir, exist_ok=True)  # claim_folder made it; direct library use may not have
        part = os.path.join(self.parts_dir, f"part-{int(seeds[0]):010d}-{len(seeds)}.npz")
        atomic_write_bytes(part, encode_npz(images, seeds, labels))
        for s in seeds.tolist():
            self.done[int(s)] = part
        self.written += len(seeds)

    def close(self) -> None:
        missing = [s for s in self.order if s not in self.done]
        if missing or not self.order:
            return  # incomplete (interrupted): keep the parts for the next run
        parts = sorted(set(self.done.values()))
        index: dict[int, tuple[str, int]] = {}
        shape = None
        for part in parts:
            with np.load(part) as data:
                shape = data["images"].shape[1:]
                for i, s in enumerate(data["seeds"].tolist()):
                    index[int(s)] = (part, i)
        labels = np.empty(len(self.order), dtype=np.int64)
        with atomic_path(self.path) as tmp:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
                with zf.open("images.npy", "w", force_zip64=True) as f:
                    header = {"descr": "|u1", "fortran_order": False, "shape": (len(self.order), *shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    cache_part, cache = None, None
                    for n, seed in enumerate(self.order):
                        part, i = index[seed]
                        if part != cache_part:
                            with np.load(part) as data:
                                cache = {"images": data["images"], "labels": data["labels"]}
                            cache_part = part
                        f.write(np.ascontiguousarray(cache["images"][i]).tobytes())
                        labels[n] = cache["labels"][i]
                zf.writestr("seeds.npy", _npy_bytes(np.asarray(self.order, dtype=np.int64)))
                zf.writestr("labels.npy", _npy_bytes(labels))
                if self.record is not None:
                    zf.writestr("record.npy", _npy_bytes(np.asarray(json.dumps(self.record, sort_keys=True))))
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # parts, record and any temp file a killed run left

    def abort(self) -> None:
        """After a failure: keep the finished parts, so the next run resumes; with none, no folder."""
        if not glob.glob(os.path.join(self.parts_dir, "part-*.npz")):
            shutil.rmtree(self.parts_dir, ignore_errors=True)


def encode_npz(images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None) -> bytes:
    """One `.npz` of a batch: ``images`` (uint8 NHWC), ``seeds``, ``labels`` (-1 when unconditional)."""
    seeds = np.asarray(seeds, dtype=np.int64)
    labels = np.full(len(seeds), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, seeds=seeds, labels=labels)
    return buffer.getvalue()


def npz_record(path: str) -> tuple[Optional[dict], list[int]]:
    """(the run record stored in a finished `.npz`, or None; its seeds)."""
    try:
        with np.load(path) as data:
            seeds = [int(s) for s in data["seeds"].tolist()] if "seeds" in data.files else []
            record = (loads_bounded(str(data["record"]), path, max_bytes=MAX_RECORD_BYTES, what="run record",
                                    allow_constants=True)
                      if "record" in data.files else None)
    except Exception:  # not an npz this tool can read (or its record is unreadable, oversized, too deep)
        return None, []
    return record, seeds


class FinishedNpz:
    """A finished `.npz` of this very run: every seed is done, nothing is written."""

    def __init__(self, path: str, seeds: Sequence[int]):
        self.path, self.seeds, self.written = path, set(seeds), 0

    def is_done(self, seed: int) -> bool:
        return int(seed) in self.seeds

    def submit(self, images, seeds, labels=None) -> None:
        raise AssertionError("a finished .npz takes no images")  # unreachable: every seed is done

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, row-major, `columns` wide."""
    n, h, w, c = images.shape
    columns = min(columns or int(math.ceil(math.sqrt(n))), n)
    rows = int(math.ceil(n / columns))
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def encode_grid(images: np.ndarray, columns: Optional[int] = None, scale: int = 1, fmt: str = "PNG",
                pad: int = 1) -> bytes:
    """One grid image of uint8 NHWC images, each enlarged ``scale`` times (nearest neighbour, so
    pixels stay exact) and tiled ``columns`` wide, in the PIL format ``fmt``; signed as edm-deploy's
    (`written_by_us`), so a rerun may replace its own grid file and no other image."""
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return encode_image(make_grid(images, columns, pad=pad), fmt, compress_level=6, signed=True)


def grid_size(count: int, image_hw: tuple[int, int], columns: Optional[int] = None, scale: int = 1,
              pad: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of the grid `make_grid` builds from `count` images scaled by `scale`."""
    h, w = image_hw[0] * scale, image_hw[1] * scale
    columns = min(columns or int(math.ceil(math.sqrt(count))), count)
    rows = int(math.ceil(count / columns))
    return rows * (h + pad) + pad, columns * (w + pad) + pad


class GridWriter:
    """Collects images and writes them as one grid image at the end (small n only).

    The file format follows the suffix (`.png`, `.jpg`, `.webp`). `scale` enlarges every image
    by an integer factor (nearest neighbour, so pixels stay exact): 64 digits of 8x8 make a
    73x73 grid at scale 1, 521x521 at scale 8.
    """

    MAX_IMAGES = 4096
    MAX_SCALE = 64
    MAX_SIDE = 16383  # pixels: the largest WebP (and far beyond any screen); PNG/JPEG follow the same bound

    def __init__(self, path: str, count: int, columns: Optional[int] = None, scale: int = 1, pad: int = 1,
                 image_shape: Optional[tuple[int, int, int]] = None):
        self.format = self.check(path, count, columns, scale, image_shape, pad)
        ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
        self.path, self.columns, self.scale, self.pad = path, columns, int(scale), pad
        self.images: dict[int, np.ndarray] = {}
        self.order: list[int] = []
        self.written = 0

    @classmethod
    def check(cls, path: str, count: int, columns: Optional[int] = None, scale: int = 1,
              image_shape: Optional[tuple[int, int, int]] = None, pad: int = 1) -> str:
        """Validate a grid output without creating anything; returns its image format.

        With `image_shape` (H, W, C) known, the grid's size in pixels is bounded too, before any
        image is sampled.
        """
        if count > cls.MAX_IMAGES:
            raise InputError(f"a grid holds up to {cls.MAX_IMAGES} images; write {count} to a folder instead")
        if columns is not None and not 1 <= columns <= max(count, 1):
            raise InputError(f"grid_cols must lie in [1, {count}] for {count} images, got {columns}", param="grid_cols")
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or not 1 <= scale <= cls.MAX_SCALE:
            raise InputError(f"grid_scale must be an integer from 1 to {cls.MAX_SCALE}, got {scale!r}",
                             param="grid_scale")
        if image_shape is not None and count > 0:
            height, width = grid_size(count, (image_shape[0], image_shape[1]), columns, int(scale), pad)
            if max(height, width) > cls.MAX_SIDE:
                raise InputError(f"grid_scale {scale} makes a {width}x{height} px grid of {count} images; at most "
                                 f"{cls.MAX_SIDE} px a side: use a smaller scale or write a folder",
                                 param="grid_scale")
        fmt = image_format_for(path)
        if os.path.isdir(path):
            raise InputError(f"{path} is a folder; a grid needs a file name")
        check_writable_dir(os.path.dirname(os.path.abspath(path)))
        refuse_foreign_file(path, "grid_path", written_by_us, "a grid image")
        return fmt

    def is_done(self, seed: int) -> bool:
        return False

    def submit(self, images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None) -> None:
        for image, seed in zip(images, seeds):
            self.images[int(seed)] = image
            self.order.append(int(seed))
        self.written += len(seeds)

    def abort(self) -> None:
        """After a failure: write nothing (a grid with holes would look complete)."""
        self.images.clear()

    def close(self) -> None:
        if not self.images:
            return
        stacked = np.stack([self.images[s] for s in self.order])
        atomic_write_bytes(self.path, encode_grid(stacked, self.columns, self.scale, self.format, self.pad))


def holds_images(folder: str) -> bool:
    """Whether `folder` holds anything a writer here produces (images, npz parts)."""
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(tuple(IMAGE_FORMATS)) or (f.startswith("part-") and f.endswith(".npz")) for f in files):
            return True
    return False


def claim_folder(folder: str, record: dict, shard: tuple[int, int] = (0, 1)) -> Any:
    """`run_record.claim_folder` for the folders these writers fill (what counts as images is theirs)."""
    return run_record.claim_folder(folder, record, shard, holds_images=holds_images)


# --------------------------------------------------------------------------------------------
# The output formats: one declaration each (what the CLI offers, how it is checked and opened)


class ImageWriter(Protocol):
    """What `generate.sample_into` drives: every output format's writer."""

    def is_done(self, seed: int) -> bool:
        """Whether the image of `seed` is already there, whole (a resumed run skips it)."""

    def submit(self, images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None) -> None:
        """Write uint8 NHWC images of `seeds` (atomically, perhaps on worker threads)."""

    def close(self) -> None:
        """Finish: wait for pending writes, assemble what is assembled at the end."""

    def abort(self) -> None:
        """After a failure: keep what is whole, write nothing partial."""


@dataclass(frozen=True)
class OutputOptions:
    """How a run's images are laid out, whatever the format (each format reads what concerns it)."""

    count: int
    image_shape: Optional[tuple[int, int, int]] = None   # (H, W, C) of the model
    subdirs: bool = False                                # PNG tree: one folder per 1000 seeds
    workers: int = 2                                     # PNG tree: encoding threads
    grid_columns: Optional[int] = None                   # grid: width in images
    grid_scale: int = 1                                  # grid: pixels per image pixel
    shard: tuple[int, int] = (0, 1)                      # this process's shard of a torchrun run


@dataclass(frozen=True)
class OutputKind:
    """One output format: its `sample` flag, its checks, how it is opened, and one batch as bytes."""

    param: str                                       # the `sample` parameter that gives its path
    flag: str                                        # the `sample` flag
    metavar: str                                     # DIR (a folder) or FILE
    help: str
    media_type: str                                  # of `encode`'s bytes
    check: Callable[[str, OutputOptions], None]      # everything that can fail before sampling
    open: Callable[[str, dict, Sequence[int], OutputOptions], Any]  # context manager -> ImageWriter
    encode: Callable[[np.ndarray, Sequence[int], Optional[np.ndarray], OutputOptions], bytes]
    shards_own_file: bool = False                    # each shard of a torchrun run writes a file of its own
    companions: Callable[[str], dict[str, str]] = lambda path: {}  # what else it writes beside the path, by what

    @property
    def is_folder(self) -> bool:
        return self.metavar == "DIR"


def _no_grid_options(o: OutputOptions, output: str) -> None:
    """Grid options shape a grid image only; given with another output they would do nothing."""
    given = [name for name, value in (("grid_scale", o.grid_scale != 1), ("grid_cols", o.grid_columns is not None))
             if value]
    if given:
        raise InputError(f"{' and '.join(given)} {'shape' if len(given) > 1 else 'shapes'} a grid image (grid_path); "
                         f"{output} has no grid: drop "
                         f"{'them' if len(given) > 1 else 'it'}", param=(*given, "grid_path"))


def _check_tree(outdir: str, o: OutputOptions) -> None:
    _no_grid_options(o, "a folder of PNGs")
    check_writable_dir(outdir)


def _check_npz(npz_path: str, o: OutputOptions) -> None:
    _no_grid_options(o, "an .npz")
    if not npz_path.lower().endswith(".npz"):
        raise InputError(f"{npz_path}: an .npz output must end in .npz")
    if os.path.isdir(npz_path):
        raise InputError(f"{npz_path} is a folder; an .npz output needs a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(npz_path)))


def _check_grid(grid_path: str, o: OutputOptions) -> None:
    if o.shard[1] > 1:
        raise InputError("a grid cannot be sharded; write it from one process")
    GridWriter.check(grid_path, o.count, o.grid_columns, o.grid_scale, o.image_shape)


@contextlib.contextmanager
def _open_tree(outdir: str, record: dict, seeds: Sequence[int], o: OutputOptions) -> Iterator[ImageWriter]:
    ensure_writable_dir(outdir)
    with claim_folder(outdir, record, o.shard):
        yield PngTreeWriter(outdir, subdirs=o.subdirs, workers=o.workers, image_shape=o.image_shape)


@contextlib.contextmanager
def _open_npz(npz_path: str, record: dict, seeds: Sequence[int], o: OutputOptions) -> Iterator[ImageWriter]:
    with exclusive_output(npz_path):
        if os.path.exists(npz_path):
            # A finished file: the same run finds nothing to do; anything else would replace it.
            previous, done = npz_record(npz_path)
            if previous != record or not set(seeds) <= set(done):
                what = "was not written by edm-deploy sample" if previous is None else (
                    "holds images sampled with other settings" if previous != record else "holds other seeds")
                raise InputError(f"{npz_path} already exists and {what}; choose another output or delete it")
            yield FinishedNpz(npz_path, done)
            return
        with claim_folder(parts_dir_for(npz_path), record):
            yield NpzWriter(npz_path, seeds, image_shape=o.image_shape, record=record)


@contextlib.contextmanager
def _open_grid(grid_path: str, record: dict, seeds: Sequence[int], o: OutputOptions) -> Iterator[ImageWriter]:
    writer = GridWriter(grid_path, len(seeds), columns=o.grid_columns, scale=o.grid_scale, image_shape=o.image_shape)
    with exclusive_output(grid_path):
        yield writer


def _encode_png(images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray], o: OutputOptions) -> bytes:
    if len(images) != 1:
        raise InputError(f"a PNG holds one image, got {len(images)}; use the grid or npz format for several")
    return encode_png(images[0])


def _encode_npz(images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray], o: OutputOptions) -> bytes:
    return encode_npz(images, seeds, labels)


def _encode_grid(images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray], o: OutputOptions) -> bytes:
    return encode_grid(images, o.grid_columns, o.grid_scale)


OUTPUT_KINDS: dict[str, OutputKind] = {
    "png": OutputKind(param="outdir", flag="--outdir", metavar="DIR", help="Write one PNG per seed here.",
                      media_type="image/png", check=_check_tree, open=_open_tree, encode=_encode_png),
    "npz": OutputKind(param="npz_path", flag="--npz", metavar="FILE",
                      help="Write all images to one .npz (uint8 NHWC + seeds + labels).",
                      media_type="application/octet-stream", check=_check_npz, open=_open_npz, encode=_encode_npz,
                      shards_own_file=True, companions=lambda path: {"its parts folder": parts_dir_for(path)}),
    "grid": OutputKind(param="grid_path", flag="--grid", metavar="FILE",
                       help="Write one grid image (.png, .jpg or .webp).", media_type="image/png", check=_check_grid,
                       open=_open_grid, encode=_encode_grid),
}


def shard_path(path: str, rank: int, world: int) -> str:
    """The file of shard ``rank`` of ``world`` for a format whose shards each write their own."""
    root, ext = os.path.splitext(path)
    return f"{root}.shard{rank}of{world}{ext}"


def outputs_for_shard(outputs: Mapping[str, Optional[str]], shard: tuple[int, int] = (0, 1)) -> dict[str, str]:
    """The outputs given (``{kind: path}``, unset ones dropped) as shard (rank, world) writes them."""
    rank, world = shard
    return {k: shard_path(p, rank, world) if OUTPUT_KINDS[k].shards_own_file and world > 1 else p
            for k, p in outputs.items() if p}


def written_paths(outputs: Mapping[str, str]) -> dict[str, str]:
    """Every path the outputs write, named by the flag that gives it (for `fileio.refuse_overwriting_inputs`)."""
    out: dict[str, str] = {}
    for k, path in outputs.items():
        kind = OUTPUT_KINDS[k]
        out[kind.flag] = path
        out.update({f"{kind.flag} ({what})": p for what, p in kind.companions(path).items()})
    return out


def _the_output(outputs: Mapping[str, Optional[str]]) -> tuple[OutputKind, str]:
    """The one output given, a symlink resolved to its target (`fileio.write_target`)."""
    unknown = [k for k in outputs if k not in OUTPUT_KINDS]
    if unknown:
        raise InputError(f"unknown output kind {unknown[0]!r}; choose one of {', '.join(OUTPUT_KINDS)}")
    given = [(OUTPUT_KINDS[k], p) for k, p in outputs.items() if p]
    if len(given) != 1:
        raise InputError("give exactly one output: " + ", ".join(f"{k.flag} {k.metavar}" for k in OUTPUT_KINDS.values()),
                         param=tuple(k.param for k in OUTPUT_KINDS.values()))
    kind, path = given[0]
    return kind, path if kind.is_folder else write_target(path)


def check_output(count: int, outputs: Mapping[str, Optional[str]], *, grid_columns: Optional[int] = None,
                 grid_scale: int = 1, image_shape: Optional[tuple[int, int, int]] = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
    """Everything about an output that can fail, checked before any model loads or sample runs.

    ``outputs`` is ``{kind: path}`` with exactly one path set (kinds: `OUTPUT_KINDS`).
    `grid_scale` enlarges a grid's images by that integer factor (see `GridWriter`); with the
    model's `image_shape` (H, W, C) known, the grid's pixel size is checked too.
    """
    kind, path = _the_output(outputs)
    kind.check(path, OutputOptions(count, image_shape, grid_columns=grid_columns, grid_scale=grid_scale, shard=shard))


def encode_output(kind: str, images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None, *,
                  grid_columns: Optional[int] = None, grid_scale: int = 1) -> tuple[bytes, str]:
    """(bytes, media type) of uint8 NHWC ``images`` in the format ``kind`` of `OUTPUT_KINDS`, as its files hold them."""
    if kind not in OUTPUT_KINDS:
        raise InputError(f"unknown output kind {kind!r}; choose one of {', '.join(OUTPUT_KINDS)}")
    spec = OUTPUT_KINDS[kind]
    return spec.encode(images, seeds, labels, OutputOptions(len(images), grid_columns=grid_columns,
                                                            grid_scale=grid_scale)), spec.media_type


@contextlib.contextmanager
def open_output(
    record: dict,
    seeds: Sequence[int],
    outputs: Mapping[str, Optional[str]],
    *,
    subdirs: bool = False,
    workers: int = 2,
    grid_columns: Optional[int] = None,
    grid_scale: int = 1,
    image_shape: Optional[tuple[int, int, int]] = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[ImageWriter]:
    """The writer for the one output of ``outputs`` (``{kind: path}``), locked and record-checked.

    `record` describes the settings that make the images (`generate.run_record`); `seeds` are
    the seeds this process will write; `grid_scale` enlarges a grid's images by an integer
    factor. Everything that can be checked is checked here, before any sampling. A symlinked
    file output is written through (`fileio.write_target`): the link stays, its target receives
    the output, and the lock and the ``.parts`` folder sit beside the target.
    """
    kind, path = _the_output(outputs)
    options = OutputOptions(len(seeds), image_shape, subdirs, workers, grid_columns, grid_scale, shard)
    kind.check(path, options)
    with kind.open(path, record, seeds, options) as writer:
        yield writer
