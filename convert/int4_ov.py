"""OpenVINO's own INT4 weight compression (``--int4-ov``): NNCF's ``compress_weights`` on the FP32 decoder, written as
an OpenVINO IR (``model.int4_ov.xml`` + ``.bin``) that only the ``openvino`` backend runs.

The FP32 reference ONNX file is read by OpenVINO (``ov.Core.read_model``) and NNCF compresses, in the ``ov.Model``,
the weight of every MatMul/Gemm to 4-bit groups of ``Int4Config.block_size`` values along K (``INT4_ASYM`` with a
zero point per group, or ``INT4_SYM`` with ``--int4-symmetric``), one FP16 scale per group; ``ratio`` is the share
of those layers in INT4 (the rest INT8, NNCF's backup mode). As NNCF does by default, the embedding table and the
last layer (the LM head) stay INT8 per channel (``all_layers=False``), and nothing is calibrated: NNCF's data-aware
refinements (AWQ, scale estimation, GPTQ) need text the seeded random prompts are not, so they are not offered.
The weights are kept as ``u4``/``i4`` (or ``u8``) constants with a decompression subgraph that OpenVINO's CPU plugin
fuses into its weight-compressed MatMul kernels; other FP32 constants stay FP32 (``compress_to_fp16=False``).

NNCF can also compress an ONNX model for ONNX Runtime (its ONNX backend writes ``MatMulNBits``), but that is what
``--int4`` already does with ONNX Runtime's own quantizer; this variant is OpenVINO's path, as OpenVINO deploys it.

The artifact is kind ``openvino_ir``: its ``.bin`` is recorded (hashed) as the file's data file. Only
``runtimes.openvino.OpenVinoRunner`` lists that kind; every other backend asked for it skips it with the reason. It is
gated by greedy decoding against the FP32 ONNX model on OpenVINO (:mod:`convert.genvalidate`), so it is made only for
a decoder exported with its KV cache (one file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from convert.config import Int4Config, QuantConfig
from convert.context import ConvertContext
from convert.ovir import KIND, constant_types, nncf_problem, quiet, record_ir, versions
from convert.quantize import QuantState
from core.errors import InputError, ToolkitError, first_line
from core.records import ArtifactMetrics, VariantParams

#: what the manifest names as the compressor
COMPRESSOR = "nncf.compress_weights"
NAME = "int4_ov"


class Int4OvError(ToolkitError):
    """NNCF or OpenVINO failed on this model."""


class Int4OvParams(VariantParams):
    """What ``--int4-ov`` did (``Artifact.params`` of ``int4_ov``)."""

    model_config = ConfigDict(extra="forbid")

    step: Literal["compress_weights_ov"] = "compress_weights_ov"
    compressor: str = COMPRESSOR
    nncf_version: str
    openvino_version: str
    mode: str = Field(description="NNCF's CompressWeightsMode: int4_asym or int4_sym")
    group_size: int = Field(description="Weights per scale along K")
    ratio: float = Field(description="Share of the ratio-defining layers in INT4 (the rest INT8)")
    all_layers: bool = Field(default=False, description="False: embeddings and the last layer stay INT8 (NNCF's "
                                                        "default)")
    data_aware: str = Field(default="none: no AWQ, scale estimation or GPTQ (they need text, not seeded prompts)")
    weights_int4: int = Field(description="Weight constants in u4/i4 in the IR")
    weights_int8: int = Field(description="Weight constants in u8/i8 in the IR (embeddings, last layer, backup)")
    source_bytes: int = Field(description="The FP32 ONNX file it was made from")
    size_bytes: int = Field(description="The IR: .xml + .bin")
    size_ratio: float = Field(description="size_bytes / source_bytes (a tiny model's .xml, the graph, outweighs its "
                                          "weights)")
    fp32_bin_bytes: int = Field(description="The weights (.bin) of the same model as an FP32 IR, before compression")
    bin_bytes: int = Field(description="The weights (.bin) of this IR")
    weights_ratio: float = Field(description="bin_bytes / fp32_bin_bytes: the weights' own compression")


def check_int4_ov(cfg: QuantConfig) -> None:
    """Before the export: NNCF and OpenVINO are installed."""
    if (why := nncf_problem("--int4-ov")) is not None:
        raise InputError(why)
    if cfg.calib.data and not (cfg.int8_static or cfg.int8_dynamic or cfg.int4):
        raise InputError("--calib: --int4-ov uses no calibration data (NNCF's data-free compression): drop --calib")


def mode_name(opts: Int4Config) -> str:
    return "int4_sym" if opts.symmetric else "int4_asym"


def compress_file(src: Path, xml: Path, opts: Int4Config, fp32_xml: Path | None = None) -> dict[str, int]:
    """Write NNCF's INT4 compression of the ONNX file ``src`` as the IR ``xml`` (+ its ``.bin``), and the uncompressed
    FP32 IR as ``fp32_xml`` when given (what the weights' size is compared with); the IR's constant element types
    (:func:`constant_types`)."""
    import nncf
    import openvino as ov

    mode = nncf.CompressWeightsMode.INT4_SYM if opts.symmetric else nncf.CompressWeightsMode.INT4_ASYM
    try:
        model = ov.Core().read_model(str(src))
        if fp32_xml is not None:  # before: compress_weights changes the model in place
            ov.save_model(model, str(fp32_xml), compress_to_fp16=False)
        with quiet():
            # a weight whose K no group divides (gemma's rotary inv_freq MatMul, K = 1) stays as it is, not an error
            ignore = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.IGNORE)
            model = nncf.compress_weights(model, mode=mode, group_size=opts.block_size, ratio=opts.ratio,
                                          advanced_parameters=ignore)
        ov.save_model(model, str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise Int4OvError(f"NNCF INT4 compression ({mode_name(opts)}, group {opts.block_size}, ratio {opts.ratio:g}) "
                          f"of {src.name} failed: {first_line(exc, with_type=True)}") from exc
    return constant_types(xml)


def describe(opts: Int4Config) -> str:
    return (f"INT4 weight compression for OpenVINO (NNCF compress_weights, {mode_name(opts)}, group {opts.block_size}, "
            f"ratio {opts.ratio:g}; embeddings and LM head INT8)")


def step_int4_ov(ctx: ConvertContext, state: QuantState) -> None:
    """``int4_ov``: the FP32 reference compressed by :func:`compress_file` into the output folder, recorded as an
    OpenVINO IR; its gate is the generation gate, run on OpenVINO after the variant steps."""
    from runtimes.session import has_kv_cache

    if not has_kv_cache(ctx.spec):
        raise InputError("--int4-ov is gated by greedy decoding on OpenVINO: it needs a decoder exported with its KV "
                         "cache (--task text-generation-with-past); use --int4 for this model")
    opts = state.cfg.int4_options
    ctx.log(describe(opts))
    xml = ctx.path(f"model.{NAME}.xml")
    fp32_xml = state.work / "int4_ov_fp32.xml"
    types = compress_file(state.reference_file, xml, opts, fp32_xml)
    bin_path = xml.with_suffix(".bin")
    fp32_bin, bin_bytes = fp32_xml.with_suffix(".bin").stat().st_size, bin_path.stat().st_size
    int4, int8 = types.get("u4", 0) + types.get("i4", 0), types.get("u8", 0) + types.get("i8", 0)
    if int4 == 0:
        raise Int4OvError(f"NNCF left no weight of {state.reference_file.name} in 4 bits (constants: {types})")
    source = state.reference_file.stat().st_size
    size = xml.stat().st_size + bin_path.stat().st_size
    nncf_v, ov_v = versions()
    params = Int4OvParams(nncf_version=nncf_v, openvino_version=ov_v, mode=mode_name(opts), group_size=opts.block_size,
                          ratio=opts.ratio, weights_int4=int4, weights_int8=int8, source_bytes=source,
                          size_bytes=size, size_ratio=round(size / source, 4), fp32_bin_bytes=fp32_bin,
                          bin_bytes=bin_bytes, weights_ratio=round(bin_bytes / fp32_bin, 4))
    notes = [f"OpenVINO IR ({KIND}): runs on the openvino backend only; {int4} weight constants in 4 bits, {int8} in "
             f"8 bits (embeddings, LM head); weights (.bin) {100 * params.weights_ratio:.1f}% of the FP32 IR's, IR "
             f"(.xml + .bin) {100 * params.size_ratio:.1f}% of {state.reference}'s ONNX file"]
    record_ir(ctx, xml, name=NAME, precision="int4", parent=state.reference, params=params,
              metrics=ArtifactMetrics(), notes=notes)
    ctx.log(f"{NAME}: {notes[0]}")
