"""A serving engine: step-level continuous batching of many requests over one model.

Every solver is a step program (`solvers.py`): it yields the state and noise level it needs
evaluated and receives D back. So the rows of many requests, each at its own sigma and with its
own solver, NFE, class and guidance, can share one network call. One thread owns the model and
loops:

1. the **scheduler** decides which waiting requests join (`ContinuousScheduler`: first come,
   first served, as soon as their rows fit under the batch limit; `RequestBatchScheduler` and
   `OneRequestScheduler` are the two usual alternatives, kept for comparison);
2. the **runner** gathers the pending evaluation of every program in flight into one call of at
   most ``max_batch`` rows (each row at its own sigma; a classifier-free guided row brings its
   unconditional twin, an autoguided one a row for the guide's call), splits the result and
   sends each program its rows;
3. finished programs leave at once, their images quantised exactly as `sample` quantises them;
   cancelled or timed-out requests free their rows before the next call.

Requests admitted at the same tick with the same plan share one program (`_Chunk.members`), so
the host's Python work per step is paid per plan, not per request; each row keeps its own seed's
noise stream, so sharing changes no image.

Fairness: admission is FIFO and a request in flight advances on every call, so a long (Heun 35)
request is never starved by short ones, and the requests in flight never exceed the batch limit.
A queue limit bounds what waits; beyond it `submit` refuses at once with `BusyError`.

Determinism: an image depends only on (model, seed, class, sampler settings, guidance), never
on what else is in flight, provided the network's rows do not depend on their batch. A compiled
network may pick kernels by batch shape, so give ``fixed_batch=N``: every call is then exactly N
rows (padded), as `sample --fixed-batch N` does, and a served image equals the image `sample
--fixed-batch N` writes for the same seed, bit for bit (tests/test_engine.py checks it under
mixed concurrent load). The sampler arithmetic itself is per row and exact.

Usable without HTTP: ``engine.submit(...)`` returns a `concurrent.futures.Future`;
``await engine.generate(...)`` is the asyncio form. NumPy only, like the rest of the runtime.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edm_deploy.runtime import solvers as slv
from edm_deploy.runtime.contract import as_denoiser
from edm_deploy.runtime.errors import EdmDeployError, InputError, NumericalError, check_int, check_number
from edm_deploy.runtime.generate import guided, quantize_uint8
from edm_deploy.runtime.guidance import check_guidance_args, check_interval, check_weight, mix
from edm_deploy.runtime.noise import StackedRandomGenerator, check_class, draw_latents_and_labels, one_hot
from edm_deploy.runtime.planner import SamplingPlan, plan_sampling
from edm_deploy.runtime.seeds import check_seeds
from edm_deploy.runtime.settings import SamplerSettings
from edm_deploy.runtime.xp import all_finite_rows, concatenate, to_float64

_log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256          # requests waiting beyond those in flight
DEFAULT_MAX_IMAGES = 64          # images one request may ask for


class BusyError(EdmDeployError):
    """The engine cannot take the request now (queue full, or draining); try again later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = float(retry_after)


class DeadlineError(EdmDeployError):
    """A request ran past its timeout and was dropped."""


@dataclass(frozen=True)
class ImageRequest:
    """What a client asks for, checked: seeds, classes (one for all, or one per seed), settings, guidance."""

    seeds: tuple[int, ...]
    class_idx: Any = None                       # None, an int, or a tuple with one class per seed
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    guidance: Optional[float] = None
    guidance_interval: Optional[tuple[float, float]] = None
    timeout: Optional[float] = None             # seconds from submission


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


class _Request:
    """A request in the engine: its chunks (programs) and what becomes of it."""

    def __init__(self, spec: ImageRequest, plan: SamplingPlan, future: Future, cfg: bool, auto: bool,
                 w: Optional[float], lo: float, hi: float):
        self.spec, self.plan, self.future = spec, plan, future
        self.cfg, self.auto, self.w, self.lo, self.hi = cfg, auto, w, lo, hi
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
        return self.w is not None and self.w != 1.0 and self.lo < sigma <= self.hi


@dataclass
class _Member:
    """One request's share of a chunk: its images ``index`` (in the request) at ``rows`` (in the chunk)."""

    request: _Request
    index: slice
    rows: slice
    seeds: list
    class_idx: Any


