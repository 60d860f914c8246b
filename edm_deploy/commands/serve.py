"""`edm-deploy serve`: an HTTP server over one model, with step-level continuous batching."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import click

from edm_deploy import sigterm
from edm_deploy.commands.common import FiniteFloat, backend_options, load_from_options
from edm_deploy.http_api import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_STEPS, DEFAULT_REQUEST_TIMEOUT
from edm_deploy.runtime.core.errors import first_line
from edm_deploy.runtime.core.schedules import MAX_STEPS
from edm_deploy.runtime.serving.scheduler import SCHEDULERS


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--guide", type=click.Path(dir_okay=False), default=None, help="Autoguidance model for requests that ask for guidance (without it, guidance is classifier-free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 or :: for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port, printed at start).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Rows of one network call [default: the model's limit, else 64].")
@click.option("--fixed-batch", type=click.IntRange(min=1), default=None, help="Every network call exactly N rows (padded), so a served image equals `sample --fixed-batch N` bit for bit.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True, help="Requests that may wait; beyond it a 503 with Retry-After.")
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True, help="Images one request may ask for.")
@click.option("--max-steps", type=click.IntRange(1, MAX_STEPS), default=DEFAULT_MAX_STEPS, show_default=True, help="Time points one request may ask for (num_steps, nfe or sigmas).")
@click.option("--request-timeout", type=FiniteFloat(0, lo_open=True), default=DEFAULT_REQUEST_TIMEOUT, show_default=True, help="Seconds a request may take, queue included (504 after); also the most a request's own timeout may be.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True, help="Open connections; beyond them a new one gets 503 at once.")
@click.option("--header-timeout", type=FiniteFloat(0, lo_open=True), default=10.0, show_default=True, help="Seconds a connection may take to send its request headers.")
@click.option("--body-timeout", type=FiniteFloat(0, lo_open=True), default=DEFAULT_BODY_TIMEOUT, show_default=True, help="Seconds a request body may take to arrive (408 after).")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="continuous", show_default=True, help="How requests share network calls (the alternatives are for comparison).")
@click.option("--drain-grace", type=FiniteFloat(0), default=5.0, show_default=True, help="Seconds the listener stays open after SIGTERM, answering 503, while a load balancer notices /healthz failing.")
@click.option("--drain-timeout", type=FiniteFloat(0), default=600.0, show_default=True, help="Seconds after SIGTERM the requests in flight may take; then they get 503 and the exit status is 75.")
@backend_options
def serve(model: str, **params: Any) -> int:
    """Serve MODEL over HTTP: many clients, their rows batched step by step.

    Each tick, the rows of every request in flight (other solvers, NFEs, classes, guidance; each
    at its own sigma) go through the network in one call of at most --max-batch rows; requests
    join and leave between calls. POST /v1/generate takes JSON (Content-Type: application/json)
    with the Python API's names (seeds or n, class_idx, solver, nfe, num_steps, sigmas, guidance,
    format png|grid|npz|json); GET / is a web page, /docs the OpenAPI page, /v1/model the model
    and limits, /healthz readiness, /metrics (Prometheus). The server holds no state but the
    model: replicas behind a load balancer answer alike (bit for bit with --fixed-batch).

    SIGTERM drains: at once /healthz answers 503 and new requests get 503 with Retry-After while
    the requests in flight go on; the listener stays open at least --drain-grace seconds, then
    closes when nothing is in flight, and the process exits 0. Requests still running
    --drain-timeout seconds after the signal get 503, one log line each, and the exit status is
    75. Ctrl-C drains without the grace; a second Ctrl-C stops at once.

    \b
    Examples:
      edm-deploy serve model.onnx --port 8000
      edm-deploy serve model.onnx --fixed-batch 32 --host 0.0.0.0
      curl -s localhost:8000/v1/generate -H 'Content-Type: application/json' -d '{"seeds": [3], "solver": "ipndm", "nfe": 5}' -o 3.png
    """
    from edm_deploy.runtime.core.optional import require

    for module in ("uvicorn", "fastapi", "fastapi_offline", "prometheus_client"):
        require(module, "edm-deploy serve")
    from edm_deploy import listener
    from edm_deploy.http_api import Limits
    from edm_deploy.loading import read_manifest
    from edm_deploy.runtime.core.fileio import sha256_file
    from edm_deploy.runtime.serving import Engine
    from edm_deploy.server import create_app

    listener.check_connection_limit(params["max_connections"])
    sock = listener.bind(params["host"], params["port"])  # a busy port fails here, before the model loads
    with contextlib.closing(sock), contextlib.ExitStack() as models:
        den = models.enter_context(load_from_options(model, params))
        guide = (models.enter_context(load_from_options(params["guide"], params, only_applicable=True))
                 if params["guide"] else None)
        engine = Engine(den, guide, max_batch=params["max_batch"], fixed_batch=params["fixed_batch"],
                        max_queue=params["max_queue"], max_images=params["max_images"], scheduler=params["scheduler"])
        for note in den.warnings:
            click.echo(f"warning: {note}", err=True)
        info = {"file": os.path.basename(model), "sha256": sha256_file(model), "manifest": read_manifest(model),
                "backend": den.describe()}
        if params["guide"]:
            info["guide"] = {"file": os.path.basename(params["guide"]), "sha256": sha256_file(params["guide"])}
        drain = listener.Drain(params["drain_grace"], params["drain_timeout"])
        limits = Limits(max_images=engine.max_images, img_resolution=den.img_resolution,
                        max_steps=params["max_steps"], request_timeout=params["request_timeout"])
        app = create_app(engine, info, limits=limits, body_timeout=params["body_timeout"], drain=drain)
        _log_to_stderr()
        server = listener.build_server(app, engine, sock, drain, header_timeout=params["header_timeout"],
                                       max_connections=params["max_connections"], on_listening=lambda _: click.echo(
                                           f"listening on {listener.url_of(sock)}", err=True))
        sigterm.extend_sigterm_grace(params["drain_grace"] + params["drain_timeout"] + 2 * listener.ABANDON_WAIT_S
                                     + sigterm.SIGTERM_GRACE_S)
        click.echo(f"serving {model} ({den.describe()}) with {engine.scheduler.name} batching, at most "
                   f"{engine.max_batch} rows per call", err=True)
        click.echo(f"determinism: {_check_shapes(engine)}", err=True)
        server.run(sockets=[sock])
        stats = engine.stats
        click.echo(f"stopped: {stats.requests_done} requests ({stats.images_done} images) served, "
                   f"{stats.network_calls} network calls, {stats.rows_per_call:.1f} rows per call, "
                   f"{stats.padded_rows} padded rows", err=True)
        if drain.abandoned:
            click.echo(f"error: {drain.abandoned} requests were abandoned when the drain timeout of "
                       f"{params['drain_timeout']:g} s ran out (exit status {listener.ABANDONED_EXIT})", err=True)
            return listener.ABANDONED_EXIT
    return 0


def _check_shapes(engine: Any) -> str:
    """The engine's determinism guarantee, checked before the first request (or, if the network fails
    now, with the first call)."""
    try:
        return str(engine.check_shapes())
    except Exception as exc:  # a backend's own error: said in one line; the first call tries again
        return f"{engine.determinism} (the check failed now: {first_line(exc)})"


def _log_to_stderr() -> None:
    """The server's own lines (a disconnect, an abandoned request, an overload) on stderr, one line each."""
    logger = logging.getLogger("edm_deploy.server")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
