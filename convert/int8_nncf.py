"""OpenVINO's own post-training INT8 (``--int8-nncf``): NNCF's ``nncf.quantize`` on the ``ov.Model`` OpenVINO reads
from the FP32 reference ONNX file, calibrated on the same data as static INT8 (``--calib``'s calibration part, never
a held-out sample), written as an OpenVINO IR (``model.int8_nncf.xml`` + ``.bin``) that only the ``openvino`` backend
runs.

NNCF inserts ``FakeQuantize`` nodes where OpenVINO's CPU plugin has INT8 kernels (its ``CPU`` target device, the
``performance`` preset: symmetric INT8 weights per output channel, activations u8/i8 per tensor) and applies its
fast bias correction; the weights are stored as ``i8`` constants with their scales, other constants stay FP32
(``compress_to_fp16=False``). At compile time the plugin fuses each FakeQuantize pair into its INT8 kernels.

A transformer is quantized with NNCF's ``model_type=TRANSFORMER`` (Optimum Intel's default): its
transformer patterns keep the operations INT8 loses most on (the attention's Softmax and the layer norms and
residual additions around it) in floating point, and SmoothQuant moves activation outliers into the weights first.
``--nncf-model-type auto`` (the default) chooses it when the graph has attention, a Softmax and a MatMul or Einsum
of two activations (neither side a weight, :mod:`convert.attention`); ``transformer`` or ``generic`` choose it by hand.
Why it matters: torchvision's vit_b_16 (random init, seeded head) quantized as a generic model kept an output cosine of
0.927 against FP32 on the held-out photos, outside the 1-point gate; as a transformer 0.997, and tune's pick at
2.7-3.0x FP32 on OpenVINO (``benchmarks/results/deploy_cpu_amd_epyc.md``, 2-core AMD EPYC).

Why an IR and not NNCF's ONNX backend (``nncf.quantize`` on an ``onnx.ModelProto``, which writes a Q/DQ ONNX file):
both give the same runtime graph on OpenVINO (the same counts of u8/i8/f32 layers after compiling resnet18 and
densenet121, and the same latency within the noise on the 2-core AMD EPYC; ``benchmarks/run_nncf_int8.py`` measures
both), but the IR is OpenVINO's own deployment path: its quantization is made on the graph OpenVINO runs (no ONNX
Q/DQ round trip through the ONNX frontend), and on densenet121 the ONNX frontend took 3x longer to compile the Q/DQ
file. A Q/DQ ONNX that ONNX Runtime runs is what ``--int8`` already writes.

The artifact is kind ``openvino_ir`` (as ``--int4-ov``'s, :mod:`convert.int4_ov`): its ``.bin`` is recorded (hashed)
as the file's data file, and only ``runtimes.openvino.OpenVinoRunner`` lists that kind. It is graded like every INT8
variant: its outputs on OpenVINO (f32 compute for what is not quantized) against the FP32 reference on the held-out
data, with the gate of ``--max-accuracy-drop`` / ``--min-cosine`` (:func:`convert.gates.gate_verdict`); a variant
over budget is recorded failed and ``convert`` exits 5.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import ConfigDict, Field

from convert.attention import ov_attention
from convert.config import NncfModelType, QuantConfig
from convert.context import ConvertContext
from convert.gates import gate_verdict, summary_line
from convert.ovir import KIND, constant_types, nncf_problem, quiet, record_ir, versions
from convert.quantize import QuantState
from core.errors import InputError, ToolkitError, first_line
from core.records import ArtifactMetrics, VariantParams

if TYPE_CHECKING:
    import openvino as ov

NAME = "int8_nncf"
QUANTIZER = "nncf.quantize"
#: NNCF's settings, as recorded
PRESET = "performance"
TARGET_DEVICE = "CPU"
#: the model types NNCF is given (``--nncf-model-type auto`` resolves to one of them)
ModelType = Literal["transformer", "generic"]


class Int8NncfError(ToolkitError):
    """NNCF or OpenVINO failed on this model."""


class Int8NncfParams(VariantParams):
    """What ``--int8-nncf`` did (``Artifact.params`` of ``int8_nncf``)."""

    model_config = ConfigDict(extra="forbid")

    step: Literal["quantize_nncf"] = "quantize_nncf"
    quantizer: str = QUANTIZER
    nncf_version: str
    openvino_version: str
    form: str = Field(default="OpenVINO IR (nncf.quantize on the ov.Model read from the FP32 ONNX file)")
    preset: str = PRESET
    target_device: str = TARGET_DEVICE
    fast_bias_correction: bool = True
    model_type: ModelType = Field(
        default="generic", description="NNCF's model_type: transformer (its transformer patterns and SmoothQuant) or "
                                       "generic (None)")
    model_type_reason: str = Field(default="", description="Why: --nncf-model-type, or what auto found in the graph")
    calibration: str = Field(description="The calibration data (the same part static INT8 calibrates on)")
    calibration_samples: int
    fake_quantize: int = Field(description="FakeQuantize nodes in the IR")
    weights_int8: int = Field(description="Weight constants in i8/u8 in the IR")
    evaluated_on: str = "OpenVINO CPU, f32 compute where not quantized"
    cpu: str


def check_int8_nncf(cfg: QuantConfig) -> None:
    """Before the export: NNCF and OpenVINO are installed, and there is calibration data."""
    if (why := nncf_problem("--int8-nncf")) is not None:
        raise InputError(why)
    if not cfg.calib.data:
        raise InputError("--int8-nncf needs calibration data: --calib DIR|FILE.npz|imagenet_subset "
                         "(or --calib synthetic, explicitly)")


def calibration_feeds(state: QuantState, fixed_batch: int | None) -> list[dict[str, np.ndarray]]:
    """The calibration data static INT8 reads (``state.calib``), one sample per feed (the model's fixed batch when it
    has one), so that NNCF's ``subset_size`` counts samples."""
    if state.calib is None:
        raise InputError("--int8-nncf needs calibration data (--calib)")
    return [{k: np.ascontiguousarray(v) for k, v in b.items()} for b in state.calib.iter_batches(fixed_batch or 1)
            if fixed_batch is None or len(next(iter(b.values()))) == fixed_batch]


