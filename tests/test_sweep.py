"""Sweeps: a plan of two tiny models run in this process and on a local 2-CPU Ray, with a cell that fails, a
cell whose convert failed (skipped), and re-runs that skip the finished cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.errors import BackendUnavailableError, InputError
from reports.models import BenchResults
from sweep.cells import expand, read_state
from sweep.plan import load_plan, parse_plan
from sweep.results import SweepResults
from sweep.run import SweepConfig, SweepOutcome, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_cnn.py"
OTHER = '''
from torch import nn
INPUT_SHAPE = (1, 3, 16, 16)
def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''


def _plan(folder: Path) -> dict[str, Any]:
    """2 tiny models (and one that does not exist) x 1 conversion x 3 variants (one never made) x 2 batches."""
    other = folder / "other.py"
    other.write_text(OTHER)
    return {"models": [{"model": f"{TINY}:build", "name": "tiny"}, {"model": f"{other}:build", "name": "other"},
                       {"model": str(folder / "missing.onnx"), "name": "missing"}],
            "conversions": {"dyn": {"int8_dynamic": True}},
            "variants": ["opt", "int8_dynamic", "no_such_variant"], "backends": ["ort"], "batch_sizes": [1, 2],
            "threads": 1, "warmup": 1, "iters": 4, "rounds": 2, "accuracy_samples": 8}


def _sweep(plan: dict[str, Any], out: Path, ray: str | None = None, skip_failed: bool = False) -> SweepOutcome:
    return run_sweep(SweepConfig(plan=parse_plan(plan), out=out, ray=ray, skip_failed=skip_failed),
                     log=lambda _m: None)


def _rows(res: SweepResults) -> dict[tuple[str, str, int], tuple[str, Any]]:
    """(model, variant, batch) -> (status, accuracy figures)"""
    return {(r.model, r.variant, r.batch_size): (r.status, r.record.accuracy.model_dump() if r.record and
                                                 r.record.accuracy else None) for r in res.rows}


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _plan(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def local_run(plan: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> SweepOutcome:
    return _sweep(plan, tmp_path_factory.mktemp("local"))


def test_sequential_rows_failures_and_files(local_run: SweepOutcome) -> None:
    res = local_run.results
    assert res.executor == "local" and len(res.converts) == 3 and len(res.rows) == 3 * 3 * 2
    status = {k: v[0] for k, v in _rows(res).items()}
    for model in ("tiny", "other"):
        for b in (1, 2):
            assert status[(model, "opt", b)] == status[(model, "int8_dynamic", b)] == "done"
            assert status[(model, "no_such_variant", b)] == "failed"
    assert {status[("missing", v, b)] for v in ("opt", "int8_dynamic") for b in (1, 2)} == {"skipped"}
    bad = next(r for r in res.rows if r.variant == "no_such_variant")
    assert bad.error is not None and "unknown variant" in bad.error and "\n" not in bad.error
    missing = next(c for c in res.converts if c.model == "missing")
    assert missing.status == "failed" and "missing.onnx" in (missing.error or "")
    skipped = next(r for r in res.rows if r.model == "missing")
    assert "convert missing (dyn) failed" in (skipped.error or "")
    done = [r for r in res.rows if r.status == "done"]
    for r in done:  # the record bench writes, plus where it ran
        assert r.record is not None and r.record.backend == "ort" and r.record.batch_size == r.batch_size
        assert r.record.variant == r.variant and r.node and r.cpu_model and r.gpu is None and r.wall_s > 0
    assert res.summary == {"cells": 21, "reused": 0, "ran": 21, "done": 10, "failed": 5, "skipped": 6}
    on_disk = SweepResults.model_validate_json(local_run.paths["json"].read_text())
    assert len(on_disk.rows) == 18 and "| tiny | dyn | ort | opt | cpu | 1 | done" in local_run.paths["md"].read_text()
    assert len(BenchResults.load(local_run.paths["bench"]).records) == 8  # `cli.py report` reads it


def test_rerun_skips_finished_cells(local_run: SweepOutcome, plan: dict[str, Any]) -> None:
    out = local_run.paths["json"].parent
    done = [r.cell for r in local_run.results.rows if r.status == "done"]
    before = {k: read_state(out, k) for k in done}
    again = _sweep(plan, out)
    assert not set(done) & set(again.ran)  # no convert or bench ran again for a done cell
    assert {k: read_state(out, k) for k in done} == before  # their state files are untouched
    assert all(r.reused for r in again.results.rows if r.status == "done")
    assert _rows(again.results) == _rows(local_run.results)
    # failed cells run again by default; --skip-failed keeps them (only the skipped benches are re-recorded)
    failed = {r.cell for r in local_run.results.rows if r.status == "failed"} | {
        c.cell for c in local_run.results.converts if c.status == "failed"}
    assert failed <= set(again.ran)
    kept = _sweep(plan, out, skip_failed=True)
    assert not failed & set(kept.ran) and {r.status for r in kept.results.rows if r.cell in kept.ran} == {"skipped"}


def test_keys_follow_content(plan: dict[str, Any], tmp_path: Path) -> None:
    converts, benches = expand(parse_plan(plan))
    again_c, again_b = expand(parse_plan(plan))
    assert [c.key for c in converts] == [c.key for c in again_c] and [b.key for b in benches] == [b.key for b in again_b]
    more_iters = expand(parse_plan({**plan, "iters": 5}))
    assert [c.key for c in more_iters[0]] == [c.key for c in converts]  # the conversions are unchanged
    assert not {b.key for b in more_iters[1]} & {b.key for b in benches}
    edited = tmp_path / "other.py"  # the same path with other content is another model
    edited.write_text(OTHER.replace("Conv2d(3, 8, 3)", "Conv2d(3, 4, 3)").replace("Linear(8", "Linear(4"))
    moved = {**plan, "models": [{"model": f"{edited}:build", "name": "other"}]}
    assert expand(parse_plan(moved))[0][0].key != converts[1].key


@pytest.fixture(scope="module")
def ray_session():  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_local_same_rows_and_rerun(ray_session: Any, plan: dict[str, Any], local_run: SweepOutcome,
                                       tmp_path: Path) -> None:
    first = _sweep(plan, tmp_path, ray="local")  # joins the session the fixture started (2 CPUs)
    res = first.results
    assert res.executor == "ray local"
    assert _rows(res) == _rows(local_run.results)  # same rows, same statuses, same accuracy figures
    assert all("ray node" in r.node for r in res.rows if r.status in ("done", "failed"))
    assert next(c for c in res.converts if c.model == "missing").status == "failed"  # a task that failed
    again = _sweep(plan, tmp_path, ray="local")
    assert not {r.cell for r in res.rows if r.status == "done"} & set(again.ran)
    assert _rows(again.results) == _rows(res)


def test_ray_cells_that_no_node_can_run_fail_at_once(ray_session: Any, tmp_path: Path) -> None:
    plan = {"models": [f"{TINY}:build"], "threads": 3, "iters": 2, "warmup": 0}
    res = _sweep(plan, tmp_path, ray="local").results  # waiting for a 3-CPU node would hang
    assert res.converts[0].status == "failed" and "needs 3 CPUs" in (res.converts[0].error or "")
    assert [r.status for r in res.rows] == ["skipped"]


def test_ray_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the [ray] extra
    with pytest.raises(BackendUnavailableError, match=r"--ray needs Ray: pip install \.\[ray\]"):
        _sweep({"models": ["resnet18"]}, tmp_path, ray="local")


@pytest.mark.parametrize(("plan", "message"), [
    ({"models": ["resnet18"], "iterz": 3}, "iterz: Extra inputs are not permitted"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"models": ["resnet18"], "backends": ["onnxruntime"]}, "unknown backend(s) ['onnxruntime']"),
    ({"models": ["resnet18", "resnet18"]}, "listed twice"),
    ({"models": ["resnet18"], "conversions": {"a": {"int2": True}}}, "conversions.a.int2: Extra inputs"),
    ({"models": ["resnet18"], "batch_sizes": [0]}, "batch sizes must be >= 1"),
    (["resnet18"], "expected a mapping"),
])
def test_bad_plans_are_one_line(plan: Any, message: str) -> None:
    with pytest.raises(InputError) as err:
        parse_plan(plan)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_plan_through_the_cli(tmp_path: Path) -> None:
    bad = tmp_path / "plan.yaml"
    bad.write_text("models: [resnet18]\nbatch_sizes: [1, 8]\nthreds: 2\n")
    proc = subprocess.run([sys.executable, "cli.py", "sweep", str(bad), "--out", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines == [f"error: {bad}: threds: Extra inputs are not permitted"]
    bad.write_text("models: [resnet18\n")
    proc = subprocess.run([sys.executable, "cli.py", "sweep", str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr and not (tmp_path / "o").exists()


def test_example_plan_is_valid() -> None:
    plan = load_plan(ROOT / "examples" / "sweep.yaml")
    converts, benches = expand(plan)
    assert len(converts) == 2 and len(benches) == 2 * 3 * 2
    assert json.loads(plan.model_dump_json())["threads"] == 1


def test_a_conversion_has_every_variant_flag_of_the_table() -> None:
    """A plan's conversion set asks for the variant rows by convert's flags: one bool per row flag, mapped by the
    shared ConvertFlags (an int4 set writes the int4 variant)."""
    from convert.config import QuantConfig, flag_fields
    from sweep.plan import Conversion, ModelEntry

    flags = {f.removeprefix("--").replace("-", "_") for f in flag_fields(QuantConfig).values()}
    assert flags <= set(Conversion.model_fields), flags - set(Conversion.model_fields)
    cfg = Conversion(int4=True).to_config(ModelEntry(model="m"), Path("out"))
    assert cfg.quant is not None and cfg.quant.int4 and not cfg.quant.fp16
