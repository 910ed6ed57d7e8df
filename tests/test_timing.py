"""Interleaved timing: rounds with the order rotated, the spread of the rounds, and the one rule that calls two
results different."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from core.metrics import LatencyStats, clearly_slower, median_interval
from runtimes import timing
from runtimes.base import Runner, RunnerOptions
from runtimes.timing import SETTLE, Settle, interleaved, interleaved_within_memory, split_iters, warm_block


class _Sleeper(Runner):
    """A runner whose call sleeps a fixed time and logs when it ran: it tests the scheduler, not a runtime."""

    name = "sleeper"

    def __init__(self, tag: str, sleep_s: float, log: list[str]) -> None:
        self.tag, self.sleep_s, self.log = tag, sleep_s, log
        self.options = RunnerOptions()

    def _load(self) -> None:
        pass

    def run_once(self, prepared: Any) -> None:
        self.log.append(self.tag)
        time.sleep(self.sleep_s)


def test_rounds_rotate_the_order_and_split_the_iterations() -> None:
    log: list[str] = []
    runners = [_Sleeper(t, 0.0005, log) for t in "abc"]
    timed = interleaved(runners, [None] * 3, warmup=1, iters=10, rounds=3, block_warmup=1, settle=None)
    assert split_iters(10, 3) == [4, 3, 3] and split_iters(2, 5) == [1, 1]
    assert [len(r) for r in timed[0].rounds] == [4, 3, 3] and all(len(t.samples) == 10 for t in timed)
    blocks = [log[i] for i in range(3, len(log)) if i == 3 or log[i] != log[i - 1]]  # after the warm-ups
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each round starts one later
    assert all(x >= 0.4 for t in timed for x in t.samples)  # ms: the sleeps were timed
    assert all(t.cpu_util is not None and t.cpu_util < 50 for t in timed)  # sleeping uses no CPU


def test_a_slow_stretch_falls_on_every_candidate_alike() -> None:
    """Run one after another, the candidate timed during a slow stretch of the machine looks slower; in
    rotated rounds the stretch is shared, and two equal candidates stay within their intervals."""
    log: list[str] = []
    slow_until = time.perf_counter() + 0.15

    class _Machine(_Sleeper):
        def run_once(self, prepared: Any) -> None:
            time.sleep(self.sleep_s * (4 if time.perf_counter() < slow_until else 1))

    a, b = _Machine("a", 0.002, log), _Machine("b", 0.002, log)
    ta, tb = interleaved([a, b], [None, None], warmup=0, iters=60, rounds=6, block_warmup=0, settle=None)
    sa, sb = LatencyStats.from_samples(ta.samples, ta.rounds), LatencyStats.from_samples(tb.samples, tb.rounds)
    assert not clearly_slower(sa, sb) and not clearly_slower(sb, sa)


class _Held(_Sleeper):
    """A sleeper that takes ``size`` bytes of a pretend memory while loaded, and counts its loads."""

    memory: ClassVar[dict[str, int]] = {"used": 0, "loads": 0, "peak": 0}
    size = 3 << 30

    def _load(self) -> None:
        self.memory["used"] += self.size
        self.memory["loads"] += 1
        self.memory["peak"] = max(self.memory["peak"], self.memory["used"])

    def _close(self) -> None:
        self.memory["used"] -= self.size


@pytest.mark.parametrize(("total_gib", "loads", "peak_gib"), [(64, 5, 15), (14, 5 + 2 * 5, 6)])
def test_runners_that_do_not_fit_in_memory_are_timed_in_chunks_every_round(
        monkeypatch: pytest.MonkeyPatch, total_gib: int, loads: int, peak_gib: int) -> None:
    """Five runners of 3 GiB each: with 64 GiB they are held together for every round (one load each); with
    14 GiB (three times one runner kept free) they are held two at a time (chunks ab, cd, e), each chunk
    opened again in every round, and every runner still gets one block of timed calls per round."""
    from core import resources

    _Held.memory.update(used=0, loads=0, peak=0)
    monkeypatch.setattr(resources, "available_memory", lambda: (total_gib << 30) - _Held.memory["used"])
    log: list[str] = []
    timed = interleaved_within_memory([lambda t=t: _Held(t, 0.0002, log) for t in "abcde"], {}, warmup=1,
                                      iters=6, rounds=3)
    assert [[len(r) for r in t.rounds] for t in timed] == [[2, 2, 2]] * 5
    assert _Held.memory == {"used": 0, "loads": loads, "peak": peak_gib << 30}
    assert timing.MIN_FREE_BYTES == 2 << 30


def test_a_long_call_gets_no_block_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The untimed calls at the start of each block absorb millisecond effects; a runner whose calls take
    LONG_CALL_MS or more skips them (one-call blocks of a 2 s call would otherwise cost twice the timed time),
    while a short one is warmed for at least Settle.min_ms in every block."""
    monkeypatch.setattr(timing, "LONG_CALL_MS", 5.0)
    log: list[str] = []
    timed = interleaved_within_memory([lambda: _Sleeper("short", 0.0005, log), lambda: _Sleeper("long", 0.01, log)],
                                      {}, warmup=2, iters=3, rounds=3)
    assert [len(t.samples) for t in timed] == [3, 3]
    assert log.count("long") == 2 + 3  # warm-ups and timed calls only
    assert log.count("short") > 2 + 3 + 3 and timed[1].warmup_calls == [0, 0, 0]
    assert all(c >= 1 for c in timed[0].warmup_calls) and min(timed[0].warmup_ms) >= SETTLE.min_ms
    # bench's fixed count (round_warmup) still applies to a long call, the time-based part does not
    assert warm_block(_Sleeper("long", 0.01, log), None, 1, SETTLE, steady_ms=10.0)[0] == 1


