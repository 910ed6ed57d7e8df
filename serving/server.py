"""`serve`: one model variant behind the KServe v2 / Triton HTTP inference protocol.

FastAPI + uvicorn. The model runs through the project's ``OrtRunner``; concurrent requests are
micro-batched (up to ``max_batch`` rows, waiting at most ``max_delay_ms`` for more). Prometheus
metrics are at ``/metrics``. A bad request gets a 4xx with ``{"error": "..."}`` (the body
``tritonclient`` reads) and the server goes on serving.

The model is named ``<model>_<variant>``, as in the Triton repository written by ``package``, so a
client written against this server works unchanged against Triton serving that repository.

With ``--grpc-port`` the same process also answers the v2 / Triton gRPC protocol (``serving.grpc_service``),
on the same event loop, model and micro-batcher.

Connections are guarded (``GuardedHttpProtocol``): a request must arrive whole, headers and body, within
``read_timeout_s`` of its first byte (else a 408 and the connection is closed), an idle connection is closed after
``keep_alive_s``, at most ``max_connections`` are open at once (more get a 503 and are closed), and a request the
HTTP parser refuses (a non-numeric Content-Length) gets the same one-line JSON error body as every other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.errors import InputError
from serving.app import create_app
from serving.served import ServeConfig, load_model


# -- running it ------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear InputError (port in use, unknown address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then, and without it
    # Nagle's algorithm and delayed ACKs add ~40 ms to every response written in two parts.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


# -- connections -----------------------------------------------------------------------------------
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}
_log = logging.getLogger("uvicorn.error")


def raw_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response with the ``{"error": ...}`` body of the app's errors, closing the connection:
    what the connection guard writes where no app runs (a parser error, a timeout, the connection cap)."""
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body)) + body)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools connection with the limits uvicorn lacks. uvicorn times out only a connection idle after a
    response, and any byte (even a bare CRLF) cancels that; a connection that opens and sends nothing, or sends its
    headers or body slowly or never in full, is otherwise held forever. Here one timer per connection:

    - idle (opened, or its last response sent, and no request begun): closed after ``keep_alive_s``;
    - a request begun: its headers and body must arrive in full within ``read_timeout_s`` of its first byte,
      however they trickle in, else a 408 JSON error (if its response has not started) and the connection closes;
    - a request received in full: no limit while the model runs.

    Connections beyond ``max_connections`` get a 503 JSON error and are closed at once, so stalled clients cannot
    take every file descriptor. Subclasses made by ``guarded_protocol`` set the three limits."""

    read_timeout_s: float = 30.0
    keep_alive_s: float = 30.0
    max_connections: int = 1024
    _last_refusal_log = -1e9

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False  # a request has begun and has not arrived in full
        self._cycle_before: Any = None
        self._read_deadline = 0.0
        over = len(self.connections) >= self.max_connections
        super().connection_made(transport)
        if over:
            now = self.loop.time()
            if now - GuardedHttpProtocol._last_refusal_log > 10:  # one line per burst, not one per connection
                GuardedHttpProtocol._last_refusal_log = now
                _log.warning("refusing connections: %d open, the limit (serve --max-connections)",
                             self.max_connections)
            self._close_with(503, f"the server has {self.max_connections} connections open, its limit "
                                  "(serve --max-connections); retry later")
            return
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = True
        self._cycle_before = self.cycle  # replaced once this request's headers are complete
        self._read_deadline = self.loop.time() + self.read_timeout_s
        self._rearm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading = False
        self._rearm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._rearm()

    def send_400_response(self, msg: str) -> None:
        """The parser refused the request (uvicorn logged ``msg``); its reason, e.g. "Invalid character in
        Content-Length", is the HttpParserError being handled."""
        exc = sys.exc_info()[1]
        self._close_with(400, f"malformed HTTP request: {exc}" if exc is not None and str(exc) else msg)

    # -- the timer --
    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        """Arm the timer for the connection's state: reading a request, idle, or waiting on the app (none)."""
        self._cancel()
        if self.transport.is_closing():
            return
        if self._reading:
            self._timer = self.loop.call_at(self._read_deadline, self._expired)
        elif self.cycle is None or self.cycle.response_complete:
            self._timer = self.loop.call_later(self.keep_alive_s, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        headers_pending = self.cycle is self._cycle_before  # the request has no cycle (and no response) yet
        if self._reading and (headers_pending or not self.cycle.response_started):
            self._close_with(408, f"the request did not arrive in full within {self.read_timeout_s:g} s "
                                  "(serve --read-timeout-s)")
        else:
            self.transport.close()

    def _close_with(self, status: int, message: str) -> None:
        self._cancel()
        if not self.transport.is_closing():
            self.transport.write(raw_error(status, message))
            self.transport.close()


def guarded_protocol(cfg: ServeConfig) -> type[GuardedHttpProtocol]:
    """``GuardedHttpProtocol`` with the limits of ``cfg`` (uvicorn creates one instance per connection)."""
    limits = {"read_timeout_s": cfg.read_timeout_s, "keep_alive_s": cfg.keep_alive_s,
              "max_connections": cfg.max_connections}
    return type("ServeHttpProtocol", (GuardedHttpProtocol,), limits)


def _uvicorn_server(app: Any, cfg: ServeConfig) -> Any:
    import uvicorn

    # uvicorn's own keep-alive timer stays, never shorter than the guard's (which covers what it misses). Its
    # limit_concurrency is left off: it accepts every connection, and answers 503 (in plain text) only once a
    # request's headers are complete, so stalled clients would still hold their sockets.
    return uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, access_log=False, lifespan="on",
                                         http=guarded_protocol(cfg),
                                         timeout_keep_alive=math.ceil(cfg.keep_alive_s)))


