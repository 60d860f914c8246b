"""Seed lists (`--seeds 0-63,100`, `-n N`) and how they are split across ranks and batches."""

from __future__ import annotations

import itertools
import os
import re
from typing import Optional, Sequence

import numpy as np

from ..core.errors import InputError, check_int

SEED_LIMIT = 1 << 32  # seeds lie in [0, 2^32): the reference seeds its streams with seed mod 2^32, so a larger
                     # seed would repeat a smaller one's noise
MAX_SEEDS = 10_000_000  # per run; a larger list would not fit the run's bookkeeping in memory


def is_number_text(text: str) -> bool:
    """Whether `text` is a whole number written in ASCII digits: `str.isdigit` and `int` also take
    other scripts' digits ('٣' is 3, and '²' passes isdigit but not int), which a seed or a
    class number written by a user never means."""
    return text.isascii() and text.isdigit()


def check_seed_count(count: int, param: str = "seeds") -> None:
    if count > MAX_SEEDS:
        raise InputError(f"{count:,} seeds is more than one run takes ({MAX_SEEDS:,}); split the seeds over several runs",
                         param=param)


def check_seed(seed: object, param: str = "seeds", where: str = "") -> int:
    """One seed: a whole number (Python or NumPy integer, never a bool, a float or text) in [0, 2^32).

    `where` says which entry it was (``seeds[3]``) in the message.
    """
    name = where or param
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        hint = " (text such as '0-63,100' is for parse_seeds)" if isinstance(seed, str) else ""
        raise InputError(f"{name} must be an integer seed, got {seed!r} ({type(seed).__name__}){hint}", param=param)
    value = int(seed)
    if not 0 <= value < SEED_LIMIT:
        why = f" (a larger one would repeat the noise of seed {value % SEED_LIMIT})" if value >= SEED_LIMIT else ""
        raise InputError(f"{name} = {value} is not a seed: seeds lie in 0..{SEED_LIMIT - 1}{why}", param=param)
    return value


def check_seeds(seeds: object, *, param: str = "seeds", unique: bool = True) -> list[int]:
    """The one seed check of the CLI, the Python API and any server: a list of valid seeds.

    `seeds` is a list, tuple, range, NumPy integer array or other iterable of seeds, each checked
    by `check_seed`; a single int or a string is refused (``"01"`` would otherwise be seeds 0 and
    1). At least one seed, at most `MAX_SEEDS` (counted before anything is built), and, with
    `unique`, no seed twice (two identical images under one seed's name). Every problem is one
    InputError tagged with `param`.
    """
    if isinstance(seeds, (str, bytes)):
        raise InputError(f"{param} must be a list of integer seeds, got the text {seeds!r} (for '0-63,100' use "
                         "parse_seeds)", param=param)
    if isinstance(seeds, (bool, int, float, np.generic)):
        raise InputError(f"{param} must be a list of integer seeds, got the single {type(seeds).__name__} {seeds!r} "
                         f"(write [{seeds!r}] for one seed)", param=param)
    if isinstance(seeds, np.ndarray) and seeds.ndim != 1:
        raise InputError(f"{param} must be a flat list of seeds, got an array of shape {list(seeds.shape)}", param=param)
    try:
        count = len(seeds)  # type: ignore[arg-type]
    except TypeError:
        try:
            seeds = list(itertools.islice(iter(seeds), MAX_SEEDS + 1))  # type: ignore[call-overload]
        except TypeError:
            raise InputError(f"{param} must be a list of integer seeds, got {type(seeds).__name__}", param=param) from None
        count = len(seeds)
    check_seed_count(count, param)
    if count == 0:
        raise InputError(f"{param} is empty; give at least one seed", param=param)
    if isinstance(seeds, range) and seeds.step > 0:  # increasing: its ends bound every seed, none repeats
        check_seed(seeds[0], param, f"{param}[0]")
        check_seed(seeds[-1], param, f"{param}[{count - 1}]")
        return list(seeds)
    out = [check_seed(s, param, f"{param}[{i}]") for i, s in enumerate(seeds)]  # type: ignore[arg-type]
    if unique and len(set(out)) != len(out):
        seen: set[int] = set()
        for s in out:
            if s in seen:
                raise InputError(f"{param} repeats seed {s}; each seed names one image", param=param)
            seen.add(s)
    return out


def parse_seeds(text: str) -> list[int]:
    """'0-63,100' -> [0, ..., 63, 100]; ranges are inclusive like the reference's.

    Seeds lie in [0, 2^32): larger ones would share a random stream with a smaller one. The
    count is checked before the list is built, so a huge range fails at once.
    """
    ranges = seed_ranges(text)
    check_seed_count(sum(hi - lo + 1 for lo, hi in ranges))
    seeds = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    if len(set(seeds)) != len(seeds):
        raise InputError("the seed list repeats seeds")
    return seeds


def seed_ranges(text: str) -> list[tuple[int, int]]:
    """The inclusive ranges of a seed list's text, each checked, none expanded."""
    ranges: list[tuple[int, int]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([0-9]{1,20})(?:-([0-9]{1,20}))?", part)  # (seeds are below 2^32: 20 digits is plenty)
        if not m:
            raise InputError(f"bad seed list {text!r}: use numbers and ranges like 0-63,100")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InputError(f"bad seed range {part!r}: the end is before the start")
        if hi >= SEED_LIMIT:
            raise InputError(f"bad seed {hi}: seeds must lie in 0..{SEED_LIMIT - 1}", param="seeds")
        ranges.append((lo, hi))
    if not ranges:
        raise InputError(f"no seeds in {text!r}: use numbers and ranges like 0-63,100")
    return ranges


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
    m = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", str(text))
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
