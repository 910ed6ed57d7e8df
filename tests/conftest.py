"""Shared fixtures: tiny models converted once per session."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_cnn.py"


@pytest.fixture(autouse=True)
def _cpu_without_reduced_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees a CPU without bf16/fp16 units (calibration.cpu's override, inherited by CLI subprocesses),
    whatever CPU CI lands on: with AMX or AVX512-FP16, bench and tune would add bf16/fp16 candidates and the
    refusals tested here would be allowed. tests/test_precisions.py sets the CPU it simulates itself."""
    from calibration.cpu import PRECISION_ENV

    monkeypatch.setenv(PRECISION_ENV, "none")


def _convert(model: str, out: Path, **export: object) -> Path:
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert

    run_convert(ConvertConfig(export=ExportConfig(model=model, **export), out=out), log=lambda _m: None)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/fixtures/tiny_cnn.py:build at 32x32, dynamic batch, converted and optimized."""
    return _convert(f"{TINY}:build", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def resnet18_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision resnet18 (random init) at 64x64."""
    return _convert("resnet18", tmp_path_factory.mktemp("r18"), input_shape=(1, 3, 64, 64))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU/TensorRT tests skip by themselves where there is no GPU / no TensorRT."""
    import importlib.util

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU here"))
        if "trt" in item.keywords and not (has_trt and has_gpu):
            item.add_marker(pytest.mark.skip(reason="TensorRT and a GPU are needed"))


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A small CNN trained on scikit-learn's digits (real labelled data), with calib/test splits."""
    from tests.digits import train_digits_model

    return train_digits_model(tmp_path_factory.mktemp("digits"))


# -- tiny decoders with a KV cache (tests/decoders.py), one export per test module that asks -----------------------
@pytest.fixture(scope="module")
def decoders_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decoders")


@pytest.fixture(scope="module")
def gpt2_art(decoders_root: Path) -> Path:
    from tests.decoders import export, tiny_gpt2

    return export(decoders_root, "gpt2", tiny_gpt2())


@pytest.fixture(scope="module")
def llama_art(decoders_root: Path) -> Path:
    from tests.decoders import export, tiny_llama

    return export(decoders_root, "llama", tiny_llama())


# -- a private copy of the tiny artifact folder that a test may not change (bad-input and hostile tests) -----------
def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def art(tiny_artifacts: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the tiny model's artifact folder; afterwards it must hold exactly what it held."""
    folder = tmp_path / "art"
    shutil.copytree(tiny_artifacts, folder)
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before
