"""Command line: flags -> config -> one library call -> render. No logic lives here.

    python cli.py convert densenet121 --int8 --calib imagenet_subset
    python cli.py bench --backends ort,trt
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from core.errors import InputError, ToolkitError, as_user_error
from core.flagtext import csv_items

if TYPE_CHECKING:  # the library is imported inside each command: --help stays fast
    from convert.config import (
        ConvertConfig,
    )
    from core.manifest import Manifest
    from reports.models import BenchResults
    from runtimes.harness import BenchConfig


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """click's usage errors (an option out of its range, an unknown option, a missing argument) as one `error:`
    line and exit 2, like every other bad input, instead of typer's usage box; `cli.py` alone still shows help."""
    # typer vendors click (typer._click): its UsageError is the base of typer.BadParameter, the family's public name
    usage_error: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        yield
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `cli.py` alone: typer prints the help
            raise
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        formatted = getattr(exc, "format_message", None)  # BadParameter's names the flag
        message = formatted() if callable(formatted) else str(exc)
        console.print(f"[bold red]error:[/] {escape(message)}{escape(where)}", soft_wrap=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None


class _Commands(TyperGroup):
    """The command group: its own and its commands' usage errors are one line (``_one_line_usage_errors``)."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert PyTorch models to ONNX/TensorRT, optimize, quantize, benchmark and hand off.")
console = Console(stderr=True, highlight=False)
# Wide tables when piped to a file or CI log; a real terminal keeps its own width.
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)
STATE: dict[str, Any] = {"debug": False}
DATA_HELP = ("Accuracy data instead of the artifact's own held-out data (what convert graded the variants on; random "
             "inputs only where it has none, and then top-1 is not graded): an image folder (class sub-folders give "
             "labels) or a .npy/.npz keyed by input name with optional 'labels'")


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors")] = False) -> None:
    STATE["debug"] = debug
    if not debug:
        # torch.jit's deprecation notices fire on every TorchScript load; keep the output readable.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")


@contextmanager
def user_errors() -> Iterator[None]:
    """ToolkitError -> one red line and its exit code; anything else too unless --debug."""
    try:
        yield
    except ToolkitError as exc:
        if STATE["debug"]:
            raise
        # escape: messages quote user input and URLs, whose brackets are not rich markup
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:
        if STATE["debug"]:
            raise
        if (err := as_user_error(exc)) is not None:  # a flag value outside a config field's range, a full disk
            console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (run with --debug for the traceback)",
                      soft_wrap=True)
        raise typer.Exit(1) from None


def log(msg: str) -> None:
    console.print(msg, soft_wrap=True)


@app.command()
def convert(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="torchvision name (densenet121), path/to/file.py:factory, a TorchScript "
                                              ".pt, an .onnx file, or hf:path/to/folder (Hugging Face, needs "
                                              "`pip install -e '.\\[hf]'`)")],
    weights: Annotated[str | None, typer.Option(help="torchvision weights name (needs internet) or a local "
                                                     "state-dict file; default: random init")] = None,
    input_shape: Annotated[str | None, typer.Option(
        help="Input shape(s): 1x3x224x224 for a one-input model, or by name, e.g. "
             "input_ids:1x16,attention_mask:1x16; they bind the model's symbolic dims (kept symbolic in the files)"
    )] = None,
    sample_inputs: Annotated[str | None, typer.Option(
        help=".npz with one array per input name: the export's sample inputs; their shapes bind the symbolic dims"
    )] = None,
    task: Annotated[str | None, typer.Option(help="hf: models: the task, e.g. feature-extraction or "
                                                  "text-classification (default: from the folder's config.json)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    exporter: Annotated[str, typer.Option(help="torchscript | dynamo")] = "torchscript",
    dynamic_batch: Annotated[bool, typer.Option(help="Symbolic batch dimension")] = True,
    optimize: Annotated[bool, typer.Option(help="Write model.opt.onnx (onnxslim + ORT)")] = True,
    out: Annotated[Path | None, typer.Option(help="Output folder (default artifacts/<model>)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random init and test inputs")] = 0,
    sparsity: Annotated[str | None, typer.Option(help="Also write a 2:4 sparse variant (magnitude, TensorRT's "
                                                      "sparse pattern); only 2:4 is supported")] = None,
    prune_channels: Annotated[str | None, typer.Option(metavar="F", help="Also write a channel-pruned variant "
                                                       "without a fraction F (0<F<1) of every layer's channels")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an FP16 variant (FP32 inputs/outputs kept)",
                                       rich_help_panel="Precision")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a static INT8 variant (QDQ; needs --calib)",
                                       rich_help_panel="Precision")] = False,
    int8_dynamic: Annotated[bool, typer.Option("--int8-dynamic", help="Also write a dynamic INT8 variant",
                                               rich_help_panel="Precision")] = False,
    int8_nncf: Annotated[bool, typer.Option("--int8-nncf", help="Also write OpenVINO's own INT8 (NNCF quantize on "
                                                                "--calib, an OpenVINO IR the openvino backend runs)",
                                            rich_help_panel="Precision")] = False,
    nncf_model_type: Annotated[str, typer.Option(help="--int8-nncf: auto | transformer | generic (NNCF's model type; "
                                                      "auto: transformer where the graph has attention)",
                                                 rich_help_panel="Precision")] = "auto",
    int4: Annotated[bool, typer.Option("--int4", help="Also write an INT4 weight-only variant (ONNX Runtime "
                                                      "MatMulNBits; MatMul/Gemm weights in 4-bit blocks)",
                                       rich_help_panel="Precision")] = False,
    int4_algorithm: Annotated[str, typer.Option(help="INT4: rtn | hqq | gptq (gptq calibrates on --calib, else on "
                                                     "seeded inputs)", rich_help_panel="Precision")] = "rtn",
    int4_block_size: Annotated[int, typer.Option(min=16, max=256, help="INT4: weights per scale along K (a power of "
                                                                       "2)", rich_help_panel="Precision")] = 32,
    int4_accuracy_level: Annotated[int | None, typer.Option(min=0, max=4, help=(
        "INT4 (--int4): MatMulNBits compute type, 0 FP32, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (default: 4 for "
        "rtn/gptq, ONNX Runtime GenAI's CPU default; 0 for hqq)"), rich_help_panel="Precision")] = None,
    int4_ov: Annotated[bool, typer.Option("--int4-ov", help="Also write OpenVINO's own INT4 variant (NNCF "
                                                            "compress_weights, an OpenVINO IR run by the openvino "
                                                            "backend only; KV-cache decoders)",
                                          rich_help_panel="Precision")] = False,
    int4_symmetric: Annotated[bool, typer.Option("--int4-symmetric", help="INT4: symmetric blocks, no zero points "
                                                 "(--int4 rtn, --int4-ov)", rich_help_panel="Precision")] = False,
    int4_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="--int4-ov: share of the layers in INT4 (the "
                                                                     "rest INT8)", rich_help_panel="Precision")] = 1.0,
    calib: Annotated[str | None, typer.Option(help="Calibration data: image folder, .npy/.npz keyed by input name, "
                                                   "imagenet_subset (built in, offline) or synthetic",
                                              rich_help_panel="Precision")] = None,
    calib_size: Annotated[int, typer.Option(min=1, help="Calibration samples (at most)",
                                            rich_help_panel="Precision")] = 100,
    calib_method: Annotated[str, typer.Option(help="minmax | entropy | percentile (comma-separated: one variant "
                                                   "each)", rich_help_panel="Precision")] = "minmax",
    calib_batch: Annotated[int, typer.Option(min=1, help="Calibration batch size", rich_help_panel="Precision")] = 8,
    size: Annotated[int | None, typer.Option(min=1, help="Images: resize the shorter side to this before the center "
                                                         "crop (default: the model's transforms, or crop/0.875)",
                                             rich_help_panel="Precision")] = None,
    mean: Annotated[str | None, typer.Option(help="Images: per-channel mean, e.g. 0.485,0.456,0.406",
                                             rich_help_panel="Precision")] = None,
    std: Annotated[str | None, typer.Option(help="Images: per-channel std, e.g. 0.229,0.224,0.225",
                                            rich_help_panel="Precision")] = None,
    activation_type: Annotated[str, typer.Option(help="Static INT8 activations: uint8 | int8",
                                                 rich_help_panel="Precision")] = "uint8",
    weight_type: Annotated[str, typer.Option(help="INT8 weights: int8 | uint8", rich_help_panel="Precision")] = "int8",
    per_channel: Annotated[bool, typer.Option(help="Per-channel weight scales", rich_help_panel="Precision")] = True,
    reduce_range: Annotated[bool | None, typer.Option("--reduce-range/--no-reduce-range", help="7-bit weights "
                                                      "(default: on where ONNX Runtime advises it: x86 without "
                                                      "VNNI)", rich_help_panel="Precision")] = None,
    int8_layouts: Annotated[str | None, typer.Option(help="More static INT8 variants, one per layout "
                                                     "(int8_static_METHOD_LAYOUT), for bench/tune to compare: "
                                                     "FORMAT_SCALES_ACTS with qdq|qop, pc|pt, u8|s8, e.g. "
                                                     "qop_pc_u8,qdq_pt_u8", rich_help_panel="Precision")] = None,
    exclude_nodes: Annotated[str | None, typer.Option(help="Comma-separated node names kept in FP32",
                                                      rich_help_panel="Precision")] = None,
    exclude_op_types: Annotated[str | None, typer.Option(help="Comma-separated op types kept in FP32, e.g. Add",
                                                         rich_help_panel="Precision")] = None,
    int8_ops: Annotated[str, typer.Option(help="Static INT8 (--int8): the op types quantized: auto | all | weighted "
                                               "(weighted: only Conv/ConvTranspose/Gemm/MatMul; all: every "
                                               "type ONNX Runtime can quantize, its default; auto: weighted where the "
                                               "graph has attention, else all). A list (auto,all) adds a variant per "
                                               "further set whose op types differ (int8_static_METHOD_SET), for "
                                               "bench/tune to compare", rich_help_panel="Precision")] = "auto",
    max_accuracy_drop: Annotated[float, typer.Option(min=0.0, help="The gate of every FP16/INT8/sparse/pruned "
                                                     "variant: top-1 points it may lose against FP32 on held-out "
                                                     "data (agreement without labels; 100 x (1 - centered cosine) "
                                                     "for outputs that are not class scores, random inputs and a "
                                                     "top-1 that is one class for every input). Outside it: marked "
                                                     "failed, left out of bench unless named, exit 5",
                                                     rich_help_panel="Accuracy gate")] = 1.0,
    min_cosine: Annotated[float, typer.Option(min=-1.0, max=1.0, help="The gate's other half: the smallest output "
                                                                      "cosine with FP32 a variant may have",
                                              rich_help_panel="Accuracy gate")] = 0.99,
    min_token_agreement: Annotated[float, typer.Option(min=0.0, max=1.0, help="Decoders with a KV cache: the share "
                                                       "of greedy decode steps whose token a variant must choose as "
                                                       "FP32 does (and a step logits cosine >= 0.98)",
                                                       rich_help_panel="Accuracy gate")] = 0.9,
    eval_text: Annotated[str | None, typer.Option(metavar="FILE|stdlib", help=(
        "Decoders with a KV cache: held-out text (a UTF-8 file, or stdlib: the held-out Python standard library "
        "files); each variant's perplexity on it is gated against FP32's (--max-perplexity-increase) and recorded"),
        rich_help_panel="Accuracy gate")] = None,
    max_perplexity_increase: Annotated[float, typer.Option(min=0.0, help=(
        "With --eval-text: the largest perplexity increase over FP32 a variant may have, as a fraction (0.05: 5%); "
        "over it: marked failed, exit 5"), rich_help_panel="Accuracy gate")] = 0.05,
    auto: Annotated[bool, typer.Option("--auto", help="Static INT8: try calibration methods, then keep the most "
                                                      "error-adding nodes in FP32 until within --max-accuracy-drop",
                                       rich_help_panel="Precision")] = False,
    eval_data: Annotated[str | None, typer.Option(help="Held-out data (image folder, .npy/.npz with optional "
                                                       "'labels') for the accuracy of every variant: INT8/FP16 "
                                                       "(default: samples of --calib that calibration never sees) "
                                                       "and sparse/pruned (default: random inputs)",
                                                  rich_help_panel="Precision")] = None,
    eval_size: Annotated[int, typer.Option(min=1, help="Held-out samples (at most)",
                                           rich_help_panel="Precision")] = 200,
    trt: Annotated[bool, typer.Option("--trt", help="Also build TensorRT engines (model.plan): FP32, or one per "
                                                    "--fp16 / --int8 --calib, each from that ONNX variant (strongly "
                                                    "typed); needs an NVIDIA GPU and `pip install .\\[trt]`",
                                      rich_help_panel="TensorRT")] = False,
    trt_from: Annotated[str | None, typer.Option(help="Build one engine from this ONNX artifact instead, e.g. "
                                                      "sparse24: in its precision, or its FP16 conversion with --fp16 "
                                                      "(default: opt/fp32, fp16, int8_trt as --fp16/--int8 ask)",
                                                 rich_help_panel="TensorRT")] = None,
    min_batch: Annotated[int | None, typer.Option(min=1, help="Engine profile: smallest batch (default 1)",
                                                  rich_help_panel="TensorRT")] = None,
    opt_batch: Annotated[int | None, typer.Option(min=1, help="Engine profile: batch the kernels are tuned for "
                                                             "(default 8)",
                                                  rich_help_panel="TensorRT")] = None,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Engine profile: largest batch (default 32)",
                                                  rich_help_panel="TensorRT")] = None,
    dim_range: Annotated[str | None, typer.Option(
        help="Engine profile of other symbolic dims, e.g. sequence=1:64:128 (comma-separated for several); "
             "default: the value --input-shape binds", rich_help_panel="TensorRT")] = None,
    tf32: Annotated[bool, typer.Option("--tf32/--no-tf32", help="FP32 layers may use TF32 tensor cores "
                                                                "(TensorRT's default)", rich_help_panel="TensorRT")] = True,
    workspace: Annotated[int | None, typer.Option(min=1, metavar="MIB", help="Workspace memory pool limit in MiB "
                                                  "(default: TensorRT's)", rich_help_panel="TensorRT")] = None,
    builder_opt_level: Annotated[int | None, typer.Option(min=0, max=5, help="Builder optimization level 0-5 "
                                                          "(default: TensorRT's, 3)",
                                                          rich_help_panel="TensorRT")] = None,
    timing_cache: Annotated[Path | None, typer.Option(help="Tactic timing cache, read if present and updated "
                                                           "(default OUT/timing.cache)",
                                                      rich_help_panel="TensorRT")] = None,
    recover: Annotated[str | None, typer.Option(metavar="distill", help="Fine-tune each --sparsity/--prune-channels "
                                                "variant with the FP32 model as teacher: a *_recovered variant "
                                                "beside it (needs --train-data)", rich_help_panel="Recovery")] = None,
    distill_into: Annotated[str | None, typer.Option(metavar="STUDENT", help="Also train a smaller model (torchvision "
                                                     "name or file.py:factory) to mimic this one: "
                                                     "model.distilled.onnx (needs --train-data)",
                                                     rich_help_panel="Recovery")] = None,
    train_data: Annotated[str | None, typer.Option(help="Training data: image folder or .npz keyed by input name, "
                                                        "optional 'labels'; a held-out part of it stops training "
                                                        "early", rich_help_panel="Recovery")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="At most this many epochs", rich_help_panel="Recovery")] = 20,
    lr: Annotated[float, typer.Option(help="Adam learning rate",
                                      rich_help_panel="Recovery")] = 1e-3,
    temperature: Annotated[float, typer.Option(help="Distillation softmax temperature",
                                               rich_help_panel="Recovery")] = 4.0,
    label_weight: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Weight of cross-entropy with the "
                                                       "labels (default 0.5 with labels, 0 without; >0 needs labels)",
                                                       rich_help_panel="Recovery")] = None,
    patience: Annotated[int, typer.Option(min=1, help="Early stopping: epochs without a better held-out agreement",
                                          rich_help_panel="Recovery")] = 4,
    train_time: Annotated[float | None, typer.Option(metavar="SECONDS",
                                                     help="Time budget: no new epoch after this",
                                                     rich_help_panel="Recovery")] = None,
    train_device: Annotated[str, typer.Option(help="cpu | cuda", rich_help_panel="Recovery")] = "cpu",
) -> None:
    """Export MODEL to ONNX, validate it, optimize it, and write manifest.json."""
    with user_errors():
        from convert.flags import from_flags

        cfg = from_flags(**_given(ctx))  # the flags' rules and the config's: convert/flags.py, convert/config.py
        manifest, folder = _run_convert_with_progress(cfg)
        _render_manifest(manifest, folder)


def _given(ctx: typer.Context) -> dict[str, Any]:
    """The command's parameters the user gave explicitly (not left at their defaults), by name."""
    def explicit(name: str) -> bool:
        # by name: recent typer vendors click, whose ParameterSource is not click.core.ParameterSource
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {name: value for name, value in ctx.params.items() if explicit(name)}


def _run_convert_with_progress(cfg: ConvertConfig) -> tuple[Manifest, Path]:
    """run_convert, with a transient progress bar for training epochs when something is trained."""
    from convert.pipeline import run_convert

    if cfg.sparsity.recover is None and cfg.distill is None:
        return run_convert(cfg, log=log)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def tick(what: str, epoch: int, epochs: int, loss: float, agree: float) -> None:
            task = tasks.setdefault(what, bar.add_task(what, total=epochs))
            bar.update(task, completed=epoch, description=f"{what}: loss {loss:.4f}, held-out agreement {agree:.1%}")

        return run_convert(cfg, log=log, progress=tick)


def _render_manifest(manifest: Manifest, folder: Path) -> None:
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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (auto: cuda when a GPU is visible)")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads")] = None,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated artifact names (default: all)")] = None,
    accuracy_samples: Annotated[int, typer.Option(min=1, help="Inputs used for the accuracy checks")] = 32,
    input_shape: Annotated[str | None, typer.Option(
        help="Values of the model's symbolic dims for the run, as convert's (e.g. input_ids:1x128,"
             "attention_mask:1x128); the batch comes from --batch-sizes")] = None,
    dims: Annotated[str | None, typer.Option(
        help="Sweep named dims as --batch-sizes sweeps the batch, e.g. sequence=16,128 (';' between dims)")] = None,
    out: Annotated[Path | None, typer.Option(help="results.json path (default ARTIFACT_DIR/bench/results.json)")] = None,
    precisions: Annotated[str, typer.Option(help="Compute precisions of the PyTorch weights (autocast) and the FP32 "
                                                 "file (OpenVINO's precision hint): fp32,fp16,bf16; fp16/bf16 on "
                                                 "cuda or on a CPU with units for them (else refused)")] = "fp32",
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Eager on cuda: replay a captured CUDA graph "
                                                                    "(removes launch overhead)")] = False,
    include_transfers: Annotated[bool, typer.Option("--include-transfers", help="cuda: time the host->device input "
                                                    "and device->host output copies too")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="PyTorch: channels_last memory "
                                                                        "format")] = False,
    openvino_hint: Annotated[str, typer.Option(help="openvino backend: LATENCY or THROUGHPUT (its "
                                                    "PERFORMANCE_HINT)")] = "LATENCY",
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds: --iters is split over them, every target "
                                                    "runs once per round in an order rotated each round; the "
                                                    "spread of the per-round p50s is reported")] = 5,
    ort_spinning: Annotated[bool, typer.Option("--ort-spinning/--no-ort-spinning",
                                               help="ONNX Runtime's threads spin while waiting for work (its default, "
                                                    "what a deployment runs); recorded in the results")] = True,
    component: Annotated[str | None, typer.Option(help="A model exported as several files (encoder, decoder, ...): "
                                                       "the one to measure (default: each in turn)")] = None,
    text: Annotated[str | None, typer.Option(metavar="FILE|stdlib", help=(
        "A decoder with a KV cache: held-out text for each variant's perplexity (a UTF-8 file, or stdlib: the "
        "held-out Python standard library files); the model's tokenizer where its folder has one, else bytes"))] = None,
) -> None:
    """Benchmark every backend on the same inputs; check accuracy against the FP32 reference."""
    with user_errors():
        from core.manifest import artifact_files
        from reports.writers import check_results_path

        cfg = _bench_config(artifact_dir, backends=backends, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                            device=device, threads=threads, data=data, variants=variants,
                            accuracy_samples=accuracy_samples, precisions=precisions, input_shape=input_shape,
                            dims=dims, options={**{k: True for k, v in {"cuda_graphs": cuda_graphs,
                                                                        "channels_last": channels_last,
                                                                        "include_transfers": include_transfers}.items()
                                                   if v}, "openvino_hint": openvino_hint},
                            rounds=rounds, ort_spinning=ort_spinning, component=component, text=text)
        json_path = out or cfg.artifact_dir / "bench" / "results.json"
        check_results_path(json_path, inputs=[*artifact_files(cfg.artifact_dir), *([cfg.data] if cfg.data else []),
                                              *([Path(text)] if text and text != "stdlib" else [])])
        _render_bench(_run_bench_with_progress(cfg), json_path)


