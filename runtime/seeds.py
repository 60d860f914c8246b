"""Seed lists (`--seeds 0-63,100`, `-n N`) and how they are split across ranks and batches."""

from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

from edm_deploy.runtime.errors import InputError


def parse_seeds(text: str) -> list[int]:
    """'0-63,100' -> [0, ..., 63, 100]; ranges are inclusive like the reference's."""
    seeds: list[int] = []
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
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise InputError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise InputError("the seed list repeats seeds")
    return seeds


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


def shard_batches(seeds: Sequence[int], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches for `rank`: near-equal batches, dealt round-robin to ranks (the reference's split).

    The number of batches is a multiple of the world size, so every rank gets the same count
    and the ranks' seed sets are disjoint and cover the list.
    """
    if batch_size < 1:
        raise InputError(f"--batch must be >= 1, got {batch_size}")
    n = len(seeds)
    num_batches = max(1, math.ceil(n / (batch_size * world))) * world
    # Larger chunks first, like torch.tensor_split.
    base, extra = divmod(n, num_batches)
    bounds = [0]
    for k in range(num_batches):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    batches = [list(seeds[bounds[k]:bounds[k + 1]]) for k in range(num_batches)]
    return [b for b in batches[rank::world] if b]
