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

from ..fixed_shape import BucketedDenoiser
from ..guidance import mix, with_unconditional_twins
from ..xp import concatenate, to_float64
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
        plain, auto, cfg = [], [], []       # chunk positions by how their rows are evaluated now
        xs, sigmas, labels, live = [], [], [], []
        for k, chunk in enumerate(chunks):
            x, sigma = chunk.pending
            keep = chunk.live_members()  # the rows of members that left are not evaluated
            live.append(keep)
            xs.append(x if keep is None else chunk.live_part(x, keep))
            sigmas.append(np.full(int(xs[-1].shape[0]), sigma, dtype=np.float64))
            labels.append(self._labels(chunk, keep, int(xs[-1].shape[0])))
            request = chunk.request
            guided = request.guided_at(sigma)
            (cfg if guided and request.cfg else auto if guided and request.auto else plain).append(k)
        order = plain + auto + cfg
        groups = [[_stack(p, plain + auto) for p in (xs, sigmas, labels)]] if plain or auto else []
        if cfg:  # classifier-free: the guided rows and their zero-label twins, in the same call
            groups.append(with_unconditional_twins(*(_stack(p, cfg) for p in (xs, sigmas, labels))))
        x_call, sigma_call, label_call = (_join([g[i] for g in groups]) for i in range(3))
        start = time.perf_counter()
        out = to_float64(self.model(x_call, sigma_call, label_call if self.label_dim else None))
        guide_out, guide_rows = None, 0
        if auto:
            gx, gs, gl = (_stack(p, auto) for p in (xs, sigmas, labels))
            guide_out = to_float64(self.guide(gx, gs, gl if self.label_dim else None))
            guide_rows = len(gs)
        seconds = time.perf_counter() - start

        answers: list[Any] = [None] * len(chunks)
        offset = 0
        for k in order:
            answers[k] = out[offset:offset + len(sigmas[k])]
            offset += len(sigmas[k])
        for k in cfg:  # the twins follow the guided rows, in the same order
            answers[k] = mix(answers[k], out[offset:offset + len(sigmas[k])], chunks[k].request.w)
            offset += len(sigmas[k])
        offset = 0
        for k in auto:
            answers[k] = mix(answers[k], guide_out[offset:offset + len(sigmas[k])], chunks[k].request.w)
            offset += len(sigmas[k])
        for k, (chunk, keep) in enumerate(zip(chunks, live)):
            if keep is not None:
                answers[k] = chunk.widen(answers[k], to_float64(chunk.pending[0]), keep)
        rows = int(x_call.shape[0])
        return RunnerOutput(tuple(answers), rows, _padding(self.model, rows), guide_rows,
                            _padding(self.guide, guide_rows) if guide_rows else 0, seconds)

    def _labels(self, chunk: Chunk, keep: Optional[list[bool]], rows: int) -> np.ndarray:
        if not self.label_dim:
            return np.zeros((rows, 0), np.float32)
        return chunk.labels if keep is None else chunk.live_part(chunk.labels, keep)


def _join(parts: list) -> Any:
    return parts[0] if len(parts) == 1 else concatenate(parts)


def _stack(parts: list, which: list[int]) -> Any:
    """The parts at positions `which`, joined along the batch (any array library)."""
    return _join([parts[k] for k in which])


def _padding(den: Any, rows: int) -> int:
    """Rows of padding `den` adds to a call of `rows` (a `BucketedDenoiser` pads; others do not)."""
    return den.padding(rows) if isinstance(den, BucketedDenoiser) else 0