def _bench_config(artifact_dir: Path | None, **flags: Any) -> BenchConfig:
    """The benchmark request (the flags' rules are BenchConfig's); without ARTIFACT_DIR, the newest folder under
    artifacts/ (said so)."""
    from runtimes.harness import BenchConfig

    folder = artifact_dir or _latest_artifact_dir()
    if artifact_dir is None:
        log(f"using artifact folder {folder}")
    return BenchConfig.model_validate({"artifact_dir": folder, **flags})


def _run_bench_with_progress(cfg: BenchConfig) -> BenchResults:
    """run_bench with a transient progress bar: one tick per target loaded, one per point timed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.manifest import Manifest
    from runtimes.generation import progress_steps
    from runtimes.harness import generation_request, run_bench, select_targets

    combos = 1
    for values in cfg.dims.values():
        combos *= len(values)
    gen = generation_request(cfg)  # a KV-cache decoder: its generation loop's steps, not one-shot targets
    total = progress_steps(gen) if gen is not None else \
        len(select_targets(Manifest.load(cfg.artifact_dir), cfg)) + len(cfg.batch_sizes) * combos
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("benchmark", total=total)

        def step(desc: str) -> None:
            bar.update(task, description=desc, advance=1)

        return run_bench(cfg, log=log, progress=step, generation=gen)  # gen: the manifest read once


def _render_bench(results: BenchResults, json_path: Path) -> None:
    """Write results.json (+ .csv, .md, .html, as one set) and print the table and the warnings."""
    from reports.html import write_bench_html
    from reports.writers import rich_table, write_results

    paths = write_results(results, json_path, html=write_bench_html)
    out_console.print(rich_table(results))
    for w in results.warnings:
        log(f"[yellow]warning:[/] {w}")
    out_console.print(f"report: {paths['json']} (+ {paths['csv'].name}, {paths['md'].name})")
    if "html" in paths:
        out_console.print(f"html: {paths['html']}")


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="results.json files; the first is the baseline")],
    html: Annotated[Path | None, typer.Option(help="HTML file (default: FIRST.html beside the first file, "
                                                   "FIRST.compare.html for several)")] = None,
    png_dir: Annotated[Path | None, typer.Option(help="Also write every plot as PNG here")] = None,
    accuracy_budget: Annotated[float, typer.Option(min=0.0, help="Largest top-1 drop against FP32 allowed "
                                                                 "for the recommendation, in points (as convert's "
                                                                 "--max-accuracy-drop)")] = 1.0,
    fail_if_slower: Annotated[str | None, typer.Option(metavar="PCT", help=(
        "Exit 4 when a row is more than PCT (e.g. 5%) slower than in the first file: its p50 above "
        "(1 + PCT/100) x the baseline's and, when both files timed it in 3 or more rounds (bench --rounds, "
        "default 5), beyond the noise: a one-sided exact rank-sum test of its round p50s against the "
        "baseline's times (1 + PCT/100) at 5% (at 5 v 5 rounds: at most 4 of the 25 round pairs have the "
        "new round faster), so a row fails by chance at most 5% of the time when it is at most PCT slower. "
        "With fewer rounds: the p50 ratio only (said once)"))] = None,
) -> None:
    """HTML report with plots and a recommendation; several files are compared side by side."""
    with user_errors():
        from reports.compare import check_regressions, parse_percent
        from reports.html import ReportConfig, make_report

        default = results[0].with_suffix(".html" if len(results) == 1 else ".compare.html")
        cfg = ReportConfig(results=results, html=html or default, png_dir=png_dir, accuracy_budget=accuracy_budget,
                           fail_if_slower=parse_percent(fail_if_slower) if fail_if_slower is not None else None)
        rep = make_report(cfg)
        for run, recs in rep.recommendations:
            for r in recs:
                out_console.print(f"[bold]{r.model} on {r.device}[/] ({run.label}): "
                                  + (f"use {r.choice}" if r.choice else "nothing fits the accuracy budget"))
                for line in r.evidence:
                    out_console.print(f"  - {line}", soft_wrap=True)
        for path in rep.png_paths:
            out_console.print(f"png: {path}")
        out_console.print(f"html: {rep.html_path}")
        if cfg.fail_if_slower is not None:
            check_regressions(rep.comparison, cfg.fail_if_slower,
                              log=lambda note: log(f"[yellow]note:[/] {escape(note)}"))
            out_console.print(f"no row is more than {cfg.fail_if_slower:g}% slower than {rep.runs[0].label}")


@app.command()
def profile(
    artifact_dir: Annotated[Path, typer.Argument(help="Folder with manifest.json")],
    backend: Annotated[str, typer.Option(help="ort | eager | torchscript")] = "ort",
    variant: Annotated[str | None, typer.Option(help="Artifact name (default: opt for ort when present)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    input_shape: Annotated[str | None, typer.Option(
        help="Values of the inputs' dynamic dims, e.g. input_ids:1x128,attention_mask:1x128 (default: the ones "
             "convert bound; the batch comes from --batch-size)")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first")] = 5,
    iters: Annotated[int, typer.Option(min=1, help="Profiled runs")] = 20,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads")] = None,
    out: Annotated[Path | None, typer.Option(help="Trace JSON (default ARTIFACT_DIR/profile/BACKEND_VARIANT"
                                                  ".trace.json)")] = None,
    top: Annotated[int, typer.Option(min=1, help="Operators to list")] = 15,
) -> None:
    """Profile one backend: a Chrome trace for Perfetto / chrome://tracing and the top operators by time."""
    with user_errors():
        from runtimes.profile import ProfileConfig, run_profile, top_ops_table

        cfg = ProfileConfig.model_validate(dict(  # --device and --threads are checked by ProfileConfig
            artifact_dir=artifact_dir, backend=backend, variant=variant, batch_size=batch_size, input_shape=input_shape,
            warmup=warmup, iters=iters, device=device, threads=threads, out=out, top=top))
        result = run_profile(cfg, log=log)
        out_console.print(top_ops_table(result, cfg.top))
        for note in result.notes:
            log(f"note: {note}")
        out_console.print(f"trace: {result.trace} (open in https://ui.perfetto.dev or chrome://tracing)")


