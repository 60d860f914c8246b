"""The HTTP face of the serving engine: a FastAPI app over `runtime.engine.Engine`.

The app holds no state but the model (and the engine's queue), so replicas of it behind any load
balancer answer the same request with the same images (under ``fixed_batch``, bit for bit: see
`runtime/engine.py`). Endpoints:

* ``POST /v1/generate``: images for ``seeds`` (a list, or the CLI's text form ``"0-7,10"``) or
  ``n`` (seeds 0..n-1), with ``class_idx`` (one class, or one per seed), every sampler option of
  `SamplerSettings` under its API name (``solver``, ``nfe``, ``num_steps``, ``sigmas``, ...),
  ``guidance`` and ``guidance_interval``, and ``format``: ``png`` (one image), ``grid`` (one PNG
  grid; ``grid_cols``, ``grid_scale``), ``npz`` (uint8 NHWC images, seeds, labels) or ``json``
  (base64 PNGs with their seeds and labels; the default for several images);
* ``GET /v1/model``: the manifest, the solvers, the limits; ``GET /healthz``; ``GET /metrics``
  (Prometheus: queue length, rows per network call, images/s, latency histogram); ``GET /`` the
  web page; ``/docs`` the OpenAPI page.

Every request goes through the library's own checks (`SamplerSettings.from_options`,
`seeds.check_seeds`, `noise.check_class`, the plan on the model), so a mistake gets the same one
line the CLI and the Python API give (naming the JSON field where the CLI names its flag), as a
400; a full queue or a draining server is a 503 with ``Retry-After``; a request past its
``timeout`` a 504. A client that goes away cancels its request, which frees its rows.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import io
import json
import os
import threading
import time
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from edm_deploy.runtime.engine import BusyError, DeadlineError, Engine, EngineObserver, GenerationResult
from edm_deploy.runtime.errors import EdmDeployError, InputError, NumericalError, check_int, first_line
from edm_deploy.runtime.settings import ALIASES, SETTING_NAMES, SamplerSettings

FORMATS = ("png", "grid", "npz", "json")
MAX_BODY_BYTES = 1 << 20
MAX_GRID_SCALE = 16
REQUEST_FIELDS = ("seeds", "n", "class_idx", "guidance", "guidance_interval", "format", "grid_cols", "grid_scale",
                  "timeout")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclasses.dataclass
class GenerateCall:
    """A parsed ``POST /v1/generate`` body: the engine's request and how to answer it."""

    seeds: list
    class_idx: Any
    settings: SamplerSettings
    guidance: Optional[float]
    guidance_interval: Any
    timeout: Optional[float]
    format: str
    grid_cols: Optional[int]
    grid_scale: int


def parse_generate(body: Any) -> GenerateCall:
    """The body's fields checked by the library's own functions; anything wrong is one InputError."""
    from edm_deploy.runtime.seeds import parse_seeds, seeds_from_count

    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    unknown = [k for k in body if k not in REQUEST_FIELDS and k not in SETTING_NAMES]
    if unknown:
        meant = ALIASES.get(unknown[0])
        hint = f" (the API calls it {meant})" if meant else ""
        raise InputError(f"unknown field {unknown[0]!r}{hint}; the fields are "
                         f"{', '.join(sorted(REQUEST_FIELDS + SETTING_NAMES))}", param=unknown[0])
    if body.get("seeds") is not None and body.get("n") is not None:
        raise InputError("give seeds or n, not both", param=("seeds", "n"))
    seeds = body.get("seeds")
    if body.get("n") is not None:
        seeds = seeds_from_count(body["n"])
    elif seeds is None:
        seeds = [0]
    elif isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    settings = SamplerSettings.from_options(**{k: body[k] for k in SETTING_NAMES if k in body})
    fmt = body.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", param="format")
    scale = check_int(body.get("grid_scale", 1), "grid_scale", 1, MAX_GRID_SCALE)
    cols = None if body.get("grid_cols") is None else check_int(body["grid_cols"], "grid_cols", lo=1)
    if isinstance(seeds, list) and fmt == "png" and len(seeds) != 1:
        raise InputError(f"format png holds one image; {len(seeds)} seeds were given (use grid, npz or json)",
                         param="format")
    interval = body.get("guidance_interval")
    return GenerateCall(seeds, body.get("class_idx"), settings, body.get("guidance"),
                        None if interval is None else tuple(interval) if isinstance(interval, list) else interval,
                        body.get("timeout"), fmt or ("png" if isinstance(seeds, list) and len(seeds) == 1 else "json"),
                        cols, scale)


