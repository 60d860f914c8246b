"""Output writers for sampled images: a PNG tree, one `.npz`, or a grid image.

Every file appears atomically (temporary name + rename), so a killed run never leaves a
truncated image, and a rerun with the same arguments skips what is complete (`is_done`).
PNG encoding runs on worker threads while the next batch is sampled; at most a few batches are
in flight, so memory does not grow with the number of images. The `.npz` writer stages batches
as small part files and assembles the final archive by streaming, for the same two reasons.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import shutil
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.fileio import atomic_write_bytes, remove_stale_temps


def ensure_writable_dir(path: str) -> None:
    """Create `path` if needed and prove we can write into it, with one clear error otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"")
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write to {path}: {exc.strerror or exc}") from exc


RUN_RECORD = ".edm-deploy-sample.json"


def check_run_record(folder: str, record: dict) -> None:
    """Refuse to resume into `folder` when it holds output made with other settings.

    Resuming skips seeds whose output exists, so mixing runs (another model, class or sampler
    setting) would silently keep stale images. The first run writes `record`; later runs must match.
    """
    path = os.path.join(folder, RUN_RECORD)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != record:
            changed = sorted(k for k in set(record) | set(previous or {}) if (previous or {}).get(k) != record.get(k))
            raise InputError(
                f"{folder} holds images sampled with other settings ({', '.join(changed) or 'unreadable record'} "
                "differ); use another output or delete it to start over"
            )
        return
    atomic_write_bytes(path, json.dumps(record, sort_keys=True).encode())


def to_pil(image: np.ndarray):
    from PIL import Image

    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise InputError(f"images must be HxWx1 or HxWx3 uint8, got shape {image.shape}")
    if image.shape[2] == 1:
        return Image.fromarray(image[:, :, 0], "L")
    return Image.fromarray(image, "RGB")


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class PngTreeWriter:
    """`{seed:06d}.png` files, optionally in one folder per 1000 seeds (`--subdirs`)."""

    def __init__(self, outdir: str, subdirs: bool = False, workers: int = 2, max_pending: int = 3):
        ensure_writable_dir(outdir)
        self.outdir = outdir
        self.subdirs = subdirs
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="png")
        self.pending: list[Future] = []
        self.max_pending = max(max_pending, workers + 1)  # keep every worker busy
        self.written = 0
        remove_stale_temps(outdir)

    def path_for(self, seed: int) -> str:
        if self.subdirs:
            return os.path.join(self.outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")
        return os.path.join(self.outdir, f"{seed:06d}.png")

    def is_done(self, seed: int) -> bool:
        return os.path.exists(self.path_for(seed))

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


class NpzWriter:
    """One `.npz` with `images` (uint8 NHWC), `seeds` and `labels` (-1 when unconditional).

    Batches are staged under ``<file>.parts/`` (each part atomic, so a rerun resumes) and the
    archive is streamed together at the end in the requested seed order.
    """

    def __init__(self, path: str, seeds: Sequence[int]):
        directory = os.path.dirname(os.path.abspath(path))
        ensure_writable_dir(directory)
        self.path = path
        self.parts_dir = path + ".parts"  # created with the first batch, not before
        self.order = [int(s) for s in seeds]
        self.done: dict[int, str] = {}
        for part in glob.glob(os.path.join(self.parts_dir, "part-*.npz")):
            try:
                with np.load(part) as data:
                    for s in data["seeds"].tolist():
                        self.done[int(s)] = part
            except Exception:
                os.unlink(part)  # unreadable part (should not happen: parts are atomic)
        self.written = 0

    def is_done(self, seed: int) -> bool:
        return int(seed) in self.done

    def submit(self, images: np.ndarray, seeds: Sequence[int], labels: Optional[np.ndarray] = None) -> None:
        seeds = np.asarray(seeds, dtype=np.int64)
        labels = np.full(len(seeds), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        os.makedirs(self.parts_dir, exist_ok=True)
        part = os.path.join(self.parts_dir, f"part-{int(seeds[0]):09d}-{len(seeds)}.npz")
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
        tmp = self.path + f".tmp-{os.getpid()}"
        try:
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
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # parts and any temp file a killed run left

    def abort(self) -> None:
        """After a failure: keep the finished parts, so the next run resumes."""


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, row-major, `columns` wide."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


class GridWriter:
    """Collects images and writes them as one grid PNG at the end (small n only)."""

    MAX_IMAGES = 4096

    def __init__(self, path: str, count: int, columns: Optional[int] = None, upscale: int = 1, pad: int = 1):
        if count > self.MAX_IMAGES:
            raise InputError(f"--grid is for up to {self.MAX_IMAGES} images; use --outdir for {count}")
        ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
        self.path, self.columns, self.upscale, self.pad = path, columns, upscale, pad
        self.images: dict[int, np.ndarray] = {}
        self.order: list[int] = []
        self.written = 0

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
        if self.upscale > 1:
            stacked = stacked.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        atomic_write_bytes(self.path, encode_png(make_grid(stacked, self.columns, pad=self.pad), compress_level=6))
