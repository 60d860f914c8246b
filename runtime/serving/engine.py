"""The engine: one model, many requests, one loop that schedules step programs and runs their calls.

One thread owns the model and repeats: drop what was cancelled or timed out, let the scheduler
decide which waiting chunks join (`scheduler.py`), start their programs, let the runner make
the tick's one batched call (`runner.py`), send each program its rows, and finish the programs
that are done (their images quantised exactly as `sample` quantises them).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional, Sequence

import numpy as np

from ..core.contract import as_denoiser
from ..core.errors import InputError, NumericalError, check_int, check_number
from ..core.xp import all_finite_rows, to_host
from ..sampling.generate import guided, quantize_uint8
from ..sampling.guidance import check_guidance_args, check_interval, check_weight
from ..sampling.noise import check_class
from ..sampling.planner import SamplingPlan, plan_sampling
from ..sampling.seeds import check_seeds
from ..sampling.settings import SamplerSettings
from ..sampling.solvers import StepInfo
from .determinism import Determinism, combine, settle_shapes
from .requests import (
    PRIORITY_RANGE,
    BusyError,
    Chunk,
    DeadlineError,
    GenerationResult,
    ImageRequest,
    Preview,
    PreviewCallback,
    RequestState,
)
from .runner import ModelRunner, RunnerOutput
from .scheduler import SCHEDULERS, SchedulerState
from .stats import EngineObserver, EngineStats

_log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256          # requests waiting beyond those in flight
DEFAULT_MAX_IMAGES = 64          # images one request may ask for
FIRST_CALL_GUESS_S = 0.01        # the call duration a scheduler reads before the first call


class Engine:
    """One model, many requests: the loop that schedules step programs and makes the batched calls.

    ``den`` is any denoiser of the contract; ``guide`` an optional autoguidance model (requests
    with a guidance weight then use it; without it, guidance is classifier-free). ``max_batch``
    bounds the rows of one network call (default: the model's limit, else 64). Determinism:
    ``fixed_batch=N`` makes every call exactly N rows; otherwise, with ``check_invariance``, the
    engine checks before its first call (or at `check_shapes`) at which batch sizes a row's result
    is unchanged and pads only the others (`determinism.py`; the outcome is ``engine.determinism``). ``max_queue`` bounds the requests
    waiting, ``max_images`` the images of one request; ``scheduler`` names one of `SCHEDULERS`.
    """

    def __init__(self, den: Any, guide: Any = None, *, max_batch: Optional[int] = None,
                 fixed_batch: Optional[int] = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_images: int = DEFAULT_MAX_IMAGES, scheduler: str = "continuous",
                 observer: Optional[EngineObserver] = None, check_invariance: bool = True):
        den = as_denoiser(den)
        self.model = den
        self.guide_model = None if guide is None else as_denoiser(guide)
        limit = check_int(max_batch, "max_batch", lo=1) if max_batch is not None else (den.max_batch or 64)
        if den.max_batch is not None and limit > den.max_batch and fixed_batch is None:
            raise InputError(f"max_batch {limit} exceeds the model's batch limit {den.max_batch}", param="max_batch")
        if fixed_batch is not None:
            fixed_batch = check_int(fixed_batch, "fixed_batch", lo=1)
            limit = fixed_batch if max_batch is None else limit
        self.max_batch = limit
        self.fixed_batch = fixed_batch
        self.check_invariance = bool(check_invariance)
        self.max_queue = check_int(max_queue, "max_queue", lo=1)
        self.max_images = check_int(max_images, "max_images", lo=1)
        if scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}", param="scheduler")
        self.scheduler = SCHEDULERS[scheduler]()
        self.observer = observer or EngineObserver()
        self.stats = EngineStats()
        self.determinism = Determinism("pending" if self.check_invariance else "unchecked")
        self.den, self.guide = den, self.guide_model
        self.runner = ModelRunner(self.den, self.guide, int(den.label_dim))
        self._shapes_settled = self._shapes_pending = False
        if fixed_batch is not None:  # nothing to check: the shape is given (and refused here if too large)
            self.check_shapes()
        self._plans: dict = {}
        self._waiting: collections.deque = collections.deque()
        self._in_flight: list[Chunk] = []
        self._queued_requests = 0
        self._deadlines: set = set()       # requests with a timeout, not yet settled
        self._check_needed = False         # a cancel arrived: look before the next call
        self._call_seconds = FIRST_CALL_GUESS_S
        self._seq = itertools.count()
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._abandon = False              # shutdown(drain=False): cancel whatever is left
        self._thread: Optional[threading.Thread] = None

    # ----- lifecycle

    def start(self) -> Engine:
        """Start the loop; the batch shapes are checked before its first network call (`check_shapes`)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edm-deploy-engine", daemon=True)
                self._shapes_pending = not self._shapes_settled
                self._thread.start()
        return self

    def check_shapes(self) -> Determinism:
        """Check now which batch shapes leave a row's result unchanged (`determinism.py`) and pad to those.

        The engine does it itself before its first network call; call it before `start` to have
        the guarantee known (and its cost paid) before the first request. Idempotent.
        """
        if not self._shapes_settled:
            check = self.check_invariance
            model, den = settle_shapes(self.model, self.max_batch, self.fixed_batch, check)
            guide = None
            if self.guide_model is not None:
                guide, self.guide = settle_shapes(self.guide_model, self.max_batch, self.fixed_batch, check)
            self.den, self.determinism = den, combine(model, guide)
            self.runner = ModelRunner(self.den, self.guide, int(self.model.label_dim))
            self._shapes_settled = True
            _log.info("determinism: %s", self.determinism)
        self._shapes_pending = False
        return self.determinism

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
                timeout: Optional[float] = None, *, priority: Optional[int] = 0, deadline: Optional[float] = None,
                preview_every: Optional[int] = None) -> ImageRequest:
        """A checked `ImageRequest` (the same checks `sample` and `generate` make); raises InputError.

        ``priority`` (-10..10, None: 0) and ``deadline`` (seconds) are hints to a scheduler that
        reads them; ``preview_every`` asks for a preview every that many solver steps.
        """
        seeds = check_seeds(seeds)
        if len(seeds) > self.max_images:
            raise InputError(f"a request may ask for at most {self.max_images} images, got {len(seeds)}", param="seeds")
        class_idx = check_class(class_idx, self.model.label_dim, len(seeds))
        settings = SamplerSettings.coerce(settings)
        check_guidance_args(False, guidance, guidance_interval)
        if guidance is not None:
            guidance = check_weight(guidance)
            guidance_interval = None if guidance_interval is None else check_interval(guidance_interval)
        timeout, deadline = (_seconds(v, name) for v, name in ((timeout, "timeout"), (deadline, "deadline")))
        priority = 0 if priority is None else check_int(priority, "priority", lo=PRIORITY_RANGE[0], hi=PRIORITY_RANGE[1])
        if preview_every is not None:
            preview_every = check_int(preview_every, "preview_every", lo=1)
        request = ImageRequest(tuple(seeds), class_idx, settings, guidance, guidance_interval, timeout,
                               priority, deadline, preview_every)
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
               request: Optional[ImageRequest] = None, priority: int = 0, deadline: Optional[float] = None,
               preview_every: Optional[int] = None, on_preview: Optional[PreviewCallback] = None) -> Future:
        """Queue a request; the Future resolves to a `GenerationResult` (or raises the request's error).

        Bad input raises InputError here; a full queue or a draining engine raises `BusyError`.
        Cancelling the Future frees the request's rows before the next network call.
        ``priority`` (higher sooner) and ``deadline`` (seconds) are read by admission policies
        that use them (`scheduler.DeadlineScheduler`). With ``preview_every`` k, ``on_preview``
        gets a `Preview` after every k-th solver step, from the engine's thread (keep it short:
        hand the arrays over, e.g. to a queue); if it raises, the request fails with that error
        and its rows leave before the next call.
        """
        if request is not None:  # built by hand, it has had none of the checks: the same as any request
            seeds, class_idx, settings, guidance, guidance_interval, timeout = (
                request.seeds, request.class_idx, request.settings, request.guidance, request.guidance_interval,
                request.timeout)
            priority, deadline, preview_every = request.priority, request.deadline, request.preview_every
        request = self.request(seeds, class_idx, settings, guidance, guidance_interval, timeout,
                               priority=priority, deadline=deadline, preview_every=preview_every)
        if (request.preview_every is None) != (on_preview is None):
            raise InputError("preview_every and on_preview go together: how often, and where the previews go",
                             param="preview_every")
        plan = self._plan(request)
        w = request.guidance
        future: Future = Future()
        entry = RequestState(request, plan, future, classifier_free=w is not None and w != 1.0 and self.guide is None,
                             autoguided=w is not None and self.guide_model is not None, on_preview=on_preview)
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
            chunks.append(Chunk(entry, part, seeds[part], cls, next(self._seq)))
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
        # The callback holds the request weakly: request -> future -> callback -> request would be a
        # cycle, and every finished request would wait for the cyclic collector to free its images.
        future.add_done_callback(functools.partial(self._on_future_done, weakref.ref(entry)))
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
        return float(min(60.0, max(0.5, self.stats.seconds_per_call * 10)))

    # ----- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._drop_cancelled()
                decision = self.scheduler.schedule(self._waiting, self._in_flight, self.max_batch,
                                                   SchedulerState(time.perf_counter(), self._call_seconds))
                if not decision.admitted and not self._in_flight:
                    if self._stopping and not self._waiting:
                        return
                    self._lock.wait(timeout=self._wait_timeout())
                    continue
            try:
                for chunk in decision.programs:
                    self._start_program(chunk)
                if self._in_flight:
                    self._step()
            except Exception as exc:  # a fault of the engine itself: fail what it holds, keep serving
                _log.exception("the engine loop failed; its requests in flight fail with it")
                for chunk in list(decision.admitted) + self._in_flight:
                    self._fail_chunk(chunk, exc)
                self._in_flight = []

    def _wait_timeout(self) -> Optional[float]:
        if not self._deadlines:
            return None
        return max(0.0, min(r.deadline for r in self._deadlines) - time.perf_counter())

    def _start_program(self, chunk: Chunk) -> None:
        for member in chunk.members:
            request = member.request
            if request.admitted is None:  # its first chunk leaves the queue
                request.admitted = time.perf_counter()
                with self._lock:
                    self._queued_requests -= 1
        if chunk.settled:
            return
        try:
            final = chunk.start(self.den, self._preview_callback(chunk))
            if final is not None:  # (a program may finish without an evaluation)
                self._finish_chunk(chunk, final)
        except Exception as exc:  # a bad program start (a bug or a backend error) fails only its requests
            self._fail_chunk(chunk, exc)
            return
        if chunk.pending is not None:
            self._in_flight.append(chunk)

    def _step(self) -> None:
        """One network call for every pending evaluation in flight (and one guide call if any row needs it)."""
        chunks = [c for c in self._in_flight if c.pending is not None]
        if not chunks:
            return
        try:
            if self._shapes_pending:  # part of the first call: if the network fails here, this call failed
                self.check_shapes()
            out = self.runner.run(chunks)
        except Exception as exc:  # the call failed: every request in it fails, the engine goes on
            for chunk in chunks:
                self._fail_chunk(chunk, exc)
            self._in_flight = [c for c in self._in_flight if not c.settled]
            return
        self._record(out)
        for chunk, answer in zip(chunks, out.answers):
            if chunk.settled:
                continue
            try:
                final = chunk.send(answer)
                if final is not None:
                    self._finish_chunk(chunk, final)
            except Exception as exc:
                self._fail_chunk(chunk, exc)
        self._in_flight = [c for c in self._in_flight if c.pending is not None and not c.settled]

    def _record(self, out: RunnerOutput) -> None:
        stats = self.stats
        stats.network_calls += 1
        stats.rows += out.rows
        stats.network_seconds += out.seconds
        padded = out.padded_rows + out.guide_padded_rows
        stats.padded_rows += padded
        if out.guide_rows:
            stats.guide_calls += 1
            stats.guide_rows += out.guide_rows
        self._call_seconds = 0.8 * self._call_seconds + 0.2 * out.seconds if stats.network_calls > 1 else out.seconds
        self.observer.network_call(out.rows, out.seconds)
        if padded:
            self.observer.padding(padded)

    # ----- previews

    def _preview_callback(self, chunk: Chunk) -> Optional[Any]:
        """The program's step callback when a member asked for previews (else none: no cost per step)."""
        if not chunk.wants_previews:
            return None

        def on_step(info: StepInfo) -> None:
            step = info.i + 1
            for member in chunk.members:
                request = member.request
                if request.on_preview is None or request.settled or step % request.spec.preview_every:
                    continue
                preview = Preview(step, info.num_steps, info.sigma_next, member.index, tuple(member.seeds),
                                  np.array(to_host(info.denoised[member.rows]), dtype=np.float32))
                try:
                    request.on_preview(preview)
                except Exception as exc:  # the consumer is gone or broken: the request ends, its rows leave
                    _log.warning("a preview consumer failed (%s); its request ends", exc)
                    self._settle(request, exc, "error")

        return on_step

    # ----- outcomes

    def _on_future_done(self, ref: weakref.ref, future: Future) -> None:
        """A client's cancel: flag it for the loop, which frees the rows before the next call."""
        request = ref()
        if future.cancelled() and request is not None:
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

    def _fail_chunk(self, chunk: Chunk, exc: BaseException) -> None:
        for member in chunk.members:
            self._settle(member.request, exc, "error")

    def _finish_chunk(self, chunk: Chunk, x: Any) -> None:
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
                self._settle(request, result, "ok")

    def _settle(self, request: RequestState, outcome: Any, status: str) -> bool:
        """Resolve a request's future once (it may have been cancelled meanwhile).

        The request is counted before its future resolves, so a client that reads the statistics
        (or /metrics) after its answer always finds its own request in them."""
        if request.settled:
            return False
        request.settled = True
        observed = False
        if not request.future.done():
            self._count_settled(request, status, +1)
            self.observer.request_done(status, len(request.spec.seeds), outcome if status == "ok" else None)
            try:
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)
                return True
            except InvalidStateError:  # cancelled between the check and now: the engine's own count follows
                self._count_settled(request, status, -1)
                observed = True
        request.cancelled = True  # cancelled by its client a moment ago: that is its outcome
        self._deadlines.discard(request)
        self.stats.requests_cancelled += 1
        if not observed:
            self.observer.request_done("cancelled", len(request.spec.seeds), None)
        return False

    def _count_settled(self, request: RequestState, status: str, sign: int) -> None:
        """Add (sign +1) or take back (-1) a settled request in the engine's own counters."""
        if status == "ok":
            self.stats.requests_done += sign
            self.stats.images_done += sign * len(request.spec.seeds)
        else:
            self.stats.requests_failed += sign


def _seconds(value: Any, name: str) -> Optional[float]:
    """A positive finite number of seconds, or None."""
    if value is None:
        return None
    seconds = check_number(value, name)
    if not seconds > 0:
        raise InputError(f"{name} must be a positive number of seconds, got {value!r}", param=name)
    return float(seconds)
