"""Schedulers: which waiting chunks join the programs in flight before the next network call.

A scheduler only decides; its decision for a tick is a plain `SchedulerOutput` that the engine
carries out (start the admitted programs, make the call). A new scheduler is one class with the
`register` decorator: `Engine(scheduler=...)`, `serve --scheduler` and the serving benchmark
read `SCHEDULERS`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

from .requests import Chunk, merge_cohorts


@dataclass(frozen=True)
class SchedulerOutput:
    """One tick's decision: the chunks that leave the queue now, merged into one program per plan."""

    admitted: tuple[Chunk, ...]     # in admission order
    programs: tuple[Chunk, ...]     # the admitted chunks merged by plan (`merge_cohorts`): one step program each


@dataclass(frozen=True)
class SchedulerState:
    """What a scheduler may read at a tick besides the queue: the engine's clock and call rate."""

    now: float                      # time.perf_counter()
    seconds_per_call: float         # a recent network call's duration (a guess before the first)


class Scheduler:
    """Decides which waiting chunks join the programs in flight before a network call."""

    name = "scheduler"

    def schedule(self, waiting: collections.deque, in_flight: list, capacity: int,
                 state: SchedulerState) -> SchedulerOutput:
        admitted = self.admit(waiting, in_flight, capacity, state)
        return SchedulerOutput(tuple(admitted), tuple(merge_cohorts(admitted)))

    def admit(self, waiting: collections.deque, in_flight: list, capacity: int, state: SchedulerState) -> list:
        """Remove from `waiting` and return the chunks to start now (their cost within `capacity`)."""
        raise NotImplementedError

    @staticmethod
    def free_rows(in_flight: list, capacity: int) -> int:
        return capacity - sum(c.cost for c in in_flight)

    @staticmethod
    def _fill(waiting: collections.deque, free: int, limit: Optional[int] = None) -> list:
        """Pop chunks from the head of the queue while they fit (strictly FIFO: a head that does not fit waits)."""
        taken = []
        while waiting and waiting[0].cost <= free and (limit is None or len(taken) < limit):
            chunk = waiting.popleft()
            free -= chunk.cost
            taken.append(chunk)
        return taken


SCHEDULERS: dict[str, type[Scheduler]] = {}


def register(cls: type[Scheduler]) -> type[Scheduler]:
    """Add a scheduler to `SCHEDULERS` under its ``name``."""
    SCHEDULERS[cls.name] = cls
    return cls


@register
class ContinuousScheduler(Scheduler):
    """Step-level continuous batching, first come first served: a waiting chunk joins at the next call
    its rows fit into. A request in flight advances on every call, so none is starved."""

    name = "continuous"

    def admit(self, waiting, in_flight, capacity, state):
        return self._fill(waiting, self.free_rows(in_flight, capacity))


@register
class DeadlineScheduler(Scheduler):
    """Continuous batching that admits the waiting request with the earliest latest-start time first.

    What is known up front is each request's network evaluations (its plan's NFE), so the time it
    will spend in flight once admitted is s = NFE x the recent call duration: a request in flight
    advances on every call whatever else runs. A request's deadline D is its own (``deadline``
    seconds after submission) or, without one, arrival + ``stretch`` x s: it should take at most
    ``stretch`` times its own work. It must start by D - s, and the waiting request with the
    smallest D - s - priority x ``priority_calls`` x call time goes first.

    Why this and not plain shortest-remaining-work first: SRPT cuts the short requests' latency,
    but under sustained load a long request can wait forever behind a stream of short ones. Here
    a request's key is at most arrival + (stretch - 1) x s_max + a bounded priority shift (and
    an explicit deadline only moves it earlier), so any request that arrives later than that
    key plus the same bounds sorts behind it: the wait is bounded (aging is built into the key),
    short requests still pass long ones that arrived up to (stretch - 1) x (s_long - s_short)
    earlier, and with equal work the order is FIFO.

    Admission stays strict in key order: the first request that does not fit waits and nothing
    behind it is admitted past it, so a large request is not starved by small ones that fit.
    """

    name = "deadline"
    stretch = 2.0
    priority_calls = 16         # one priority level counts as arriving this many network calls earlier

    def key(self, chunk: Chunk, seconds_per_call: float) -> tuple[float, int]:
        request = chunk.request
        service = request.plan.nfe * seconds_per_call
        spec = request.spec
        due = request.submitted + (spec.deadline if spec.deadline is not None else self.stretch * service)
        return due - service - spec.priority * self.priority_calls * seconds_per_call, chunk.seq

    def admit(self, waiting, in_flight, capacity, state):
        free = self.free_rows(in_flight, capacity)
        if not waiting or free <= 0:
            return []
        order = sorted(waiting, key=lambda c: self.key(c, state.seconds_per_call))
        taken = []
        for chunk in order:
            if chunk.cost > free:
                break
            free -= chunk.cost
            taken.append(chunk)
        if taken:
            chosen = {id(c) for c in taken}
            kept = [c for c in waiting if id(c) not in chosen]
            waiting.clear()
            waiting.extend(kept)
        return taken


@register
class RequestBatchScheduler(Scheduler):
    """Request-level batching as general model servers do: the waiting requests that fit run to
    completion together; newcomers wait until the whole batch is done."""

    name = "request-batch"

    def admit(self, waiting, in_flight, capacity, state):
        return [] if in_flight else self._fill(waiting, capacity)


@register
class OneRequestScheduler(Scheduler):
    """One chunk at a time: every network call serves one request."""

    name = "one-request"

    def admit(self, waiting, in_flight, capacity, state):
        return [] if in_flight else self._fill(waiting, capacity, limit=1)