def _check_grpc_port(cfg: ServeConfig) -> None:
    """A busy --grpc-port fails before the model is loaded (gRPC itself binds it only once serving starts)."""
    if cfg.grpc_port:
        if cfg.grpc_port == cfg.port:
            raise InputError(f"--grpc-port {cfg.grpc_port} is also the HTTP --port; give them different ports")
        bind(cfg.host, cfg.grpc_port).close()


def serve(cfg: ServeConfig, log: Callable[[str], None] = print) -> None:
    """Load the model, listen, and serve until interrupted (Ctrl-C or SIGTERM: a clean shutdown)."""
    sock = bind(cfg.host, cfg.port)  # first: a busy port fails before the model is loaded
    try:
        _check_grpc_port(cfg)
        model = load_model(cfg, log)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    log(f"serving {model.name!r} at http://{host}:{port} (KServe v2; max batch {cfg.max_batch}, max delay "
        f"{cfg.max_delay_ms:g} ms; metrics at /metrics)")
    app = create_app(model, cfg, log)
    server = _uvicorn_server(app, cfg)
    server.run(sockets=[sock])
    if signal.SIGINT in getattr(server, "_captured_signals", ()):
        # uvicorn re-raises a caught Ctrl-C at the end of its coroutine, inside asyncio.run; on a loaded machine that
        # KeyboardInterrupt was seen lost (`serve` exited 0: tests/test_serve_grpc.py, once in CI). Whatever the
        # race, Ctrl-C exits as everywhere else in the CLI: "interrupted", 130.
        raise KeyboardInterrupt
    if app.state.grpc is not None and app.state.grpc.error is not None:
        raise app.state.grpc.error  # uvicorn logged the failed startup and returned; exit non-zero


class BackgroundServer:
    """Serve in a background thread on a free loopback port (tests and benchmarks); a context manager."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.model = load_model(cfg, log=lambda _m: None)
        self.app = create_app(self.model, cfg)
        self._sock = bind(cfg.host, cfg.port)
        #: host:port of the gRPC server (with cfg.grpc_port), known once started
        self.grpc_target: str | None = None
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server = _uvicorn_server(self.app, cfg)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                if self.app.state.grpc is not None and self.app.state.grpc.error is not None:
                    raise self.app.state.grpc.error
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        if self.app.state.grpc is not None:
            from serving.grpc_service import grpc_address

            self.grpc_target = grpc_address(self.cfg.host, self.app.state.grpc.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
