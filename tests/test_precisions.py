"""bf16/fp16 as compute precisions of their own (issue 32): the CPU probe and its override, the skip on a CPU
without the units, bf16 rows graded against FP32 and gated, tune searching precision, and `package --from-tune`
carrying it into the Triton config.

This machine may lack bf16 units (an AVX2 CPU): the tests that need a bf16 CPU simulate one through the probe's
override (ONNXKIT_CPU_PRECISIONS). PyTorch's CPU autocast computes bf16 there too (emulated, rounding as bf16 does), so
accuracy is real; OpenVINO falls back to f32 there, which its runner detects and refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration.cpu import PRECISION_ENV, features_from_flags, native_precisions, precision_problem
from core.errors import BackendUnavailableError, InputError

SPR = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_fp16"}
ZEN4 = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}
AVX2 = {"avx2", "fma"}


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with bf16 units (simulated by the probe's override)."""
    monkeypatch.setenv(PRECISION_ENV, "bf16")


@pytest.fixture
def plain_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without bf16/fp16 units (simulated by the probe's override)."""
    monkeypatch.setenv(PRECISION_ENV, "none")


def here_has(precision: str) -> bool:
    """What this CPU really computes natively (the probe without its override)."""
    return precision in native_precisions(env={})


# -- the probe ------------------------------------------------------------------------------------------------
def test_the_probe_reads_the_units_from_the_flags() -> None:
    assert native_precisions(features_from_flags("x86_64", "Xeon", SPR), env={}) == ("fp32", "bf16", "fp16")
    assert native_precisions(features_from_flags("x86_64", "EPYC 9654", ZEN4), env={}) == ("fp32", "bf16")
    avx2 = features_from_flags("x86_64", "EPYC 7B13", AVX2)
    assert native_precisions(avx2, env={}) == ("fp32",)
    why = precision_problem("bf16", avx2, env={})
    assert why is not None and why.startswith("this CPU (EPYC 7B13: AVX2, FMA") and "AMX-BF16" in why
    assert "\n" not in why
    assert precision_problem("int8", avx2, env={}) is None and precision_problem("fp32", avx2, env={}) is None


def test_the_override_simulates_a_cpu_with_and_without() -> None:
    spr, avx2 = features_from_flags("x86_64", "Xeon", SPR), features_from_flags("x86_64", "EPYC", AVX2)
    assert native_precisions(avx2, env={PRECISION_ENV: "bf16"}) == ("fp32", "bf16")
    assert native_precisions(spr, env={PRECISION_ENV: "none"}) == ("fp32",)
    assert native_precisions(spr, env={PRECISION_ENV: ""}) == ("fp32",)
    assert precision_problem("bf16", spr, env={PRECISION_ENV: "none"}) is not None
    with pytest.raises(InputError, match=r"ONNXKIT_CPU_PRECISIONS='fp8': unknown precision\(s\) \['fp8'\]"):
        native_precisions(avx2, env={PRECISION_ENV: "fp8"})


# -- an explicit request on a CPU without the units: refused in one line --------------------------------------
def test_bench_refuses_bf16_on_a_cpu_without_the_units(tmp_path: Path, plain_cpu: None) -> None:
    from runtimes.harness import BenchConfig

    with pytest.raises(InputError) as err:
        BenchConfig(artifact_dir=tmp_path, backends=["openvino"], precisions=["fp32", "bf16"])
    assert "--precisions bf16" in str(err.value) and "no bf16 units" in str(err.value) and "\n" not in str(err.value)


def test_bench_takes_bf16_on_a_cpu_with_the_units(tmp_path: Path, bf16_cpu: None) -> None:
    from runtimes.harness import BenchConfig

    assert BenchConfig(artifact_dir=tmp_path, precisions=["fp32", "bf16"]).precisions == ["fp32", "bf16"]
    with pytest.raises(InputError, match="--precisions fp16"):  # fp16 not simulated: still refused
        BenchConfig(artifact_dir=tmp_path, precisions=["fp16"])


def _runner(art: Path, backend: str, precision: str, variant: str = "fp32"):  # type: ignore[no-untyped-def]
    from core.manifest import Manifest
    from runtimes import RUNNERS
    from runtimes.base import RunnerOptions

    manifest = Manifest.load(art)
    artifact = next(a for a in manifest.artifacts.values() if a.name == variant or
                    (variant == "weights" and a.kind in RUNNERS[backend].artifact_kinds))
    return RUNNERS[backend](manifest, art, artifact, RunnerOptions(precision=precision))


@pytest.mark.parametrize("backend,variant", [("eager", "weights"), ("compile", "weights"), ("openvino", "fp32")])
def test_a_runner_skips_bf16_on_a_cpu_without_the_units(tiny_artifacts: Path, plain_cpu: None, backend: str,
                                                        variant: str) -> None:
    runner = _runner(tiny_artifacts, backend, "bf16", variant)
    with pytest.raises(BackendUnavailableError, match=r"^this CPU \(.*\) has no bf16 units"):
        runner.load()
    assert not runner.loaded


def test_onnx_runtime_has_no_bf16_compute_and_says_so(tiny_artifacts: Path, bf16_cpu: None) -> None:
    runner = _runner(tiny_artifacts, "ort", "bf16")
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime's CPU provider has no bf16 compute"):
        runner.load()


def test_openvino_bf16_is_never_f32_under_the_bf16_label(tiny_artifacts: Path, bf16_cpu: None) -> None:
    """On a CPU whose OpenVINO plugin has bf16 kernels the FP32 file compiles in bf16; elsewhere (this AVX2 CPU, the
    probe told otherwise) OpenVINO falls back to f32, which the runner detects and refuses."""
    pytest.importorskip("openvino")
    import numpy as np

    runner = _runner(tiny_artifacts, "openvino", "bf16")
    assert runner.config["INFERENCE_PRECISION_HINT"] == "bf16" and runner.precision == "bf16"
    if not here_has("bf16"):
        with pytest.raises(BackendUnavailableError, match="compiled model.*in f32, not bf16"):
            runner.load()
        return
    with runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        assert np.isfinite(runner.infer({"input": x})[0]).all()


# -- bench: bf16 rows of their own, graded against FP32 -------------------------------------------------------
def test_bench_has_bf16_rows_graded_against_fp32(tiny_artifacts: Path, bf16_cpu: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """eager in bf16 (autocast) is a row labelled bf16 whose drop is measured against the FP32 reference; ONNX
    Runtime's bf16 target is skipped with its one line; the row's % of peak is read against the bf16 peak."""
    import core.flops as flops
    from reports.writers import to_markdown
    from runtimes.harness import BenchConfig, run_bench

    monkeypatch.setitem(flops.PEAK_MEASURES, "fp32", lambda threads: {"given": 100.0})
    monkeypatch.setitem(flops.PEAK_MEASURES, "bf16", lambda threads: {"given bf16": 400.0})
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["eager", "ort"], precisions=["fp32", "bf16"],
                                batch_sizes=[2], warmup=1, iters=3, rounds=3, accuracy_samples=8),
                    log=lambda _m: None)
    rows = {(r.backend, r.precision): r for r in res.records}
    assert set(rows) == {("eager", "fp32"), ("eager", "bf16"), ("ort", "fp32")}
    bf16 = rows[("eager", "bf16")]
    assert bf16.accuracy_drop is not None and bf16.accuracy_drop > 0  # bf16's rounding, measured, not zero
    assert bf16.accuracy is not None and bf16.accuracy.cosine < 1.0
    assert rows[("eager", "fp32")].accuracy_drop == pytest.approx(0.0, abs=1e-6)
    assert bf16.peak_precision == "bf16" and bf16.peak_basis == "bf16 GEMM (given bf16) 400 GFLOP/s"
    assert any(w.startswith("ort:fp32 (bf16) skipped: ONNX Runtime's CPU provider has no bf16") for w in res.warnings)
    assert "bf16" in to_markdown(res)