class _Chunk:
    """Rows driven by one step program: a part of one request, or several requests with one plan.

    Requests admitted at the same tick with the same plan (solver, time points, guidance) share a
    program: their rows advance together, so the per-step host work is paid once per plan, not
    once per request. Each row still has its own seed's noise, so an image is what it would be
    alone. A member that leaves early (cancelled, timed out) keeps its rows in the program's
    arrays but not in the network call: they are answered with D = x (finite, unused).
    """

    def __init__(self, request: _Request, index: slice, seeds: list[int], class_idx: Any, engine: Engine):
        self.members = [_Member(request, index, slice(0, len(seeds)), seeds, class_idx)]
        self.plan = request.plan
        self.engine = engine
        self.program: Optional[slv.Program] = None
        self.pending: Optional[tuple[Any, float]] = None
        self.labels: Any = None

    @property
    def request(self) -> _Request:
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
        live = sum(len(m.seeds) for m in self.members if not m.request.settled)
        return live * self.request.guided_rows_cost

    def absorb(self, other: _Chunk) -> None:
        """Take the members of another waiting chunk with the same plan (before either starts)."""
        offset = self.rows
        for m in other.members:
            self.members.append(_Member(m.request, m.index, slice(offset, offset + len(m.seeds)), m.seeds, m.class_idx))
            offset += len(m.seeds)

    def start(self) -> None:
        den = self.engine.den
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
        self.program = self.plan.program(den.to_device(latents), rnd.randn_like)
        self._advance(lambda: next(self.program))

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

    def send(self, denoised: Any) -> None:
        self._advance(lambda: self.program.send(denoised))

    def _advance(self, step: Callable[[], Any]) -> None:
        try:
            self.pending = step()
        except StopIteration as finished:
            self.pending = None
            self.engine._finish_chunk(self, finished.value)


class Scheduler:
    """Decides which waiting chunks join the programs in flight before a network call."""

    name = "scheduler"

    def admit(self, waiting: collections.deque, in_flight: list, capacity: int) -> list:
        raise NotImplementedError

    @staticmethod
    def _fill(waiting: collections.deque, free: int, limit: Optional[int] = None) -> list:
        """Pop chunks from the head of the queue while they fit (strictly FIFO: a head that does not fit waits)."""
        taken = []
        while waiting and waiting[0].cost <= free and (limit is None or len(taken) < limit):
            chunk = waiting.popleft()
            free -= chunk.cost
            taken.append(chunk)
        return taken


class ContinuousScheduler(Scheduler):
    """Step-level continuous batching: a waiting chunk joins at the next call its rows fit into."""

    name = "continuous"

    def admit(self, waiting, in_flight, capacity):
        return self._fill(waiting, capacity - sum(c.cost for c in in_flight))


class RequestBatchScheduler(Scheduler):
    """Request-level batching as general model servers do: the waiting requests that fit run to
    completion together; newcomers wait until the whole batch is done."""

    name = "request-batch"

    def admit(self, waiting, in_flight, capacity):
        return [] if in_flight else self._fill(waiting, capacity)


class OneRequestScheduler(Scheduler):
    """One chunk at a time: every network call serves one request."""

    name = "one-request"

    def admit(self, waiting, in_flight, capacity):
        return [] if in_flight else self._fill(waiting, capacity, limit=1)


SCHEDULERS = {s.name: s for s in (ContinuousScheduler, RequestBatchScheduler, OneRequestScheduler)}


class EngineObserver:
    """Hooks for metrics (the server maps them to Prometheus); every method a no-op here."""

    def network_call(self, rows: int, seconds: float) -> None: ...

    def request_done(self, status: str, images: int, result: Optional[GenerationResult]) -> None: ...


@dataclass
class EngineStats:
    """Counters the engine keeps itself (thread-safe to read: plain ints and floats)."""

    network_calls: int = 0
    rows: int = 0
    guide_calls: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    images_done: int = 0
    network_seconds: float = 0.0

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.network_calls if self.network_calls else 0.0


