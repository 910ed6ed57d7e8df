"""`serve`: one model variant behind the KServe v2 / Triton HTTP inference protocol.

FastAPI + uvicorn. The model runs through the project's ``OrtRunner``; concurrent requests are
micro-batched (up to ``max_batch`` rows, waiting at most ``max_delay_ms`` for more). Prometheus
metrics are at ``/metrics``. A bad request gets a 4xx with ``{"error": "..."}`` (the body
``tritonclient`` reads) and the server goes on serving.

The model is named ``<model>_<variant>``, as in the Triton repository written by ``package``, so a
client written against this server works unchanged against Triton serving that repository.

With ``--grpc-port`` the same process also answers the v2 / Triton gRPC protocol (``serving.grpc_service``),
on the same event loop, model and micro-batcher.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

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


def _uvicorn_server(app: Any, cfg: ServeConfig) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, access_log=False, lifespan="on",
                                         timeout_keep_alive=30))


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