def choose_model_type(model: ov.Model, asked: NncfModelType) -> tuple[ModelType, str]:
    """NNCF's model type for ``model`` and why: ``asked`` unless it is ``auto``, else transformer where the graph
    has attention (:func:`convert.attention.ov_attention`)."""
    if asked == "transformer" or asked == "generic":
        return asked, f"--nncf-model-type {asked}"
    count = ov_attention(model)
    if count.found:
        return "transformer", f"auto: attention in the graph {count.describe()}"
    return "generic", f"auto: no attention in the graph {count.describe()}"


def quantize_file(src: Path, xml: Path, feeds: list[dict[str, np.ndarray]],
                  model_type: NncfModelType = "auto") -> tuple[dict[str, int], tuple[ModelType, str]]:
    """Write NNCF's INT8 quantization of the ONNX file ``src`` as the IR ``xml`` (+ its ``.bin``), calibrated on
    ``feeds``, as the model type ``model_type`` (:func:`choose_model_type`); the IR's op and constant counts
    (``FakeQuantize``, ``i8``, ...) and the model type used, with why."""
    import nncf
    import openvino as ov

    if not feeds:
        raise InputError("--int8-nncf: no calibration sample could be read")
    try:
        model = ov.Core().read_model(str(src))
        chosen = choose_model_type(model, model_type)
        kind = {"model_type": nncf.ModelType.TRANSFORMER} if chosen[0] == "transformer" else {}
        with quiet():
            quantized = nncf.quantize(model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.PERFORMANCE,
                                      target_device=nncf.TargetDevice.CPU, subset_size=len(feeds),
                                      fast_bias_correction=True, **kind)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    except ToolkitError:
        raise
    except Exception as exc:
        raise Int8NncfError(f"NNCF INT8 quantization of {src.name} failed: {first_line(exc, with_type=True)}") \
            from exc
    return ir_counts(xml), chosen


