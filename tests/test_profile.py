"""`profile`: a valid Chrome trace with events, and the top operators, for each profiled backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from core.errors import InputError
from runtimes.profile import ProfileConfig, ort_op_times, run_profile

runner = CliRunner()

# Operators the tiny CNN must show (conv + batch-norm + relu + pool + linear).
EXPECTED_OP = {"ort": ("Conv", "FusedConv"), "eager": ("conv",), "torchscript": ("conv", "forward", "mkldnn")}


def trace_events(path: Path) -> list[dict[str, object]]:
    """Chrome trace: a JSON array of events, or an object with traceEvents (both open in Perfetto)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    events = data if isinstance(data, list) else data["traceEvents"]
    assert isinstance(events, list) and events
    for e in events:
        assert isinstance(e, dict) and "ph" in e and "name" in e
    assert any(e["ph"] == "X" and "dur" in e for e in events)
    return events


@pytest.mark.parametrize("backend", ["ort", "eager", "torchscript"])
def test_profile_writes_trace_and_top_ops(tiny_artifacts: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / f"{backend}.trace.json"
    res = run_profile(ProfileConfig(artifact_dir=tiny_artifacts, backend=backend, batch_size=2, warmup=2, iters=5,
                                    out=out), log=lambda _m: None)
    assert res.trace == out
    trace_events(out)
    assert res.ops and res.op_time_ms > 0
    assert sum(o.pct for o in res.ops) == pytest.approx(100.0)
    assert [o.total_ms for o in res.ops] == sorted((o.total_ms for o in res.ops), reverse=True)
    names = " ".join(o.op for o in res.top(15))
    assert any(w in names for w in EXPECTED_OP[backend]), names
    if backend == "ort":
        assert res.variant == "opt"
        # only the profiled runs count: every node ran once per run
        assert all(o.calls % 5 == 0 for o in res.ops), [(o.op, o.calls) for o in res.ops]
    assert not list(tmp_path.glob(".profile-*")), "scratch folder left behind"


def test_ort_op_times_windows_exclude_warmup() -> None:
    def node(ts: int, op: str, dur: int) -> dict[str, object]:
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "ph": "X",
                "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100, "ph": "X"},  # warm-up
        node(10, "Conv", 90),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100, "ph": "X"},
        node(210, "Conv", 50), node(260, "Relu", 10),
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100, "ph": "X"},
        node(410, "Conv", 70), node(470, "Relu", 30),
    ]
    assert ort_op_times(events, 2) == {"Conv": (2, pytest.approx(0.12)), "Relu": (2, pytest.approx(0.04))}


def test_profile_cli(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    res = runner.invoke(cli.app, ["profile", str(tiny_artifacts), "--backend", "ort", "--iters", "3", "--warmup",
                                  "1", "--out", str(out), "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "top operators" in res.output and str(out.name) in res.output
    trace_events(out)


@pytest.mark.parametrize("args,msg", [
    (["--backend", "tensorflow"], "cannot profile backend 'tensorflow'"),
    (["--backend", "ort", "--variant", "nope"], "cannot run variant 'nope'"),
    (["--device", "tpu"], "unknown --device"),
])
def test_profile_bad_input_is_one_clear_line(tiny_artifacts: Path, tmp_path: Path, args: list[str],
                                             msg: str) -> None:
    res = runner.invoke(cli.app, ["profile", str(tiny_artifacts), *args, "--out", str(tmp_path / "t.json")])
    text = res.output + (res.stderr if res.stderr_bytes else "")
    assert res.exit_code == 2, text
    assert msg in text and "Traceback" not in text
    assert not (tmp_path / "t.json").exists()


def test_profile_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no manifest.json"):
        run_profile(ProfileConfig(artifact_dir=tmp_path / "none"), log=lambda _m: None)
