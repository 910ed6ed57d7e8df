"""OpenVINO and torch.compile as backends: the same harness, inputs and accuracy checks as every other one."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import BackendUnavailableError, InputError
from runtimes.harness import BenchConfig, run_bench

pytest.importorskip("openvino")


def test_openvino_runs_every_onnx_variant_and_agrees(tiny_artifacts: Path) -> None:
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["ort", "openvino"], batch_sizes=[1, 2],
                                warmup=1, iters=6, rounds=3, accuracy_samples=8,
                                options={"openvino_hint": "THROUGHPUT"}), log=lambda _m: None)
    ov = [r for r in res.records if r.backend == "openvino"]
    assert {r.variant for r in ov} == {r.variant for r in res.records if r.backend == "ort"}
    assert {r.batch_size for r in ov} == {1, 2}
    for r in ov:
        assert r.accuracy is not None and r.accuracy.cosine > 0.9999 and r.accuracy_drop is not None
        assert r.accuracy_drop < 0.01  # random inputs (no held-out data): the output cosine is graded, no top-1
    assert res.config["options"]["openvino_hint"] == "THROUGHPUT"


def test_an_fp32_variant_on_openvino_is_computed_in_fp32(tiny_artifacts: Path) -> None:
    """OpenVINO's CPU plugin computes an FP32 model in bf16 by default on a CPU with AMX (relative error about
    1e-3, within the cosine check above): a row labelled fp32 must be FP32, as close to ONNX Runtime as FP32 is."""
    import numpy as np
    import onnxruntime as ort
    import openvino as ov

    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.openvino import OpenVinoRunner

    manifest = Manifest.load(tiny_artifacts)
    art = manifest.artifacts["opt"]
    sess = ort.InferenceSession(str(tiny_artifacts / art.file.path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((2, *inp.shape[1:])).astype(np.float32)
    expected = sess.run(None, {inp.name: x})[0]
    with OpenVinoRunner(manifest, tiny_artifacts, art, RunnerOptions()) as runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        got = runner.infer_prepared(runner.prepare({inp.name: x}))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_openvino_failure_is_one_line_and_the_others_go_on(tiny_artifacts: Path, tmp_path: Path) -> None:
    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.openvino import OpenVinoRunner

    manifest = Manifest.load(tiny_artifacts)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    art = manifest.artifacts["opt"].model_copy(update={"file": manifest.artifacts["opt"].file.model_copy(
        update={"path": str(broken)})})
    with pytest.raises(BackendUnavailableError, match=r"^OpenVINO cannot run broken.onnx: "):
        OpenVinoRunner(manifest, tmp_path, art, RunnerOptions()).load()


def test_torch_compile_records_its_compile_time_apart(tiny_artifacts: Path) -> None:
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["eager", "compile"], batch_sizes=[1],
                                warmup=1, iters=4, rounds=2, accuracy_samples=4), log=lambda _m: None)
    (rec,) = [r for r in res.records if r.backend == "compile"]
    assert rec.extra["compile_s"] > 0 and rec.load_s is not None and rec.load_s >= rec.extra["compile_s"]
    assert rec.accuracy is not None and rec.accuracy.cosine > 0.9999


def test_tune_searches_settings_prunes_and_picks_within_budget(tiny_artifacts: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from runtimes.tune import TuneConfig, run_tune

    logs: list[str] = []
    res = run_tune(TuneConfig(artifact_dir=tiny_artifacts, backends=["ort", "openvino", "trt"], stages=[4, 8],
                              rounds=3, accuracy_samples=4), log=logs.append)
    assert any(line.startswith("skipped backend trt:") for line in logs)  # unavailable: said, not fatal
    ort = [c for c in res.candidates if c.backend == "ort"]
    assert {(c.settings["threads"], c.settings["ort_spinning"]) for c in ort} >= {(1, True), (1, False)}
    assert {c.settings["openvino_hint"] for c in res.candidates if c.backend == "openvino"} == {"LATENCY", "THROUGHPUT"}
    assert all(c.batch_size == 1 for c in res.candidates)  # the latency objective: the smallest batch
    winner = next(c for c in res.candidates if c.label == res.winner)
    assert winner.within_budget and winner.latency_ms is not None and winner.pruned_at_stage is None
    # every candidate measured in stage 1 (but a bf16/fp16 one on a CPU without the units: skipped, issue 32)
    assert all(c.latency_ms is not None for c in res.candidates if c.skipped is None)
    assert res.best_per_batch == {"1": res.winner}
    stages = [line for line in logs if line.startswith("stage ")]  # the screen first, then at least stage 4
    assert stages[0].endswith("x 3 timed calls in 3 interleaved rounds") and stages[0].startswith("stage 1 (screen):")
    assert stages[1].startswith("stage 2: ") and res.stages_run == len(stages) >= 2
    with pytest.raises(InputError, match="screen of 2 call"):
        run_tune(TuneConfig(artifact_dir=tiny_artifacts, screen=2), log=logs.append)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "cli.py"), "tune", str(tiny_artifacts), "--backends", "ort",
                           "--variants", "opt", "--max-minutes", "0.1", "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["winner"].startswith("ort:opt ") and {c["variant"] for c in saved["candidates"]} == {"opt"}
    bad = subprocess.run([sys.executable, str(root / "cli.py"), "tune", str(tiny_artifacts), "--objective", "speed"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown --objective 'speed'" in bad.stderr


def test_best_per_batch_prefers_the_candidates_that_lasted_then_the_fastest() -> None:
    from core.metrics import LatencyStats
    from runtimes.tune import Candidate, best_per_batch

    def cand(variant: str, batch: int, p50: float, pruned: int | None) -> Candidate:
        return Candidate(backend="ort", variant=variant, precision="int8", settings={}, batch_size=batch,
                         latency_ms=LatencyStats.from_samples([p50] * 5), pruned_at_stage=pruned)

    cands = [cand("qdq", 1, 10.0, None), cand("qop", 1, 12.0, None), cand("early", 1, 5.0, 1),
             cand("qdq", 8, 90.0, 2), cand("qop", 8, 70.0, 2), cand("gone", 8, 60.0, 1)]
    best = best_per_batch(cands)
    assert best == {"1": cands[0].label, "8": cands[4].label}


@pytest.fixture(scope="module")
def r18_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init resnet18 at 32x32: its FP32 export and a dynamic INT8 variant."""
    from convert.config import ConvertConfig, ExportConfig, QuantConfig
    from convert.pipeline import run_convert

    out = tmp_path_factory.mktemp("r18") / "r18"
    run_convert(ConvertConfig(export=ExportConfig(model="resnet18", input_shape=(1, 3, 32, 32), optimize=False),
                              quant=QuantConfig(int8_dynamic=True), out=out), log=lambda _m: None)
    return out


