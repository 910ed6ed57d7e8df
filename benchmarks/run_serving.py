"""Serving overhead (issue 5): a served ONNX Runtime model under load vs the harness's in-process latency.

    python benchmarks/run_serving.py [--artifact-dir /tmp/dn121] [--duration 20] [--concurrency 1,8]

1. ``convert densenet121`` (random init, 224x224) unless the folder already has a manifest.
2. In-process: the bench harness, ONNX Runtime on the ``opt`` variant, batch 1 (and 8 for scale).
3. Two ``cli.py serve`` subprocesses on loopback ports: micro-batching on (max batch 8, max delay
   2 ms) and off (max batch 1).
4. Concurrency 1: the load generator against the batching server; then a paired measurement that
   alternates one in-process call (the harness's ORT runner, in this process) with one call through
   the real ``tritonclient.http`` client to each server, so CPU contention from other processes hits
   all three alike and the per-pair difference is the HTTP overhead.
5. Concurrency 8: the load generator alternates between the two servers for a few rounds (again so
   that drifting contention does not favour one), every response checked against ONNX Runtime.

Targets: at concurrency 1 the HTTP path adds under 2 ms to the in-process p50; micro-batching
raises throughput at concurrency 8 over no batching. Writes benchmarks/results/serving_cpu.md (the
summary) and serving_cpu.results.{json,csv,md} (the bench report format, kind "loadtest").
Only 127.0.0.1 is contacted; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, ensure_converted, machine, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


@contextlib.contextmanager
def serve_subprocess(art: Path, max_batch: int, max_delay_ms: float) -> Iterator[str]:
    """`cli.py serve` on a free loopback port; yields its URL and stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", str(art), "--variant", "opt", "--port", str(port),
           "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms), "--no-ort-spinning"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(f"http://127.0.0.1:{port}", proc)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)


