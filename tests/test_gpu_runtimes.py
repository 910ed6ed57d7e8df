"""GPU backends and their measurement helpers.

CPU-runnable here: the request checks, the samplers' behaviour without a GPU, and the CLI's
one-line errors. ``@pytest.mark.gpu`` / ``@pytest.mark.trt`` tests run only
where a CUDA GPU (and TensorRT) is present and skip cleanly elsewhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from core.errors import InputError
from core.iospec import IOSpec
from core.manifest import Manifest, SourceInfo
from core.records import CopyParams
from core.resources import cuda_problem
from runtimes import RUNNERS
from runtimes.gpu import NvmlSampler
from runtimes.harness import BenchConfig, check_gpu_request


# -- requests and backends without a GPU --------------------------------------------------------------
def test_backend_table_and_trt_availability() -> None:
    assert RUNNERS["trt"].__name__ == "TrtRunner" and RUNNERS["ort-trt"].__name__ == "OrtTensorrtRunner"
    on_cpu = RUNNERS["trt"].available("cpu") or ""
    if cuda_problem() is not None:  # no GPU: say that TensorRT needs one, not just "use --device cuda"
        assert "TensorRT needs an NVIDIA GPU" in on_cpu
    else:
        assert "cuda only" in on_cpu
    assert "does not run on cpu" in (RUNNERS["ort-trt"].available("cpu") or "")
    if cuda_problem() is not None:
        assert "GPU" in (RUNNERS["trt"].available("cuda") or "") or "pip install .[trt]" in (
            RUNNERS["trt"].available("cuda") or "")


def test_gpu_only_precisions_and_options_are_refused_on_cpu(tmp_path: Path) -> None:
    check_gpu_request(BenchConfig(artifact_dir=tmp_path, device="cuda", precisions=["fp32", "fp16", "bf16"],
                                  options={"cuda_graphs": True}))
    with pytest.raises(InputError, match=r"unknown precision\(s\) \['fp8'\]"):
        check_gpu_request(BenchConfig(artifact_dir=tmp_path, precisions=["fp8"]))
    with pytest.raises(InputError, match="--precisions fp16, --cuda-graphs: only measured with --device cuda"):
        check_gpu_request(BenchConfig(artifact_dir=tmp_path, precisions=["fp32", "fp16"],
                                      options={"cuda_graphs": True, "channels_last": True}))


def test_nvml_sampler_reports_nothing_when_disabled_or_absent() -> None:
    with NvmlSampler(enabled=False) as off:
        mark = off.mark()
    assert not off.available and off.util_since(mark) is None and off.growth_mb is None
    if cuda_problem() is not None:
        with NvmlSampler() as absent:
            pass
        assert not absent.available and absent.reason
        assert absent.util_since(0) is None and absent.growth_mb is None


def bare_manifest(folder: Path) -> Path:
    """A manifest with an ONNX artifact: enough for the CLI's request checks, which fail before any run."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"placeholder")
    manifest = Manifest(source=SourceInfo(model="tiny", kind="onnx"), iospec=IOSpec.for_image_model((1, 3, 8, 8)))
    manifest.record(folder, folder / "model.onnx", name="fp32", kind="onnx", params=CopyParams())
    manifest.save(folder)
    return folder


runner = CliRunner()


@pytest.mark.skipif(cuda_problem() is None, reason="a CUDA GPU is present here")
def test_cli_device_cuda_without_gpu_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(cli.app, ["bench", str(bare_manifest(tmp_path / "a")), "--device", "cuda",
                                  "--backends", "ort,trt"])
    assert res.exit_code == 3, res.output
    assert "unavailable on cuda" in res.output and "trt:" in res.output and res.output.strip().count("\n") == 0


@pytest.mark.parametrize("flags,msg", [
    (["--precisions", "fp16,bf16"], "--precisions fp16, --precisions bf16: only measured with --device cuda"),
    (["--include-transfers"], "--include-transfers: only measured with --device cuda"),
    (["--precisions", "int4"], "unknown precision(s) ['int4']"),
])
def test_cli_gpu_flags_on_cpu_are_one_line(tmp_path: Path, flags: list[str], msg: str) -> None:
    res = runner.invoke(cli.app, ["bench", str(bare_manifest(tmp_path / "a")), "--backends", "ort", *flags])
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.strip().count("\n") == 0, res.output