def request_schema() -> dict:
    """The JSON schema of the generate body for the OpenAPI page, from the settings' own fields."""
    props: dict[str, Any] = {
        "seeds": {"description": "Seeds: a list of integers in [0, 2^32) or the CLI's text form '0-7,10' "
                                 "[default: [0]]", "anyOf": [{"type": "array", "items": {"type": "integer"}},
                                                              {"type": "string"}]},
        "n": {"type": "integer", "description": "Seeds 0..n-1 instead of seeds."},
        "class_idx": {"description": "One class for all images, or a list with one class per seed [default: random "
                                     "per seed]", "anyOf": [{"type": "integer"},
                                                            {"type": "array", "items": {"type": "integer"}}]},
        "guidance": {"type": "number", "description": "Guidance weight W: D = D_g + W (D - D_g), by the server's "
                                                      "guide model or, without one, classifier-free."},
        "guidance_interval": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2,
                              "description": "Guide only for lo < sigma <= hi."},
        "format": {"type": "string", "enum": list(FORMATS),
                   "description": "png (one image), grid, npz or json [default: png for one image, else json]."},
        "grid_cols": {"type": "integer", "description": "Grid width in images."},
        "grid_scale": {"type": "integer", "description": f"Grid pixels per image pixel, 1..{MAX_GRID_SCALE}."},
        "timeout": {"type": "number", "description": "Seconds; a request still running then gets a 504."},
    }
    types = {"int": {"type": "integer"}, "float": {"type": "number"}, "flag": {"type": "boolean"},
             "sigmas": {"type": "array", "items": {"type": "number"}}}
    for f in dataclasses.fields(SamplerSettings):
        meta = f.metadata
        entry = dict(types.get(meta["kind"], {"type": "string"}))
        if meta["kind"] == "choice":
            entry["enum"] = list(meta["choices"])
        entry["description"] = meta["doc"] + "."
        props[f.name] = entry
    return {"type": "object", "properties": props, "additionalProperties": False}


# ------------------------------------------------------------------------------------------------
# Metrics


