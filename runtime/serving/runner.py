"""The model runner: the pending evaluations of every program in flight as one batched call.

Each chunk in flight waits for D(x; sigma) at its own sigma. The runner stacks their live rows
(a member that left is not evaluated), adds the classifier-free twins of the rows whose request
is guided at this sigma (`guidance.with_unconditional_twins`: the zero label, in the same call),
sends autoguided rows to the guide in a second call, mixes as offline guidance does
(`guidance.mix`) and splits the answer per chunk. Padding to the batch shapes the start-up check
chose happens inside the wrapped model (`fixed_shape.BucketedDenoiser`); the runner counts the
real and padded rows of every call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.xp import concatenate, to_float64
from ..sampling.fixed_shape import BucketedDenoiser
from ..sampling.guidance import mix, with_unconditional_twins
from .requests import Chunk


@dataclass(frozen=True)
class RunnerOutput:
    """One tick's call: each chunk's answer (all its rows, in chunk order) and what the call cost."""

    answers: tuple[Any, ...]
    rows: int               # real rows of the model's call (classifier-free twins included)
    padded_rows: int        # rows of padding added to reach a checked batch shape
    guide_rows: int         # real rows of the guide's call (0: no guide call)
    guide_padded_rows: int
    seconds: float          # the calls, from the first row in to the last row out


class ModelRunner:
    """Makes the network call of a tick for a list of chunks, each with a pending evaluation."""

    def __init__(self, model: Any, guide: Optional[Any], label_dim: int):
        self.model, self.guide, self.label_dim = model, guide, int(label_dim)

    def run(self, chunks: list[Chunk]) -> RunnerOutput:
        """Evaluate every chunk's pending (x, sigma); raises what the network raises."""
        rows = _Rows.gather(chunks, self.label_dim)
        x, sigma, labels = rows.model_call()
        start = time.perf_counter()
        out = to_float64(self.model(x, sigma, labels if self.label_dim else None))
        guide_out = None
        if rows.auto:
            gx, gs, gl = (_stack(part, rows.auto) for part in (rows.xs, rows.sigmas, rows.labels))
            guide_out = to_float64(self.guide(gx, gs, gl if self.label_dim else None))
        seconds = time.perf_counter() - start
        guide_rows = 0 if guide_out is None else int(guide_out.shape[0])
        return RunnerOutput(rows.answers(chunks, out, guide_out), int(x.shape[0]), _padding(self.model, int(x.shape[0])),
                            guide_rows, _padding(self.guide, guide_rows) if guide_rows else 0, seconds)


@dataclass
class _Rows:
    """The live rows of a tick's chunks, grouped by how they are evaluated at their sigma now."""

    xs: list
    sigmas: list
    labels: list
    live: list                      # per chunk: which members are live, None when all are
    plain: list[int]                # chunk positions: unguided now
    auto: list[int]                 # autoguided now (a second call, on the guide)
    cfg: list[int]                  # classifier-free guided now (their zero-label twins in the same call)

    @classmethod
    def gather(cls, chunks: list[Chunk], label_dim: int) -> _Rows:
        rows = cls([], [], [], [], [], [], [])
        for k, chunk in enumerate(chunks):
            x, sigma = chunk.pending
            keep = chunk.live_members()  # the rows of members that left are not evaluated
            x = x if keep is None else chunk.live_part(x, keep)
            n = int(x.shape[0])
            rows.xs.append(x)
            rows.sigmas.append(np.full(n, sigma, dtype=np.float64))
            rows.labels.append(np.zeros((n, 0), np.float32) if not label_dim else
                               chunk.labels if keep is None else chunk.live_part(chunk.labels, keep))
            rows.live.append(keep)
            request = chunk.request
            guided = request.guided_at(sigma)
            (rows.cfg if guided and request.cfg else rows.auto if guided and request.auto else rows.plain).append(k)
        return rows

    def model_call(self) -> tuple[Any, np.ndarray, np.ndarray]:
        """(x, sigma, labels) of the model's call: unguided and autoguided rows, then guided rows and their twins."""
        parts = (self.xs, self.sigmas, self.labels)
        groups = [[_stack(p, self.plain + self.auto) for p in parts]] if self.plain or self.auto else []
        if self.cfg:
            groups.append(with_unconditional_twins(*(_stack(p, self.cfg) for p in parts)))
        return tuple(_join([g[i] for g in groups]) for i in range(3))

    def answers(self, chunks: list[Chunk], out: Any, guide_out: Any) -> tuple[Any, ...]:
        """Each chunk's D, mixed where guided (`guidance.mix`), with D = x for the rows of members that left."""
        answers: list[Any] = [None] * len(chunks)
        offset = 0
        for k in self.plain + self.auto + self.cfg:
            answers[k] = out[offset:offset + len(self.sigmas[k])]
            offset += len(self.sigmas[k])
        for k in self.cfg:  # the twins follow the guided rows, in the same order
            answers[k] = mix(answers[k], out[offset:offset + len(self.sigmas[k])], chunks[k].request.w)
            offset += len(self.sigmas[k])
        offset = 0
        for k in self.auto:
            answers[k] = mix(answers[k], guide_out[offset:offset + len(self.sigmas[k])], chunks[k].request.w)
            offset += len(self.sigmas[k])
        for k, (chunk, keep) in enumerate(zip(chunks, self.live)):
            if keep is not None:
                answers[k] = chunk.widen(answers[k], to_float64(chunk.pending[0]), keep)
        return tuple(answers)


def _join(parts: list) -> Any:
    return parts[0] if len(parts) == 1 else concatenate(parts)


def _stack(parts: list, which: list[int]) -> Any:
    """The parts at positions `which`, joined along the batch (any array library)."""
    return _join([parts[k] for k in which])


def _padding(den: Any, rows: int) -> int:
    """Rows of padding `den` adds to a call of `rows` (a `BucketedDenoiser` pads; others do not)."""
    return den.padding(rows) if isinstance(den, BucketedDenoiser) else 0
