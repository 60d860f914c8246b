"""The HTTP face of the serving engine: a FastAPI app over `runtime.serving.Engine`.

The app holds no state but the model (and the engine's queue), so replicas of it behind any load
balancer answer the same request with the same images (bit for bit under the engine's determinism
guarantee, reported in ``/v1/model``: batch-invariant, padded or fixed; see `runtime/serving/`). Endpoints:

* ``POST /v1/generate`` (``application/json``): the body `http_api.GenerateRequest` declares
  (seeds or n, class_idx, guidance, format png|grid|npz|json, ...) and every sampler option of
  `SamplerSettings` under its API name; with ``stream: true`` the answer is NDJSON
  (``application/x-ndjson``): a preview line every ``preview_every`` solver steps, then the
  result line (format json's body) or an error line ``{"error": ..., "status": ...}``; a client
  that goes away frees its rows before the next network call;
* ``GET /v1/model`` (the model, the solvers, the limits), ``GET /healthz`` (readiness: 503 while
  draining), ``GET /metrics`` (Prometheus text), ``GET /`` the web page, ``/docs`` the OpenAPI
  page (Swagger UI from the installed `fastapi-offline` package: no network needed), and HEAD on
  each GET path.

What the server trusts: nothing in a request. The body is refused on its declared length and
while it streams (``max_body_bytes``), must arrive within ``body_timeout`` seconds, must be
``application/json`` (a web page on another origin can send ``text/plain`` without asking: that
is refused, so a browser cannot be used to spend this server's time), and is read by the
project's bounded JSON reader; every field goes through the library's own checks
(`SamplerSettings.from_options`, `seeds.check_seeds`, `noise.check_class`, the plan on the
model) with the image count, the time points and the time a request may take bounded before any
of it is spent. There is no authentication: put the server behind a proxy that has it, or keep
it on a private network (it listens on 127.0.0.1 unless told otherwise).

Every answer that is not the images is the one error shape ``{"error": "..."}``: 400 for a bad
request (the library's own line, naming the JSON field), 404/405, 408 (body too slow), 413 (body
too large), 415 (not JSON), 503 with ``Retry-After`` (queue full, draining, abandoned at the
drain timeout), 504 (past the request's timeout), 500 (the model or the server failed).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import os
import threading
import time
from typing import Any, Optional

import numpy as np
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edm_deploy.http_api import (
    DEFAULT_BODY_TIMEOUT,
    MEDIA_TYPES,
    GenerateRequest,
    Limits,
    api_words,
    components,
    error_response,
    generate_responses,
    get_responses,
    parse_generate,
)
from edm_deploy.runtime.core.errors import EdmDeployError, InputError, first_line
from edm_deploy.runtime.serving import (
    BusyError,
    DeadlineError,
    Engine,
    EngineObserver,
    GenerationResult,
    Preview,
)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
RETRY_DRAINING_S = 5
UNREAD = {"Connection": "close"}  # a body left unread: the connection cannot carry another request
_log = logging.getLogger("edm_deploy.server")


# ------------------------------------------------------------------------------------------------
# Metrics


class PrometheusObserver(EngineObserver):
    """The engine's events and the front door's refusals as Prometheus metrics in the app's own registry."""

    def __init__(self, engine_ref: Any, max_batch: int):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch})
        self.calls = Counter("edm_deploy_network_calls", "Network calls made by the engine", registry=self.registry)
        self.real_rows = Counter("edm_deploy_rows", "Real rows of the model's calls (classifier-free twins included, "
                                 "padding not)", registry=self.registry)
        self.padded_rows = Counter("edm_deploy_padded_rows", "Rows of padding added to reach a batch size whose "
                                   "results match the full batch (see determinism in /v1/model)",
                                   registry=self.registry)
        self.rows = Histogram("edm_deploy_rows_per_call", "Rows of one network call", buckets=buckets,
                              registry=self.registry)
        self.call_seconds = Histogram("edm_deploy_network_call_seconds", "Seconds of one network call",
                                      buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                               5, 10), registry=self.registry)
        self.requests = Counter("edm_deploy_requests", "Requests the engine finished, by outcome", ["status"],
                                registry=self.registry)
        self.refused = Counter("edm_deploy_refused_requests", "Requests refused before the engine ran them, by reason "
                               "and status", ["reason", "status"], registry=self.registry)
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
        self.real_rows.inc(rows)
        self.rows.observe(rows)
        self.call_seconds.observe(seconds)

    def padding(self, rows: int) -> None:
        self.padded_rows.inc(rows)

    def request_done(self, status: str, images: int, result: Optional[GenerationResult]) -> None:
        self.requests.labels(status=status).inc()
        if result is not None:
            self.images.inc(images)
            self.latency.observe(result.total_s)
            with self._lock:
                self._recent.append((time.monotonic(), images))

    def refuse(self, reason: str, status: int) -> None:
        self.refused.labels(reason=reason, status=str(status)).inc()

    def images_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / window


