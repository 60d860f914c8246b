"""The run record and the locks that make resuming into an output folder safe.

Resuming skips seeds whose output exists, so a folder must only ever hold images of one run:
the first run writes its record (`generate.run_record`: the model, class, settings, batch...)
beside the images and later runs must match it. One writer per output: the folder lock for an
unsharded run, one lock per shard for the ranks of a torchrun run, which check the record one
after another. Which files count as images is the writers' business (`writers.holds_images`),
passed in, so this module knows nothing of formats.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Callable, Iterator, Optional

from ..core.errors import InputError
from ..core.fileio import (
    atomic_write_bytes,
    exclusive_lock,
    is_locked,
    lock_path_for,
    remove_stale_temps,
)
from ..core.jsonio import MAX_RECORD_BYTES, read_json_file

RUN_RECORD = ".edm-deploy-sample.json"
# The ranks of one torchrun run check the record one after another under the folder lock; they
# start together, so a rank waits this long for its turn (the check walks the folder once).
RECORD_CHECK_WAIT_S = 120.0

HoldsImages = Callable[[str], bool]


def read_record(folder: str) -> tuple[bool, Optional[dict], str]:
    """(exists, content or None when unreadable, why it is unreadable)."""
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.exists(path):
        return False, None, ""
    try:
        data = read_json_file(path, max_bytes=MAX_RECORD_BYTES, what="run record", allow_constants=True)
    except InputError as exc:  # unreadable, oversized or nested too deeply: a record that matches nothing
        return True, None, str(exc)
    if not isinstance(data, dict):
        return True, None, f"{path} holds a JSON {type(data).__name__}, not a run record"
    return True, data, ""


def _shard_lock(folder: str, shard: tuple[int, int]) -> str:
    return os.path.join(folder, f".edm-deploy-shard{shard[0]}of{shard[1]}.lock")


def _others_writing(folder: str, own_shard_lock: str) -> bool:
    """Whether another process holds a shard lock of `folder` right now."""
    own = os.path.abspath(own_shard_lock) if own_shard_lock else None
    return any(is_locked(p) for p in glob.glob(os.path.join(folder, ".edm-deploy-shard*.lock"))
               if os.path.abspath(p) != own)


def check_run_record(folder: str, record: dict, holds_images: HoldsImages, others_writing: bool = False) -> None:
    """Refuse to resume into `folder` when it holds output made with other settings.

    The first run writes `record`; later runs must match. A folder that holds images but no
    record was not written by this tool and is refused rather than mixed into; a record whose
    folder holds no images (a run that failed before its first image) is replaced, unless
    another process is still writing there.
    """
    exists, previous, damage = read_record(folder)
    if previous == record:
        return
    if not exists:
        if holds_images(folder):
            raise InputError(f"{folder} already holds images but no edm-deploy run record, so they cannot be "
                             "resumed safely; choose an empty or new output")
    elif previous is None and (holds_images(folder) or others_writing):
        raise InputError(f"{folder} holds images, but its run record is damaged ({damage}), so the settings that "
                         "made them are unknown and they cannot be resumed safely; choose another output, or delete "
                         "the folder to start over")
    elif holds_images(folder) or others_writing:
        changed = sorted(k for k in set(record) | set(previous or {}) if (previous or {}).get(k) != record.get(k))
        raise InputError(
            f"{folder} holds images sampled with other settings ({', '.join(changed) or 'unreadable record'} "
            "differ); use another output or delete it to start over"
        )
    atomic_write_bytes(os.path.join(folder, RUN_RECORD), json.dumps(record, sort_keys=True).encode())


@contextlib.contextmanager
def claim_folder(folder: str, record: dict, shard: tuple[int, int] = (0, 1), *, holds_images: HoldsImages
                 ) -> Iterator[None]:
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
            check_run_record(folder, record, holds_images, others_writing=others)
            if not others:
                remove_stale_temps(folder)
            if not sharded:
                run.enter_context(check.pop_all())  # keep the folder lock for the whole run
        yield
