"""Request state: what a client asks for, what it gets back, and the rows the engine drives for it.

A request is cut into chunks of at most the batch limit; each chunk is run by one step program.
Chunks admitted at the same tick with the same plan are merged into one program (`Chunk.absorb`),
so the host's per-step work is paid per plan, not per request, while each row keeps its own
seed's noise stream (sharing changes no image).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..core.errors import EdmDeployError
from ..core.xp import concatenate
from ..sampling.guidance import guided_rows
from ..sampling.noise import StackedRandomGenerator, draw_latents_and_labels, one_hot
from ..sampling.planner import SamplingPlan
from ..sampling.settings import SamplerSettings
from ..sampling.solvers import Callback, Program


class BusyError(EdmDeployError):
    """The engine cannot take the request now (queue full, or draining); try again later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = float(retry_after)


class DeadlineError(EdmDeployError):
    """A request ran past its timeout and was dropped."""


@dataclass(frozen=True)
class ImageRequest:
    """What a client asks for, checked: seeds, classes (one for all, or one per seed), settings, guidance.

    ``timeout`` is hard (past it the request is dropped with `DeadlineError`); ``deadline`` and
    ``priority`` are hints to an admission policy that reads them (`scheduler.DeadlineScheduler`);
    ``preview_every`` asks for the denoised estimate every that many solver steps.
    """

    seeds: tuple[int, ...]
    class_idx: Any = None                       # None, an int, or a tuple with one class per seed
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    guidance: Optional[float] = None
    guidance_interval: Optional[tuple[float, float]] = None
    timeout: Optional[float] = None             # seconds from submission
    priority: int = 0                           # higher is sooner, within PRIORITY_RANGE
    deadline: Optional[float] = None            # seconds from submission the client would like the images by
    preview_every: Optional[int] = None         # solver steps between previews


PRIORITY_RANGE = (-10, 10)


@dataclass
class GenerationResult:
    """A finished request: uint8 NHWC images in seed order, their labels, and where the time went."""

    images: np.ndarray
    seeds: list[int]
    labels: Optional[np.ndarray]
    solver: str
    nfe: int
    queued_s: float       # submission to admission
    run_s: float          # admission to the last image
    total_s: float
    admitted_at: float = 0.0  # time.perf_counter() at admission (orders requests)
    warnings: tuple = ()      # why the settings give poor images on this model (`SamplingPlan.warnings`)

    @property
    def seconds(self) -> float:
        return self.total_s


@dataclass(frozen=True)
class Preview:
    """A request's progress after solver step ``step`` of ``steps``: the denoised estimate of some of its images.

    ``denoised`` is float32 [n, C, H, W] in [-1, 1] (a host copy the consumer may keep) for the
    images at positions ``index`` of the request (seeds ``seeds``); a request larger than the
    batch limit reports each chunk of its images apart.
    """

    step: int
    steps: int
    sigma: float            # the noise level the state has reached
    index: slice
    seeds: tuple[int, ...]
    denoised: np.ndarray


PreviewCallback = Callable[[Preview], None]


class RequestState:
    """A request in the engine: its plan, guidance, chunks left, and what becomes of it."""

    def __init__(self, spec: ImageRequest, plan: SamplingPlan, future: Future, *, classifier_free: bool,
                 autoguided: bool, on_preview: Optional[PreviewCallback] = None):
        self.spec, self.plan, self.future = spec, plan, future
        self.w = spec.guidance
        self.lo, self.hi = (0.0, float("inf")) if spec.guidance_interval is None else spec.guidance_interval
        self.cfg, self.auto = classifier_free, autoguided
        self.on_preview = on_preview if spec.preview_every else None
        self.submitted = time.perf_counter()
        self.deadline = None if spec.timeout is None else self.submitted + spec.timeout
        self.admitted: Optional[float] = None
        self.images: list = [None] * len(spec.seeds)
        self.labels: list = [None] * len(spec.seeds)
        self.chunks_left = 0
        self.settled = False        # its outcome is decided (images, an error, a cancellation)
        self.cancelled = False      # set from the cancelling thread; the loop settles it

    @property
    def guided_rows_cost(self) -> int:
        """Rows of the model's call one image of this request may take: 2 with classifier-free guidance."""
        return 2 if self.cfg else 1

    def guided_at(self, sigma: float) -> bool:
        return self.w is not None and bool(guided_rows(sigma, self.w, self.lo, self.hi))


@dataclass
class Member:
    """One request's share of a chunk: its images ``index`` (in the request) at ``rows`` (in the chunk)."""

    request: RequestState
    index: slice
    rows: slice
    seeds: list
    class_idx: Any