def batch_rows(url: str) -> float | None:
    """Mean rows per model execution, from the server's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith("onnxkit_batch_rows_sum") or line.startswith("onnxkit_batch_rows_count"):
            vals[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    count = vals.get("onnxkit_batch_rows_count", 0.0)
    return vals.get("onnxkit_batch_rows_sum", 0.0) / count if count else None


def paired_overhead(urls: dict[str, str], model: str, infer: Any, feed: dict[str, np.ndarray],
                    pairs: int) -> dict[str, dict[str, float]]:
    """Alternate in-process and HTTP calls; medians of each and of the per-pair HTTP - in-process difference."""
    import tritonclient.http as triton_http

    clients = {k: triton_http.InferenceServerClient(u.removeprefix("http://"), network_timeout=120)
               for k, u in urls.items()}
    (name, arr), = feed.items()
    inp = triton_http.InferInput(name, list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    times: dict[str, list[float]] = {"in-process": [], **{k: [] for k in urls}}
    for i in range(pairs + 2):  # the first two rounds warm the connections up
        row = {}
        t0 = time.perf_counter()
        infer(feed)
        row["in-process"] = (time.perf_counter() - t0) * 1e3
        for k, c in clients.items():
            t0 = time.perf_counter()
            c.infer(model, [inp])
            row[k] = (time.perf_counter() - t0) * 1e3
        if i >= 2:
            for k, v in row.items():
                times[k].append(v)
    base = np.asarray(times["in-process"])
    out = {"in-process": {"p50_ms": float(np.median(base)), "pairs": float(len(base))}}
    for k in urls:
        a = np.asarray(times[k])
        out[k] = {"p50_ms": float(np.median(a)), "median_diff_ms": float(np.median(a - base)), "pairs": float(len(a))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--artifact-dir", default="/tmp/dn121")
    ap.add_argument("--duration", type=float, default=20.0, help="Seconds of load per concurrency and mode")
    ap.add_argument("--rounds", type=int, default=3, help="Alternations between the two servers at concurrency 8")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--iters", type=int, default=30, help="In-process timed iterations")
    ap.add_argument("--pairs", type=int, default=40, help="Paired in-process/HTTP calls at concurrency 1")
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    args = ap.parse_args()

    from reports.models import BenchRecord, BenchResults
    from reports.writers import write_results
    from runtimes.harness import BenchConfig, run_bench
    from serving.loadtest import LoadTestConfig, artifact_reference, run_loadtest

    command = "python " + " ".join(sys.argv)
    art = ensure_converted(args.model, Path(args.artifact_dir))
    load_before = os.getloadavg()
    inproc = run_bench(BenchConfig(artifact_dir=art, backends=["ort"], variants=["opt"], batch_sizes=[1, 8],
                                   warmup=5, iters=args.iters, options={"ort_spinning": False}), log=lambda _m: None)
    for r in inproc.records:
        r.extra["mode"] = "in-process (bench harness)"
    results = BenchResults(kind="loadtest", model=args.model, artifact_dir=str(art),
                           config={"command": command, "duration_s": args.duration, "rounds": args.rounds,
                                   "warmup_s": args.warmup, "inputs": "random normal, 8 distinct",
                                   "ort_spinning": False},
                           records=list(inproc.records))
    # The harness's ORT runner on the same variant. Thread spinning is off in every session (this one,
    # the harness's and both servers'): with three processes on two cores, a spinning session that
    # has just run steals the cores from the next call in the alternation and inflates its latency.
    reference = artifact_reference(art, "opt", ort_spinning=False)
    name = f"{args.model}_opt"
    modes = {"micro-batching": 8, "no batching": 1}

    def load(url: str, mode: str, conc: int, seconds: float, rnd: int) -> BenchRecord:
        res = run_loadtest(LoadTestConfig(url=f"{url}/v2/models/{name}", concurrency=conc, duration_s=seconds,
                                          warmup_s=args.warmup, timeout_s=120), reference=reference, log=print)
        results.warnings += res.warnings
        rec = res.records[0]
        rec.extra.update({"mode": f"HTTP, {mode} (max batch {modes[mode]}, max delay {args.max_delay_ms} ms)",
                          "round": rnd, "load_average_1min": round(os.getloadavg()[0], 2)})
        results.records.append(rec)
        return rec

    with serve_subprocess(art, modes["micro-batching"], args.max_delay_ms) as url_on, \
            serve_subprocess(art, modes["no batching"], args.max_delay_ms) as url_off:
        urls = {"micro-batching": url_on, "no batching": url_off}
        c1 = load(url_on, "micro-batching", 1, args.duration, 0)
        feed = artifact_feed(art)
        paired = paired_overhead(urls, name, reference, feed, args.pairs)
        c8: dict[str, list[BenchRecord]] = {m: [] for m in modes}
        for rnd in range(1, args.rounds + 1):
            for mode, url in (urls.items() if rnd % 2 else reversed(urls.items())):
                c8[mode].append(load(url, mode, 8, args.duration / args.rounds, rnd))
        rows = {m: batch_rows(u) for m, u in urls.items()}
    load_after = os.getloadavg()

    base = next(r for r in inproc.records if r.batch_size == 1)
    base8 = next(r for r in inproc.records if r.batch_size == 8)
    tput = {m: sum(r.throughput * r.extra["duration_s"] for r in recs) / sum(r.extra["duration_s"] for r in recs)
            for m, recs in c8.items()}
    errors = sum(r.extra["errors"] for r in results.records if r.backend == "http")
    incorrect = sum(r.extra["incorrect"] for r in results.records if r.backend == "http")
    mc = machine()
    lines = [f"# Serving overhead: {args.model} (ONNX Runtime, CPU)", "",
             f"Command: `{command}`  ",
             f"Machine: {mc['cpu_model']}, {mc['cpu_count']} cores, {mc['ram_gb']} GiB; load average "
             f"{load_before[0]:.1f} before and {load_after[0]:.1f} after (this benchmark's own server, client and "
             "ONNX Runtime threads account for about 2; more means other work shared the 2 cores, inflating "
             "absolute numbers; the per-request, paired and alternating measurements below keep the comparisons "
             "fair despite that).  ",
             f"Model: {args.model}, random init, 224x224, variant `opt`, batch 1 per request, ONNX Runtime "
             f"{results.versions.get('onnxruntime')} with its default threads in the harness and the servers, and "
             "thread spinning off in every session (`serve --no-ort-spinning`): three processes share two cores, "
             "and a session left spinning after its call would slow the next call in the alternation. The "
             "load generator runs in this process, the servers in their own (loopback only).", "",
             "## Latency and throughput", "",
             "| measurement | concurrency | p50 ms | p90 ms | p99 ms | samples/s | errors | incorrect |",
             "|---|---|---|---|---|---|---|---|"]
    for r in inproc.records:
        lines.append(f"| in-process harness, batch {r.batch_size} | - | {r.latency_ms.p50:.1f} | "
                     f"{r.latency_ms.p90:.1f} | {r.latency_ms.p99:.1f} | {r.throughput:.2f} | - | - |")
    for r in results.records:
        if r.backend == "http":
            when = f", round {r.extra['round']}" if r.extra["round"] else ""
            lines.append(f"| {r.extra['mode']}{when} | {r.extra['concurrency']} | {r.latency_ms.p50:.1f} | "
                         f"{r.latency_ms.p90:.1f} | {r.latency_ms.p99:.1f} | {r.throughput:.2f} | {r.extra['errors']} "
                         f"| {r.extra['incorrect']} |")
    lines += ["", f"Server-side mean rows per model execution (all requests): micro-batching "
              f"{rows['micro-batching'] or 0:.2f}, no batching {rows['no batching'] or 0:.2f}.", "",
              f"## Paired concurrency-1 measurement ({args.pairs} rounds, tritonclient.http)", "",
              "| path | p50 ms | median per-pair difference vs in-process, ms |", "|---|---|---|",
              f"| in-process (harness's ORT runner) | {paired['in-process']['p50_ms']:.1f} | - |"]
    for m in modes:
        lines.append(f"| HTTP, {m} | {paired[m]['p50_ms']:.1f} | {paired[m]['median_diff_ms']:+.2f} |")
    overhead_paired = paired["micro-batching"]["median_diff_ms"]
    overhead_load = c1.latency_ms.p50 - base.latency_ms.p50
    overhead_req = c1.extra["overhead_ms_p50_p90_p99"]
    infer_req = c1.extra["server_infer_ms_p50_p90_p99"]
    read_req = c1.extra["server_read_ms_p50_p90_p99"]
    in_handler = c1.extra["server_handler_ms_p50_p90_p99"][0] - infer_req[0]
    ratio = tput["micro-batching"] / tput["no batching"]
    # "raises throughput" only beyond the noise: the rounds' intervals must not overlap (core.metrics's rule,
    # on per-request time = 1 / throughput, so that "slower" reads the same way as for latencies)
    from core.metrics import LatencyStats, clearly_slower

    def per_round(mode: str) -> LatencyStats:
        times = [1000.0 / r.throughput for r in c8[mode]]
        return LatencyStats.from_samples(times, [[t] for t in times])

    batching_wins = clearly_slower(per_round("no batching"), per_round("micro-batching"))
    lines += ["", "## Targets", "",
              f"- HTTP adds under 2 ms to the in-process p50 at concurrency 1: per request, end-to-end latency minus "
              f"the server's own model time (its Server-Timing header) has p50 {overhead_req[0]:.2f} ms "
              f"(p90 {overhead_req[1]:.2f}, p99 {overhead_req[2]:.2f}; model time p50 {infer_req[0]:.1f} ms) -> "
              f"**{'met' if overhead_req[0] < 2.0 else 'not met'}**. This is the measure the verdict uses: it is "
              "taken within each request, so CPU contention from other processes cannot move work between the two "
              f"sides. Where it goes (p50s): {read_req[0]:.2f} ms receiving, decoding and checking the "
              f"{_mb(feed):.2f} MB request in the server, {in_handler - read_req[0]:.2f} ms more in the server's handler "
              "(batcher hand-off to the inference thread and back, response encoding), and the remaining "
              f"~{overhead_req[0] - in_handler:.1f} ms outside the handler (the client, the HTTP stack and "
              f"the wake-ups of the processes and threads on the two cores). The other two estimates: paired alternation (in-process call, then HTTP call, {args.pairs} "
              f"rounds) gives a median difference of {overhead_paired:+.2f} ms; the unpaired comparison (load "
              f"generator p50 {c1.latency_ms.p50:.1f} ms vs harness p50 {base.latency_ms.p50:.1f} ms, measured "
              f"minutes apart) gives {overhead_load:+.1f} ms. Those two subtract model runs made at different moments, "
              "so they carry the model time's run-to-run variation (in-process p50 to p90 spread: "
              f"{base.latency_ms.p90 - base.latency_ms.p50:.1f} ms).",
              f"- Micro-batching raises throughput at concurrency 8: {tput['micro-batching']:.2f} vs "
              f"{tput['no batching']:.2f} samples/s without ({ratio:.2f}x, {args.rounds} alternating rounds) -> "
              f"**{'met' if batching_wins else 'not met'}** (met only when the rounds' 95% intervals do not "
              "overlap). For scale, the harness in-process: batch 8 "
              f"{base8.throughput:.2f} samples/s, batch 1 {base.throughput:.2f}. Per round (micro-batching / none "
              "samples/s, 1-min load average after each): " + "; ".join(
                  f"round {i + 1}: {on.throughput:.2f} ({on.extra['load_average_1min']}) / {off.throughput:.2f} "
                  f"({off.extra['load_average_1min']})" for i, (on, off) in enumerate(zip(c8["micro-batching"],
                                                                                            c8["no batching"],
                                                                                            strict=True))) + ".",
              f"- Every response was checked against ONNX Runtime run in-process: {errors} errors, {incorrect} "
              "incorrect."]
    if results.warnings:
        lines += ["", "## Warnings", *[f"- {w}" for w in results.warnings]]
    results.config["paired_c1"] = paired
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = write_results(results, RESULTS / "serving_cpu.results.json")
    (RESULTS / "serving_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'serving_cpu.md'} and {paths['json']}")


def _mb(feed: dict[str, np.ndarray]) -> float:
    return sum(a.nbytes for a in feed.values()) / 1e6


def artifact_feed(art: Path) -> dict[str, np.ndarray]:
    from core.manifest import Manifest

    return Manifest.load(art).iospec.random_feed(1, seed=123)


if __name__ == "__main__":
    main()