@app.command()
def package(
    artifact_dir: Annotated[Path, typer.Argument(help="Folder with manifest.json (from `convert`)")],
    format: Annotated[str, typer.Option("--format", help="triton: a model repository; kserve: DIR/model_repository "
                                                         "+ DIR/inferenceservice.yaml")] = "triton",
    out: Annotated[Path | None, typer.Option(help="Model repository folder to write")] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated artifact names, prefixes or kinds, e.g. "
                                                      "opt,int8,plan (default: opt)")] = None,
    name: Annotated[str | None, typer.Option(help="Model name prefix (default: the source model's name)")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=0, help="Triton max_batch_size (default 8; 0 for a "
                                                                   "fixed-batch model)")] = None,
    dynamic_batching: Annotated[bool | None, typer.Option("--dynamic-batching/--no-dynamic-batching",
                                                          help="Triton's dynamic batcher (default: on when "
                                                               "batching)")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(min=0, help="Dynamic batcher max queue delay (µs)")] = 100,
    instances: Annotated[int, typer.Option(min=1, help="Model instances (instance_group count)")] = 1,
    kind: Annotated[str | None, typer.Option(help="cpu | gpu (default: cpu for ONNX, gpu for plans)")] = None,
    input_shape: Annotated[str | None, typer.Option(
        help="Warm-up shapes for Triton (config.pbtxt model_warmup), e.g. input_ids:8x128,attention_mask:8x128: "
             "Triton runs them before it reports the model ready; the dims stay -1 (dynamic)")] = None,
    from_tune: Annotated[Path | None, typer.Option(
        help="Package the winner of `tune` with its settings in config.pbtxt: a tune.json, or the folder holding "
             "one (e.g. ARTIFACT_DIR)")] = None,
    storage_uri: Annotated[str | None, typer.Option(help="kserve: where DIR/model_repository is uploaded (s3://, "
                                                         "gs://, pvc://, https://)")] = None,
    service_name: Annotated[str | None, typer.Option(help="kserve: InferenceService name (default: the model's)")] = None,
    cpu: Annotated[str | None, typer.Option(help="kserve: CPU request = limit per replica (default 1)")] = None,
    memory: Annotated[str | None, typer.Option(help="kserve: memory request = limit per replica (default 2Gi)")] = None,
    gpus: Annotated[int | None, typer.Option(help="kserve: nvidia.com/gpu per replica (default 0)")] = None,
    min_replicas: Annotated[int | None, typer.Option(help="kserve: fewest replicas; 0 scales to zero (default 1)")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="kserve: most replicas (default: KServe's)")] = None,
    scale_metric: Annotated[str | None, typer.Option(help="kserve: concurrency | rps | cpu | memory "
                                                          "(default concurrency)")] = None,
    scale_target: Annotated[int | None, typer.Option(help="kserve: target per replica of --scale-metric")] = None,
    grpc: Annotated[bool | None, typer.Option("--grpc/--http", help="kserve: expose Triton's gRPC or HTTP port "
                                                                    "(default HTTP)")] = None,
    runtime_version: Annotated[str | None, typer.Option(help="kserve: Triton image tag, e.g. 24.08-py3")] = None,
) -> None:
    """Write a Triton model repository (config.pbtxt validated with Triton's schema, MANIFEST.json); with
    --format kserve, that repository plus a KServe InferenceService manifest for it."""
    with user_errors():
        from serving.triton import PackageConfig
        from serving.triton import package as run_package

        if format not in ("triton", "kserve"):
            raise InputError(f"unknown --format {format!r}; supported: triton, kserve")
        if out is None:
            raise InputError("--out REPO is required: the model repository folder to write")
        kserve_flags = dict(storage_uri=storage_uri, service_name=service_name, cpu=cpu, memory=memory, gpus=gpus,
                            min_replicas=min_replicas, max_replicas=max_replicas, scale_metric=scale_metric,
                            scale_target=scale_target, grpc=grpc, runtime_version=runtime_version)
        cfg = PackageConfig.model_validate(dict(  # --kind is checked by PackageConfig
            artifact_dir=artifact_dir, out=out, name=name, variants=csv_items(variants, "--variants") if variants else None,
            max_batch_size=max_batch_size, dynamic_batching=dynamic_batching, max_queue_delay_us=max_queue_delay_us,
            instances=instances, kind=kind, input_shape=input_shape, from_tune=from_tune))
        if format == "kserve":
            from serving.kserve import ISVC_FILE, REPO_DIR, options_from_flags, package_kserve

            repo, folder, _ = package_kserve(cfg, options_from_flags(kserve_flags), log=log)
            out_console.print(f"upload {folder / REPO_DIR} to {storage_uri}, then `kubectl apply -f "
                              f"{folder / ISVC_FILE}`; models: {', '.join(m.name for m in repo.models)}")
            return
        from serving.kserve import refuse_kserve_flags

        refuse_kserve_flags(kserve_flags)
        repo, folder = run_package(cfg, log=log)
        out_console.print(f"model repository: {folder} ({', '.join(m.name for m in repo.models)}); "
                          f"check it with `python cli.py verify {folder}`")