class Chunk:
    """Rows driven by one step program: a part of one request, or several requests with one plan.

    A member that leaves early (cancelled, timed out) keeps its rows in the program's arrays but
    not in the network call: they are answered with D = x (finite, unused).
    """

    def __init__(self, request: RequestState, index: slice, seeds: list[int], class_idx: Any, seq: int):
        self.members = [Member(request, index, slice(0, len(seeds)), seeds, class_idx)]
        self.plan = request.plan
        self.seq = seq                              # arrival order, for stable tie-breaking
        self.program: Optional[Program] = None
        self.pending: Optional[tuple[Any, float]] = None
        self.labels: Any = None

    @property
    def request(self) -> RequestState:
        """The first member's request (the plan, guidance and cost are the same for every member)."""
        return self.members[0].request

    @property
    def settled(self) -> bool:
        return all(m.request.settled for m in self.members)

    @property
    def rows(self) -> int:
        return sum(len(m.seeds) for m in self.members)

    @property
    def cost(self) -> int:
        """Rows of a network call this chunk's live members take."""
        live = sum(len(m.seeds) for m in self.members if not m.request.settled)
        return live * self.request.guided_rows_cost

    @property
    def wants_previews(self) -> bool:
        return any(m.request.on_preview is not None for m in self.members)

    def absorb(self, other: Chunk) -> None:
        """Take the members of another waiting chunk with the same plan (before either starts)."""
        offset = self.rows
        for m in other.members:
            self.members.append(Member(m.request, m.index, slice(offset, offset + len(m.seeds)), m.seeds, m.class_idx))
            offset += len(m.seeds)

    def start(self, den: Any, callback: Callback = None) -> Optional[Any]:
        """Draw the seeds' latents and labels and start the program; the final state if it needs no evaluation."""
        seeds = [s for m in self.members for s in m.seeds]
        rnd = StackedRandomGenerator(seeds)
        img_shape = (den.img_channels, den.img_resolution, den.img_resolution)
        label_dim = int(den.label_dim)
        # The seeds' own random labels are drawn either way (the draw order of `sample`); then
        # each member's forced classes, one for all its seeds or one per seed, replace them.
        latents, self.labels = draw_latents_and_labels(rnd, img_shape, label_dim, None)
        for m in self.members:
            if m.class_idx is not None:
                classes = m.class_idx if isinstance(m.class_idx, tuple) else [m.class_idx] * len(m.seeds)
                self.labels[m.rows] = one_hot(np.asarray(classes), label_dim)
        self.program = self.plan.program(den.to_device(latents), rnd.randn_like, callback)
        return self._advance(lambda: next(self.program))

    def send(self, denoised: Any) -> Optional[Any]:
        """Answer the pending evaluation; the final state when the program has finished."""
        return self._advance(lambda: self.program.send(denoised))

    def _advance(self, step: Callable[[], Any]) -> Optional[Any]:
        try:
            self.pending = step()
            return None
        except StopIteration as finished:
            self.pending = None
            return finished.value

    def live_members(self) -> Optional[list[bool]]:
        """Which members are still live, or None when all are (the common case: nothing to slice)."""
        live = [not m.request.settled for m in self.members]
        return None if all(live) else live

    def live_part(self, x: Any, live: list[bool]) -> Any:
        """The rows of `x` that belong to the live members (any array library)."""
        parts = [x[m.rows] for m, keep in zip(self.members, live) if keep]
        return parts[0] if len(parts) == 1 else concatenate(parts)

    def widen(self, answer: Any, x: Any, live: list[bool]) -> Any:
        """The live members' rows from `answer`, D = x for those that left (finite; nothing reads them)."""
        parts, k = [], 0
        for m, keep in zip(self.members, live):
            n = m.rows.stop - m.rows.start
            parts.append(answer[k:k + n] if keep else x[m.rows])
            k += n if keep else 0
        return concatenate(parts)


def merge_cohorts(chunks: list[Chunk]) -> list[Chunk]:
    """Chunks admitted together merged by plan (same solver, time points, guidance) into one program each.

    Merging is per tick and never past the batch limit the scheduler admitted under, so what
    runs is the same set of rows; only the host work per step is shared.
    """
    merged: dict[int, Chunk] = {}
    out = []
    for chunk in chunks:
        if chunk.settled:
            out.append(chunk)
            continue
        head = merged.get(id(chunk.plan))
        if head is None:
            merged[id(chunk.plan)] = chunk
            out.append(chunk)
        else:
            head.absorb(chunk)
    return out
