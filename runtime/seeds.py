"""Seed lists (`--seeds 0-63,100`, `-n N`) and how they are split across ranks and batches."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from edm_deploy.runtime.errors import InputError, check_int

SEED_LIMIT = 1 << 32  # the per-seed streams are seeded with seed mod 2^32, like the reference's
MAX_SEEDS = 10_000_000  # per run; a larger list would not fit the run's bookkeeping in memory


def check_seed_count(count: int) -> None:
    if count > MAX_SEEDS:
        raise InputError(f"{count} seeds is more than one run takes ({MAX_SEEDS:,}); split the seeds over several runs")


def parse_seeds(text: str) -> list[int]:
    """'0-63,100' -> [0, ..., 63, 100]; ranges are inclusive like the reference's.

    Seeds lie in [0, 2^32): larger ones would share a random stream with a smaller one. The
    count is checked before the list is built, so a huge range fails at once.
    """
    ranges: list[tuple[int, int]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"bad seed list {text!r}: use numbers and ranges like 0-63,100")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InputError(f"bad seed range {part!r}: the end is before the start")
        if hi >= SEED_LIMIT:
            raise InputError(f"bad seed {hi}: seeds must lie in 0..{SEED_LIMIT - 1}")
        ranges.append((lo, hi))
    if not ranges:
        raise InputError(f"no seeds in {text!r}: use numbers and ranges like 0-63,100")
    check_seed_count(sum(hi - lo + 1 for lo, hi in ranges))
    seeds = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    if len(set(seeds)) != len(seeds):
        raise InputError("the seed list repeats seeds")
    return seeds


def check_seeds(seeds: Any) -> list[int]:
    """A seed list given as data (the API, the server): integers in [0, 2^32), no repeats, at least one.

    The one check behind every front end: the CLI's text goes through `parse_seeds`, which
    enforces the same. Floats (1.9), strings ("01"), booleans and out-of-range values are refused
    rather than converted, so a seed never silently means another one.
    """
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise InputError(f"seeds must be a list of integers, got {seeds!r}", param="seeds")
    out: list[int] = []
    for s in seeds:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise InputError(f"seeds must be integers, got {s!r}", param="seeds")
        if not 0 <= int(s) < SEED_LIMIT:
            raise InputError(f"bad seed {int(s)}: seeds must lie in 0..{SEED_LIMIT - 1}", param="seeds")
        out.append(int(s))
        if len(out) > MAX_SEEDS:
            check_seed_count(len(out))
    if not out:
        raise InputError("no seeds given", param="seeds")
    if len(set(out)) != len(out):
        raise InputError("the seed list repeats seeds", param="seeds")
    return out


def seeds_from_count(n: int) -> list[int]:
    """Seeds 0..n-1 (`-n N`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of images must be a positive integer, got {n!r}")
    check_seed_count(n)
    return list(range(n))


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n. Without it, torchrun's RANK/WORLD_SIZE are used."""
    if text is None:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError as exc:
            raise InputError("RANK and WORLD_SIZE must be integers") from exc
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"bad RANK={rank} / WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        return rank, world
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise InputError(f"bad shard {text!r}: use i/n, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"bad shard {text!r}: need 0 <= i < n")
    return i, n


def check_batch_size(batch_size: object) -> int:
    return check_int(batch_size, "batch_size", lo=1)


def shard_batches(seeds: Sequence[int], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches for `rank`: consecutive chunks of `batch_size` seeds, dealt round-robin to ranks.

    A batch's composition depends only on the seed list and the batch size, never on the number
    of seeds or of ranks, so a longer run, a resumed run and a sharded run put every seed in
    the same batch as any other run with the same `batch_size` (which matters for bit-exact
    results: compiled kernels may depend on the batch). Only this rank's batches are built, so
    a huge world size costs nothing; ranks' seed sets are disjoint and cover the list.
    """
    batch_size = check_batch_size(batch_size)
    return [list(seeds[lo:lo + batch_size]) for lo in range(rank * batch_size, len(seeds), world * batch_size)]