# -- on a machine with a CUDA GPU -------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_event_timer_and_peak_memory() -> None:
    import torch

    from runtimes.gpu import cuda_event_times, peak_allocated_mb, reset_peak_memory

    x = torch.randn(1024, 1024, device="cuda")
    reset_peak_memory()
    times = cuda_event_times(lambda: x @ x, warmup=2, iters=5)
    assert len(times) == 5 and all(t > 0 for t in times) and peak_allocated_mb() >= 4.0


@pytest.mark.gpu
def test_eager_and_torchscript_on_cuda(tiny_artifacts: Path, tmp_path: Path) -> None:
    import torch

    from runtimes.harness import run_bench

    precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else [])
    cfg = BenchConfig(artifact_dir=tiny_artifacts, backends=["eager", "torchscript"], batch_sizes=[1, 4], warmup=2,
                      iters=5, device="cuda", precisions=precisions, accuracy_samples=8,
                      options={"cuda_graphs": True, "channels_last": True})
    res = run_bench(cfg, log=lambda _m: None)
    assert len(res.records) == 2 * len(precisions) * 2
    for r in res.records:
        assert r.device == "cuda" and r.latency_ms.p50 > 0 and r.vram_mb and r.vram_mb > 0
        assert r.accuracy is not None and r.accuracy.cosine > (0.9999 if r.precision == "fp32" else 0.99)
    moved = run_bench(cfg.model_copy(update={"backends": ["eager"], "precisions": ["fp32"],
                                             "options": {"include_transfers": True}}), log=lambda _m: None)
    assert len(moved.records) == 2


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
def test_ort_cuda_with_io_binding(tiny_artifacts: Path) -> None:
    from runtimes.harness import run_bench

    if RUNNERS["ort"].available("cuda") is not None:
        pytest.skip(RUNNERS["ort"].available("cuda") or "")
    cfg = BenchConfig(artifact_dir=tiny_artifacts, backends=["ort"], batch_sizes=[1, 4], warmup=2, iters=5,
                      device="cuda", accuracy_samples=8)
    res = run_bench(cfg, log=lambda _m: None)
    assert res.records and all(r.accuracy is not None and r.accuracy.cosine > 0.9999 for r in res.records)


@pytest.mark.trt
def test_trt_engine_in_the_harness(tmp_path: Path) -> None:
    from convert.config import ConvertConfig, EngineConfig, ExportConfig
    from convert.pipeline import run_convert
    from runtimes.harness import run_bench
    from tests.conftest import TINY

    out = tmp_path / "tiny"
    run_convert(ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=out,
                              engine=EngineConfig(fp16=True, max_batch=8)), log=lambda _m: None)
    cfg = BenchConfig(artifact_dir=out, backends=["trt"], batch_sizes=[1, 8], warmup=2, iters=5, device="cuda",
                      accuracy_samples=8)
    for options in ({}, {"include_transfers": True}):
        res = run_bench(cfg.model_copy(update={"options": options}), log=lambda _m: None)
        assert [r.batch_size for r in res.records] == [1, 8]
        assert all(r.accuracy is not None and r.accuracy.cosine > 0.999 for r in res.records)


def test_ort_tensorrt_provider_keeps_its_caches_in_the_artifact_folder(tiny_artifacts: Path, tmp_path: Path) -> None:
    """Its engine and timing caches go under ARTIFACT_DIR/bench, never into the working directory."""
    import shutil

    from runtimes.base import RunnerOptions

    art_dir = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, art_dir)
    manifest = Manifest.load(art_dir)
    runner = RUNNERS["ort-trt"](manifest, art_dir, manifest.artifacts["opt"], RunnerOptions(device="cuda"))
    opts = runner.gpu_provider_options()  # type: ignore[attr-defined]
    cache = art_dir / "bench" / "ort_trt_cache"
    assert cache.is_dir() and opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(cache)
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"] and opts["device_id"] == 0