def test_a_bf16_peak_is_measured_where_the_units_are(plain_cpu: None) -> None:
    """PyTorch's bf16 GEMM is measured; OpenVINO's only where it computes bf16 (here: where the CPU has the units)."""
    from core.flops import reduced_matmul_peaks

    rates = reduced_matmul_peaks("bf16", 1, n=64, repeats=2)
    assert rates["torch"] > 0
    if not here_has("bf16"):
        assert "openvino" not in rates  # OpenVINO fell back to f32: not a bf16 rate


# -- tune: precision searched and gated --------------------------------------------------------------------------
def _tune(art: Path, budget: float, backends: list[str]):  # type: ignore[no-untyped-def]
    from runtimes.tune import TuneConfig, run_tune

    return run_tune(TuneConfig(artifact_dir=art, backends=backends, batch_sizes=[2], stages=[3], rounds=3, screen=0,
                               accuracy_samples=8, accuracy_budget=budget), log=lambda _m: None)


def test_tune_searches_bf16_and_the_gate_drops_it_over_budget(tiny_artifacts: Path, bf16_cpu: None) -> None:
    within = _tune(tiny_artifacts, 1.0, ["eager"])
    bf16 = next(c for c in within.candidates if c.precision == "bf16")
    assert bf16.within_budget and bf16.latency_ms is not None and "(bf16)" in bf16.label
    assert bf16.accuracy_drop_points is not None and bf16.accuracy_drop_points > 0
    assert json.loads(within.model_dump_json())["candidates"][1]["precision"] in ("fp32", "bf16")
    over = _tune(tiny_artifacts, 0.0, ["eager"])  # a budget bf16's rounding cannot meet: the gate fails it
    bf16 = next(c for c in over.candidates if c.precision == "bf16")
    assert not bf16.within_budget and bf16.latency_ms is None and bf16.skipped is None
    assert over.winner is not None and "(fp32)" in over.winner