# ------------------------------------------------------------------------------------------------
# Responses


def encode_result(result: GenerationResult, call: GenerateRequest) -> bytes:
    """The body of a finished request in the format it asked for (png, grid and npz as `sample` writes them)."""
    from edm_deploy.runtime.output.writers import encode_output

    if call.format == "json":
        return json.dumps(result_body(result)).encode()
    return encode_output(call.format, result.images, result.seeds, result.labels, grid_columns=call.grid_cols,
                         grid_scale=call.grid_scale or 1)[0]


def result_body(result: GenerationResult) -> dict:
    """The JSON result (format json, and a stream's last line)."""
    from edm_deploy.runtime.output.writers import encode_png

    return {
        "seeds": result.seeds,
        "labels": None if result.labels is None else [int(v) for v in result.labels],
        "images": [base64.b64encode(encode_png(im)).decode("ascii") for im in result.images],
        "solver": result.solver, "nfe": result.nfe,
        "seconds": round(result.total_s, 6), "queued_seconds": round(result.queued_s, 6),
        "run_seconds": round(result.run_s, 6), "warnings": [api_words(w) for w in result.warnings],
    }


def preview_line(preview: Preview) -> bytes:
    """A stream's preview: the denoised estimate quantised as the final images are, as PNGs."""
    from edm_deploy.runtime.output.writers import encode_png
    from edm_deploy.runtime.sampling.generate import quantize_uint8

    images = [base64.b64encode(encode_png(im)).decode("ascii") for im in quantize_uint8(preview.denoised)]
    return json.dumps({"preview": {"step": preview.step, "steps": preview.steps, "sigma": preview.sigma,
                                   "seeds": list(preview.seeds), "index": [preview.index.start, preview.index.stop],
                                   "images": images}}).encode() + b"\n"


class Refused(Exception):
    """A request answered with an error before the engine saw it: (status, reason for /metrics, message)."""

    def __init__(self, status: int, reason: str, message: str, **headers: str):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers


def check_declared_body(headers: Any, limit: int) -> None:
    """Refuse a body on what the headers say, before a byte of it is read: its length, then its type."""
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, "body_too_large", f"the request body is larger than {limit} bytes", **UNREAD)
    if not _is_json(headers.get("content-type")):
        raise Refused(415, "unsupported_media_type", "the request body must be application/json (send the header "
                                                     "Content-Type: application/json)", **UNREAD)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused as soon as it streams past `limit` bytes or takes over `timeout` s to arrive."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(request.receive(), timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            raise Refused(408, "body_timeout", f"the request body did not arrive within {timeout:g} s", **UNREAD) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, "body_too_large", f"the request body is larger than {limit} bytes", **UNREAD)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_json(content_type: Optional[str]) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _client_gone(request: Any) -> None:
    """Returns when the client disconnects (the next ASGI message after the body is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


# ------------------------------------------------------------------------------------------------
# ASGI wrappers


class HeadAsGet:
    """HEAD on any GET path: the GET's status and headers without its body (FastAPI routes lack HEAD)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class CloseWhileDraining:
    """While draining, every response says ``Connection: close``, so keep-alive clients move to another replica."""

    def __init__(self, app: Any, engine: Engine):
        self.app, self.engine = app, engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.engine.accepting:
            return await self.app(scope, receive, send)

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


