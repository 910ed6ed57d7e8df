"""Comparing results files: row matching, ratios, and the --fail-if-slower regression gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from core.errors import InputError, ValidationError
from reports.compare import check_regressions, compare_runs, load_runs, parse_percent, run_labels
from tests.reports_data import R18, R18_1T, load, save, scale_latency

runner = CliRunner()


def _before_after(tmp_path: Path) -> tuple[Path, Path, dict[tuple[str, str, int], float]]:
    """A real run as the baseline and a hand-made 'after' copy: known factors per row, one row dropped."""
    before = load(R18)
    after = load(R18)
    factors = {("eager", "torch", 1): 1.10, ("ort", "opt", 4): 1.30, ("ort", "opt", 1): 1.04,
               ("torchscript", "torch", 1): 0.80}
    for rec in after["records"]:
        f = factors.get((rec["backend"], rec["variant"], rec["batch_size"]))
        if f is not None:
            scale_latency(rec, f)
    after["records"] = [r for r in after["records"] if (r["backend"], r["variant"], r["batch_size"])
                        != ("ort", "fp32", 4)]
    return save(before, tmp_path / "before.json"), save(after, tmp_path / "after.json"), factors


def test_ratios_and_unmatched_rows(tmp_path: Path) -> None:
    b, a, factors = _before_after(tmp_path)
    cmp = compare_runs(load_runs([b, a]))
    assert cmp.labels == ["before", "after"]
    assert len(cmp.rows) == 8
    for row in cmp.rows:
        _, backend, variant, _, _, batch, _dims = row.key
        if (backend, variant, batch) == ("ort", "fp32", 4):
            assert row.records[1] is None and row.latency_ratio(1) is None
            continue
        f = factors.get((backend, variant, batch), 1.0)
        assert row.latency_ratio(1) == pytest.approx(f)
        assert row.throughput_ratio(1) == pytest.approx(1 / f)
        assert row.same_inputs()
    assert cmp.unmatched() == ["resnet18 ort:fp32 fp32 cpu batch 4: not in after"]


def test_regression_gate_lists_every_slower_row(tmp_path: Path) -> None:
    b, a, _ = _before_after(tmp_path)
    cmp = compare_runs(load_runs([b, a]))
    regs = cmp.regressions(5.0)
    assert sorted((r.key[1], r.key[2], r.key[5]) for r in regs) == [("eager", "torch", 1), ("ort", "opt", 4)]
    assert {round(r.slower_pct, 6) for r in regs} == {10.0, 30.0}
    assert len(cmp.regressions(3.0)) == 3  # the +4% row too
    assert cmp.regressions(50.0) == []
    with pytest.raises(ValidationError) as exc:
        check_regressions(cmp, 5.0)
    assert len(exc.value.failures) == 2
    check_regressions(cmp, 35.0)  # nothing over 35%: no error
    with pytest.raises(InputError):
        check_regressions(compare_runs(load_runs([b])), 5.0)


def test_gate_through_the_cli(tmp_path: Path) -> None:
    b, a, _ = _before_after(tmp_path)
    html = tmp_path / "cmp.html"
    res = runner.invoke(cli.app, ["report", str(b), str(a), "--html", str(html), "--fail-if-slower", "5%"])
    assert res.exit_code == 4, res.output
    text = res.output + (res.stderr if res.stderr_bytes else "")
    assert "2 row(s) more than 5% slower" in text
    assert "eager:torch fp32 cpu batch 1" in text and "ort:opt fp32 cpu batch 4" in text
    assert html.is_file()  # the report is written before the gate fails
    page = html.read_text()
    assert 'id="comparison"' in page and "REGRESSION" in page
    res = runner.invoke(cli.app, ["report", str(b), str(a), "--html", str(html), "--fail-if-slower", "35"])
    assert res.exit_code == 0, res.output
    assert "no row is more than 35% slower" in res.output


def test_two_real_runs_compare(tmp_path: Path) -> None:
    cmp = compare_runs(load_runs([R18, R18_1T]))
    assert cmp.labels == ["r18_cpu", "r18_cpu_1thread"]
    assert len(cmp.rows) == 8 and not cmp.unmatched()
    for row in cmp.rows:
        base, new = row.records
        assert base is not None and new is not None
        assert row.latency_ratio(1) == pytest.approx(new.latency_ms.p50 / base.latency_ms.p50)


def test_parse_percent_and_labels() -> None:
    assert parse_percent("5%") == 5.0 and parse_percent("5") == 5.0 and parse_percent(" 2.5 % ") == 2.5
    for bad in ("", "-5%", "five", "5%%", "1e3"):
        with pytest.raises(InputError):
            parse_percent(bad)
    assert run_labels([Path("a/bench/results.json"), Path("b/bench/results.json")]) == [
        "a/bench/results", "b/bench/results"]
    assert run_labels([Path("x.json"), Path("x.json")]) == ["x", "x #2"]