def test_tune_skips_bf16_candidates_on_a_cpu_without_the_units(tiny_artifacts: Path, plain_cpu: None) -> None:
    pytest.importorskip("openvino")
    result = _tune(tiny_artifacts, 1.0, ["eager", "openvino"])
    skipped = {(c.backend, c.precision): c.skipped for c in result.candidates if c.skipped}
    for backend in ("eager", "openvino"):
        assert "no bf16 units (AVX512_BF16 or AMX-BF16" in str(skipped[(backend, "bf16")])
        assert "no fp16 units (AVX512-FP16 or AMX-FP16" in str(skipped[(backend, "fp16")])
    assert all(c.latency_ms is None for c in result.candidates if c.precision != "fp32")


# -- package --from-tune: the precision reaches config.pbtxt where the backend has a key ---------------------------
@pytest.mark.parametrize("precision,param,note", [
    ("bf16", "YES", None),
    ("fp16", None, "f16 compute (INFERENCE_PRECISION_HINT=f16, as tune measured): the openvino backend has no key"),
    ("fp32", None, "f32 compute (INFERENCE_PRECISION_HINT=f32, as tune measured)"),
])
def test_package_carries_the_tuned_precision(tiny_artifacts: Path, tmp_path: Path, precision: str,
                                             param: str | None, note: str | None) -> None:
    pytest.importorskip("tritonclient")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from runtimes.tune import Candidate, TuneResult
    from serving.triton import PackageConfig, package

    win = Candidate(backend="openvino", variant="fp32", precision=precision, settings={"openvino_hint": "LATENCY"},
                    batch_size=1, accuracy_drop_points=0.1)
    doc = TuneResult(config={"artifact_dir": str(tiny_artifacts)}, candidates=[win], winner=win.label, stages_run=1,
                     reason="picked for the test")
    (tmp_path / "tune.json").write_text(doc.model_dump_json())
    repo, out = package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tmp_path / "tune.json"),
                        log=lambda _m: None)
    cfg = text_format.Parse((out / repo.models[0].name / "config.pbtxt").read_text(), mc.ModelConfig())
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert cfg.backend == "openvino" and params.get("HINT_BF16") == param
    tuned = repo.models[0].tuned
    assert tuned is not None and tuned.precision == precision
    assert (note is None and not tuned.not_carried) or any(n.startswith(note or "") for n in tuned.not_carried)