def ir_counts(xml: Path) -> dict[str, int]:
    """How many FakeQuantize nodes the IR holds (``FakeQuantize``) and its Constant element types (``i8``, ...)."""
    import openvino as ov

    fq = sum(1 for op in ov.Core().read_model(str(xml)).get_ops() if op.get_type_name() == "FakeQuantize")
    return {"FakeQuantize": fq, **constant_types(xml)}


class OpenVinoSession:
    """The IR compiled by OpenVINO for the CPU (f32 compute where not quantized, as bench runs an INT8 row), with
    the ``get_outputs`` / ``run`` of an ONNX Runtime session, so the held-out evaluator grades it like every variant."""

    class _Out:
        def __init__(self, name: str) -> None:
            self.name = name

    def __init__(self, xml: Path) -> None:
        import openvino as ov

        from core.flops import openvino_config

        self.compiled = ov.Core().compile_model(str(xml), "CPU", openvino_config("LATENCY", None, "fp32"))
        self.request = self.compiled.create_infer_request()
        self.names = [p.get_any_name() for p in self.compiled.outputs]

    def get_outputs(self) -> list[Any]:
        return [self._Out(n) for n in self.names]

    def run(self, _names: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.array(result[p]) for p in self.compiled.outputs]


def step_int8_nncf(ctx: ConvertContext, state: QuantState) -> None:
    """``int8_nncf``: the FP32 reference quantized by :func:`quantize_file` into the output folder, graded on
    OpenVINO against the FP32 reference on the held-out data, recorded as an OpenVINO IR."""
    if state.calib is None:
        raise InputError("--int8-nncf needs calibration data (--calib)")
    ctx.log(f"INT8 for OpenVINO (NNCF quantize on the ov.Model, {PRESET} preset, target {TARGET_DEVICE}, fast bias "
            f"correction; calibration: {state.calib.describe()})")
    feeds = calibration_feeds(state, ctx.spec.fixed_batch())
    xml = ctx.path(f"model.{NAME}.xml")
    counts, (model_type, why) = quantize_file(state.reference_file, xml, feeds, state.cfg.nncf_model_type)
    ctx.log(f"{NAME}: NNCF model type {model_type} ({why})")
    int8 = counts.get("i8", 0) + counts.get("u8", 0)
    if counts["FakeQuantize"] == 0:
        raise Int8NncfError(f"NNCF quantized nothing in {state.reference_file.name} (no FakeQuantize in the IR)")
    stats = state.evaluator.evaluate(xml, session=OpenVinoSession(xml))
    gate = gate_verdict(stats, state.cfg.gate, state.random_init)
    metrics = ArtifactMetrics(accuracy=stats, gate=gate, summary=summary_line(stats, gate),
                              held_out=state.evaluator.record())
    nncf_v, ov_v = versions()
    params = Int8NncfParams(nncf_version=nncf_v, openvino_version=ov_v, calibration=state.calib.describe(),
                            calibration_samples=sum(len(next(iter(f.values()))) for f in feeds),
                            model_type=model_type, model_type_reason=why,
                            fake_quantize=counts["FakeQuantize"], weights_int8=int8, cpu=state.cpu.summary)
    notes = [f"OpenVINO IR ({KIND}): runs on the openvino backend only; {counts['FakeQuantize']} FakeQuantize, "
             f"{int8} INT8 weight constants; NNCF model type {model_type}; graded on OpenVINO"]
    art = record_ir(ctx, xml, name=NAME, precision="int8", parent=state.reference, params=params, metrics=metrics,
                    notes=notes)
    if gate.passed is False:
        art.status = "failed"
    ctx.log(f"{NAME}: {metrics.summary}")