def test_tune_grades_random_init_weights_on_the_output_cosine(r18_int8: Path) -> None:
    """Random-init weights give near-uniform class scores whose argmax flips on rounding noise, so convert's gates
    grade them on 100 x (1 - cosine); tune must use the same basis, else it drops every INT8 variant of a random-init
    model (the benchmark models) as 'over the accuracy budget' while convert passed them."""
    from runtimes.tune import TuneConfig, run_tune

    res = run_tune(TuneConfig(artifact_dir=r18_int8, backends=["ort"], stages=[2], rounds=3, accuracy_samples=8),
                   log=lambda _m: None)
    int8 = [c for c in res.candidates if c.variant == "int8_dynamic"]
    assert int8 and all(c.within_budget for c in int8)
    # the cosine basis: small but never exactly 0 for INT8 (top-1 agreement on these inputs is a flat 100%)
    assert all(c.accuracy_drop_points is not None and 0 < c.accuracy_drop_points < 1 for c in int8)


def test_the_best_of_each_precision_pruned_at_the_screen_is_re_timed_with_the_winner(
        r18_int8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FP32 clearly slower than INT8 is pruned at the screen; the FP32 figures quoted (best_per_precision) must not
    rest on its three calls: a final stage re-times the best FP32 candidate and the winner side by side. The stage
    timings are pretend (FP32 2 ms, INT8 1 ms, one thread 10% slower): this checks tune's schedule, not a runtime."""
    from core.metrics import LatencyStats
    from runtimes import tune

    stages: list[tuple[list[str], int]] = []

    def pretend(setup: object, live: list[tune.Candidate], iters: int, rounds: int) -> None:
        stages.append(([c.label for c in live], iters))
        for c in live:
            ms = (2.0 if c.precision == "fp32" else 1.0) * (1.1 if c.settings.get("threads") == 1 else 1.0)
            c.latency_ms = LatencyStats.from_samples([ms] * iters, [[ms]] * min(iters, rounds))

    monkeypatch.setattr(tune, "_time_stage", pretend)
    res = tune.run_tune(tune.TuneConfig(artifact_dir=r18_int8, backends=["ort"], stages=[4, 8], rounds=3,
                                        accuracy_samples=4), log=lambda _m: None)
    per = res.best_per_precision["1"]
    assert set(per) == {"fp32", "int8"} and per["int8"] == res.winner
    fp32 = next(c for c in res.candidates if c.label == per["fp32"])
    assert fp32.pruned_at_stage == 1 and fp32.settings["threads"] != 1  # pruned at the screen, the faster setting
    assert stages[0][1] == 3 and len(stages[0][0]) == len(res.candidates)  # the screen: every candidate
    tied = [c.label for c in res.candidates if c.precision == "int8" and c.settings["threads"] != 1]
    assert stages[-1] == (res.final_stage, 4) and set(res.final_stage) == {fp32.label, *tied}  # the winner's tie
    assert fp32.latency_ms is not None and fp32.latency_ms.iters == 4  # its figures: the final stage's
    from rich.console import Console

    console = Console(record=True, width=400)
    console.print(tune.tune_table(res))
    assert "pruned after stage 1; re-timed in the final stage" in console.export_text()


def test_a_tie_is_settled_by_the_final_stage_not_by_the_stage_before(
        r18_int8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two INT8 candidates within each other's noise through the search: the one ahead at the last stage was
    declared the winner before the final stage re-timed it, while the other, re-timed there side by side, ran
    faster (vit_b_16 at batch 8 in run_deploy). The winner must come from the final stage's same-round figures.
    Pretend timings (A ahead by 2% with +-10% rounds until the final stage, where B is 10% faster with tight
    rounds): this checks tune's schedule, not a runtime."""
    from core.metrics import LatencyStats
    from runtimes import tune

    def key(c: tune.Candidate) -> str:
        s = c.settings
        if c.precision == "fp32" or s["threads"] == 1 or s["ort_graph_optimization"] != "all":
            return "slow"
        return "A" if (s["ort_spinning"], s["ort_execution_mode"]) == (True, "sequential") else (
            "B" if (s["ort_spinning"], s["ort_execution_mode"]) == (False, "sequential") else "slow")

    calls: list[int] = []

    def pretend(setup: object, live: list[tune.Candidate], iters: int, rounds: int) -> None:
        calls.append(len(live))
        final = len(calls) == 4  # the screen, stages [4, 8], then the final stage
        for c in live:
            ms = {"A": 1.05 if final else 1.0, "B": 0.95 if final else 1.02, "slow": 3.0}[key(c)]
            spread = [1.0] * 3 if final or key(c) == "slow" else [0.9, 1.0, 1.1]
            c.latency_ms = LatencyStats.from_samples([ms] * iters, [[ms * f] for f in spread])

    monkeypatch.setattr(tune, "_time_stage", pretend)
    res = tune.run_tune(tune.TuneConfig(artifact_dir=r18_int8, backends=["ort"], stages=[4, 8], rounds=3,
                                        accuracy_samples=4), log=lambda _m: None)
    by_key = {key(c): c for c in res.candidates if key(c) != "slow"}
    assert len(calls) == 4 and {by_key["A"].label, by_key["B"].label} <= set(res.final_stage)
    assert res.winner == by_key["B"].label and "every other candidate clearly slower" in res.reason
    assert res.best_per_precision["1"]["int8"] == res.winner


def test_ort_graph_level_and_execution_mode_reach_the_session(tiny_artifacts: Path) -> None:
    """tune's ORT search dimensions are real session settings, and the outputs do not change with them."""
    import numpy as np
    import onnxruntime as ort

    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.ort import OrtRunner

    man = Manifest.load(tiny_artifacts)
    feed = man.iospec.random_feed(2, seed=0)
    outs = []
    for level, mode in (("all", "sequential"), ("extended", "parallel")):
        opts = RunnerOptions(threads=1, ort_graph_optimization=level, ort_execution_mode=mode)
        with OrtRunner(man, tiny_artifacts, man.artifacts["opt"], opts) as r:
            so = r.session.get_session_options()
            assert so.graph_optimization_level == {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
            assert so.execution_mode == {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
                                         "parallel": ort.ExecutionMode.ORT_PARALLEL}[mode]
            outs.append(r.infer(feed))
    for a, b in zip(outs[0], outs[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