@app.command()
def verify(repo: Annotated[Path, typer.Argument(help="Model repository written by `package`")]) -> None:
    """Check every file of a model repository against MANIFEST.json (sha256, configs, engine targets)."""
    with user_errors():
        from serving.verify import verify_repo

        report = verify_repo(repo)
        for note in report.notes:
            log(f"[yellow]note:[/] {note}")
        out_console.print(f"ok: {report.files_checked} files match MANIFEST.json; models: {', '.join(report.models)}")


@app.command()
def serve(
    artifact_dir: Annotated[Path, typer.Argument(help="Folder with manifest.json (from `convert`)")],
    variant: Annotated[str | None, typer.Option(help="ONNX artifact to serve (default: opt)")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port")] = 8000,
    grpc_port: Annotated[int | None, typer.Option(min=0, max=65535, help="Also serve the KServe v2 / Triton gRPC "
                                                                         "protocol on this port")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Micro-batching: most rows run together (1: off)")] = 8,
    max_delay_ms: Annotated[float, typer.Option(min=0, max=1000, help="Micro-batching: longest wait for a "
                                                                      "batch to fill (ms)")] = 2.0,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads")] = None,
    ort_spinning: Annotated[bool, typer.Option("--ort-spinning/--no-ort-spinning",
                                               help="ONNX Runtime threads spin while idle (off: less CPU when "
                                                    "other processes share the cores)")] = True,
    max_body_mb: Annotated[float | None, typer.Option(
        min=0.001, help="Largest request body (MiB); default: a JSON request of --max-batch rows of the model's "
                        "inputs (64 MiB when an input dim has no upper bound)")] = None,
    input_shape: Annotated[str | None, typer.Option(
        help="Shapes of the start-up warm-up run, e.g. input_ids:8x128,attention_mask:8x128 (default: the ones "
             "convert bound, batch 1); requests may use any shape the model accepts, up to --max-batch rows")] = None,
    read_timeout_s: Annotated[float, typer.Option(help="Seconds an HTTP request's headers and body may take to "
                                                       "arrive in full (slower: 408, connection closed)")] = 30.0,
    keep_alive_s: Annotated[float, typer.Option(help="Seconds an idle HTTP connection stays open")] = 30.0,
    max_connections: Annotated[int, typer.Option(help="Most HTTP connections open at once (more: 503)")] = 1024,
) -> None:
    """Serve one variant over the KServe v2 / Triton HTTP (and gRPC) protocol, with /metrics and micro-batching."""
    with user_errors():
        from serving.served import ServeConfig
        from serving.server import serve as run_serve

        run_serve(ServeConfig(artifact_dir=artifact_dir, variant=variant, host=host, port=port, grpc_port=grpc_port,
                              max_batch=max_batch,
                              max_delay_ms=max_delay_ms, threads=threads, max_body_mb=max_body_mb,
                              ort_spinning=ort_spinning, input_shape=input_shape, read_timeout_s=read_timeout_s,
                              keep_alive_s=keep_alive_s, max_connections=max_connections), log=log)


@app.command()
def loadtest(
    url: Annotated[str, typer.Argument(help="http://host:port\\[/v2/models/NAME]")],
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="Concurrent clients")] = 8,
    duration: Annotated[float, typer.Option(min=0.1, max=3600, help="Timed seconds")] = 30.0,
    warmup: Annotated[float, typer.Option(min=0, max=600, help="Untimed seconds first")] = 1.0,
    batch: Annotated[int, typer.Option(min=1, help="Rows per request")] = 1,
    model: Annotated[str | None, typer.Option(help="Model name when the URL does not give it")] = None,
    max_requests: Annotated[int | None, typer.Option(min=1, help="Stop after this many requests")] = None,
    json_tensors: Annotated[bool, typer.Option("--json-tensors", help="Send JSON tensors, not binary")] = False,
    input_shape: Annotated[str | None, typer.Option(
        help="Values of the inputs' dynamic dims, e.g. input_ids:1x16,attention_mask:1x16 (default: the "
             "--reference artifact's)")] = None,
    reference: Annotated[Path | None, typer.Option(help="Artifact folder: check every response against ONNX "
                                                        "Runtime run here on the served variant")] = None,
    out: Annotated[Path | None, typer.Option(help="results.json to write (+ .csv, .md)")] = None,
) -> None:
    """Load-test a KServe v2 endpoint: p50/p90/p99 latency, throughput, errors, response checks."""
    with user_errors():
        from core.errors import ValidationError
        from core.manifest import artifact_files
        from reports.writers import check_results_path, rich_table, write_results
        from serving.loadtest import LoadTestConfig, run_loadtest

        cfg = LoadTestConfig(url=url, model=model, concurrency=concurrency, duration_s=duration, warmup_s=warmup,
                             batch=batch, max_requests=max_requests, binary=not json_tensors, reference=reference,
                             input_shape=input_shape)
        if out is not None:
            check_results_path(out, inputs=artifact_files(reference) if reference is not None else ())
        results = run_loadtest(cfg, log=log)
        if results.records:
            out_console.print(rich_table(results))
        if out is not None:
            out_console.print(f"report: {write_results(results, out)['json']}")
        if results.warnings:
            raise ValidationError("load test", results.warnings)


