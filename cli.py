"""Command line: flags -> config -> one library call -> render. No logic lives here.

    python cli.py convert densenet121 --int8 --calib imagenet_subset
    python cli.py bench --backends ort,trt
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from core.errors import InputError, ToolkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert PyTorch models to ONNX/TensorRT, optimize, quantize, benchmark and hand off.")
console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)
STATE: dict[str, Any] = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors")] = False) -> None:
    STATE["debug"] = debug


@contextmanager
def user_errors() -> Iterator[None]:
    """ToolkitError -> one red line and its exit code; anything else too unless --debug."""
    try:
        yield
    except ToolkitError as exc:
        if STATE["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:
        if STATE["debug"]:
            raise
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                      soft_wrap=True)
        raise typer.Exit(1) from None


def log(msg: str) -> None:
    console.print(msg, soft_wrap=True)


def csv_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise InputError(f"{what} is empty")
    return items


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in csv_list(text, what)]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise InputError(f"{what} must be >= 1, got {text!r}")
    return values


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="torchvision name (densenet121), path/to/file.py:factory, a TorchScript "
                                              ".pt, or an .onnx file")],
    weights: Annotated[str | None, typer.Option(help="torchvision weights name (needs internet) or a local "
                                                     "state-dict file; default: random init")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input shape, e.g. 1x3x224x224")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    exporter: Annotated[str, typer.Option(help="torchscript | dynamo")] = "torchscript",
    dynamic_batch: Annotated[bool, typer.Option(help="Symbolic batch dimension")] = True,
    optimize: Annotated[bool, typer.Option(help="Write model.opt.onnx (onnxslim + ORT)")] = True,
    out: Annotated[Path | None, typer.Option(help="Output folder (default artifacts/<model>)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random init and test inputs")] = 0,
) -> None:
    """Export MODEL to ONNX, validate it, optimize it, and write manifest.json."""
    with user_errors():
        from convert.pipeline import ConvertConfig, ExportConfig, run_convert
        from core.iospec import parse_shape

        if exporter not in ("torchscript", "dynamo"):
            raise InputError(f"unknown --exporter {exporter!r}; choose torchscript or dynamo")
        cfg = ConvertConfig(
            export=ExportConfig(model=model, weights=weights, input_shape=parse_shape(input_shape) if input_shape else None,
                                opset=opset, exporter=exporter, dynamic_batch=dynamic_batch, optimize=optimize,
                                seed=seed),  # type: ignore[arg-type]
            out=out,
        )
        manifest, folder = run_convert(cfg, log=log)
        from reports.manifest_view import manifest_table

        out_console.print(manifest_table(manifest, folder))
        out_console.print(f"manifest: {folder / 'manifest.json'}")


def _latest_artifact_dir() -> Path:
    candidates = sorted(Path("artifacts").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise InputError("no ARTIFACT_DIR given and none found under artifacts/: run `python cli.py convert MODEL` first")
    return candidates[-1].parent


@app.command()
def bench(
    artifact_dir: Annotated[Path | None, typer.Argument(help="Folder with manifest.json (default: newest under "
                                                             "artifacts/)")] = None,
    backends: Annotated[str, typer.Option(help="Comma-separated backends")] = "eager,torchscript,ort",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes")] = "1,8",
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up runs")] = 10,
    iters: Annotated[int, typer.Option(min=1, help="Timed runs")] = 100,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads")] = None,
    data: Annotated[Path | None, typer.Option(help="Image folder; class sub-folders give labels")] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated artifact names (default: all)")] = None,
    accuracy_samples: Annotated[int, typer.Option(min=1, help="Inputs used for the accuracy checks")] = 32,
    out: Annotated[Path | None, typer.Option(help="results.json path (default ARTIFACT_DIR/bench/results.json)")] = None,
) -> None:
    """Benchmark every backend on the same inputs; check accuracy against the FP32 reference."""
    with user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from core.fsutil import ensure_writable_dir
        from reports.writers import rich_table, write_results
        from runtimes.harness import BenchConfig, run_bench, select_targets

        if device not in ("cpu", "cuda"):
            raise InputError(f"unknown --device {device!r}; choose cpu or cuda")
        folder = artifact_dir or _latest_artifact_dir()
        if artifact_dir is None:
            log(f"using artifact folder {folder}")
        cfg = BenchConfig(artifact_dir=folder, backends=csv_list(backends, "--backends"),
                          batch_sizes=int_list(batch_sizes, "--batch-sizes"), warmup=warmup, iters=iters,
                          device=device, threads=threads, data=data,  # type: ignore[arg-type]
                          variants=csv_list(variants, "--variants") if variants else None,
                          accuracy_samples=accuracy_samples)
        json_path = out or folder / "bench" / "results.json"
        ensure_writable_dir(json_path.parent)
        from core.manifest import Manifest

        total = len(select_targets(Manifest.load(folder), cfg)) * len(cfg.batch_sizes)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("benchmark", total=total)

            def step(desc: str) -> None:
                bar.update(task, description=desc, advance=1)

            results = run_bench(cfg, log=log, progress=step)
        paths = write_results(results, json_path)
        out_console.print(rich_table(results))
        for w in results.warnings:
            log(f"[yellow]warning:[/] {w}")
        out_console.print(f"report: {paths['json']} (+ {paths['csv'].name}, {paths['md'].name})")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
