"""The serving engine's former import path; the engine lives in `runtime.serving`.

Kept only while `edm_deploy.server` and `edm_deploy.commands.serve` still import from here.
"""

from edm_deploy.runtime.serving import (  # noqa: F401
    SCHEDULERS,
    BusyError,
    ContinuousScheduler,
    DeadlineError,
    Engine,
    EngineObserver,
    EngineStats,
    GenerationResult,
    ImageRequest,
    OneRequestScheduler,
    RequestBatchScheduler,
)