@app.command()
def tune(
    artifact_dir: Annotated[Path, typer.Argument(help="Folder with manifest.json (from `convert`)")],
    backends: Annotated[str, typer.Option(help="Backends to search (unavailable ones are skipped)")] = "ort,openvino",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes (latency: the smallest one)")] = "1,8",
    variants: Annotated[str | None, typer.Option(help="Comma-separated artifact names to search (default: all ok)")] = None,
    objective: Annotated[str, typer.Option(help="latency | throughput")] = "latency",
    accuracy_budget: Annotated[float, typer.Option(min=0.0, help="Largest top-1 drop against FP32, in points (a "
                                                                 "decoder with a KV cache: points of greedy token "
                                                                 "agreement lost)")] = 1.0,
    max_minutes: Annotated[float, typer.Option(min=0.1, help="No new search stage after this long")] = 10.0,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="tune.json path (default ARTIFACT_DIR/tune.json)")] = None,
) -> None:
    """Find the fastest backend x variant x settings (x batch) on this machine within an accuracy budget."""
    with user_errors():
        from core.fsutil import atomic_write_text, check_not_an_input
        from core.manifest import artifact_files
        from runtimes.tune import TuneConfig, run_tune, tune_table

        cfg = TuneConfig.model_validate({  # the flags' rules are TuneConfig's
            "artifact_dir": artifact_dir, "backends": backends, "batch_sizes": batch_sizes, "objective": objective,
            "variants": variants, "accuracy_budget": accuracy_budget, "max_minutes": max_minutes, "data": data})
        path = out or artifact_dir / "tune.json"
        check_not_an_input(path, "--out", [*artifact_files(artifact_dir), *([data] if data else [])])
        result = run_tune(cfg, log=log)
        atomic_write_text(path, result.model_dump_json(indent=2) + "\n")
        out_console.print(tune_table(result))
        from rich.markup import escape

        for batch, label in result.best_per_batch.items():
            out_console.print(escape(f"fastest at batch {batch}: {label}"))
        out_console.print(escape(f"winner: {result.winner} ({result.reason}); every candidate in {path}"))