# ------------------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, model_info: Optional[dict] = None, *, title: str = "edm-deploy",
               limits: Optional[Limits] = None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               drain: Any = None) -> Any:
    """The FastAPI app serving ``engine`` (started with the app, drained when it stops).

    ``limits`` bound what one request may ask (default: the engine's image limit and the
    `http_api` defaults); ``drain`` (a `listener.Drain`) counts the requests abandoned when a
    drain times out, for the process's exit status.
    """
    import weakref
    from contextlib import asynccontextmanager

    from fastapi_offline import FastAPIOffline

    from edm_deploy.runtime.core.version import __version__
    from edm_deploy.runtime.sampling.planner import plan_sampling
    from edm_deploy.runtime.sampling.settings import SamplerSettings
    from edm_deploy.runtime.sampling.solvers import SOLVER_REGISTRY

    den = engine.model
    limits = limits or Limits(max_images=engine.max_images, img_resolution=den.img_resolution)
    observer = PrometheusObserver(weakref.ref(engine), engine.max_batch)
    engine.observer = observer
    default_plan = plan_sampling(den, SamplerSettings())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPIOffline(title=title, version=__version__, lifespan=lifespan, redoc_url=None,
                         description="EDM diffusion sampling with step-level continuous batching across requests.")
    app.state.engine = engine
    app.state.observer = observer

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def refused(status: int, reason: str, message: str, **headers: str) -> JSONResponse:
        observer.refuse(reason, status)
        return error(status, message, **headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        words = {404: f"no such path: {request.url.path}",
                 405: f"{request.url.path} does not take {request.method}"}
        return error(exc.status_code, words.get(exc.status_code, str(exc.detail)), **(exc.headers or {}))

    json_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/healthz", summary="Readiness: 200 while taking requests, 503 while draining",
             responses=get_responses("Ready", json_content, 503))
    async def healthz() -> Any:
        if not engine.accepting:
            return error(503, "draining: finishing the requests in flight", **{"Retry-After": str(RETRY_DRAINING_S)})
        return {"status": "ok", "queue_length": engine.queue_length}

    @app.get("/v1/model", summary="The model, the solvers and the limits",
             responses=get_responses("The model and the server's limits",
                                     {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}))
    async def model() -> Any:
        sigma_max = float(den.sigma_max) if np.isfinite(den.sigma_max) else None
        positive = default_plan.sigmas[default_plan.sigmas > 0]
        return {
            "model": dict(model_info or {}),
            "img_resolution": den.img_resolution, "img_channels": den.img_channels, "label_dim": den.label_dim,
            "sigma_min": float(f"{positive[-1]:.12g}"), "sigma_max": float(f"{positive[0]:.12g}"),
            "model_sigma_min": float(den.sigma_min), "model_sigma_max": sigma_max,
            "solvers": {name: {"description": api_words(s.description), "reference": s.reference,
                               "nfe": api_words(s.nfe_formula), "options": [o for o in s.options if o != "randn_like"]}
                        for name, s in SOLVER_REGISTRY.items()},
            "limits": {"max_batch": engine.max_batch, "fixed_batch": engine.fixed_batch,
                       "max_queue": engine.max_queue, "max_images": limits.max_images, "max_steps": limits.max_steps,
                       "request_timeout": limits.request_timeout, "max_body_bytes": limits.max_body_bytes},
            "guidance": {"guide": engine.guide is not None,
                         "classifier_free": bool(den.label_dim) and (den.label_dropout is None or den.label_dropout > 0)},
            "scheduler": engine.scheduler.name,
            "determinism": str(engine.determinism),
        }

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse,
             responses=get_responses("The metrics", {"text/plain": {"schema": {"type": "string"}}}))
    async def metrics() -> Any:
        return Response(generate_latest(observer.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate", summary="Generate images", responses=generate_responses(),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}})
    async def generate(request: Request) -> Any:
        try:
            check_declared_body(request.headers, limits.max_body_bytes)
            raw = await read_body(request, limits.max_body_bytes, body_timeout)
            call = parse_generate(_loads(raw, limits.max_body_bytes), limits)
            previews: Optional[asyncio.Queue] = asyncio.Queue() if call.stream else None
            future = engine.submit(**call.engine_args(),  # submit checks the request as `Engine.request` does
                                   on_preview=_deliver(previews) if call.preview_every else None)
        except Refused as exc:
            return refused(exc.status, exc.reason, str(exc), **exc.headers)
        except ClientDisconnect:
            _log.info("a client went away while sending its request body")
            return Response(status_code=499)  # nobody reads it
        except BusyError as exc:
            reason = "draining" if not engine.accepting else "queue_full"
            return refused(503, reason, str(exc), **{"Retry-After": str(max(1, round(exc.retry_after)))})
        except EdmDeployError as exc:
            return refused(400, "bad_request", api_words(str(exc)))
        if previews is not None:
            return StreamingResponse(_lines(call, future, previews), media_type="application/x-ndjson")
        return await _answer(request, call, future)

    def _failure(call: GenerateRequest, exc: BaseException) -> tuple[int, str, dict[str, str]]:
        """A request's failure as (status, message in the API's words, headers)."""
        if isinstance(exc, asyncio.CancelledError):  # the engine let it go: the drain timed out
            if drain is not None:
                drain.note_abandoned()
            _log.warning(f"abandoned a request for seeds {_seeds_shown(call.seeds)} at the drain timeout")
            return 503, ("the server stopped before this request finished (its drain timed out); retry on another "
                         "replica"), {"Retry-After": str(RETRY_DRAINING_S)}
        if isinstance(exc, DeadlineError):
            return 504, str(exc), {}
        if isinstance(exc, InputError):  # found when the program started (e.g. sigmas a solver cannot step)
            observer.refuse("bad_request", 400)
            return 400, api_words(str(exc)), {}
        return 500, api_words(first_line(exc)), {}  # the model's or a backend's own failure: one line

    async def _answer(request: Request, call: GenerateRequest, future: Any) -> Any:
        waiting = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled: nobody waits for its rows
            gone.cancel()
            if not waiting.done():
                future.cancel()
        if not waiting.done():  # the client went away: its rows leave before the next network call
            return Response(status_code=499)
        try:
            result = waiting.result()
        except (asyncio.CancelledError, Exception) as exc:
            status, message, headers = _failure(call, exc)
            return error(status, message, **headers)
        content = encode_result(result, call)
        headers = {"X-Seconds": f"{result.total_s:.6f}", "X-NFE": str(result.nfe), "X-Solver": result.solver,
                   "X-Seeds": ",".join(map(str, result.seeds))}
        if result.warnings:
            warning = " | ".join(api_words(w) for w in result.warnings)
            headers["X-Warning"] = warning.encode("ascii", "replace").decode("ascii")
        return Response(content, media_type=MEDIA_TYPES[call.format], headers=headers)

    async def _lines(call: GenerateRequest, future: Any, previews: asyncio.Queue) -> Any:
        """A stream's lines: each preview as it comes, then the result or the error. If the client goes
        away, Starlette cancels this generator and the request's rows leave before the next call."""
        waiting = asyncio.wrap_future(future)
        try:
            while not waiting.done():
                getter = asyncio.ensure_future(previews.get())
                await asyncio.wait({waiting, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield preview_line(getter.result())
                else:
                    getter.cancel()
            while not previews.empty():  # those the engine sent before it finished
                yield preview_line(previews.get_nowait())
            try:
                last: dict = {"result": result_body(waiting.result())}
            except (asyncio.CancelledError, Exception) as exc:
                status, message, _ = _failure(call, exc)
                last = {"error": message, "status": status}
            yield json.dumps(last).encode() + b"\n"
        finally:
            if not waiting.done():
                future.cancel()

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components())
            for path in schema["paths"].values():  # every operation may meet an unknown path's 404 shape
                for operation in path.values():
                    operation["responses"].setdefault("404", error_response(404))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(HeadAsGet)
    app.add_middleware(CloseWhileDraining, engine=engine)
    return app


def _deliver(previews: asyncio.Queue) -> Any:
    """The engine's preview callback for a stream: hand each preview to the event loop's queue.

    It runs in the engine's thread; if the loop has closed, the call raises and the engine ends
    the request (its rows leave before the next network call).
    """
    loop = asyncio.get_running_loop()
    return lambda preview: loop.call_soon_threadsafe(previews.put_nowait, preview)


def _loads(raw: bytes, limit: int) -> Any:
    from edm_deploy.runtime.core.jsonio import loads_bounded

    return loads_bounded(raw or b"{}", "the request body", max_bytes=limit)


def _seeds_shown(seeds: list) -> str:
    return ",".join(map(str, seeds[:8])) + (",..." if len(seeds) > 8 else "")
