"""The HTML report from the checked-in results: well-formed, self-contained, every plot and every row;
bad results files; `bench` writing results.html; and one render in headless Chromium."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from reports.compare import key_text, row_key
from reports.html import ReportConfig, make_report
from reports.models import BenchResults
from reports.plots import PLOTS
from tests.conftest import ROOT
from tests.reports_data import R18, R18_1T, load, save

runner = CliRunner()
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "track"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Collects what the tests look at and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.images: list[bytes] = []
        self.urls: list[str] = []
        self.row_keys: list[str] = []
        self.in_results = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
            if tag == "section":
                self.in_results = a["id"] == "results"
        for attr in ("src", "href"):
            if a.get(attr):
                self.urls.append(str(a[attr]))
        if tag == "img" and str(a.get("src", "")).startswith("data:image/png;base64,"):
            self.images.append(base64.b64decode(str(a["src"]).split(",", 1)[1]))
        if tag == "tr" and self.in_results and a.get("data-key"):
            self.row_keys.append(str(a["data-key"]))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], page.stack
    return page


def expected_keys(*paths: Path) -> list[str]:
    return [key_text(row_key(r)) for p in paths for r in BenchResults.load(p).records]


def test_report_of_two_runs_has_every_plot_and_row(tmp_path: Path) -> None:
    html, png_dir = tmp_path / "out" / "report.html", tmp_path / "png"
    rep = make_report(ReportConfig(results=[R18, R18_1T], html=html, png_dir=png_dir))
    page = parse(html)
    for name in PLOTS:
        assert f"plot-{name}" in page.ids
        assert (png_dir / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert len(page.images) == len(PLOTS) and all(img.startswith(PNG_MAGIC) for img in page.images)
    assert sorted(page.row_keys) == sorted(expected_keys(R18, R18_1T))
    for section in ("recommendation", "comparison", "plots", "results", "runs"):
        assert section in page.ids
    # self-contained: nothing to fetch, only embedded images and in-page links
    assert all(u.startswith(("data:", "#")) for u in page.urls), [u[:40] for u in page.urls]
    text = html.read_text()
    assert "Use <b>" in text and "fastest within the budget" in text
    assert len(rep.recommendations) == 2 and rep.comparison is not None


def test_single_run_report_has_no_comparison(tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    make_report(ReportConfig(results=[R18], html=html))
    page = parse(html)
    assert "comparison" not in page.ids
    assert sorted(page.row_keys) == sorted(expected_keys(R18))


def _bad_files(tmp_path: Path) -> list[tuple[Path, str]]:
    wrong_version = load(R18) | {"schema_version": 99}
    no_records_field = load(R18)
    no_records_field["records"][0].pop("latency_ms")
    return [
        (save({"hello": 1}, tmp_path / "other.json"), "schema_version"),
        (save(wrong_version, tmp_path / "v99.json"), "schema_version 99"),
        (save(no_records_field, tmp_path / "broken.json"), "does not match the results schema: records.0.latency_ms"),
        (tmp_path / "missing.json", "does not exist"),
    ]


def test_bad_results_files_are_one_clear_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(R18.read_text()[:500])
    cases = [(corrupt, "not a readable results JSON file"), *_bad_files(tmp_path)]
    for path, msg in cases:
        res = runner.invoke(cli.app, ["report", str(R18), str(path), "--html", str(tmp_path / "x.html")])
        text = res.output + (res.stderr if res.stderr_bytes else "")
        assert res.exit_code == 2, (path, text)
        assert msg in text and str(path.name) in text, text
        assert "Traceback" not in text
    assert not (tmp_path / "x.html").exists()


def test_bad_file_in_a_real_process(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    proc = subprocess.run([sys.executable, "cli.py", "report", str(corrupt)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "corrupt.json" in lines[0], proc.stderr


def test_bench_writes_results_html(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench" / "results.json"
    res = runner.invoke(cli.app, ["bench", str(tiny_artifacts), "--backends", "ort", "--batch-sizes", "1",
                                  "--iters", "2", "--warmup", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = parse(out.with_suffix(".html"))
    assert sorted(page.row_keys) == sorted(expected_keys(out))
    assert len(page.images) == len(PLOTS)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    html = tmp_path / "report.html"
    make_report(ReportConfig(results=[R18, R18_1T], html=html))
    shot = tmp_path / "shot.png"
    cmd = [str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,2400",
           f"--screenshot={shot}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.std() > 20, "screenshot looks blank"
    assert (gray < 128).mean() > 0.01, "hardly any dark pixels: text and plots did not render"
