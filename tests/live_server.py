"""A real uvicorn server in a thread of the test process, built as `edm-deploy serve` builds it.

The same `listener.build_server` (guarded connections, the drain contract) on a socket from
`listener.bind`, so the front door is tested over TCP without a subprocess per server. Signals
cannot reach a thread: a test drains by calling ``server.handle_exit(signal.SIGTERM, None)``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator


@contextlib.contextmanager
def live_server(engine: Any, *, limits: Any = None, body_timeout: float = 30.0, header_timeout: float = 10.0,
                max_connections: int = 1024, drain_grace: float = 0.0, drain_timeout: float = 600.0,
                info: Any = None) -> Iterator[Any]:
    """Yields the server with ``.url``, ``.app``, ``.engine``, ``.drain`` and ``.thread``; stopped on exit."""
    from edm_deploy import listener
    from edm_deploy.server import create_app

    sock = listener.bind("127.0.0.1", 0)
    drain = listener.Drain(drain_grace, drain_timeout)
    app = create_app(engine, info or {"file": "model.onnx"}, limits=limits, body_timeout=body_timeout, drain=drain)
    server = listener.build_server(app, engine, sock, drain, header_timeout=header_timeout,
                                   max_connections=max_connections, on_listening=lambda _: None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    server.url, server.app, server.engine, server.drain, server.thread = listener.url_of(sock), app, engine, drain, thread
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
