"""Issue 13: every bad input is ONE clear `error:` line, no traceback, exit code 2 (README), and nothing on
disk is damaged. Each case goes through the real CLI (typer's runner, in-process, as tests/test_cli.py);
for convert/package/bench the files already in the output folder are compared byte for byte afterwards."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from tests.conftest import ROOT, TINY, snapshot

runner = CliRunner()
DICT_MODEL = ROOT / "tests" / "fixtures" / "dict_outputs.py"
RESULTS = ROOT / "tests" / "fixtures" / "results" / "r18_cpu.json"


def invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(cli.app, [str(a) for a in args])
    return res.exit_code, res.output  # stdout and stderr interleaved


def one_error(args: list[str | Path], *needles: str, code: int = 2) -> str:
    """Run the CLI; assert exit ``code``, exactly one `error:` line, no traceback; return that line."""
    got, text = invoke(*map(str, args))
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert got == code, text
    assert len(errors) == 1 and "Traceback" not in text and "internal error" not in text, text
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _results(tmp_path: Path, name: str, edit: dict[str, object], *, all_rows: bool = False) -> Path:
    data = json.loads(RESULTS.read_text())
    for rec in data["records"] if all_rows else data["records"][:1]:
        for key, value in edit.items():
            if key.startswith("latency_ms."):
                rec["latency_ms"][key.split(".")[1]] = value
            else:
                rec[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))  # NaN is written as the JSON extension NaN, as Python reads it
    return path


# -- "internal error", exit 1, before: now one clear line with exit 2 -------------------------------------
def test_output_paths_that_are_folders(art: Path, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    one_error(["bench", art, "--out", tmp_path / "d", "--backends", "ort", "--batch-sizes", "1"], "is a folder")
    one_error(["report", RESULTS, "--html", tmp_path / "d"], "--html", "is a folder")
    one_error(["profile", art, "--out", tmp_path / "d"], "--out", "is a folder")


def test_requests_too_big_for_memory_are_refused_before_allocating(art: Path, tmp_path: Path) -> None:
    one_error(["bench", art, "--batch-sizes", "100000000", "--backends", "ort"], "--batch-sizes 100000000", "TiB")
    one_error(["bench", art, "--accuracy-samples", "1000000000", "--backends", "ort", "--batch-sizes", "1"],
              "--accuracy-samples 1000000000")
    one_error(["convert", f"{TINY}:build", "--input-shape", "1x3x100000x100000", "--out", art], "--input-shape",
              "GiB")


def test_package_max_batch_size_beyond_int32(art: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("earlier")
    one_error(["package", art, "--out", repo, "--max-batch-size", "99999999999"], "--max-batch-size")
    assert snapshot(repo) == {"keep.txt": hashlib.sha256(b"earlier").hexdigest()}


@pytest.mark.parametrize("edit,needle", [
    ({"batch_size": 0}, "batch_size 0"),
    ({"latency_ms.p50": float("nan")}, "p50 nan"),
    ({"latency_ms.p50": -3.0}, "p50 -3.0"),
], ids=["batch-0", "nan-p50", "negative-latency"])
def test_report_refuses_impossible_measurements(tmp_path: Path, edit: dict[str, object], needle: str) -> None:
    one_error(["report", _results(tmp_path, "bad.json", edit), "--html", tmp_path / "r.html"], "impossible", needle)
    assert not (tmp_path / "r.html").exists()


def test_report_zero_baseline_with_fail_if_slower(tmp_path: Path) -> None:
    base = _results(tmp_path, "base.json", {"latency_ms.p50": 0.0}, all_rows=True)
    one_error(["report", base, RESULTS, "--fail-if-slower", "5%", "--html", tmp_path / "c.html"], "p50 0")


def test_disk_full_is_one_line_and_the_folder_is_kept(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.transaction

    def full(_root: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(_root))

    monkeypatch.setattr(core.transaction, "fsync_tree", full)
    one_error(["convert", f"{TINY}:build", "--out", art], "no space left on device")


# -- dict outputs: supported --------------------------------------------------------------------------------
def test_forward_returning_a_dict_is_exported_with_outputs_named_by_key(tmp_path: Path) -> None:
    out = tmp_path / "dict"
    code, text = invoke("convert", f"{DICT_MODEL}:build", "--out", str(out))
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["iospec"]["outputs"]] == ["scores", "embedding"]
    code, text = invoke("bench", str(out), "--backends", "eager,torchscript,ort", "--batch-sizes", "2", "--iters",
                        "2", "--warmup", "0", "--rounds", "1", "--out", str(tmp_path / "b" / "results.json"))
    assert code == 0, text
    records = json.loads((tmp_path / "b" / "results.json").read_text())["records"]
    assert {r["backend"] for r in records} == {"eager", "torchscript", "ort"}
    assert all(r["accuracy"]["cosine"] > 0.9999 for r in records if r["backend"] != "eager")


# -- multi-line or exit 1 before ------------------------------------------------------------------------------
def test_config_value_out_of_range_is_one_line(tmp_path: Path) -> None:
    one_error(["convert", f"{TINY}:build", "--opset", "0", "--out", tmp_path / "o"], "--opset")
    one_error(["convert", f"{TINY}:build", "--opset", "99", "--out", tmp_path / "o"], "--opset")
    assert not (tmp_path / "o").exists()


def test_forward_leaving_torch_cannot_be_exported(art: Path) -> None:
    one_error(["convert", f"{DICT_MODEL}:numpy_forward", "--out", art], "cannot be traced", "NumPy")


@pytest.mark.parametrize("shape", ["1x3x32", "1x3x32x32x2"])
def test_wrong_rank_for_an_image_model(art: Path, shape: str) -> None:
    one_error(["convert", f"{TINY}:build", "--input-shape", shape, "--out", art], "rank-4 input")  # before the export


def test_all_nan_calibration_data(art: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "nan.npz", input=np.full((12, 3, 32, 32), np.nan, np.float32))
    one_error(["convert", f"{TINY}:build", "--int8", "--calib", tmp_path / "nan.npz", "--out", art], "NaN")


# -- accepted silently before ---------------------------------------------------------------------------------
def test_integer_arrays_for_a_float_input(art: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "i64.npz", input=np.ones((12, 3, 32, 32), np.int64))
    np.savez(tmp_path / "f32.npz", input=np.random.default_rng(0).random((12, 3, 32, 32), np.float32))
    one_error(["convert", f"{TINY}:build", "--sample-inputs", tmp_path / "i64.npz", "--out", art],
              "'input' is int64", "float32")
    one_error(["convert", f"{TINY}:build", "--int8", "--calib", tmp_path / "i64.npz", "--out", art],
              "calibration file", "input: dtype int64 where the model takes float32")
    one_error(["convert", f"{TINY}:build", "--int8", "--calib", tmp_path / "f32.npz", "--eval-data",
               tmp_path / "i64.npz", "--out", art], "held-out (--eval-data) file", "int64")


# -- wrong words before -----------------------------------------------------------------------------------------
def test_words_say_what_the_path_is(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    one_error(["verify", tmp_path / "file"], "is a file", "model repository folder")
    one_error(["report", tmp_path], "is a folder", "results JSON file")


def test_eval_data_errors_name_the_held_out_data(art: Path, tmp_path: Path) -> None:
    one_error(["convert", f"{TINY}:build", "--sparsity", "2:4", "--eval-data", tmp_path / "none.npz", "--out", art],
              "held-out (--eval-data) file", "does not exist")


def test_unknown_exclude_node_lists_existing_ones(art: Path) -> None:
    one_error(["convert", f"{TINY}:build", "--int8", "--calib", "synthetic", "--exclude-nodes", "zzz", "--out", art],
              "no node named 'zzz'", "e.g.", "Conv")


# -- loadtest against a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_url(tiny_artifacts: Path) -> Iterator[str]:
    from serving.served import ServeConfig
    from serving.server import BackgroundServer

    with BackgroundServer(ServeConfig(artifact_dir=tiny_artifacts, port=0, max_body_mb=1.0)) as srv:
        yield srv.url


def test_loadtest_reference_of_another_model(server_url: str, tmp_path: Path) -> None:
    other = tmp_path / "dict"
    code, text = invoke("convert", f"{DICT_MODEL}:build", "--out", str(other), "--no-optimize")
    assert code == 0, text
    one_error(["loadtest", server_url, "--reference", other, "--duration", "1", "--warmup", "0"],
              "another model than the one served", "'input'")


def test_loadtest_max_requests_below_the_warm_up_traffic(server_url: str) -> None:
    code, text = invoke("loadtest", server_url, "--max-requests", "3", "--warmup", "5", "--duration", "5",
                        "--concurrency", "2")
    assert code == 0 and "error" not in text, text
