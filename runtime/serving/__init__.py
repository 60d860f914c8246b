"""The serving engine: step-level continuous batching of many requests over one model.

Every solver is a step program (`solvers.py`): it yields the state and noise level it needs
evaluated and receives D back, so the rows of many requests, each at its own sigma and with its
own solver, NFE, class and guidance, can share one network call. Split as vLLM splits its
engine:

* `requests.py`: what a client asks for and gets back, and the request state in the engine
  (chunks of at most the batch limit, one step program each; requests admitted together with one
  plan share a program);
* `scheduler.py`: which waiting chunks join before a call; each tick's decision is a plain
  `SchedulerOutput`. FIFO (`continuous`), earliest latest-start (`deadline`, using each request's
  known NFE, deadline and priority, no starvation), and two baselines kept for comparison;
* `runner.py`: the one batched call per tick (classifier-free twins, the guide's call, the mix);
* `determinism.py`: at start-up, which batch shapes leave a row's result unchanged; calls are
  padded only to those;
* `engine.py`: the loop; `stats.py`: counters and the metrics hooks.

Determinism: an image depends only on (model, seed, class, sampler settings, guidance), never on
what else is in flight, provided the network's rows do not depend on their batch, which the
start-up check establishes or padding enforces (`Engine.determinism` says which). The sampler
arithmetic itself is per row and exact.

Usable without HTTP: ``engine.submit(...)`` returns a `concurrent.futures.Future`;
``await engine.generate(...)`` is the asyncio form. NumPy only, like the rest of the runtime.
"""

from .determinism import Determinism
from .engine import DEFAULT_MAX_IMAGES, DEFAULT_MAX_QUEUE, Engine
from .requests import BusyError, DeadlineError, GenerationResult, ImageRequest, Preview
from .scheduler import (
    SCHEDULERS,
    ContinuousScheduler,
    DeadlineScheduler,
    OneRequestScheduler,
    RequestBatchScheduler,
    Scheduler,
    SchedulerOutput,
    register,
)
from .stats import EngineObserver, EngineStats

__all__ = [
    "DEFAULT_MAX_IMAGES", "DEFAULT_MAX_QUEUE", "SCHEDULERS", "BusyError", "ContinuousScheduler", "DeadlineError",
    "DeadlineScheduler", "Determinism", "Engine", "EngineObserver", "EngineStats", "GenerationResult", "ImageRequest",
    "OneRequestScheduler", "Preview", "RequestBatchScheduler", "Scheduler", "SchedulerOutput", "register",
]
