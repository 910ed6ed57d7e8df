"""Issue 33: the CLI cases of a hostile-user campaign that were damaging, hung, gave an "internal error", were
accepted silently, left something behind or said it unclearly. Each is now one `error:` line with a non-zero exit
(or a refusal) and leaves every file as it was; each test here failed on the code before its fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from runtimes.base import usable_cpus
from tests.conftest import ROOT, TINY
from tests.test_bad_input import invoke, one_error

RESULTS = ROOT / "tests" / "fixtures" / "results" / "r18_cpu.json"
QUICK_BENCH = ["--backends", "ort", "--batch-sizes", "1", "--iters", "2", "--warmup", "0", "--rounds", "1"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- damaging: an output path that is an input ------------------------------------------------------------------
def test_report_html_that_is_its_own_input_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    results = run / "results.json"
    shutil.copy(RESULTS, results)
    before = _digest(results)
    one_error(["report", results, "--html", results], "--html", "is also an input")
    one_error(["report", RESULTS, results, "--html", tmp_path / "run" / ".." / "run" / "results.json"],
              "is also an input")
    as_html = run / "r.html"  # a results file named .html: the default report path FIRST.html is the file itself
    shutil.copy(RESULTS, as_html)
    one_error(["report", as_html], "is also an input")
    assert _digest(results) == before and _digest(as_html) == before


def test_outputs_that_are_artifact_files_are_refused(art: Path) -> None:
    one_error(["bench", art, *QUICK_BENCH, "--out", art / "manifest.json"], "--out", "is also an input")
    one_error(["tune", art, "--out", art / "manifest.json"], "--out", "is also an input")
    one_error(["profile", art, "--out", art / "model.opt.onnx"], "--out", "is also an input")


# -- hang: more threads than CPUs ---------------------------------------------------------------------------------
def test_threads_above_the_usable_cpus_are_refused(art: Path, tmp_path: Path) -> None:
    too_many = str(usable_cpus() + 1)
    one_error(["bench", art, *QUICK_BENCH, "--threads", too_many, "--out", tmp_path / "b" / "results.json"],
              f"--threads {too_many}", "CPU")
    one_error(["profile", art, "--threads", too_many, "--iters", "1", "--warmup", "0", "--out",
               tmp_path / "p" / "t.json"], f"--threads {too_many}")
    assert not (tmp_path / "b").exists() and not (tmp_path / "p").exists()


def test_threads_above_the_usable_cpus_are_refused_by_every_runner_and_the_server(art: Path) -> None:
    from runtimes.base import RunnerOptions
    from serving.served import ServeConfig
    from serving.server import BackgroundServer

    with pytest.raises(InputError, match="more than the"):  # what bench, tune, profile and serve build
        RunnerOptions(threads=usable_cpus() + 1)
    assert RunnerOptions(threads=usable_cpus()).threads == usable_cpus()
    with pytest.raises(InputError, match="more than the"), \
            BackgroundServer(ServeConfig(artifact_dir=art, port=0, threads=usable_cpus() + 1)):
        pass


# -- "internal error" before --------------------------------------------------------------------------------------
def test_sample_inputs_with_no_sample(art: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "zero.npz", input=np.zeros((0, 3, 32, 32), np.float32))
    one_error(["convert", f"{TINY}:build", "--sample-inputs", tmp_path / "zero.npz", "--out", art], "no sample")


def test_seed_beyond_what_pytorch_takes(art: Path) -> None:
    one_error(["convert", f"{TINY}:build", "--seed", "99999999999999999999999", "--out", art], "--seed")


@pytest.mark.parametrize("command", ["bench", "profile", "tune"])
def test_a_file_or_a_binary_manifest_instead_of_an_artifact_folder(command: str, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "manifest.json").write_bytes(b"\xff\xfe\x00 not JSON")
    one_error([command, tmp_path / "file.txt"], "is a file, not an artifact folder")
    one_error([command, tmp_path / "bin"], "is not readable JSON")


def test_out_ending_in_dot_dot_is_the_folder_it_names(tmp_path: Path) -> None:
    target = tmp_path / "d"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "keep.txt").write_text("earlier")
    code, text = invoke("convert", f"{TINY}:build", "--no-optimize", "--out", str(target / "sub" / ".."))
    assert code == 0, text
    assert (target / "manifest.json").is_file() and (target / "sub" / "keep.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging folder left beside or inside it


# -- accepted silently before ---------------------------------------------------------------------------------------
def test_a_factory_that_exits(art: Path, tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text("import sys\n\ndef build():\n    sys.exit(0)\n")
    (tmp_path / "script.py").write_text("import sys\nsys.exit(0)\n\ndef build():\n    pass\n")
    one_error(["convert", f"{tmp_path / 'exits.py'}:build", "--out", art], "sys.exit(0)")
    one_error(["convert", f"{tmp_path / 'script.py'}:build", "--out", art], "sys.exit(0)")


def test_sample_inputs_with_nan_or_a_key_that_names_no_input(art: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "nan.npz", input=np.full((1, 3, 32, 32), np.nan, np.float32))
    np.savez(tmp_path / "key.npz", image=np.ones((1, 3, 32, 32), np.float32))
    one_error(["convert", f"{TINY}:build", "--sample-inputs", tmp_path / "nan.npz", "--out", art], "NaN")
    one_error(["convert", f"{TINY}:build", "--sample-inputs", tmp_path / "key.npz", "--out", art],
              "no input named 'image'", "'input'")


def test_flags_that_act_on_nothing_or_leave_a_value_out(art: Path) -> None:
    one_error(["convert", f"{TINY}:build", "--input-shape", "", "--out", art], "--input-shape")
    one_error(["convert", f"{TINY}:build", "--trt-from", "sparse24", "--out", art], "--trt-from", "add --trt")
    one_error(["bench", art, "--backends", "ort", "--batch-sizes", "1,,2"], "--batch-sizes", "empty item")


def test_kserve_runtime_version_that_is_no_image_tag(art: Path, tmp_path: Path) -> None:
    one_error(["package", art, "--format", "kserve", "--storage-uri", "s3://bucket/m", "--runtime-version",
               "bad tag!", "--out", tmp_path / "ks"], "--runtime-version", "image tag")
    assert not (tmp_path / "ks").exists()


# -- leftovers -----------------------------------------------------------------------------------------------------
def test_profile_with_a_bad_shape_creates_no_folder(art: Path, tmp_path: Path) -> None:
    one_error(["profile", art, "--input-shape", "1x3", "--out", tmp_path / "prof" / "t.json"], "--input-shape")
    assert not (tmp_path / "prof").exists()


def test_a_failing_ray_sweep_leaves_no_session_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session of another test is running")
    from sweep.plan import parse_plan
    from sweep.run import SweepConfig, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="t33-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    plan = parse_plan({"models": [{"model": str(tmp_path / "missing.onnx"), "name": "missing"}],
                       "backends": ["ort"], "batch_sizes": [1], "threads": 1})
    try:
        outcome = run_sweep(SweepConfig(plan=plan, out=tmp_path / "sweep", ray="local"), log=lambda _m: None)
        assert outcome.results.summary["failed"] == 1
        assert not ray.is_initialized()
        left = sorted(p.name for p in tmp.iterdir() if p.name != ".ses")  # .ses: Ray's one id file per TMPDIR
        assert left == [], left
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- messages made exact --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["bench", "ART", "--iters", "0"], "--iters"),
    (["bench", "ART", "--threads", "-1"], "--threads"),
    (["convert", "x", "--calib-size", "0"], "--calib-size"),
    (["bench", "ART", "--no-such-flag"], "--no-such-flag"),
    (["no-such-command"], "no-such-command"),
], ids=["iters-0", "threads-negative", "calib-size-0", "unknown-option", "unknown-command"])
def test_usage_errors_are_one_line(art: Path, args: list[str], needle: str) -> None:
    line = one_error([str(art) if a == "ART" else a for a in args], needle)
    assert "--help" in line
    code, text = invoke()  # no command at all still shows the help
    assert code == 2 and "Usage" in text and "error:" not in text


@pytest.mark.parametrize("command", [["package", "--out", "REPO"], ["serve", "--port", "0"]])
def test_package_and_serve_on_a_file_say_it_is_a_file(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    args = [str(tmp_path / "repo") if a == "REPO" else a for a in command]
    one_error([args[0], tmp_path / "file.txt", *args[1:]], "is a file")


def test_full_disk_while_packaging_names_the_destination(art: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)  # shutil.copyfile's fast path, as when the disk fills up
    line = one_error(["package", art, "--out", tmp_path / "repo"], "no space left on device")
    assert f"{tmp_path}/.repo." in line and "model.onnx" in line and str(art) not in line, line  # its staging copy


@pytest.mark.parametrize("shape", ["1x3x32", "1x3x32x32x2"])
def test_wrong_rank_input_shape_is_said_before_the_export(art: Path, shape: str) -> None:
    line = one_error(["convert", f"{TINY}:build", "--input-shape", shape, "--out", art], "rank", "1x3x32x32")
    assert "export" not in line and "channels" not in line


def test_choices_checked_by_the_configs(art: Path, tmp_path: Path) -> None:
    one_error(["profile", art, "--device", "tpu"], "unknown --device 'tpu'; choose cpu or cuda")
    one_error(["package", art, "--kind", "tpu", "--out", tmp_path / "r"], "unknown --kind 'tpu'; choose cpu or gpu")
    assert json.loads((art / "manifest.json").read_text())  # untouched (the fixture compares every byte too)


# -- the campaign's rerun (benchmarks/run_hostile_cli.py) found these two --------------------------------------------
def test_calib_method_with_an_empty_item(art: Path) -> None:
    one_error(["convert", f"{TINY}:build", "--int8", "--calib", "synthetic", "--calib-method", "minmax,,entropy",
               "--out", art], "--calib-method", "empty item")


@pytest.mark.parametrize("ray", [None, "local"])
def test_a_local_sweep_with_more_threads_than_cpus_is_refused_up_front(tmp_path: Path, ray: str | None) -> None:
    from sweep.plan import parse_plan
    from sweep.run import SweepConfig, run_sweep

    plan = parse_plan({"models": [{"model": str(tmp_path / "missing.onnx"), "name": "missing"}],
                       "backends": ["ort"], "batch_sizes": [1], "threads": usable_cpus() + 1})
    with pytest.raises(InputError, match=f"plan threads: {usable_cpus() + 1} is more than the {usable_cpus()} CPU"):
        run_sweep(SweepConfig(plan=plan, out=tmp_path / "sweep", ray=ray), log=lambda _m: None)
    assert not (tmp_path / "sweep").exists()  # nothing started, nothing written
