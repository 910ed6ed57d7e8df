"""Nothing lost on failure: `convert` and `bench` through the real CLI (subprocesses), their folders hashed
before and after a failing input, SIGINT or SIGTERM; and ONNX files past the inline limit saved with
external data that the manifest hashes."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

SLOW_MODEL = '''
import time
from torch import nn


class Slow(nn.Module):
    """Every forward takes 0.4 s: the export and each parity check leave time to send a signal."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        time.sleep(0.4)
        return self.fc(x)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("forward is broken")


def slow():
    return Slow()


def broken():
    return Broken()
'''


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (hidden ones too) by relative path -> sha256, and every folder as 'dir'."""
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def staging_left(parent: Path) -> list[Path]:
    return [p for p in parent.rglob("*") if ".staging-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny CNN plus an earlier benchmark's results, as a user's folder would hold them."""
    from tests.conftest import _convert

    out = _convert(f"{TINY}:build", tmp_path_factory.mktemp("good") / "tiny")
    (out / "bench").mkdir()
    (out / "bench" / "results.json").write_text('{"earlier": "run"}\n')
    return out


@pytest.fixture
def folder(good_folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(good_folder, dst)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The failing inputs: a zero-byte .onnx, an op of a custom domain, a forward that raises; and a slow model."""
    import onnx
    from onnx import TensorProto, helper

    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.onnx").write_bytes(b"")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Mystery", ["x"], ["y"], domain="com.example")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), d / "custom.onnx")
    (d / "models.py").write_text(SLOW_MODEL)
    return {"empty": str(d / "empty.onnx"), "custom": str(d / "custom.onnx"), "slow": f"{d / 'models.py'}:slow",
            "broken": f"{d / 'models.py'}:broken"}


FAILING = {
    "zero_byte_onnx": (["{empty}"], "not an ONNX model"),
    "custom_domain_op": (["{custom}"], "ONNX Runtime cannot load"),
    "opset_99": ([f"{TINY}:build", "--opset", "99"], "--opset"),
    "forward_fails": (["{broken}", "--input-shape", "1x4"], "forward is broken"),
}


def assert_one_error_line(stderr: str, expect: str) -> None:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr


@pytest.mark.parametrize("case", list(FAILING))
def test_failing_input_leaves_the_folder_byte_identical(folder: Path, models: dict[str, str], case: str) -> None:
    args, expect = FAILING[case]
    before = snapshot(folder)
    res = cli("convert", *[a.format(**models) for a in args], "--out", str(folder))
    assert res.returncode == 2, res.stderr
    assert_one_error_line(res.stderr, expect)
    assert snapshot(folder) == before
    assert not staging_left(folder.parent)


def test_failed_convert_into_a_new_folder_leaves_nothing(tmp_path: Path, models: dict[str, str]) -> None:
    res = cli("convert", models["broken"], "--input-shape", "1x4", "--out", str(tmp_path / "new" / "sub"))
    assert res.returncode == 2, res.stderr
    assert_one_error_line(res.stderr, "forward is broken")
    assert list(tmp_path.iterdir()) == []


def _wait_for(proc: subprocess.Popen[str], parent: Path, name: str, point: str) -> None:
    """Until the staging folder of ``parent/name`` exists (and holds ``point``, a file name, when given)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"convert ended before reaching {point}: {proc.communicate()}"
        stages = list(parent.glob(f".{name}.staging-*"))
        if stages and (point == "staging" or (stages[0] / point).is_file()):
            return
        time.sleep(0.005)
    pytest.fail(f"{point} never appeared")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", ["staging", "model.onnx", "model.opt.onnx"])
def test_signal_during_a_rerun_leaves_the_old_folder(folder: Path, models: dict[str, str], sig: int, code: int,
                                                     point: str) -> None:
    before = snapshot(folder)
    proc = subprocess.Popen([sys.executable, "cli.py", "convert", models["slow"], "--input-shape", "1x4",
                             "--out", str(folder)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, folder.parent, folder.name, point)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert snapshot(folder) == before
    assert not staging_left(folder.parent)


def test_a_signal_whose_exception_a_finalizer_swallowed_still_stops_the_swap(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Python runs the signal handler wherever the main thread is; inside a finalizer its SystemExit is only printed
    ("Exception ignored in ...", a traceback) and the block would go on to swap in a half-made set. The block's
    normal end raises the signal again, with nothing printed: the old folder stays as it was, nothing is staged."""
    import gc
    import os

    from core.transaction import staged_folder

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    class _SignalledInFinalizer:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside the finalizer

    with pytest.raises(SystemExit) as exc, staged_folder(target) as stage:
        (stage / "new.txt").write_text("new")
        obj = _SignalledInFinalizer()
        del obj
        gc.collect()
    assert exc.value.code == 128 + signal.SIGTERM
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert not staging_left(tmp_path)


def test_rerun_swaps_the_set_and_keeps_other_content(folder: Path) -> None:
    """The new set replaces the old artifacts (model.opt.onnx, not in the new manifest, goes); bench/ stays."""
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert
    from core.manifest import Manifest

    run_convert(ConvertConfig(export=ExportConfig(model=f"{TINY}:build", optimize=False), out=folder),
                log=lambda _m: None)
    m = Manifest.load(folder)
    assert sorted(m.artifacts) == ["fp32", "torch"] and m.verify(folder) == []
    assert not (folder / "model.opt.onnx").exists()
    assert (folder / "bench" / "results.json").read_text() == '{"earlier": "run"}\n'
    assert not staging_left(folder.parent)


def test_bench_on_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    res = cli("bench", str(tmp_path / "nope"), "--backends", "ort", "--iters", "1", "--warmup", "0")
    assert res.returncode == 2, res.stderr
    assert_one_error_line(res.stderr, "no manifest.json")
    assert list(tmp_path.iterdir()) == []


def test_bench_writes_its_files_as_one_set(folder: Path) -> None:
    res = cli("bench", str(folder), "--backends", "ort", "--batch-sizes", "1", "--iters", "2", "--warmup", "0",
              "--device", "cpu")
    assert res.returncode == 0, res.stderr
    names = {p.name for p in (folder / "bench").iterdir()}
    assert names == {"results.json", "results.csv", "results.md", "results.html"}
    assert '"earlier"' not in (folder / "bench" / "results.json").read_text()


def test_large_models_are_saved_with_external_data_the_manifest_hashes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2 GiB limit lowered to 1 kB: every ONNX artifact is model + .data, both hashed and verified."""
    import onnxruntime as ort

    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert
    from core import onnxfile

    monkeypatch.setattr(onnxfile, "MAX_INLINE_BYTES", 1000)
    manifest, out = run_convert(ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=tmp_path / "big"),
                                log=lambda _m: None)
    for name in ("fp32", "opt"):
        rec = manifest.artifacts[name].file
        assert [d.path for d in rec.external_data] == [f"{rec.path}.data"], rec
        ort.InferenceSession(str(out / rec.path), providers=["CPUExecutionProvider"])
    assert manifest.verify(out) == []
    data = out / manifest.artifacts["opt"].file.external_data[0].path
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    assert any("model.opt.onnx.data sha256" in p for p in manifest.verify(out))


def test_save_onnx_threshold_is_a_parameter(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from core.onnxfile import external_data_files, save_onnx

    w = numpy_helper.from_array(np.ones((64, 4), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert save_onnx(model, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    written = save_onnx(onnx.load(str(tmp_path / "small.onnx")), tmp_path / "big.onnx", max_inline=100)
    assert written == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert external_data_files(tmp_path / "big.onnx") == [tmp_path / "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "small.onnx"]


def test_package_carries_external_data_beside_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model past the inline limit keeps its .data file through `package`, hashed in MANIFEST.json, and the
    packaged model.onnx loads in ONNX Runtime from the repository; `verify` checks the data file too."""
    import onnxruntime as ort

    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert
    from core import onnxfile
    from serving.triton import PackageConfig, package
    from serving.verify import verify_repo

    monkeypatch.setattr(onnxfile, "MAX_INLINE_BYTES", 1000)
    _, out = run_convert(ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=tmp_path / "big"),
                         log=lambda _m: None)
    repo, folder = package(PackageConfig(artifact_dir=out, out=tmp_path / "repo"), log=lambda _m: None)
    version = folder / repo.models[0].name / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.opt.onnx.data"]
    assert any(f.path.endswith("model.opt.onnx.data") for f in repo.files)
    ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert verify_repo(folder).files_checked == len(repo.files)


def test_int8_variants_of_a_large_model_keep_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the inline limit (lowered to 1 kB), quantization reads and writes external data and the variants
    keep their .data files, hashed by the manifest and loadable by ONNX Runtime."""
    import onnxruntime as ort

    from convert.config import Budget, CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
    from convert.pipeline import run_convert
    from core import onnxfile

    monkeypatch.setattr(onnxfile, "MAX_INLINE_BYTES", 1000)
    quant = QuantConfig(int8_dynamic=True, int8_static=True, calib=CalibConfig(data="synthetic", size=16),
                        gate=GateConfig(**Budget(max_accuracy_drop=100, min_cosine=-1).model_dump()))
    manifest, out = run_convert(ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=tmp_path / "big",
                                              quant=quant), log=lambda _m: None)
    for name in ("int8_dynamic", "int8_static_minmax"):
        rec = manifest.artifacts[name].file
        assert rec.external_data, f"{name} was written inline"
        ort.InferenceSession(str(out / rec.path), providers=["CPUExecutionProvider"])
    assert manifest.verify(out) == []


@pytest.mark.parametrize("where", ["folder", "files"])
def test_a_signal_just_after_the_staging_folder_is_made_still_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The signal handler can run on the very next bytecode after ``mkdir`` made the staging folder, before any
    ``try`` that would remove it (seen once in test_signal_during_a_rerun_leaves_the_old_folder[staging-SIGTERM]):
    here KeyboardInterrupt is raised right there, and neither the staging folder nor a new parent is left."""
    from core import transaction

    real_mkdir = Path.mkdir

    def mkdir_then_interrupt(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        real_mkdir(self, mode, parents, exist_ok)
        if transaction.STAGING_TAG.strip("-") in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    target = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        if where == "folder":
            with transaction.staged_folder(target):
                pytest.fail("the block must not run")
        else:
            with transaction.staged_files(target, ["results.json"]):
                pytest.fail("the block must not run")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))