class _ColdAfterSwitch(Runner):
    """A runner that is slow for ``cold_s`` of wall time after another runner ran, as a real runtime is while the
    previous one's threads still spin and its own caches and threads are cold. It sleeps its latency and reports
    it as measured, so the schedule is tested, not the load on this machine (a sleep only ever overshoots)."""

    name = "cold-after-switch"
    last: ClassVar[list[str]] = [""]  # the tag of the runner that ran last

    def __init__(self, tag: str, warm_ms: float, cold_ms: float, cold_s: float) -> None:
        self.tag, self.warm_ms, self.cold_ms, self.cold_s = tag, warm_ms, cold_ms, cold_s
        self.options = RunnerOptions()
        self.switched = 0.0

    def _load(self) -> None:
        pass

    def run_once(self, prepared: Any) -> None:
        self.time_iterations(prepared, 1, 0)

    def time_iterations(self, prepared: Any, warmup: int, iters: int) -> list[float]:
        out: list[float] = []
        for k in range(warmup + iters):
            now = time.perf_counter()
            if self.last[0] != self.tag:
                self.last[0], self.switched = self.tag, now
            ms = self.cold_ms if now - self.switched < self.cold_s else self.warm_ms
            time.sleep(ms / 1e3)
            if k >= warmup:
                out.append(ms)
        return out


