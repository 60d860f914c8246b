"""File output every layer shares: atomic writes, temporary names, checksums.

Every artifact this project writes appears atomically: the bytes go to a temporary file beside
the final name, which is renamed into place only when complete, so a killed or failing writer
never leaves half a file under a name a reader would trust. Temporary files are named
``.tmp-<random>-<final name>.partial``: hidden, and never ending in the final name's extension,
so a ``*.png`` (or ``*.npz``, ``*.onnx``) glob never picks up half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterator

from .errors import InputError

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".partial"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary names (a killed writer may leave them)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_regular_file(path: str, what: str = "file") -> None:
    """A path to read must be a regular file (symlinks followed): opening a FIFO or a device waits
    for a writer that may never come, so that would hang instead of failing."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise InputError(f"{what} {path} is {kind}, not a regular file")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide and writer threads write files


def _existing_folder(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    return directory


def write_target(path: str) -> str:
    """The file a write to the output a user named `path` must replace: a symlink is followed.

    Renaming onto a symlink would replace the link by a plain file and leave its target stale,
    and a lock taken beside the link would not exclude a writer that names the target; so a
    command resolves each output file the user names (``--npz``, ``--grid``, ``--dest``, ``--out``,
    ``--json``) with this before it writes or locks, and writes through the link as ``cp`` and a
    shell redirect do. Files a command names itself inside an output folder (images, records,
    parts) are not resolved: a symlink planted there is replaced, never written through.
    A path that is no symlink comes back as given.
    """
    return os.path.realpath(path) if os.path.islink(path) else path


# Temporary files and folders being written right now: a stop (SIGTERM) removes them before it
# unwinds, so none is left even when the unwinding itself is cut short (a library crashing on
# the interrupt, the watchdog ending a call that does not return).
_LIVE_TEMPORARIES: dict[str, bool] = {}


def track_temporary(path: str, is_folder: bool = False) -> None:
    _LIVE_TEMPORARIES[path] = is_folder


def untrack_temporary(path: str) -> None:
    _LIVE_TEMPORARIES.pop(path, None)


def remove_live_temporaries() -> None:
    """Remove every temporary file or folder a write in progress holds (called on SIGTERM)."""
    for path, is_folder in list(_LIVE_TEMPORARIES.items()):
        try:
            if is_folder:
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
        except OSError:
            pass
        _LIVE_TEMPORARIES.pop(path, None)


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """A temporary path beside `path` to write into; renamed onto `path` when the block succeeds.

    For writers that need a file name (zip archives, `onnx.save`). On any exception the
    temporary file is removed and `path` is left as it was.
    """
    directory = _existing_folder(path)
    # The name's head only: the temporary adds ~22 characters, and a name near the 255 limit is valid.
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path)[:96] + TEMP_SUFFIX, dir=directory)
    os.close(fd)
    track_temporary(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(directory)
    except OSError as exc:
        if exc.filename not in (None, tmp):
            raise
        # A failed write (a full disk, a file size limit) names no file, or the temporary one: name the output.
        raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
    finally:
        untrack_temporary(tmp)
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes, durable: bool = False) -> None:
    """Write `data` to a temporary file beside `path`, then rename: readers never see half a file.

    With `durable`, the data and the rename are flushed to disk (fsync of the file and the
    folder) before returning, so a power loss cannot leave an empty file under the final name;
    checkpoints use it, per-image PNG writes do not (it would cost a disk flush per image).
    """
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _fsync_dir(directory: str) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds (Windows): the rename is as durable as it gets
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temps(folder: str) -> int:
    """Delete the temporary files a killed writer left in `folder` and its subfolders.

    Only our own temporary names are touched; call it while holding the folder's lock, so no
    live writer's file is removed. Returns how many were removed.
    """
    removed = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if is_temp_name(name):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


# --------------------------------------------------------------------------------------------
# Outputs: never onto an input, and one writer at a time.


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (symlinks and hard links resolved)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the resolved paths can tell
        return False


def refuse_overwriting_inputs(inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """One clear error, before any work, when an output path would replace one of the inputs.

    `inputs` and `outputs` map a label the user knows (a flag or argument name, e.g. ``MODEL`` or
    ``--npz``) to a path; every file a command writes belongs in `outputs`, derived names
    (``x.npz.parts``, ``model.plan.json``) included.
    """
    for out_label, out_path in outputs.items():
        if not out_path:
            continue
        for in_label, in_path in inputs.items():
            if in_path and _same_file(out_path, in_path):
                raise InputError(
                    f"{out_label} {out_path} would overwrite {in_label} {in_path}; choose another output",
                    param=in_label,
                )


def refuse_foreign_file(path: str, label: str, ours: Callable[[str], bool], what: str) -> None:
    """Replace nothing edm-deploy did not write: an existing file at output `path` must be `what`
    (e.g. "a bench JSON") as `ours(path)` recognises it, else one InputError before any work.

    The rule `sample --npz` follows, for every file a command writes: a file of the same kind
    that edm-deploy wrote (a rerun) may be replaced, anything else the user must move away.
    `ours` reads a bounded head of the file and must not raise; a symlink is judged at its target.
    """
    target = write_target(path)
    if not os.path.lexists(target) or os.path.isdir(target):
        return  # nothing to replace; a folder is each command's own error
    if not ours(target):
        raise InputError(f"{label} {path} already exists and is not {what} that edm-deploy wrote; choose another "
                         "output or delete it", param=label)


def lock_path_for(output: str) -> str:
    """The lock file guarding an output: inside an output folder, beside an output file (hidden).

    A symlinked output file is locked beside its target, so two names of one file share a lock.
    """
    if os.path.isdir(output):
        return os.path.join(output, ".edm-deploy.lock")
    directory, name = os.path.split(os.path.abspath(write_target(output)))
    return os.path.join(directory, f".{name}.lock")


@contextlib.contextmanager
def exclusive_lock(lock_file: str, what: str, wait: float = 0) -> Iterator[None]:
    """Hold an exclusive OS lock on `lock_file` for the block; if another process holds it for
    longer than `wait` seconds (0: not at all), one clear error naming `what` (the output it guards).

    The lock is an OS file lock (`filelock`), released by the kernel when the process dies, so a
    killed run never leaves its output locked. The small lock file itself stays (removing it
    would race with a writer that just opened it).
    """
    from filelock import FileLock, Timeout

    lock = FileLock(lock_file, timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"another edm-deploy process is writing {what} (it holds {lock_file}); wait for it or choose another output"
        ) from None
    try:
        yield
    finally:
        lock.release()


def is_locked(lock_file: str) -> bool:
    """Whether another process (or another lock object here) holds `lock_file` right now."""
    from filelock import FileLock, Timeout

    if not os.path.exists(lock_file):
        return False
    probe = FileLock(lock_file, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def exclusive_output(output: str) -> contextlib.AbstractContextManager:
    """Hold the exclusive lock of `output` (a folder or a file) for a block: one writer at a time."""
    return exclusive_lock(lock_path_for(output), output)