class Engine:
    """One model, many requests: the loop that schedules step programs and makes the batched calls.

    ``den`` is any denoiser of the contract; ``guide`` an optional autoguidance model (requests
    with a guidance weight then use it; without it, guidance is classifier-free). ``max_batch``
    bounds the rows of one network call (default: the model's limit, else 64); ``fixed_batch``
    makes every call exactly that many rows (see the module docstring). ``max_queue`` bounds the
    requests waiting, ``max_images`` the images of one request.
    """

    def __init__(self, den: Any, guide: Any = None, *, max_batch: Optional[int] = None,
                 fixed_batch: Optional[int] = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_images: int = DEFAULT_MAX_IMAGES, scheduler: str = "continuous",
                 observer: Optional[EngineObserver] = None):
        from edm_deploy.runtime.fixed_shape import FixedShapeDenoiser

        den = as_denoiser(den)
        self.model = den
        self.guide_model = None if guide is None else as_denoiser(guide)
        limit = check_int(max_batch, "max_batch", lo=1) if max_batch is not None else (den.max_batch or 64)
        if den.max_batch is not None and limit > den.max_batch and fixed_batch is None:
            raise InputError(f"max_batch {limit} exceeds the model's batch limit {den.max_batch}", param="max_batch")
        if fixed_batch is not None:
            fixed_batch = check_int(fixed_batch, "fixed_batch", lo=1)
            limit = fixed_batch if max_batch is None else limit
            den = FixedShapeDenoiser(den, fixed_batch)
            if guide is not None:
                guide = FixedShapeDenoiser(guide, fixed_batch)
        self.den = den
        self.guide = None if guide is None else as_denoiser(guide)
        self.max_batch = limit
        self.fixed_batch = fixed_batch
        self.max_queue = check_int(max_queue, "max_queue", lo=1)
        self.max_images = check_int(max_images, "max_images", lo=1)
        if scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}", param="scheduler")
        self.scheduler = SCHEDULERS[scheduler]()
        self.observer = observer or EngineObserver()
        self.stats = EngineStats()
        self._plans: dict = {}
        self._waiting: collections.deque = collections.deque()
        self._in_flight: list[_Chunk] = []
        self._queued_requests = 0
        self._deadlines: set = set()       # requests with a timeout, not yet settled
        self._check_needed = False         # a cancel arrived: look before the next call
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._abandon = False              # shutdown(drain=False): cancel whatever is left
        self._thread: Optional[threading.Thread] = None

    # ----- lifecycle

    def start(self) -> Engine:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edm-deploy-engine", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(drain=exc[0] is None)

    def shutdown(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; with ``drain`` finish those in flight and queued, else cancel them."""
        with self._lock:
            self._accepting = False
            if not drain:  # every request now and any the loop holds between queue and flight
                self._abandon = True
                self._cancel_all()
                self._check_needed = True
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (`BusyError`); those queued and in flight go on."""
        with self._lock:
            self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_length(self) -> int:
        """Requests waiting to start (not yet in flight)."""
        return self._queued_requests

    @property
    def rows_in_flight(self) -> int:
        return sum(c.cost for c in self._in_flight)

    # ----- requests

    def request(self, seeds: Sequence[int], class_idx: Any = None, settings: Any = None,
                guidance: Optional[float] = None, guidance_interval: Any = None,
                timeout: Optional[float] = None) -> ImageRequest:
        """A checked `ImageRequest` (the same checks `sample` and `generate` make); raises InputError."""
        seeds = check_seeds(seeds)
        if len(seeds) > self.max_images:
            raise InputError(f"a request may ask for at most {self.max_images} images, got {len(seeds)}", param="seeds")
        class_idx = check_class(class_idx, self.model.label_dim, len(seeds))
        settings = SamplerSettings.coerce(settings)
        check_guidance_args(False, guidance, guidance_interval)
        if guidance is not None:
            guidance = check_weight(guidance)
            guidance_interval = None if guidance_interval is None else check_interval(guidance_interval)
        if timeout is not None and not check_number(timeout, "timeout") > 0:
            raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}", param="timeout")
        request = ImageRequest(tuple(seeds), class_idx, settings, guidance, guidance_interval,
                               None if timeout is None else float(timeout))
        self._plan(request)
        return request

    def _plan(self, request: ImageRequest) -> SamplingPlan:
        """The request's plan on the composed model (a guide narrows the sigma range), cached per settings."""
        key = (request.settings, request.guidance, request.guidance_interval)
        plan = self._plans.get(key)
        if plan is None:
            runner = guided(self.model, self.guide_model if request.guidance is not None else None, request.guidance,
                            request.guidance_interval)
            plan = plan_sampling(runner, request.settings)
            if len(self._plans) > 1024:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def submit(self, seeds: Any = None, class_idx: Any = None, settings: Any = None, guidance: Optional[float] = None,
               guidance_interval: Any = None, timeout: Optional[float] = None, *,
               request: Optional[ImageRequest] = None) -> Future:
        """Queue a request; the Future resolves to a `GenerationResult` (or raises the request's error).

        Bad input raises InputError here; a full queue or a draining engine raises `BusyError`.
        Cancelling the Future frees the request's rows before the next network call.
        """
        if request is not None:  # built by hand, it has had none of the checks: the same as any request
            seeds, class_idx, settings, guidance, guidance_interval, timeout = (
                request.seeds, request.class_idx, request.settings, request.guidance, request.guidance_interval,
                request.timeout)
        request = self.request(seeds, class_idx, settings, guidance, guidance_interval, timeout)
        plan = self._plan(request)
        w = request.guidance
        lo, hi = (0.0, math.inf) if request.guidance_interval is None else request.guidance_interval
        cfg = w is not None and w != 1.0 and self.guide is None
        future: Future = Future()
        entry = _Request(request, plan, future, cfg, w is not None and self.guide is not None, w, lo, hi)
        if entry.guided_rows_cost > self.max_batch:
            raise InputError(f"classifier-free guidance evaluates 2 rows per image, more than this engine's batch "
                             f"limit of {self.max_batch}; serve with a larger max_batch or ask without guidance",
                             param="guidance")
        per_chunk = self.max_batch // entry.guided_rows_cost
        seeds = list(request.seeds)
        classes = request.class_idx
        chunks = []
        for start in range(0, len(seeds), per_chunk):
            part = slice(start, min(start + per_chunk, len(seeds)))
            cls = classes[part] if isinstance(classes, tuple) else classes
            chunks.append(_Chunk(entry, part, seeds[part], cls, self))
        entry.chunks_left = len(chunks)
        with self._lock:
            if not self._accepting:
                raise BusyError("the engine is shutting down and takes no new requests", retry_after=5.0)
            if self._queued_requests >= self.max_queue:
                raise BusyError(f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                                retry_after=self._retry_hint())
            self._waiting.extend(chunks)
            self._queued_requests += 1
            if entry.deadline is not None:
                self._deadlines.add(entry)
            self._lock.notify_all()
        future.add_done_callback(lambda f, entry=entry: self._on_future_done(entry, f))
        if self._thread is None:
            self.start()
        return future

    async def generate(self, *args: Any, **kwargs: Any) -> GenerationResult:
        """`submit` for asyncio; cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def _retry_hint(self) -> float:
        """Seconds until a queue slot is likely free: one request's share of the recent call rate."""
        if not self.stats.network_calls or not self.stats.requests_done:
            return 1.0
        per_call = self.stats.network_seconds / self.stats.network_calls
        return float(min(60.0, max(0.5, per_call * 10)))

    # ----- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._drop_cancelled()
                admitted = self.scheduler.admit(self._waiting, self._in_flight, self.max_batch)
                if not admitted and not self._in_flight:
                    if self._stopping and not self._waiting:
                        return
                    self._lock.wait(timeout=self._wait_timeout())
                    continue
            try:
                for chunk in _cohorts(admitted):
                    self._admit(chunk)
                if self._in_flight:
                    self._tick()
            except Exception as exc:  # a fault of the engine itself: fail what it holds, keep serving
                _log.exception("the engine loop failed; its requests in flight fail with it")
                for chunk in admitted + self._in_flight:
                    self._fail_chunk(chunk, exc)
                self._in_flight = []

    def _wait_timeout(self) -> Optional[float]:
        if not self._deadlines:
            return None
        return max(0.0, min(r.deadline for r in self._deadlines) - time.perf_counter())

    def _admit(self, chunk: _Chunk) -> None:
        for member in chunk.members:
            request = member.request
            if request.admitted is None:  # its first chunk leaves the queue
                request.admitted = time.perf_counter()
                with self._lock:
                    self._queued_requests -= 1
        if chunk.settled:
            return
        try:
            chunk.start()
        except Exception as exc:  # a bad program start (a bug or a backend error) fails only its requests
            self._fail_chunk(chunk, exc)
            return
        if chunk.pending is not None:  # (a program may finish without an evaluation)
            self._in_flight.append(chunk)

    def _on_future_done(self, request: _Request, future: Future) -> None:
        """A client's cancel: flag it for the loop, which frees the rows before the next call."""
        if future.cancelled():
            request.cancelled = True
            with self._lock:
                self._check_needed = True
                self._lock.notify_all()

    def _cancel_all(self) -> None:
        """Cancel every request queued or in flight (caller holds the lock)."""
        for chunk in list(self._waiting) + self._in_flight:
            for member in chunk.members:
                member.request.cancelled = True
                member.request.future.cancel()

    def _drop_cancelled(self) -> None:
        """Cancelled and timed-out requests leave before the next call (caller holds the lock).

        Only runs when a request was cancelled or one with a deadline is in the engine, so the
        common tick costs nothing here.
        """
        if not (self._check_needed or self._deadlines or self._abandon):
            return
        self._check_needed = False
        if self._abandon:
            self._cancel_all()
        now = time.perf_counter()
        for request in list(self._deadlines):
            if request.settled:
                self._deadlines.discard(request)
            elif now > request.deadline:
                self._settle(request, DeadlineError(f"the request ran past its timeout of {request.spec.timeout:g} s"),
                             "timeout")
        for chunk in list(self._waiting) + self._in_flight:
            for member in chunk.members:
                request = member.request
                if request.cancelled and not request.settled:
                    request.settled = True
                    self.stats.requests_cancelled += 1
                    self.observer.request_done("cancelled", len(request.spec.seeds), None)
        gone = [c for c in self._waiting if c.settled]
        if gone:
            self._waiting = collections.deque(c for c in self._waiting if not c.settled)
        for request in {id(c.request): c.request for c in gone}.values():
            if request.admitted is None:
                request.admitted = now
                self._queued_requests -= 1
        self._in_flight = [c for c in self._in_flight if not c.settled]

    def _tick(self) -> None:
        """One network call for every pending evaluation in flight (and one guide call if any row needs it)."""
        chunks = [c for c in self._in_flight if c.pending is not None]
        if not chunks:
            return
        xs, sigmas, counts, labels, live = [], [], [], [], []
        uncond, auto = [], []
        for chunk in chunks:
            x, sigma = chunk.pending
            keep = chunk.live_members()  # the rows of members that left are not evaluated
            live.append(keep)
            xs.append(x if keep is None else chunk.live_part(x, keep))
            sigmas.append(sigma)
            counts.append(int(xs[-1].shape[0]))
            labels.append(chunk.labels if keep is None or chunk.labels is None else chunk.live_part(chunk.labels, keep))
            request = chunk.request
            if request.w is not None and request.guided_at(sigma):
                (uncond if request.cfg else auto).append(len(xs) - 1)
        owners = len(chunks)
        label_dim = int(self.den.label_dim)
        for k in uncond:  # classifier-free: the zero-label twin rows in the same call
            xs.append(xs[k])
            sigmas.append(sigmas[k])
            counts.append(counts[k])
            labels.append(np.zeros((counts[k], label_dim), np.float32))
        x_all = xs[0] if len(xs) == 1 else concatenate(xs)
        sigma_all = np.repeat(np.array(sigmas, dtype=np.float64), counts)
        labels_all = None if label_dim == 0 else np.concatenate(labels)
        start = time.perf_counter()
        try:
            out = to_float64(self.den(x_all, sigma_all, labels_all))
            guide_out = None
            if auto:
                gx = concatenate([xs[k] for k in auto]) if len(auto) > 1 else xs[auto[0]]
                gs = np.repeat(np.array([sigmas[k] for k in auto], dtype=np.float64), [counts[k] for k in auto])
                gl = None if label_dim == 0 else np.concatenate([labels[k] for k in auto])
                guide_out = to_float64(self.guide(gx, gs, gl))
                self.stats.guide_calls += 1
        except Exception as exc:  # the call failed: every request in it fails, the engine goes on
            for chunk in chunks:
                self._fail_chunk(chunk, exc)
            self._in_flight = [c for c in self._in_flight if not c.settled]
            return
        seconds = time.perf_counter() - start
        self.stats.network_calls += 1
        self.stats.rows += int(x_all.shape[0])
        self.stats.network_seconds += seconds
        self.observer.network_call(int(x_all.shape[0]), seconds)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        answers = [out[bounds[k]:bounds[k + 1]] for k in range(owners)]
        for j, k in enumerate(uncond):
            twin = owners + j
            answers[k] = mix(answers[k], out[bounds[twin]:bounds[twin + 1]], chunks[k].request.w)
        offset = 0
        for k in auto:
            answers[k] = mix(answers[k], guide_out[offset:offset + counts[k]], chunks[k].request.w)
            offset += counts[k]
        for chunk, answer, keep in zip(chunks, answers, live):
            if chunk.settled:
                continue
            try:
                if keep is not None:
                    answer = chunk.widen(answer, to_float64(chunk.pending[0]), keep)
                chunk.send(answer)
            except Exception as exc:
                self._fail_chunk(chunk, exc)
        self._in_flight = [c for c in self._in_flight if c.pending is not None and not c.settled]

    def _fail_chunk(self, chunk: _Chunk, exc: BaseException) -> None:
        for member in chunk.members:
            self._settle(member.request, exc, "error")

    def _finish_chunk(self, chunk: _Chunk, x: Any) -> None:
        finite = all_finite_rows(x)
        images = quantize_uint8(x)
        ints = None if chunk.labels is None else chunk.labels.argmax(axis=1).astype(np.int64)
        for member in chunk.members:
            request = member.request
            if request.settled:
                continue
            ok = finite[member.rows]
            if not ok.all():
                bad = [s for s, good in zip(member.seeds, ok) if not good]
                self._settle(request, NumericalError(f"the denoiser produced NaN/Inf for seeds "
                                                     f"{', '.join(map(str, bad[:10]))}"), "error")
                continue
            for k, i in zip(range(member.rows.start, member.rows.stop), range(member.index.start, member.index.stop)):
                request.images[i] = images[k]
                request.labels[i] = None if ints is None else ints[k]
            request.chunks_left -= 1
            if request.chunks_left == 0:
                now = time.perf_counter()
                labels = None if request.labels[0] is None else np.array(request.labels, dtype=np.int64)
                result = GenerationResult(np.stack(request.images), list(request.spec.seeds), labels, request.plan.solver,
                                          request.plan.nfe, request.admitted - request.submitted, now - request.admitted,
                                          now - request.submitted, request.admitted, tuple(request.plan.warnings))
                if self._settle(request, result, "ok"):
                    self.stats.images_done += len(request.spec.seeds)

    def _settle(self, request: _Request, outcome: Any, status: str) -> bool:
        """Resolve a request's future once (it may have been cancelled meanwhile)."""
        if request.settled:
            return False
        request.settled = True
        try:
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)
        except InvalidStateError:  # cancelled by its client a moment ago: that is its outcome
            request.cancelled = True
            self._deadlines.discard(request)
            self.stats.requests_cancelled += 1
            self.observer.request_done("cancelled", len(request.spec.seeds), None)
            return False
        if status == "ok":
            self.stats.requests_done += 1
        else:
            self.stats.requests_failed += 1
        self.observer.request_done(status, len(request.spec.seeds), outcome if status == "ok" else None)
        return True


def _cohorts(chunks: list) -> list:
    """Chunks admitted together merged by plan (same solver, time points, guidance) into one program each.

    Merging is per tick and never past the batch limit the scheduler admitted under, so what
    runs is the same set of rows; only the host work per step is shared.
    """
    merged: dict[int, _Chunk] = {}
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


__all__ = [
    "BusyError", "ContinuousScheduler", "DeadlineError", "Engine", "EngineObserver", "EngineStats",
    "GenerationResult", "ImageRequest", "OneRequestScheduler", "RequestBatchScheduler", "SCHEDULERS",
]
