"""gRPC vs HTTP per-request overhead of `serve` (issue 16), through the real Triton clients.

    python benchmarks/run_grpc.py [--artifact-dir /tmp/onnxkit_grpc_tiny] [--rounds 6] [--requests 150]

1. ``convert tests/fixtures/tiny_cnn.py:build`` (32x32, ~0.1 ms a run: the figure is the protocol's cost,
   not the model's) unless the folder already has a manifest.
2. One ``cli.py serve --grpc-port`` subprocess on loopback, micro-batching off (``--max-batch 1``: no
   batching wait in either protocol), one ONNX Runtime thread, spinning off.
3. Interleaved rounds: in each round, for concurrency 1 and 8, ``tritonclient.http`` and
   ``tritonclient.grpc`` (order rotated every round) each send ``--requests`` requests per client thread,
   one client per thread, kept across rounds so connections stay open. Latency is per request, end to
   end in the client (``perf_counter_ns``); the p50 interval is the 95% bootstrap interval of the median
   of the per-round p50s, and "faster" is said only when the intervals do not overlap.
4. Every response is checked against ONNX Runtime run here on the same file.

Writes benchmarks/results/grpc_cpu.{json,md}. Only 127.0.0.1 is contacted; every call has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, stop, write
from benchmarks.run_serving import free_port, wait_ready

TINY = f"{ROOT / 'tests' / 'fixtures' / 'tiny_cnn.py'}:build"
PROTOCOLS = ("http", "grpc")


@dataclass
class Server:
    """A running server: what it is, and where each protocol answers."""

    label: str
    model: str
    http: str  # host:port
    grpc: str  # host:port


@contextlib.contextmanager
def onnxkit_server(art: Path) -> Iterator[Server]:
    """`cli.py serve --grpc-port` on free loopback ports, stopped afterwards."""
    port, gport = free_port(), free_port()
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", str(art), "--variant", "opt", "--port", str(port),
           "--grpc-port", str(gport), "--max-batch", "1", "--threads", "1", "--no-ort-spinning"]
    with _process(cmd, f"http://127.0.0.1:{port}"):
        yield Server("onnxkit serve (FastAPI/uvicorn + grpc.aio)", "tiny_cnn_opt", f"127.0.0.1:{port}",
                     f"127.0.0.1:{gport}")


@contextlib.contextmanager
def kserve_server(art: Path) -> Iterator[Server]:
    """KServe's ModelServer wrapping the same model (benchmarks/kserve_predictor.py), in its own process:
    kserve and tritonclient.grpc cannot be imported in one process."""
    port, gport = free_port(), free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kserve_predictor.py"), str(art), "--http-port", str(port),
           "--grpc-port", str(gport)]
    with _process(cmd, f"http://127.0.0.1:{port}"):
        yield Server("KServe ModelServer 0.21 (custom predictor)", "tiny_cnn_opt", f"127.0.0.1:{port}",
                     f"127.0.0.1:{gport}")


@contextlib.contextmanager
def _process(cmd: list[str], url: str) -> Iterator[None]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(url, proc)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
            yield
        finally:
            stop(proc)


# -- clients ---------------------------------------------------------------------------------------
def make_call(server: Server, protocol: str, x: np.ndarray) -> Callable[[], np.ndarray]:
    """One client (its own connection) and a call sending ``x`` and returning the logits."""
    if protocol == "http":
        import tritonclient.http as client_mod

        client: Any = client_mod.InferenceServerClient(server.http, network_timeout=60)
    else:
        import tritonclient.grpc as client_mod

        client = client_mod.InferenceServerClient(server.grpc)
    inp = client_mod.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = [client_mod.InferRequestedOutput("logits")]

    def call() -> np.ndarray:
        if protocol == "http":
            return client.infer(server.model, [inp], outputs=out).as_numpy("logits")
        return client.infer(server.model, [inp], outputs=out, client_timeout=60).as_numpy("logits")

    return call


def per_thread(requests: int, concurrency: int) -> int:
    """Timed requests per client thread in a round: fewer at concurrency 8, so a round stays short."""
    return requests if concurrency == 1 else max(requests // 4, 20)


@dataclass
class Cell:
    """Latencies (ms) of one server x protocol x concurrency, per round."""

    rounds: list[list[float]] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    incorrect: int = 0


def run_round(connect: Callable[[], Callable[[], np.ndarray]], threads_n: int, want: np.ndarray, requests: int,
              cell: Cell) -> None:
    """``threads_n`` client threads, each with its own client (made in the thread: tritonclient.http's gevent
    client must stay on one thread) and 3 untimed requests, then ``requests`` timed ones all at once."""
    lat: list[list[float]] = [[] for _ in range(threads_n)]
    bad = [0] * threads_n
    start = threading.Barrier(threads_n + 1, timeout=120)

    def client(i: int) -> None:
        try:
            call = connect()
            for _ in range(3):
                call()
        finally:
            start.wait()
        for _ in range(requests):
            t0 = time.perf_counter_ns()
            got = call()
            lat[i].append((time.perf_counter_ns() - t0) / 1e6)
            if got is None or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                bad[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads_n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    cell.walls.append(time.perf_counter() - t0)
    cell.rounds.append([v for per in lat for v in per])
    cell.incorrect += sum(bad)


def measure(servers: list[Server], art: Path, rounds: int, requests: int,
            concurrencies: tuple[int, ...]) -> dict[tuple[str, str, int], Cell]:
    """Interleaved rounds over every server x protocol x concurrency, the order rotated each round."""
    import onnxruntime as ort

    from core.manifest import Manifest

    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(art / Manifest.load(art).artifacts["opt"].file.path),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input": x})[0]
    keys = [(s.label, p, c) for c in concurrencies for s in servers for p in PROTOCOLS]
    by_label = {s.label: s for s in servers}
    cells = {k: Cell() for k in keys}
    for r in range(rounds):
        for c in concurrencies:
            order = [k for k in keys if k[2] == c]
            shift = r % len(order)
            for k in order[shift:] + order[:shift]:
                connect = functools.partial(make_call, by_label[k[0]], k[1], x)
                run_round(connect, c, want, per_thread(requests, c), cells[k])
        print(f"round {r + 1}/{rounds} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    return cells


# -- report ----------------------------------------------------------------------------------------
def summarise(cells: dict[tuple[str, str, int], Cell]) -> list[dict[str, Any]]:
    from core.metrics import LatencyStats

    rows = []
    for (label, protocol, conc), cell in cells.items():
        flat = [v for r in cell.rounds for v in r]
        stats = LatencyStats.from_samples(flat, cell.rounds)
        rows.append({"server": label, "protocol": protocol, "concurrency": conc, "latency_ms": stats.model_dump(),
                     "requests_per_s": len(flat) / sum(cell.walls), "incorrect": cell.incorrect})
    return rows


def _compare(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """``a`` vs ``b`` by their p50s and the interval rule (core.metrics.latency_differs)."""
    from core.metrics import LatencyStats, latency_differs

    sa, sb = LatencyStats(**a["latency_ms"]), LatencyStats(**b["latency_ms"])
    diff = sa.p50 - sb.p50
    word = ((f"{a_name} faster" if diff < 0 else f"{b_name} faster") if latency_differs(sa, sb)
            else "no difference beyond the noise (intervals overlap)")
    return f"{a_name} p50 {sa.p50:.2f} ms vs {b_name} {sb.p50:.2f} ms ({diff:+.2f} ms, {sa.p50 / sb.p50:.2f}x): **{word}**"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """gRPC vs HTTP per server and concurrency; then each other server vs the first (``serve``)."""
    def row(server: str, protocol: str, conc: int) -> dict[str, Any]:
        return next(r for r in rows if (r["server"], r["protocol"], r["concurrency"]) == (server, protocol, conc))

    servers = list(dict.fromkeys(r["server"] for r in rows))
    concs = sorted({r["concurrency"] for r in rows})
    out = [f"{s}, concurrency {c}: " + _compare(row(s, "grpc", c), row(s, "http", c), "gRPC", "HTTP")
           for s in servers for c in concs]
    out += [f"{p} at concurrency {c}: " + _compare(row(other, p, c), row(servers[0], p, c), "KServe", "serve")
            for other in servers[1:] for p in PROTOCOLS for c in concs]
    return out


def notes(verdict_lines: list[str], with_kserve: bool) -> list[str]:
    """How to read the table, and which server `serve` keeps (the faster beyond the noise, else ours)."""
    out = ["## Reading it", "",
           "- Both servers run the same ONNX file through the same `OrtRunner` with the same input checks. `serve` "
           "hands each request to its micro-batcher's inference thread and back (a thread hand-off per request, "
           "which lets the event loop take the next requests while the model runs); the KServe predictor's "
           "synchronous `predict` (the usual custom-predictor form) runs the model on KServe's event loop. KServe's "
           "per-request INFO logging is turned down to warnings, as `serve` logs nothing per request.",
           "- The latency is the whole round trip seen by the Triton client in Python, client work included; at "
           "concurrency 8 the eight client threads, the server and ONNX Runtime share the cores, so the figures "
           "there are mostly queueing."]
    if not with_kserve:
        return [*out, "- KServe's model server was not measured (`--no-kserve`, or kserve not installed)."]
    kserve_wins = [v for v in verdict_lines if v.endswith("**KServe faster**")]
    serve_wins = [v for v in verdict_lines if v.endswith("**serve faster**")]
    keep = "KServe's ModelServer" if kserve_wins and not serve_wins else "its own FastAPI + grpc.aio server"
    out.append(f"- Decision: `serve` stays on {keep}. KServe was faster beyond the noise in {len(kserve_wins)} "
               f"comparison(s) and slower in {len(serve_wins)} (the rule: switch only if KServe is faster somewhere "
               "and slower nowhere). Beyond speed, keeping ours keeps micro-batching across both protocols, the "
               "hardened HTTP request checks (body limits, hostile-input fuzzing) and tritonclient's protos in "
               "one process (kserve's clash with them).")
    return out


def markdown(payload: dict[str, Any]) -> str:
    mc, cfg = payload["machine"], payload["config"]
    lines = ["# gRPC vs HTTP per-request overhead (`serve`, tiny CNN, CPU)", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {mc['cpu_model']}, {mc['cpu_count']} cores, {mc['ram_gb']} GiB; 1-min load average "
             f"{payload['load_average_before']:.2f} before and {payload['load_average_after']:.2f} after (the server "
             "and the client threads of this benchmark share the cores; other helpers' work may too).  ",
             f"Model: tests/fixtures/tiny_cnn.py at 1x3x32x32 FP32 (12 KB in, 40 B out), variant `opt`, ONNX "
             f"Runtime {payload['versions']['onnxruntime']} with 1 thread, spinning off, micro-batching off "
             "(`--max-batch 1`). Clients: tritonclient "
             f"{payload['versions']['tritonclient']} (`http`: binary tensors; `grpc`: raw_input_contents), one "
             f"client per thread, in this process. {cfg['rounds']} interleaved rounds, order rotated each round; "
             f"{cfg['requests']} timed requests per round at concurrency 1, {cfg['requests_c8']} per thread at 8.", "",
             "| server | protocol | concurrency | p50 ms | p50 95% interval | p90 ms | p99 ms | requests/s | incorrect |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        s = r["latency_ms"]
        iv = s["p50_interval"]
        lines.append(f"| {r['server']} | {r['protocol']} | {r['concurrency']} | {s['p50']:.2f} | "
                     f"{iv[0]:.2f}-{iv[1]:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | {r['requests_per_s']:.0f} | "
                     f"{r['incorrect']} |")
    lines += ["", "## Verdicts", "", *[f"- {v}" for v in payload["verdicts"]], ""]
    lines += payload.get("notes", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifact-dir", default="/tmp/onnxkit_grpc_tiny")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=150, help="Timed requests per round at concurrency 1")
    ap.add_argument("--no-kserve", action="store_true", help="Measure `serve` only, not KServe's ModelServer")
    args = ap.parse_args()
    import importlib.util
    from importlib import metadata

    art = ensure_converted(TINY, Path(args.artifact_dir))
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(onnxkit_server(art))]
        if not args.no_kserve and importlib.util.find_spec("kserve") is not None:
            servers.append(stack.enter_context(kserve_server(art)))
        cells = measure(servers, art, args.rounds, args.requests, (1, 8))
    rows = summarise(cells)
    found = {"onnxruntime": "onnxruntime", "tritonclient": "tritonclient", "grpcio": "grpc", "uvicorn": "uvicorn",
             "kserve": "kserve"}
    say = verdicts(rows)
    payload: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv), "machine": machine(), "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "versions": {d: metadata.version(d) for d, mod in found.items() if importlib.util.find_spec(mod)},
        "config": {"rounds": args.rounds, "requests": args.requests, "requests_c8": per_thread(args.requests, 8),
                   "max_batch": 1, "ort_threads": 1},
        "rows": rows, "verdicts": say, "notes": notes(say, len(servers) > 1)}
    text = markdown(payload)
    paths = write("grpc_cpu", payload, text)
    print(text)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
