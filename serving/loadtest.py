"""`loadtest URL`: N concurrent clients for D seconds against a KServe v2 / Triton HTTP endpoint.

Bounded: it stops by itself after ``duration_s`` (and after ``max_requests`` when given), and every
request has a timeout. The inputs are random tensors built from the model's metadata, encoded once
as binary tensors (what ``tritonclient.http`` sends). Every response is checked: its outputs must
have the metadata's names and batch size, be finite and, for the same input, agree with the first
answer to it, or with a reference the caller computed in-process. The result is a ``BenchResults``
(kind ``loadtest``) so a report can put ``bench`` and ``serve`` side by side.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError
from core.iospec import IOSpec, feed_digest
from core.metrics import LatencyStats
from core.resources import check_feed_memory
from reports.models import BenchRecord, BenchResults
from serving.protocol import (
    HEADER_LENGTH,
    SERVER_TIMING,
    RequestError,
    decode_response,
    encode_request,
    server_timing,
    spec_from_metadata,
)

#: Computes expected outputs (in metadata output order) for a feed: e.g. ONNX Runtime in-process.
Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class LoadTestConfig(BaseModel):
    """A load test request."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http://host:port or http://host:port/v2/models/NAME")
    model: str | None = Field(default=None, description="Model name when the URL does not give it "
                                                        "(default: the server's only model)")
    concurrency: int = Field(default=8, ge=1, le=1024, description="Clients, each with one request in flight")
    duration_s: float = Field(default=30.0, gt=0, le=3600, description="Timed run length (after warm-up)")
    warmup_s: float = Field(default=1.0, ge=0, le=600, description="Untimed run before the timed one")
    batch: int = Field(default=1, ge=1, description="Rows per request")
    max_requests: int | None = Field(default=None, ge=1, description="Stop after this many requests (warm-up "
                                                                     "included, and at most half of them)")
    timeout_s: float = Field(default=30.0, gt=0, description="Per-request timeout")
    distinct_inputs: int = Field(default=8, ge=1, le=1024, description="Different random inputs cycled through")
    binary: bool = Field(default=True, description="Binary tensors (tritonclient's default) instead of JSON")
    seed: int = 0
    reference: Path | None = Field(default=None, description="Artifact folder: check responses against ONNX Runtime "
                                                             "run in-process on the served variant")
    input_shape: str | None = Field(default=None, description="Values of the inputs' dynamic dims, as convert's "
                                                              "--input-shape (e.g. input_ids:1x16,attention_mask:1x16)")
    rtol: float = Field(default=1e-3, ge=0, description="Response check: relative tolerance")
    atol: float = Field(default=1e-4, ge=0, description="Response check: absolute tolerance")


@dataclass
class Target:
    base: str
    model: str
    spec: IOSpec
    config: dict[str, Any]


def _split_url(url: str, model: str | None) -> tuple[str, str | None]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"malformed URL {url!r}: expected http://host:port[/v2/models/NAME]")
    try:
        _ = parts.port
    except ValueError:
        raise InputError(f"malformed URL {url!r}: bad port") from None
    base = f"{parts.scheme}://{parts.netloc}"
    segs = [s for s in parts.path.split("/") if s]
    if segs[:2] == ["v2", "models"] and len(segs) >= 3:
        if model and model != segs[2]:
            raise InputError(f"the URL names model {segs[2]!r} but --model is {model!r}")
        return base, segs[2]
    if segs:
        raise InputError(f"URL path {parts.path!r} is not /v2/models/NAME")
    return base, model