def test_each_block_is_timed_only_once_its_target_is_back_to_steady_state() -> None:
    """Two targets, each 10x slower for 80 ms after the other ran (longer than Settle.min_ms, so the settle rule
    decides): with one untimed call per block (the old rule, settle=None) the first timed calls of every block
    are cold; the default block warm-up keeps calling until the last call is back at the steady latency, so
    every timed call is a steady one, and it records what it did."""
    def pair() -> list[Runner]:
        return [_ColdAfterSwitch(t, warm_ms=1.0, cold_ms=10.0, cold_s=0.08) for t in "ab"]

    old = interleaved(pair(), [None, None], warmup=12, iters=30, rounds=3, block_warmup=1, settle=None)
    assert sum(x == 10.0 for t in old for x in t.samples) >= 8  # 4 blocks follow a switch: each timed cold calls
    timed = interleaved(pair(), [None, None], warmup=12, iters=30, rounds=3)
    for t in timed:
        assert t.samples == [1.0] * 30
        assert len(t.warmup_calls) == 3 and all(c >= 2 for c in t.warmup_calls)
        assert all(SETTLE.min_ms <= ms < SETTLE.max_ms for ms in t.warmup_ms) and max(t.warmup_ms) >= 80.0
        info = t.block_warmup()
        assert info["block_warmup_calls_max"] == max(t.warmup_calls)
        assert info["block_warmup_ms_total"] >= 3 * SETTLE.min_ms


def test_a_block_warm_up_that_never_settles_stops_at_its_cap_and_follows_the_steady_latency() -> None:
    """A target whose calls stay 5x above the steady latency it was given is warmed up to Settle.max_ms, not
    forever; its steady latency is then the median of its timed calls, so the next blocks settle at once."""
    always_cold = _ColdAfterSwitch("c", warm_ms=5.0, cold_ms=5.0, cold_s=1e9)
    (t,) = interleaved([always_cold], [None], warmup=0, iters=6, rounds=3,
                       settle=Settle(min_ms=5.0, tolerance=0.05, max_ms=30.0), steady_ms=[1.0])
    assert 30.0 <= t.warmup_ms[0] < 130.0 and 2 <= t.warmup_calls[0] <= 6  # calls of 5 ms or more: at most 30/5
    assert t.warmup_calls[1:] == [1, 1] and t.samples == [5.0] * 6


def test_interval_rule() -> None:
    def stats(p50: float, lo: float, hi: float) -> LatencyStats:
        return LatencyStats(p50=p50, p90=p50, p99=p50, mean=p50, min=p50, max=p50, std=0, iters=10,
                            p50_interval=(lo, hi))

    assert clearly_slower(stats(12, 11.5, 12.5), stats(10, 9.5, 10.5), ratio=1.1)
    assert not clearly_slower(stats(12, 9.0, 13.0), stats(10, 9.5, 10.5), ratio=1.1)  # intervals overlap
    assert not clearly_slower(stats(10.5, 10.4, 10.6), stats(10, 9.9, 10.1), ratio=1.1)  # under the ratio
    lo, hi = median_interval([10.0, 10.2, 9.9, 10.1, 10.0])
    assert 9.9 <= lo <= 10.0 <= hi <= 10.2
    assert LatencyStats.from_samples([1.0, 2.0], [[1.0], [2.0]]).p50_interval is None  # < 3 rounds: no interval


def test_bench_records_rounds_spinning_and_restores_torch_threads(tiny_artifacts: Path) -> None:
    import torch

    from runtimes.harness import BenchConfig, run_bench

    before = torch.get_num_threads()
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["eager", "ort"], batch_sizes=[1], warmup=1,
                                iters=8, rounds=4, threads=1, ort_spinning=False, accuracy_samples=4),
                    log=lambda _m: None)
    assert torch.get_num_threads() == before
    assert res.config["ort_spinning"] is False and res.config["rounds"] == 4
    for r in res.records:
        assert len(r.latency_ms.round_p50s) == 4 and r.latency_ms.iters == 8
        lo, hi = r.latency_ms.p50_interval or (0, 0)
        assert 0 < lo <= hi
        assert r.cpu_util is not None and 0 < r.cpu_util <= 105  # % of the CPUs the process may use
        # the block warm-ups are recorded: at least round_warmup calls, and Settle.min_ms, in each of the 4 blocks
        assert r.extra["block_warmup_calls_median"] >= 1 and r.extra["block_warmup_ms_total"] >= 4 * SETTLE.min_ms
    from reports.writers import to_markdown

    eager_row = next(ln for ln in to_markdown(res).splitlines() if ln.startswith("| eager "))
    ort_row = next(ln for ln in to_markdown(res).splitlines() if ln.startswith("| ort "))
    assert "| reference |" in eager_row and "reference" not in ort_row  # the reference is not checked against itself
    assert "[" in ort_row  # the p50 with its interval


