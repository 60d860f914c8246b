"""`edm-deploy serve`: an HTTP server over one model, with step-level continuous batching."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Optional

import click

from edm_deploy import sigterm
from edm_deploy.commands.common import FiniteFloat, backend_options, load_from_options
from edm_deploy.runtime.serving.scheduler import SCHEDULERS


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--guide", type=click.Path(dir_okay=False), default=None, help="Autoguidance model for requests that ask for guidance (without it, guidance is classifier-free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port, printed at start).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Rows of one network call [default: the model's limit, else 64].")
@click.option("--fixed-batch", type=click.IntRange(min=1), default=None, help="Every network call exactly N rows (padded), so a served image equals `sample --fixed-batch N` bit for bit.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True, help="Requests that may wait; beyond it a 503 with Retry-After.")
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True, help="Images one request may ask for.")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="continuous", show_default=True, help="How requests share network calls (the alternatives are for comparison).")
@click.option("--drain-timeout", type=FiniteFloat(0), default=600.0, show_default=True, help="Seconds SIGTERM waits for the requests in flight.")
@backend_options
def serve(model: str, **params: Any) -> None:
    """Serve MODEL over HTTP: many clients, their rows batched step by step.

    Each tick, the rows of every request in flight (other solvers, NFEs, classes, guidance; each
    at its own sigma) go through the network in one call of at most --max-batch rows; requests
    join and leave between calls. POST /v1/generate takes JSON with the Python API's names
    (seeds or n, class_idx, solver, nfe, num_steps, sigmas, guidance, format png|grid|npz|json);
    GET / is a web page, /docs the OpenAPI page, /v1/model the model and limits, /healthz,
    /metrics (Prometheus). SIGTERM drains: requests in flight finish, new ones get 503, then the
    server exits. The server holds no state but the model: replicas behind a load balancer
    answer alike (bit for bit with --fixed-batch).

    \b
    Examples:
      edm-deploy serve model.onnx --port 8000
      edm-deploy serve model.onnx --fixed-batch 32 --host 0.0.0.0
      curl -s localhost:8000/v1/generate -d '{"seeds": [3], "solver": "ipndm", "nfe": 5}' -o 3.png
    """
    from edm_deploy.runtime.optional import require

    uvicorn = require("uvicorn", "edm-deploy serve")
    require("fastapi", "edm-deploy serve")
    from edm_deploy.loading import read_manifest
    from edm_deploy.runtime.engine import Engine
    from edm_deploy.runtime.fileio import sha256_file
    from edm_deploy.server import create_app

    with contextlib.ExitStack() as models:
        den = models.enter_context(load_from_options(model, params))
        guide = (models.enter_context(load_from_options(params["guide"], params, only_applicable=True))
                 if params["guide"] else None)
        engine = Engine(den, guide, max_batch=params["max_batch"], fixed_batch=params["fixed_batch"],
                        max_queue=params["max_queue"], max_images=params["max_images"], scheduler=params["scheduler"])
        for note in den.warnings:
            click.echo(f"warning: {note}", err=True)
        info = {"file": model, "sha256": sha256_file(model), "manifest": read_manifest(model), "backend": den.describe()}
        if params["guide"]:
            info["guide"] = {"file": params["guide"], "sha256": sha256_file(params["guide"])}
        app = create_app(engine, info)
        config = uvicorn.Config(app, host=params["host"], port=params["port"], log_level="warning",
                                timeout_graceful_shutdown=params["drain_timeout"], lifespan="on")
        server = draining_server(uvicorn, config, engine)
        sigterm.extend_sigterm_grace(params["drain_timeout"] + sigterm.SIGTERM_GRACE_S)
        click.echo(f"serving {model} ({den.describe()}) with {engine.scheduler.name} batching, at most "
                   f"{engine.max_batch} rows per call", err=True)
        server.run()
        stats = engine.stats
        click.echo(f"stopped: {stats.requests_done} requests ({stats.images_done} images) served, "
                   f"{stats.network_calls} network calls, {stats.rows_per_call:.1f} rows per call", err=True)


def draining_server(uvicorn: Any, config: Any, engine: Any) -> Any:
    """uvicorn's server with SIGTERM as a drain: the engine refuses new requests at once (503),
    uvicorn stops listening and waits for the requests in flight, then the process exits 0."""

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Optional[Any]) -> None:
            engine.stop_accepting()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True  # not re-raised afterwards: a drained server exits cleanly

        def _log_started_message(self, listeners: Any) -> None:
            for sock in listeners:
                host, port = sock.getsockname()[:2]
                click.echo(f"listening on http://{host}:{port}", err=True)

    return DrainingServer(config)
