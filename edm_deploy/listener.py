"""The serving process around the app: its socket, slow and surplus clients, and the drain on SIGTERM.

uvicorn runs the app; this module adds what a process behind a load balancer needs and uvicorn
leaves open:

* the socket is bound before the model loads, so a busy port is one error line, not a server that
  printed "serving" and then died;
* a connection must deliver its request headers within ``header_timeout`` seconds (uvicorn only
  times out idle keep-alive connections, and resets that on any byte); beyond ``max_connections``
  open connections a new one is answered 503 and closed at once, and the overload is logged once
  when it starts and once when it ends, never per connection;
* the drain contract (`DrainingServer`): on SIGTERM /healthz fails (readiness), new requests get
  503 with Retry-After and ``Connection: close``, the requests in flight go on; the listener stays
  open for at least ``drain_grace`` seconds (the time a balancer needs to see the failing probe),
  then closes as soon as nothing is in flight. Requests still running ``drain_timeout`` seconds
  after the signal are abandoned: each gets the JSON 503, the log one line each, and the process
  exits with `ABANDONED_EXIT`. Ctrl-C drains the same way without the grace; a second one abandons.
"""

from __future__ import annotations

import errno
import logging
import resource
import signal
import socket
import time
from typing import Any, Callable, Optional

from edm_deploy.runtime.core.errors import InputError

ABANDONED_EXIT = 75           # sysexits' EX_TEMPFAIL: the drain timed out and requests were abandoned
FD_RESERVE = 64               # file descriptors kept for the model, logs and the listener itself
_log = logging.getLogger("edm_deploy.server")

BUSY_BODY = b'{"error":"the server has too many open connections; retry shortly"}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                 b"connection: close\r\ncontent-length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket, an IPv6 host in brackets."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on (host, port); a busy port or an unknown host is one InputError."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {shown}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        why = (exc.strerror or str(exc)).lower()
        raise InputError(f"cannot listen on {shown}: {why}"
                         + (" (another server holds the port: choose another --port)"
                            if exc.errno == errno.EADDRINUSE else "")) from None
    sock.setblocking(False)
    return sock


def check_connection_limit(max_connections: int) -> int:
    """Raise the open-file limit to its hard maximum; `max_connections` must fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if max_connections + FD_RESERVE > soft:
        raise InputError(f"max_connections {max_connections} needs more open files than this process may have "
                         f"({soft}, ulimit -n); lower it or raise the limit", param="max_connections")
    return max_connections


class OverloadLog:
    """Connections refused beyond the limit: one log line when the overload starts, one when it ends."""

    def __init__(self, max_connections: int, on_refused: Optional[Callable[[], None]] = None):
        self.max_connections = max_connections
        self.on_refused = on_refused
        self.active = False
        self.refused = 0
        self.refused_at_start = 0

    def refuse(self) -> None:
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused()
        if not self.active:
            self.active, self.refused_at_start = True, self.refused - 1
            _log.warning(f"overloaded: {self.max_connections} connections are open (max_connections); new ones get "
                         "503 until some close")

    def eased(self) -> None:
        if self.active:
            self.active = False
            _log.warning(f"no longer overloaded: {self.refused - self.refused_at_start} connections were refused")


def guarded_protocol(base: type, header_timeout: float, overload: OverloadLog) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers and a cap on open connections."""
    import h11

    class GuardedProtocol(base):
        _refused = False
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            if len(self.connections) >= overload.max_connections:
                self._refused, self.transport = True, transport
                transport.write(BUSY_RESPONSE)
                transport.close()
                overload.refuse()
                return
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)
            if len(self.connections) < overload.max_connections:
                overload.eased()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request begun: nothing to answer

    return GuardedProtocol


class Drain:
    """What the drain did: whether it began, and how many requests it abandoned (the app counts them)."""

    def __init__(self, grace: float, timeout: float):
        self.grace, self.timeout = float(grace), float(timeout)
        self.started: Optional[float] = None
        self.signal: Optional[int] = None
        self.abandoned = 0
        self.abandoning = False

    def note_abandoned(self) -> None:
        self.abandoned += 1


def draining_server(uvicorn: Any, config: Any, engine: Any, drain: Drain,
                    on_listening: Callable[[list], None]) -> Any:
    """uvicorn's server with the drain contract of this module's docstring."""

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Optional[Any]) -> None:
            if drain.started is None:
                drain.started, drain.signal = time.monotonic(), sig
                engine.stop_accepting()
                _log.warning(f"draining: {signal.Signals(sig).name} received; /healthz fails, new requests get 503, "
                             f"requests in flight have {drain.timeout:g} s")
            elif sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self._abandon()
                self.force_exit = True
            # not re-raised afterwards: a drained server exits with its own status

        async def startup(self, sockets: Optional[list] = None) -> None:
            import asyncio

            asyncio.get_running_loop().set_exception_handler(_quiet_accept_errors())
            await super().startup(sockets=sockets)
            if self.started:
                on_listening(sockets or [])

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter) or drain.started is None:
                return self.should_exit
            waited = time.monotonic() - drain.started
            busy = len(self.server_state.tasks)
            grace = drain.grace if drain.signal == signal.SIGTERM else 0.0
            if busy and waited >= drain.timeout and not drain.abandoning:
                self._abandon()
            if not busy and waited >= min(grace, drain.timeout):
                self.should_exit = True
            elif drain.abandoning and waited >= drain.timeout + ABANDON_WAIT_S:
                self.should_exit = True  # what is left (a body still arriving) uvicorn cancels
            return self.should_exit

        def _abandon(self) -> None:
            """The requests in flight get their 503 now (the app answers and counts each)."""
            drain.abandoning = True
            engine.shutdown(drain=False, timeout=0)

    return DrainingServer(config)


ABANDON_WAIT_S = 5.0  # after abandoning, how long the answers may take to go out


def build_server(app: Any, engine: Any, sock: socket.socket, drain: Drain, *, header_timeout: float,
                 max_connections: int, on_listening: Callable[[list], None]) -> Any:
    """The uvicorn server for `app` on `sock`: guarded connections, the drain contract, overload counted in /metrics."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    overload = OverloadLog(max_connections, on_refused=lambda: app.state.observer.refuse("too_many_connections", 503))
    config = uvicorn.Config(app, http=guarded_protocol(H11Protocol, header_timeout, overload), log_level="warning",
                            lifespan="on", timeout_keep_alive=5, timeout_graceful_shutdown=ABANDON_WAIT_S)
    return draining_server(uvicorn, config, engine, drain, on_listening)


def _quiet_accept_errors() -> Callable:
    """The event loop's error handler, with "out of file descriptors" on accept logged once a minute, no traceback."""
    last = [0.0]

    def handle(loop: Any, context: dict) -> None:
        exc = context.get("exception")
        if "accept" in str(context.get("message", "")) and isinstance(exc, OSError):
            now = time.monotonic()
            if now - last[0] > 60:
                last[0] = now
                _log.warning(f"cannot accept connections: {exc.strerror or exc} (the open-file limit is reached)")
            return
        loop.default_exception_handler(context)

    return handle