class PrometheusObserver(EngineObserver):
    """The engine's events as Prometheus metrics in the app's own registry."""

    def __init__(self, engine_ref: Any, max_batch: int):
        self.registry = CollectorRegistry()
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch})
        self.calls = Counter("edm_deploy_network_calls", "Network calls made by the engine", registry=self.registry)
        self.rows = Histogram("edm_deploy_rows_per_call", "Rows of one network call", buckets=buckets,
                              registry=self.registry)
        self.requests = Counter("edm_deploy_requests", "Requests finished, by outcome", ["status"],
                                registry=self.registry)
        self.images = Counter("edm_deploy_images", "Images delivered", registry=self.registry)
        self.latency = Histogram("edm_deploy_request_latency_seconds", "Submission to last image",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        queue = Gauge("edm_deploy_queue_length", "Requests waiting to start", registry=self.registry)
        queue.set_function(lambda: engine_ref().queue_length if engine_ref() else 0)
        in_flight = Gauge("edm_deploy_rows_in_flight", "Rows of the requests in flight", registry=self.registry)
        in_flight.set_function(lambda: engine_ref().rows_in_flight if engine_ref() else 0)
        rate = Gauge("edm_deploy_images_per_second", "Images delivered per second over the last minute",
                     registry=self.registry)
        rate.set_function(self.images_per_second)
        self._recent: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def network_call(self, rows: int, seconds: float) -> None:
        self.calls.inc()
        self.rows.observe(rows)

    def request_done(self, status: str, images: int, result: Optional[GenerationResult]) -> None:
        self.requests.labels(status=status).inc()
        if result is not None:
            self.images.inc(images)
            self.latency.observe(result.total_s)
            with self._lock:
                self._recent.append((time.monotonic(), images))

    def images_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / window


# ------------------------------------------------------------------------------------------------
# Responses


def encode_result(result: GenerationResult, call: GenerateCall) -> tuple[bytes, str]:
    """(body, media type) of a finished request in the format it asked for."""
    from edm_deploy.runtime.writers import encode_png, make_grid

    if call.format == "png":
        return encode_png(result.images[0]), "image/png"
    if call.format == "grid":
        grid = make_grid(result.images, call.grid_cols)
        if call.grid_scale > 1:
            grid = grid.repeat(call.grid_scale, axis=0).repeat(call.grid_scale, axis=1)
        return encode_png(grid), "image/png"
    if call.format == "npz":
        buffer = io.BytesIO()
        arrays = {"images": result.images, "seeds": np.asarray(result.seeds, dtype=np.int64)}
        if result.labels is not None:
            arrays["labels"] = result.labels
        np.savez(buffer, **arrays)
        return buffer.getvalue(), "application/octet-stream"
    body = {
        "seeds": result.seeds,
        "labels": None if result.labels is None else [int(v) for v in result.labels],
        "images": [base64.b64encode(encode_png(im)).decode("ascii") for im in result.images],
        "solver": result.solver, "nfe": result.nfe,
        "seconds": round(result.total_s, 6), "queued_seconds": round(result.queued_s, 6),
        "run_seconds": round(result.run_s, 6), "warnings": list(result.warnings),
    }
    return json.dumps(body).encode(), "application/json"


async def _client_gone(request: Any) -> None:
    """Returns when the client disconnects (the next ASGI message after the body is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def create_app(engine: Engine, model_info: Optional[dict] = None, *, title: str = "edm-deploy") -> Any:
    """The FastAPI app serving ``engine`` (started with the app, drained when it stops)."""
    import weakref
    from contextlib import asynccontextmanager

    from edm_deploy.runtime.solvers import SOLVER_REGISTRY
    from edm_deploy.runtime.version import __version__

    observer = PrometheusObserver(weakref.ref(engine), engine.max_batch)
    engine.observer = observer

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title=title, version=__version__, lifespan=lifespan,
                  description="EDM diffusion sampling with step-level continuous batching across requests.")
    app.state.engine = engine

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz() -> Any:
        if not engine.accepting:
            return error(503, "draining: finishing the requests in flight", **{"Retry-After": "5"})
        return {"status": "ok", "queue_length": engine.queue_length}

    @app.get("/v1/model", summary="The model's manifest, the solvers and the limits")
    async def model() -> Any:
        den = engine.model
        return {
            "model": model_info or {},
            "img_resolution": den.img_resolution, "img_channels": den.img_channels, "label_dim": den.label_dim,
            "sigma_min": den.sigma_min, "sigma_max": den.sigma_max,
            "solvers": {name: {"description": s.description, "reference": s.reference, "nfe": s.nfe_formula,
                               "options": [o for o in s.options if o != "randn_like"]}
                        for name, s in SOLVER_REGISTRY.items()},
            "limits": {"max_batch": engine.max_batch, "fixed_batch": engine.fixed_batch,
                       "max_queue": engine.max_queue, "max_images": engine.max_images},
            "guidance": {"guide": engine.guide is not None,
                         "classifier_free": bool(den.label_dim) and (den.label_dropout is None or den.label_dropout > 0)},
            "scheduler": engine.scheduler.name,
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Any:
        return Response(generate_latest(observer.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate", summary="Generate images", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": request_schema()}}}},
        responses={200: {"content": {"image/png": {}, "application/json": {}, "application/octet-stream": {}},
                         "description": "The images in the asked format"},
                   400: {"description": "A bad request: one line saying what is wrong"},
                   503: {"description": "Queue full or draining; see Retry-After"},
                   504: {"description": "Past the request's timeout"}})
    async def generate(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            return error(400, "the request body is not valid JSON")
        try:
            call = parse_generate(body)
            future = engine.submit(call.seeds, call.class_idx, call.settings, call.guidance, call.guidance_interval,
                                   call.timeout)
        except BusyError as exc:
            return error(503, str(exc), **{"Retry-After": str(max(1, round(exc.retry_after)))})
        except EdmDeployError as exc:
            return error(400, str(exc))
        waiting = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (a forced shutdown): nobody waits for its rows
            gone.cancel()
            if not waiting.done():
                future.cancel()
        if not waiting.done():  # the client went away: its rows leave before the next network call
            return Response(status_code=499)
        try:
            result = waiting.result()
        except DeadlineError as exc:
            return error(504, str(exc))
        except NumericalError as exc:
            return error(500, str(exc))
        except asyncio.CancelledError:
            return error(503, "the request was cancelled (the server is stopping)", **{"Retry-After": "5"})
        except Exception as exc:  # a backend's own error (onnxruntime, torch): one line, not a traceback
            return error(500, first_line(exc))
        content, media = encode_result(result, call)
        headers = {"X-Seconds": f"{result.total_s:.6f}", "X-NFE": str(result.nfe), "X-Solver": result.solver,
                   "X-Seeds": ",".join(map(str, result.seeds))}
        if result.warnings:
            headers["X-Warning"] = " | ".join(result.warnings).encode("ascii", "replace").decode("ascii")
        return Response(content, media_type=media, headers=headers)

    return app
