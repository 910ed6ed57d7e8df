"""Serving under hostile clients (issues 13, 33): random malformed requests, stalled connections and bad gRPC
messages, then good requests checked against ONNX Runtime.

    python benchmarks/run_serving_fuzz.py [--count 2000] [--good 200] [--seed 0] [--stalled 300]
                                          [--read-timeout-s 5] [--artifact-dir /tmp/fuzz_tiny]

1. ``convert`` the tests' tiny CNN (32x32, dynamic batch) unless the folder has a manifest.
2. ``cli.py serve`` in a subprocess on a free 127.0.0.1 port with gRPC too (its defaults: max batch 8, the body
   limit derived from them; ``--read-timeout-s`` and the same keep-alive), warmed up with good requests; its RSS
   is read from /proc at start, after the warm-up and at the end.
3. ``--count`` requests over raw sockets, each a random mutation of a valid request (binary or JSON):
   bad shapes and huge dims, bad datatypes, bad data values, truncated bodies, wrong header and
   content lengths (non-numeric ones too), bit flips, garbage and deeply nested JSON, unknown names, oversized
   bodies, bad encodings, clients that hang up mid-body, true/false as FP32 data, an input with both JSON data and
   binary bytes, and a binary_data_size that is not a byte count.
4. ``--stalled`` connections held open: a third send nothing, a third stop inside their headers, a third send a
   body shorter than their Content-Length. Good requests are sent meanwhile; each stalled connection must be
   closed within the read/keep-alive timeout (plus 5 s), the begun requests with a 408 JSON error.
5. gRPC: messages that are not protobuf, and an input sent both in ``contents`` and ``raw_input_contents``;
   each must be INVALID_ARGUMENT.
6. ``--good`` valid requests (batch 1-8, binary and JSON), every output checked against ONNX Runtime
   run here on the served file.

It records crashes (the server process gone), 5xx answers to client errors, answers that are not a
one-line ``{"error"}`` JSON (uvicorn's plain-text parser errors included), requests left unanswered, requests that
must be refused but were answered 200, stalled connections left open, wrong answers, and the server's RSS at start,
after the warm-up and at the end (target: within 20%), in benchmarks/results/serving_fuzz.{json,md}. Only
127.0.0.1 is contacted; every socket has a timeout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, stop, write
from benchmarks.run_serving import free_port, wait_ready

MODEL = "tiny_cnn_opt"
PATH = f"/v2/models/{MODEL}/infer"
HL = "Inference-Header-Content-Length"
#: uvicorn's own answer to a request its HTTP parser refuses (before issue 33: plain text, now a JSON error).
UVICORN_400 = b"Invalid HTTP request received."
Wire = tuple[dict[str, str], bytes, str]  # headers, body, how to send: "full" | "hangup" | "short"


# -- requests ----------------------------------------------------------------------------------------
def valid(rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """A valid request document and the binary tensor bytes ("" for JSON data)."""
    batch = rng.randint(1, 8)
    x = np.random.default_rng(rng.randrange(2**32)).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    item: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    if rng.random() < 0.5:
        item["parameters"] = {"binary_data_size": x.nbytes}
        return {"inputs": [item], "outputs": [{"name": "logits"}]}, x.tobytes()
    item["data"] = x.reshape(-1).tolist()
    return {"inputs": [item]}, b""


def wire(doc: Any, blob: bytes) -> Wire:
    head = json.dumps(doc).encode()
    return ({HL: str(len(head))} if blob else {}), head + blob, "full"


HUGE_DIMS: list[Any] = [[2**54 + 1, 3, 32, 32], [2**64 + 1], [1, 3, 32, 2**64 + 1], [2**62, 3, 32, 32],
                        [0, 3, 32, 32], [1, 3, 32, 2**40], [1] * 40, [-1, 3, 32, 32], [1.5, 3, 32, 32],
                        [True, 3, 32, 32], "1,3,32,32", [[1], 3, 32, 32], [], None, [10**400]]
VALUES: list[Any] = [10**400, -(10**400), 2**63, "1.0", None, [], {}, True, [1.0, [2.0]]]


def m_shape(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    doc["inputs"][0]["shape"] = rng.choice(
        [*HUGE_DIMS, [rng.randint(0, 10**rng.randint(1, 30)) for _ in range(rng.randint(1, 5))]])
    return wire(doc, blob)


def m_dtype(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    doc["inputs"][0]["datatype"] = rng.choice(["FP64", "INT64", "UINT8", "BOOL", "BYTES", "fp32", "", None, 5,
                                               "BF16", "FP16"])
    return wire(doc, blob)


def m_values(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    item = doc["inputs"][0]
    item.pop("parameters", None)
    data = item.get("data") or np.zeros(int(np.prod(item["shape"]))).tolist()
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] = rng.choice(VALUES)
    item["data"] = rng.choice([data, "abc", 5, {"a": 1}, data[: len(data) // 2]])
    return wire(doc, b"")


def m_literal(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    """Tokens json.dumps cannot write: 1e400, NaN, Infinity, 100000-deep nesting, a 5000-digit integer."""
    token = rng.choice([b"1e400", b"NaN", b"-Infinity", b"1e39", b"[" * 100_000 + b"]" * 100_000, b"9" * 5000])
    body = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,32,32],"data":['
            + b",".join([token if i == 7 else b"0.5" for i in range(3072)]) + b"]}]}")
    return {}, body, "full"


def m_truncate(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    headers, body, _ = wire(doc, blob)
    return headers, body[: rng.randrange(len(body))], "full"


def m_header_length(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    headers, body, _ = wire(doc, blob or b"\0" * 4)
    n = len(body) - len(blob or b"\0" * 4)
    headers[HL] = str(rng.choice([0, -1, n + rng.randint(1, 50), max(n - rng.randint(1, 50), 1), 2**70, len(body),
                                  "abc", "", " 12", "1e3", "0x10"]))
    return headers, body, "full"


def m_flip(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    headers, body, _ = wire(doc, blob)
    raw = bytearray(body)
    for _ in range(rng.randint(1, 20)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return headers, bytes(raw), "full"


def m_garbage(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    choices = [rng.randbytes(rng.randint(0, 4096)), b"", b"null", b"[]", b'{"inputs": 5}', b'{"inputs": []}',
               b'{"inputs": [5]}', b'"' + b"a" * 10000 + b'"', b"{" * 50000, b'{"inputs": [{"name": 1}]}',
               base64.b64encode(rng.randbytes(300)), b'{"inputs":[{"name":"input"}]}\xff\xfe']
    return {}, rng.choice(choices), "full"


def m_names(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    what = rng.randrange(4)
    if what == 0:
        doc["inputs"][0]["name"] = rng.choice(["image", "", "x" * 5000, "input\n"])
    elif what == 1:
        doc["inputs"].append(dict(doc["inputs"][0]))  # the same input twice (and its bytes once)
    elif what == 2:
        doc["outputs"] = rng.choice([[{"name": "nope"}], "logits", [5], [{"name": "logits", "parameters": 7}]])
    else:
        doc["parameters"] = rng.choice([5, "x", [1], {"binary_data_output": {"a": 1}}])
        doc["id"] = rng.choice([10**4000, [[[[]]]], {"a": 1}, "x" * 300])
    return wire(doc, blob)


def m_content(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    """Wrong Content-Length, oversized bodies, bad encodings, hang-ups mid-body."""
    headers, body, _ = wire(doc, blob)
    what = rng.randrange(5)
    if what == 0:
        headers["Content-Length"] = str(rng.choice([10**12, 2**70, 50 << 20]))
        return headers, body[:1000], "short"  # the server refuses from the headers, or waits; we hang up
    if what == 1:
        return headers, body, "hangup"
    if what == 2:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "x" * 100])
        return headers, body, "full"
    if what == 3:
        headers["Content-Length"] = rng.choice([str(max(len(body) - rng.randint(1, 100), 0)), "abc", "-5", "1e3",
                                                "12 34", "0x10"])
        return headers, body, "full"
    return headers, b"0" * (2 << 20), "full"  # over the default body limit


def m_bools(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    """true/false in FP32 JSON data: all of it, or one value among floats."""
    item = doc["inputs"][0]
    item.pop("parameters", None)
    count = int(np.prod(item["shape"]))
    data = item.get("data") or [0.5] * count
    if rng.random() < 0.5:
        data = [rng.random() < 0.5 for _ in range(count)]
    else:
        data[rng.randrange(count)] = rng.choice([True, False])
    item["data"] = data
    return wire(doc, b"")


def m_both(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    """An input with JSON data and binary bytes both."""
    item = doc["inputs"][0]
    count = int(np.prod(item["shape"]))
    item["data"] = item.get("data") or [0.5] * count
    item["parameters"] = {"binary_data_size": count * 4}
    return wire(doc, blob or b"\0" * (count * 4))


def m_binary_size(rng: random.Random, doc: dict[str, Any], blob: bytes) -> Wire:
    """A binary_data_size that is not a byte count."""
    item = doc["inputs"][0]
    item.pop("data", None)
    item["parameters"] = {"binary_data_size": rng.choice([-5, -1, "abc", "12288", 1.5, True, [4], {"a": 1}])}
    return wire(doc, blob or b"\0" * (int(np.prod(item["shape"])) * 4))


MUTATIONS: dict[str, Callable[[random.Random, dict[str, Any], bytes], Wire]] = {
    "shape": m_shape, "datatype": m_dtype, "values": m_values, "literal": m_literal, "truncate": m_truncate,
    "header_length": m_header_length, "bit_flip": m_flip, "garbage": m_garbage, "names": m_names,
    "content": m_content, "bool_data": m_bools, "data_and_binary": m_both, "binary_size": m_binary_size}
#: Mutations no valid request can come out of: a 200 to one of them is a silent acceptance.
MUST_REFUSE = {"bool_data", "data_and_binary", "binary_size"}


# -- sending -------------------------------------------------------------------------------------------
def send(port: int, headers: dict[str, str], body: bytes, how: str, timeout: float = 30) -> tuple[int, bytes]:
    """One request on its own connection; (status, body), or (0, b"") when there is no answer to read."""
    lines = [f"POST {PATH} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if "Content-Length" not in headers:
        headers = {**headers, "Content-Length": str(len(body))}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            if how == "hangup":
                sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body[: len(body) // 2])
                return 0, b""
            sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
            if how == "short":
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed first; read what it said
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/1.1 "):
        return 0, raw
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head[9:12]), rest


def one_line_json_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return b"\n" not in body.strip() and isinstance(doc, dict) and list(doc) == ["error"]


def fuzz(port: int, count: int, rng: random.Random, alive: Callable[[], bool]) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in MUTATIONS}
    problems: list[str] = []
    for i in range(count):
        kind = rng.choice(list(MUTATIONS))
        doc, blob = valid(rng)
        headers, body, how = MUTATIONS[kind](rng, doc, blob)
        status, answer = send(port, headers, body, how)
        if how == "hangup":
            label = "hung up"
        elif status == 0:
            label = "no answer" if how == "full" else "hung up"
        else:
            label = str(status)
            if answer == UVICORN_400:  # refused by uvicorn's HTTP parser (Content-Length 2**70) before the app
                label += " (HTTP parser, plain text: not a one-line JSON error)"
            elif 400 <= status < 500 and not one_line_json_error(answer):
                label += " (not a one-line JSON error)"
            elif status == 200 and kind in MUST_REFUSE:
                label += " (silently accepted)"
        by_kind[kind][label] += 1
        if status >= 500 or label in ("no answer",) or "not a one-line" in label or "silently" in label:
            problems.append(f"#{i} {kind}: {label} {answer[:200]!r}")
        if not alive():
            problems.append(f"#{i} {kind}: the server process died")
            break
    return {"by_kind": {k: dict(v) for k, v in by_kind.items()}, "problems": problems}


def stalled(port: int, count: int, timeout_s: float, url: str, rng: random.Random, reference: Any) -> dict[str, Any]:
    """``count`` connections held open (nothing sent, headers cut short, a body shorter than its Content-Length)
    while 20 good requests are sent; how long each took to be closed, and what it was told."""
    import select

    kinds = {"idle": b"", "headers": f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-".encode(),
             "body": f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n".encode()
             + b'{"inputs": ['}
    socks: dict[socket.socket, tuple[str, float]] = {}
    refused = 0
    for i in range(count):
        kind = list(kinds)[i % 3]
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(kinds[kind])
        except OSError:
            refused += 1
            continue
        socks[sock] = (kind, time.monotonic())
    t_good = time.perf_counter()
    during = good(url, 20, rng, reference)
    during["seconds"] = round(time.perf_counter() - t_good, 2)
    open_ = dict(socks)
    answers: Counter[str] = Counter()
    closed_after: list[float] = []
    deadline = time.monotonic() + timeout_s + 5
    buffers: dict[socket.socket, bytes] = {s: b"" for s in socks}
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.1)
        for sock in ready:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                buffers[sock] += chunk
                continue
            kind, t0 = open_.pop(sock)
            closed_after.append(time.monotonic() - t0)
            raw = buffers[sock]
            status = raw[9:12].decode() if raw.startswith(b"HTTP/1.1 ") else "closed"
            json_ok = status == "closed" or one_line_json_error(raw.partition(b"\r\n\r\n")[2])
            answers[f"{kind}: {status}{'' if json_ok else ' (not a one-line JSON error)'}"] += 1
    for sock in socks:
        sock.close()
    return {"connections": count, "refused_at_connect": refused, "left_open": len(open_), "answers": dict(answers),
            "closed_after_s_max": round(max(closed_after, default=0), 2),
            "closed_after_s_median": round(float(np.median(closed_after)) if closed_after else 0, 2),
            "good_requests_meanwhile": during}


def grpc_cases(target: str) -> dict[str, Any]:
    """Messages that are not protobuf (three calls), and an input in both contents and raw_input_contents."""
    import grpc
    from tritonclient.grpc import service_pb2

    codes: Counter[str] = Counter()
    x = np.zeros((1, 3, 32, 32), np.float32)
    both = service_pb2.ModelInferRequest(model_name=MODEL)
    both.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32]).contents.fp32_contents.extend(x.ravel())
    both.raw_input_contents.append(x.tobytes())
    cases = [(call, garbage) for call in ("ModelInfer", "ModelMetadata", "ServerLive")
             for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", bytes(range(256)) * 4)]
    cases.append(("ModelInfer", both.SerializeToString()))
    with grpc.insecure_channel(target) as channel:
        for call, raw in cases:
            try:
                channel.unary_unary(f"/inference.GRPCInferenceService/{call}")(raw, timeout=30)
                codes[f"{call}: OK"] += 1
            except grpc.RpcError as exc:
                codes[f"{call}: {exc.code().name}"] += 1
    return {"requests": len(cases), "codes": dict(codes),
            "not_invalid_argument": sum(n for k, n in codes.items() if not k.endswith("INVALID_ARGUMENT"))}


def good(url: str, count: int, rng: random.Random, reference: Any) -> dict[str, Any]:
    """Valid requests (binary and JSON); each answer compared with ONNX Runtime run here."""
    import httpx

    from serving.protocol import decode_response, encode_request

    wrong, errors, worst = 0, 0, 0.0
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            x = np.random.default_rng(rng.randrange(2**32)).standard_normal(
                (rng.randint(1, 8), 3, 32, 32)).astype(np.float32)
            body, head_len = encode_request({"input": x}, ["logits"], binary=rng.random() < 0.5)
            resp = client.post(f"{url}{PATH}", content=body, headers={HL: str(head_len)} if head_len else {})
            if resp.status_code != 200:
                errors += 1
                continue
            got = decode_response(resp.content, resp.headers.get(HL))["logits"]
            want = reference.run(None, {"input": x})[0]
            worst = max(worst, float(np.abs(got - want).max()))
            wrong += int(not np.allclose(got, want, rtol=1e-4, atol=1e-5))
    return {"requests": count, "errors": errors, "wrong": wrong, "max_abs_err": worst}


# -- the run -------------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def serve(art: Path, timeout_s: float) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", str(art), "--variant", "opt", "--port", str(port),
           "--grpc-port", str(grpc_port), "--no-ort-spinning", "--read-timeout-s", str(timeout_s),
           "--keep-alive-s", str(timeout_s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield proc, port, grpc_port
    finally:
        stop(proc)


def metric(url: str, prefix: str) -> float:
    import httpx

    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from core.manifest import Manifest

    art = ensure_converted(f"{ROOT / 'tests' / 'fixtures' / 'tiny_cnn.py'}:build", Path(args.artifact_dir))
    onnx_file = art / Manifest.load(art).artifacts["opt"].file.path
    reference = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rng = random.Random(args.seed)
    with serve(art, args.read_timeout_s) as (proc, port, grpc_port):
        url = f"http://127.0.0.1:{port}"
        rss_start = rss_mb(proc.pid)
        warm = good(url, args.good, rng, reference)
        rss_before = rss_mb(proc.pid)
        t0 = time.perf_counter()
        fuzzed = fuzz(port, args.count, rng, lambda: proc.poll() is None)
        fuzz_s = time.perf_counter() - t0
        held = stalled(port, args.stalled, args.read_timeout_s, url, rng, reference) if proc.poll() is None else None
        grpc_ = grpc_cases(f"127.0.0.1:{grpc_port}") if proc.poll() is None else None
        crashed = proc.poll() is not None
        after = good(url, args.good, rng, reference) if not crashed else None
        rss_after = rss_mb(proc.pid) if not crashed else None
        server = {} if crashed else {
            "5xx": metric(url, 'onnxkit_inference_errors_total{code="5'),
            "4xx": metric(url, 'onnxkit_inference_errors_total{code="4'),
            "disconnects": metric(url, "onnxkit_inference_disconnects_total{")}
    five = sum(n for kinds in fuzzed["by_kind"].values() for label, n in kinds.items() if label.startswith("5"))
    return {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "machine": machine(), "count": args.count, "seed": args.seed, "fuzz_s": round(fuzz_s, 1),
        "crashes": int(crashed), "five_xx_for_client_errors": five, "problems": fuzzed["problems"][:50],
        "problem_count": len(fuzzed["problems"]), "by_kind": fuzzed["by_kind"], "server_metrics": server,
        "read_timeout_s": args.read_timeout_s, "stalled": held, "grpc": grpc_,
        "good_before": warm, "good_after": after, "rss_mb_start": rss_start, "rss_mb_before": rss_before,
        "rss_mb_after": rss_after, "rss_ratio": round(rss_after / rss_before, 3) if rss_after else None,
        "rss_ratio_to_start": round(rss_after / rss_start, 3) if rss_after else None}


def markdown(r: dict[str, Any]) -> str:
    after = r["good_after"] or {}
    held = r["stalled"] or {}
    during = held.get("good_requests_meanwhile") or {}
    grpc_ = r["grpc"] or {}
    lines = [
        "# Serving fuzz: malformed requests against `serve` (tiny CNN, ONNX Runtime, CPU)", "",
        f"Command: `{r['command']}`  ", f"Date: {r['date']}  ",
        f"Machine: {r['machine']['cpu_model']}, {r['machine']['cpu_count']} cores", "",
        f"- {r['count']} malformed requests (seed {r['seed']}) in {r['fuzz_s']} s: **{r['crashes']} crashes**, "
        f"**{r['five_xx_for_client_errors']} 5xx** answers to client errors, {r['problem_count']} problems "
        "(5xx, no answer, an error body that is not one-line JSON, uvicorn's plain-text parser errors included, "
        "or a 200 to a request that must be refused)",
        f"- {held.get('connections')} stalled connections (read/keep-alive timeout {r['read_timeout_s']:g} s): "
        f"**{held.get('left_open')} left open** {r['read_timeout_s'] + 5:g} s after; closed after "
        f"{held.get('closed_after_s_median')} s (median), {held.get('closed_after_s_max')} s (max); answers "
        f"{held.get('answers')}; {held.get('refused_at_connect')} refused at connect; good requests meanwhile: "
        f"{during.get('requests')}, {during.get('errors')} errors, {during.get('wrong')} wrong, in "
        f"{during.get('seconds')} s",
        f"- gRPC: {grpc_.get('requests')} malformed messages, **{grpc_.get('not_invalid_argument')} not "
        f"INVALID_ARGUMENT** ({grpc_.get('codes')})",
        f"- good requests after the fuzz: {after.get('requests', 0)}, {after.get('errors', 'n/a')} errors, "
        f"**{after.get('wrong', 'n/a')} wrong answers** vs ONNX Runtime (max abs err {after.get('max_abs_err')})",
        f"- server RSS: {r['rss_mb_start']} MB at start, {r['rss_mb_before']} MB after the warm-up (before the fuzz), "
        f"{r['rss_mb_after']} MB at the end (ratio to the warmed-up RSS {r['rss_ratio']}, to the start "
        f"{r['rss_ratio_to_start']}; target within 20%)",
        f"- server /metrics after: {r['server_metrics']}", "",
        "| mutation | answers |", "|---|---|"]
    for kind, labels in r["by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(labels.items()))} |")
    lines += ["", "Problems:" if r["problems"] else "No problems.", *[f"- `{p}`" for p in r["problems"]], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="Malformed requests")
    ap.add_argument("--good", type=int, default=200, help="Good requests before and after, checked against ORT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stalled", type=int, default=300, help="Connections held open with an unfinished request")
    ap.add_argument("--read-timeout-s", type=float, default=5.0, help="serve --read-timeout-s and --keep-alive-s")
    ap.add_argument("--artifact-dir", default="/tmp/fuzz_tiny")
    args = ap.parse_args()
    result = run(args)
    j, m = write("serving_fuzz", result, markdown(result))
    print(markdown(result))
    print(f"wrote {j} and {m}")
    after = result["good_after"] or {}
    held = result["stalled"] or {}
    bad = (result["crashes"] or result["problem_count"] or after.get("wrong", 1) or after.get("errors", 1)
           or held.get("left_open", 1) or (held.get("good_requests_meanwhile") or {}).get("errors", 1)
           or (result["grpc"] or {}).get("not_invalid_argument", 1) or (result["rss_ratio"] or 2) > 1.2)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
