"""GPU backends, their measurement helpers, and the calibration data loader for TensorRT.

CPU-runnable here: the Polygraphy data loader, the request checks, the samplers' behaviour without
a GPU, and the CLI's one-line errors. ``@pytest.mark.gpu`` / ``@pytest.mark.trt`` tests run only
where a CUDA GPU (and TensorRT) is present and skip cleanly elsewhere.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from calibration.polygraphy_adapter import PolygraphyDataLoader
from core.errors import InputError
from core.iospec import IOSpec
from core.manifest import Manifest, SourceInfo
from runtimes import RUNNERS
from runtimes.gpu import NvmlSampler
from runtimes.harness import BenchConfig, check_gpu_request
from runtimes.torch_eager import cuda_problem


class ArraysSource:
    """A CalibrationSource over in-memory arrays, yielding batches of its own size ``chunk``."""

    def __init__(self, arrays: dict[str, np.ndarray], chunk: int) -> None:
        self.arrays, self.chunk, self.passes = arrays, chunk, 0

    @property
    def input_names(self) -> list[str]:
        return list(self.arrays)

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        self.passes += 1
        for i in range(0, self.num_samples, self.chunk):  # ignores batch_size on purpose: any batching works
            yield {n: a[i:i + self.chunk] for n, a in self.arrays.items()}

    def describe(self) -> str:
        return f"{self.num_samples} in-memory samples"

    def digest(self) -> str:
        return "test"


def two_inputs(n: int) -> dict[str, np.ndarray]:
    return {"image": np.arange(n * 4, dtype=np.float16).reshape(n, 1, 2, 2),
            "ids": np.arange(n * 3, dtype=np.int64).reshape(n, 3)}


def test_loader_rechunks_to_exact_batches_and_drops_the_remainder() -> None:
    source = ArraysSource(two_inputs(11), chunk=3)
    loader = PolygraphyDataLoader(source, batch_size=4, input_names=["ids", "image"])
    batches = list(loader)
    assert len(batches) == len(loader) == 2 and loader.plan() == {"batches": 2, "batch_size": 4, "samples": 11,
                                                                  "dropped": 3}
    for i, b in enumerate(batches):
        assert list(b) == ["ids", "image"]  # the network's input order
        assert b["image"].dtype == np.float32 and b["ids"].dtype == np.int64  # TensorRT calibrates in float32
        assert b["image"].shape == (4, 1, 2, 2) and b["image"].flags.c_contiguous
        np.testing.assert_array_equal(b["image"], two_inputs(11)["image"][4 * i:4 * i + 4].astype(np.float32))
        np.testing.assert_array_equal(b["ids"], two_inputs(11)["ids"][4 * i:4 * i + 4])
    again = list(loader)  # Polygraphy's Calibrator.reset() iterates again
    assert source.passes == 2 and all(np.array_equal(a["ids"], b["ids"]) for a, b in zip(batches, again, strict=True))


def test_loader_refuses_data_that_cannot_calibrate() -> None:
    with pytest.raises(InputError, match="fewer than one batch of 8"):
        PolygraphyDataLoader(ArraysSource(two_inputs(5), chunk=5), batch_size=8)
    with pytest.raises(InputError, match=r"has no input\(s\) \['mask'\]"):
        PolygraphyDataLoader(ArraysSource(two_inputs(8), chunk=4), batch_size=4, input_names=["image", "mask"])

    class Ragged(ArraysSource):
        def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
            yield {"image": self.arrays["image"][:4], "ids": self.arrays["ids"][:3]}

    with pytest.raises(InputError, match="different batch sizes"):
        list(PolygraphyDataLoader(Ragged(two_inputs(8), chunk=4), batch_size=2))


@pytest.mark.trt
def test_polygraphy_calibrator_over_the_loader(tmp_path: Path) -> None:
    from calibration.polygraphy_adapter import make_calibrator

    loader = PolygraphyDataLoader(ArraysSource(two_inputs(8), chunk=8), batch_size=4)
    calibrator = make_calibrator(loader, tmp_path / "calib.cache", "minmax")
    assert calibrator.get_batch_size() == 1 and calibrator.read_calibration_cache() is None
    assert calibrator.get_batch(["image", "ids"]) is not None  # two device pointers


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
    manifest.record(folder, folder / "model.onnx", name="fp32", kind="onnx", step="copy")
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
    from convert.engine import EngineConfig
    from convert.pipeline import ConvertConfig, ExportConfig, run_convert
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