def test_bench_states_each_rows_work_and_fraction_of_the_machines_peak(tiny_artifacts: Path) -> None:
    """GFLOP per call from the ONNX graph (Conv/MatMul/Gemm MACs x 2) and the fraction of the measured FP32
    matrix-multiply peak it reaches."""
    import onnx

    from core.flops import onnx_macs
    from runtimes.harness import BenchConfig, run_bench

    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["ort"], batch_sizes=[1, 4], warmup=1,
                                iters=3, rounds=3, accuracy_samples=4), log=lambda _m: None)
    assert res.machine["matmul_peak_gflops"] > 0
    one, four = (next(r for r in res.records if r.batch_size == b) for b in (1, 4))
    assert one.gflop is not None and four.gflop == pytest.approx(4 * one.gflop)  # linear in the batch
    assert (one.peak_fraction or 0) > 0  # (its size depends on the load on the machine: no upper bound here)
    model = onnx.load(str(tiny_artifacts / "model.onnx"))
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert convs and onnx_macs(tiny_artifacts / "model.onnx", {"input": [1, 3, 32, 32]}) == one.gflop * 1e9 / 2


def test_macs_at_batch_1_survive_a_broadcast_shape_inference_cannot_follow(tmp_path: Path) -> None:
    """x [1, 8] + (x reshaped by a shape ONNX cannot propagate) has an unknown batch at batch 1 (1 broadcasts
    against anything), so every MatMul after it had no shape and a Hugging Face BERT got no GFLOP at batch 1."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from core.flops import onnx_macs

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Abs", ["s"], ["s2"]),
             helper.make_node("Reshape", ["x", "s2"], ["r"]), helper.make_node("Add", ["x", "r"], ["a"]),
             helper.make_node("MatMul", ["a", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")])
    path = tmp_path / "broadcast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert [onnx_macs(path, {"x": [b, 8]}) for b in (1, 2, 8)] == [32, 64, 256]


def test_the_matmul_peak_is_the_fastest_gemm_library_here() -> None:
    """PyTorch's BLAS alone is not the machine's peak (MKL on an AMD CPU: about half of oneDNN's rate), so FP32 models
    run on OpenVINO or ONNX Runtime came out above 100% of it."""
    import importlib.util

    from core.flops import matmul_peak_gflops, matmul_peaks

    peaks = matmul_peaks(1)
    assert {"torch", "onnxruntime"} <= set(peaks) and all(v > 0 for v in peaks.values())
    assert ("openvino" in peaks) == (importlib.util.find_spec("openvino") is not None)
    assert matmul_peak_gflops(1) == max(peaks.values())


def test_each_gemm_library_computes_the_fp32_product_it_times() -> None:
    """run_deploy times ``matmul_call`` beside a model's calls as the machine's FP32 peak of that moment: each
    library's call must be the n x n FP32 product itself (OpenVINO's bf16 default on a CPU with AMX runs 2x faster
    with 3e-3 relative error: a peak from it would not be FP32's)."""
    import numpy as np
    import pytest

    from core.flops import MATMUL_LIBRARIES, matmul_call

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((128, 128)).astype(np.float32) for _ in range(2))
    expected = a.astype(np.float64) @ b.astype(np.float64)
    for lib in MATMUL_LIBRARIES:
        call = matmul_call(lib, 128, 1, operands=(a, b))
        if call is None:
            continue
        out = call()
        got = np.asarray(out[0] if isinstance(out, list) else
                         out.numpy() if hasattr(out, "numpy") else next(iter(out.values())))
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5, lib
    with pytest.raises(KeyError):
        matmul_call("no-such-library", 8)
