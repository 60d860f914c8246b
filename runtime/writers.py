"""Output writers for sampled images: a PNG tree, one `.npz`, or a grid image, and the run
record and locks that make resuming into them safe.

Every file appears atomically (temporary name + rename; see `runtime.fileio`), so a killed run
never leaves a truncated image under a final name. A rerun with the same settings skips what is
complete, and checks what it counts as complete: a PNG must be a regular file that decodes to an
image of the model's shape, an npz part must load with the right shapes; anything damaged is
redone. PNG encoding runs on worker threads while the next batch is sampled; at most a few
batches are in flight, so memory does not grow with the number of images. The `.npz` writer
stages batches as small part files and assembles the final archive by streaming.

`open_output` is the one entry point: it takes the output's locks (one writer per output, or per
shard of a torchrun run), checks or writes the run record (the settings that made the images,
refusing to mix other settings or a folder this tool did not write), clears stale temporary
files and returns the writer.
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
from typing import Iterator, Optional, Sequence

import numpy as np

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import (
    atomic_path,
    atomic_write_bytes,
    exclusive_lock,
    exclusive_output,
    is_locked,
    lock_path_for,
    remove_stale_temps,
    write_target,
)
from edm_deploy.runtime.jsonio import MAX_RECORD_BYTES, loads_bounded, read_json_file

RUN_RECORD = ".edm-deploy-sample.json"
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # grid suffix -> PIL format


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


def encode_image(image: np.ndarray, fmt: str = "PNG", compress_level: int = 1) -> bytes:
    buffer = io.BytesIO()
    options = {"compress_level": compress_level} if fmt == "PNG" else {"quality": 95}
    to_pil(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


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
        labels = np.full(len(seeds), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        os.makedirs(self.parts_dir, exist_ok=True)  # claim_folder made it; direct library use may not have
        part = os.path.join(self.parts_dir, f"part-{int(seeds[0]):010d}-{len(seeds)}.npz")
        buffer = io.BytesIO()
        np.savez(buffer, images=images, seeds=seeds, labels=labels)
        atomic_write_bytes(part, buffer.getvalue())
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
        if self.scale > 1:
            stacked = stacked.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        grid = make_grid(stacked, self.columns, pad=self.pad)
        atomic_write_bytes(self.path, encode_image(grid, self.format, compress_level=6))


# --------------------------------------------------------------------------------------------
# The run record and the locks: what makes resuming into an output safe.


def _read_record(folder: str) -> tuple[bool, Optional[dict]]:
    """(exists, content or None when unreadable)."""
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.exists(path):
        return False, None
    try:
        data = read_json_file(path, max_bytes=MAX_RECORD_BYTES, what="run record", allow_constants=True)
        return True, data if isinstance(data, dict) else None
    except InputError:  # unreadable, oversized or nested too deeply: a record that matches nothing
        return True, None


def _holds_images(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(tuple(IMAGE_FORMATS)) or (f.startswith("part-") and f.endswith(".npz")) for f in files):
            return True
    return False


def _shard_lock(folder: str, shard: tuple[int, int]) -> str:
    return os.path.join(folder, f".edm-deploy-shard{shard[0]}of{shard[1]}.lock")


def _others_writing(folder: str, own_shard_lock: str) -> bool:
    """Whether another process holds a shard lock of `folder` right now."""
    own = os.path.abspath(own_shard_lock) if own_shard_lock else None
    return any(is_locked(p) for p in glob.glob(os.path.join(folder, ".edm-deploy-shard*.lock"))
               if os.path.abspath(p) != own)


def check_run_record(folder: str, record: dict, others_writing: bool = False) -> None:
    """Refuse to resume into `folder` when it holds output made with other settings.

    Resuming skips seeds whose output exists, so mixing runs (another model, class or sampler
    setting) would silently keep stale images. The first run writes `record`; later runs must
    match. A folder that holds images but no record was not written by this tool and is refused
    rather than mixed into; a record whose folder holds no images (a run that failed before its
    first image) is replaced, unless another process is still writing there.
    """
    exists, previous = _read_record(folder)
    if previous == record:
        return
    if not exists:
        if _holds_images(folder):
            raise InputError(f"{folder} already holds images but no edm-deploy run record, so they cannot be "
                             "resumed safely; choose an empty or new output")
    elif _holds_images(folder) or others_writing:
        changed = sorted(k for k in set(record) | set(previous or {}) if (previous or {}).get(k) != record.get(k))
        raise InputError(
            f"{folder} holds images sampled with other settings ({', '.join(changed) or 'unreadable record'} "
            "differ); use another output or delete it to start over"
        )
    atomic_write_bytes(os.path.join(folder, RUN_RECORD), json.dumps(record, sort_keys=True).encode())


# The ranks of one torchrun run check the record one after another under the folder lock; they
# start together, so a rank waits this long for its turn (the check walks the folder once).
RECORD_CHECK_WAIT_S = 120.0


@contextlib.contextmanager
def claim_folder(folder: str, record: dict, shard: tuple[int, int] = (0, 1)) -> Iterator[None]:
    """Own `folder` as the writer of `shard` for the block, its run record checked first.

    One process writes an unsharded output: it holds the folder lock for the whole run, and is
    refused while any shard of another run is live there. The ranks of a sharded run write the
    same folder side by side: each holds its own shard lock for the run and the folder lock only
    while checking the record (waiting its turn behind the other ranks), and takes its shard lock
    before releasing the folder lock, so a run with other settings arriving next sees it as a
    live writer. Stale temporary files are cleared only when no other writer is live.
    """
    os.makedirs(folder, exist_ok=True)
    sharded = shard[1] > 1
    with contextlib.ExitStack() as run:
        with contextlib.ExitStack() as check:
            check.enter_context(exclusive_lock(lock_path_for(folder), folder,
                                               wait=RECORD_CHECK_WAIT_S if sharded else 0))
            own = _shard_lock(folder, shard) if sharded else ""
            if sharded:
                run.enter_context(exclusive_lock(own, f"{folder} (shard {shard[0]}/{shard[1]})"))
            others = _others_writing(folder, own)
            if others and not sharded:
                raise InputError(f"another edm-deploy process is writing {folder} (a sharded run); wait for it or "
                                 "choose another output")
            check_run_record(folder, record, others_writing=others)
            if not others:
                remove_stale_temps(folder)
            if not sharded:
                run.enter_context(check.pop_all())  # keep the folder lock for the whole run
        yield


def check_output(count: int, *, outdir: Optional[str] = None, npz_path: Optional[str] = None,
                 grid_path: Optional[str] = None, grid_columns: Optional[int] = None, grid_scale: int = 1,
                 image_shape: Optional[tuple[int, int, int]] = None, shard: tuple[int, int] = (0, 1)) -> None:
    """Everything about an output that can fail, checked before any model loads or sample runs.

    `grid_scale` enlarges a grid's images by that integer factor (see `GridWriter`); with the
    model's `image_shape` (H, W, C) known, the grid's pixel size is checked too.
    """
    given = [p for p in (outdir, npz_path, grid_path) if p]
    if len(given) != 1:
        raise InputError("give exactly one output: a folder, an .npz file or a grid image")
    if npz_path and not npz_path.lower().endswith(".npz"):
        raise InputError(f"{npz_path}: an .npz output must end in .npz")
    npz_path = write_target(npz_path) if npz_path else npz_path  # a symlink: what is checked is its target
    grid_path = write_target(grid_path) if grid_path else grid_path
    if outdir:
        check_writable_dir(outdir)
    elif npz_path:
        if os.path.isdir(npz_path):
            raise InputError(f"{npz_path} is a folder; an .npz output needs a file name")
        check_writable_dir(os.path.dirname(os.path.abspath(npz_path)))
    else:
        if shard[1] > 1:
            raise InputError("a grid cannot be sharded; write it from one process")
        GridWriter.check(grid_path, count, grid_columns, grid_scale, image_shape)


@contextlib.contextmanager
def open_output(
    record: dict,
    seeds: Sequence[int],
    *,
    outdir: Optional[str] = None,
    npz_path: Optional[str] = None,
    grid_path: Optional[str] = None,
    subdirs: bool = False,
    workers: int = 2,
    grid_columns: Optional[int] = None,
    grid_scale: int = 1,
    image_shape: Optional[tuple[int, int, int]] = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[object]:
    """The writer for exactly one of `outdir`, `npz_path`, `grid_path`, locked and record-checked.

    `record` describes the settings that make the images (`generate.run_record`); `seeds` are
    the seeds this process will write; `grid_scale` enlarges a grid's images by an integer
    factor. Everything that can be checked is checked here, before any sampling. A symlinked
    `npz_path` or `grid_path` is written through (`fileio.write_target`): the link stays, its
    target receives the output, and the lock and the ``.parts`` folder sit beside the target.
    """
    check_output(len(seeds), outdir=outdir, npz_path=npz_path, grid_path=grid_path, grid_columns=grid_columns,
                 grid_scale=grid_scale, image_shape=image_shape, shard=shard)
    npz_path = write_target(npz_path) if npz_path else npz_path
    grid_path = write_target(grid_path) if grid_path else grid_path
    if grid_path:
        writer = GridWriter(grid_path, len(seeds), columns=grid_columns, scale=grid_scale, image_shape=image_shape)
        with exclusive_output(grid_path):
            yield writer
        return
    if outdir:
        ensure_writable_dir(outdir)
        with claim_folder(outdir, record, shard):
            yield PngTreeWriter(outdir, subdirs=subdirs, workers=workers, image_shape=image_shape)
        return
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
            yield NpzWriter(npz_path, seeds, image_shape=image_shape, record=record)