async def _get_json(session: Any, url: str, what: str) -> Any:
    import aiohttp

    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise InputError(f"{what}: {url} answered {resp.status}: {(await resp.text())[:200]}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BackendUnavailableError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


async def discover(session: Any, cfg: LoadTestConfig) -> Target:
    """Find the model and its inputs from the server (health, repository index, metadata, config)."""
    import aiohttp

    base, model = _split_url(cfg.url, cfg.model)
    try:
        async with session.get(f"{base}/v2/health/ready") as resp:
            if resp.status != 200:
                raise BackendUnavailableError(f"{base} is not ready (GET /v2/health/ready -> {resp.status})")
        if model is None:
            async with session.post(f"{base}/v2/repository/index") as resp:
                index = await resp.json(content_type=None) if resp.status == 200 else []
            names = sorted({m["name"] for m in index if isinstance(m, dict) and "name" in m})
            if len(names) != 1:
                raise InputError(f"name the model: --model NAME or {base}/v2/models/NAME (the server lists "
                                 f"{names or 'no repository index'})")
            model = names[0]
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BackendUnavailableError(f"cannot reach {base}: {exc or type(exc).__name__}") from None
    meta = await _get_json(session, f"{base}/v2/models/{model}", f"model {model!r}")
    spec = spec_from_metadata(meta)
    spec.check_batch(cfg.batch)
    if spec.fixed_batch() is None and not spec.dynamic_batch:
        raise InputError(f"model {model!r} has no batch dimension; use --batch 1")
    try:
        config = await _get_json(session, f"{base}/v2/models/{model}/config", "config")
    except (InputError, BackendUnavailableError):
        config = {}
    return Target(base=base, model=model, spec=spec, config=config)


@dataclass
class _Tally:
    latencies_ms: list[float] = field(default_factory=list)
    #: per timed request, from our server's Server-Timing header: its phases (read, queue, infer, handler),
    #: and the end-to-end latency minus the model time
    server_ms: dict[str, list[float]] = field(default_factory=dict)
    overhead_ms: list[float] = field(default_factory=list)
    rows: int = 0
    requests: int = 0
    #: requests sent (finished or not): --max-requests caps these, and warm-up may use at most half of them
    issued: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    incorrect: int = 0
    checked: int = 0
    #: the first correct answer to each distinct input, in output order
    first_answer: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{kind}: {detail[:300]}")


def _check(answer: dict[str, np.ndarray], spec: IOSpec, batch: int, want: list[np.ndarray] | None,
           cfg: LoadTestConfig) -> str | None:
    """Why a response is wrong, or None."""
    names = spec.output_names
    if sorted(answer) != sorted(names):
        return f"outputs {sorted(answer)} != {names}"
    for n in names:
        a = answer[n]
        if spec.dynamic_batch and (a.ndim == 0 or a.shape[0] != batch):
            return f"output {n!r} has shape {list(a.shape)}, expected batch {batch}"
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"output {n!r} has non-finite values"
    if want is not None:
        for n, w in zip(names, want, strict=True):
            if answer[n].shape != w.shape or not np.allclose(answer[n], w, rtol=cfg.rtol, atol=cfg.atol):
                diff = float(np.max(np.abs(answer[n].astype(np.float64) - w))) if answer[n].shape == w.shape else -1
                return f"output {n!r} differs from the expected values (max abs diff {diff:.3g})"
    return None


async def _client(session: Any, target: Target, bodies: list[tuple[bytes, dict[str, str]]], worker: int,
                  cfg: LoadTestConfig, tally: _Tally, clock: dict[str, float],
                  expected: dict[int, list[np.ndarray]] | None) -> None:
    import aiohttp

    url = f"{target.base}/v2/models/{target.model}/infer"
    k = worker
    while True:
        now = time.perf_counter()
        if now >= clock["end"] or (cfg.max_requests is not None and tally.issued >= cfg.max_requests):
            return
        if now < clock["start"] and cfg.max_requests is not None and tally.issued >= cfg.max_requests // 2:
            clock["start"], clock["end"] = now, now + cfg.duration_s  # warm-up ends: keep half the cap timed
        timed = now >= clock["start"]
        tally.issued += 1
        idx = k % len(bodies)
        k += cfg.concurrency
        body, headers = bodies[idx]
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                payload = await resp.read()
                status, header_len = resp.status, resp.headers.get(HEADER_LENGTH)
                timing = server_timing(resp.headers.get(SERVER_TIMING))
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.requests += 1
            tally.error("transport", str(exc) or type(exc).__name__)
            continue
        t1 = time.perf_counter()
        tally.requests += 1
        if status != 200:
            tally.error(f"http {status}", payload.decode(errors="replace"))
            continue
        try:
            answer = decode_response(payload, header_len)
        except (RequestError, KeyError, ValueError, TypeError) as exc:
            tally.error("bad response", str(exc))
            continue
        want = expected.get(idx) if expected is not None else tally.first_answer.get(idx)
        problem = _check(answer, target.spec, cfg.batch, want, cfg)
        tally.checked += 1
        if problem is not None:
            tally.incorrect += 1
            tally.error("incorrect", problem)
            continue
        tally.first_answer.setdefault(idx, [answer[n] for n in target.spec.output_names])
        if timed:
            tally.latencies_ms.append((t1 - t0) * 1e3)
            tally.rows += cfg.batch
            if "infer" in timing:
                tally.overhead_ms.append((t1 - t0) * 1e3 - timing["infer"])
                for phase, ms in timing.items():
                    tally.server_ms.setdefault(phase, []).append(ms)


def _spec_mismatch(served: IOSpec, ref: IOSpec) -> str | None:
    """How the reference artifact's inputs/outputs differ from the served model's metadata (names, ranks,
    fixed dims, dtypes), or None when they agree."""
    for what, got, want in (("inputs", ref.inputs, served.inputs), ("outputs", ref.outputs, served.outputs)):
        if [t.name for t in got] != [t.name for t in want]:
            return f"its {what} are {[t.name for t in got]}, the server's {[t.name for t in want]}"
        for g, w in zip(got, want, strict=True):
            fixed_differ = any(isinstance(a, int) and isinstance(b, int) and a != b
                               for a, b in zip(g.shape, w.shape, strict=False))
            if len(g.shape) != len(w.shape) or fixed_differ or g.dtype != w.dtype:
                return f"{g.name!r} is {g.shape} {g.dtype} there, {w.shape} {w.dtype} on the server"
    return None


def _feeds(spec: IOSpec, cfg: LoadTestConfig) -> list[dict[str, np.ndarray]]:
    """Random requests: with --reference, from the artifact's own IOSpec (its dims' values, the token ids'
    vocabulary, masks of ones), else from the server's metadata; --input-shape binds dynamic dims."""
    from core.shapes import apply_input_shapes

    if cfg.reference is not None:
        from core.manifest import Manifest

        known = Manifest.load(cfg.reference).iospec
        if why := _spec_mismatch(spec, known):
            raise InputError(f"--reference {cfg.reference} is another model than the one served: {why}")
        spec = known
    spec, _ = apply_input_shapes(spec, cfg.input_shape)
    if unbound := spec.unbound_dims():
        raise InputError(f"the model's input dim(s) {', '.join(unbound)} are dynamic: give them values with "
                         f"--input-shape (e.g. {','.join(f'{t.name}:1x16' for t in spec.inputs)}) or --reference "
                         "ARTIFACT_DIR")
    check_feed_memory(spec, cfg.batch, f"--batch {cfg.batch}")
    dtypes = {t.name: t.dtype for t in spec.inputs}
    return [{n: a.astype(dtypes[n]) for n, a in spec.random_feed(cfg.batch, seed=cfg.seed + i).items()}
            for i in range(cfg.distinct_inputs)]


async def _run(cfg: LoadTestConfig, reference: Reference | None,
               log: Callable[[str], None]) -> tuple[Target, list[dict[str, np.ndarray]], _Tally, float, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        target = await discover(session, cfg)
        feeds = _feeds(target.spec, cfg)
        expected = None
        if reference is None and cfg.reference is not None:
            reference = artifact_reference(cfg.reference, _param(target.config, "onnxkit_variant"))
        if reference is not None:
            expected = {i: [np.asarray(o) for o in reference(f)] for i, f in enumerate(feeds)}
        bodies = []
        for f in feeds:
            body, header_len = encode_request(f, target.spec.output_names, binary=cfg.binary)
            headers = {"Content-Type": "application/octet-stream" if header_len else "application/json"}
            if header_len is not None:
                headers[HEADER_LENGTH] = str(header_len)
            bodies.append((body, headers))
        log(f"load test: {cfg.concurrency} clients, {cfg.warmup_s:g} s warm-up + {cfg.duration_s:g} s against "
            f"{target.base}/v2/models/{target.model} (batch {cfg.batch})")
        tally = _Tally()
        t0 = time.perf_counter()
        clock = {"start": t0 + cfg.warmup_s, "end": t0 + cfg.warmup_s + cfg.duration_s}
        await asyncio.gather(*(_client(session, target, bodies, w, cfg, tally, clock, expected)
                               for w in range(cfg.concurrency)))
        wall = max(time.perf_counter() - clock["start"], 1e-9)
        return target, feeds, tally, wall, expected


def _event_loop_runner() -> Callable[[Any], Any]:
    """uvloop's ``run`` where installed (a faster event loop: less client time in every latency), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def run_loadtest(cfg: LoadTestConfig, reference: Reference | None = None,
                 log: Callable[[str], None] = print) -> BenchResults:
    """Run the load test; return a ``BenchResults`` (kind ``loadtest``) with one ``http`` record.

    ``reference`` (or ``cfg.reference``, an artifact folder run in ONNX Runtime here) computes the
    expected outputs of a feed: every response is then checked against it, and the record's accuracy
    compares the served outputs with it.
    """
    target, feeds, tally, wall, expected = _event_loop_runner()(_run(cfg, reference, log))

    errors = sum(tally.errors.values())
    results = BenchResults(kind="loadtest", model=target.model, artifact_dir=None,
                           config=cfg.model_dump(mode="json") | {"inputs": f"random normal (seed {cfg.seed}), "
                                                                              f"{cfg.distinct_inputs} distinct"})
    if errors:
        results.warnings.append(f"{errors} failed request(s): {dict(tally.errors)}; e.g. {tally.error_examples[0]}")
    if not tally.latencies_ms:
        results.warnings.append("no request succeeded in the timed window")
        return results
    accuracy = None
    if expected is not None and tally.first_answer:
        from core.metrics import accuracy_stats

        idx = sorted(tally.first_answer)
        count = len(expected[idx[0]])
        accuracy = accuracy_stats([np.concatenate([tally.first_answer[i][k] for i in idx]) for k in range(count)],
                                  [np.concatenate([expected[i][k] for i in idx]) for k in range(count)], None,
                                  "in-process reference", target.spec.output_names)
    lat = LatencyStats.from_samples(tally.latencies_ms)
    results.records.append(BenchRecord(
        model=target.model, backend="http", variant=_param(target.config, "onnxkit_variant") or target.model,
        precision=_param(target.config, "onnxkit_precision") or "unknown",
        device=_param(target.config, "onnxkit_runner") or "server",
        batch_size=cfg.batch, latency_ms=lat, throughput=tally.rows / wall,
        input_digest=feed_digest(feeds[0]), accuracy=accuracy,
        notes=[f"end-to-end HTTP latency with {cfg.concurrency} concurrent client(s); throughput = rows answered "
               "correctly per second of the timed window"],
        extra={"url": f"{target.base}/v2/models/{target.model}", "concurrency": cfg.concurrency,
               "duration_s": wall, "requests": tally.requests, "timed_ok": len(tally.latencies_ms), "errors": errors,
               "errors_by_kind": dict(tally.errors), "error_examples": tally.error_examples,
               "checked": tally.checked, "incorrect": tally.incorrect,
               "check": "in-process reference" if expected is not None else "consistency with the first answer",
               "requests_per_s": len(tally.latencies_ms) / wall, **_timing_extra(tally)},
    ))
    return results


def _timing_extra(tally: _Tally) -> dict[str, Any]:
    """Model time and the rest of the latency (HTTP, parsing, queueing, copies), when the server reports it."""
    if not tally.overhead_ms:
        return {}
    series = {"overhead_ms": tally.overhead_ms, **{f"server_{k}_ms": v for k, v in tally.server_ms.items()}}
    out: dict[str, Any] = {f"{k}_p50_p90_p99": np.percentile(v, [50, 90, 99]).round(3).tolist()
                           for k, v in series.items()}
    return {**out,
            "overhead_note": "overhead = end-to-end latency minus the server's model time (Server-Timing), "
                             "per request: HTTP, encoding, checks, queueing and copies"}


def _param(config: Any, key: str) -> str | None:
    """A string parameter of a Triton model config (as JSON), e.g. the variant our server reports."""
    params = config.get("parameters", {}) if isinstance(config, dict) else {}
    value = params.get(key) if isinstance(params, dict) else None
    return str(value["string_value"]) if isinstance(value, dict) and "string_value" in value else None


def artifact_reference(artifact_dir: Path, variant: str | None = None, *, ort_spinning: bool = True) -> Reference:
    """Expected outputs from ONNX Runtime run in-process on an artifact (default variant: opt, else fp32)."""
    from runtimes.base import RunnerOptions
    from runtimes.ort import OrtRunner
    from serving.triton import default_variant, load_artifacts, resolve_variants

    base = Path(artifact_dir)
    manifest = load_artifacts(base)
    arts = [a for a in resolve_variants(manifest, [variant or default_variant(manifest)])
            if a.kind in OrtRunner.artifact_kinds]
    if len(arts) != 1:
        raise InputError(f"--reference needs exactly one ONNX variant; {variant!r} gives {[a.name for a in arts]}")
    runner = OrtRunner(manifest, base, arts[0], RunnerOptions(device="cpu", ort_spinning=ort_spinning)).load()
    return runner.infer