@app.command()
def sweep(
    plan: Annotated[Path, typer.Argument(help="Plan YAML: models, conversions, variants, backends, batch sizes, "
                                              "devices, threads (see examples/sweep.yaml)")],
    ray: Annotated[str | None, typer.Option(help="Run each cell as a Ray task: local (start Ray here), auto (join "
                                                 "the running cluster) or an address; needs `pip install .\\[ray]`")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the cells and results (default artifacts/sweep-PLAN)")] = None,
    skip_failed: Annotated[bool, typer.Option("--skip-failed", help="A re-run keeps failed cells as recorded "
                                                                    "(default: runs them again)")] = False,
) -> None:
    """Convert and benchmark every cell of PLAN; a re-run skips finished cells. Exit 1 when a cell failed."""
    with user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from sweep.plan import load_plan
        from sweep.run import SweepConfig, run_sweep

        cfg = SweepConfig(plan=load_plan(plan), out=out or Path("artifacts") / f"sweep-{plan.stem}", ray=ray,
                          skip_failed=skip_failed)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("sweep", total=None)
            outcome = run_sweep(cfg, log=log, progress=lambda done, total, desc: bar.update(
                task, completed=done, total=total, description=escape(desc)))
        s = outcome.results.summary
        for line in outcome.results.failures():
            log(f"[yellow]failed:[/] {escape(line)}")
        out_console.print(f"{s['cells']} cells: {s['done']} done, {s['failed']} failed, {s['skipped']} skipped "
                          f"({s['reused']} reused) in {outcome.results.wall_s:.1f} s")
        out_console.print(f"results: {outcome.paths['json']} (+ {outcome.paths['md'].name})")
        if s["failed"] or s["skipped"]:
            raise ToolkitError(f"{s['failed']} cell(s) failed and {s['skipped']} skipped (their convert cell failed): "
                               f"see {outcome.paths['md']}; a re-run retries them and skips the done ones")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
