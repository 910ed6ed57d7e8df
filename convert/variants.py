"""The variant steps, in one explicit table, as ``runtimes.RUNNERS`` is for backends.

Each row (:class:`Variant`) names what asks for the variant (its config section and field, and the convert flag
that sets it), its checks before the export, its step, the params record it writes and its precision. The pipeline
(its ``quant`` row, ``convert.pipeline.PIPELINE_VARIANTS``, runs :func:`run_quant`) and the checks before the export
(:func:`check_config`) iterate this table; the config
section's field that asks for a variant names its flag, which the "which variants" messages list
(``convert.config.variant_flags``). Adding a variant is its module, one row here (and, for a flag of its own, one
field of its section) and its tests.

A row's step runs after the FP32 model exists, over the :class:`convert.quantize.QuantState` its section shares
(held-out data and the FP32 reference, calibration), and makes its variant(s) through
:func:`convert.context.attempt_variant`, so that one that fails is recorded and the others are still made.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from calibration.loaders import count_samples
from calibration.sources import EVAL_ROLE
from convert.calibrate import open_quant_data
from convert.component_variants import (
    FP16_PER_COMPONENT,
    INT8_DYNAMIC_PER_COMPONENT,
    PerComponent,
    run_component_variants,
)
from convert.config import QuantConfig, join_flags
from convert.context import ConvertContext, attempt_variant
from convert.genvalidate import grade_new_variants
from convert.int4 import INT4_PER_COMPONENT, Int4Params, check_int4, step_int4
from convert.int4_ov import Int4OvParams, check_int4_ov, step_int4_ov
from convert.int8_nncf import Int8NncfParams, check_int8_nncf, step_int8_nncf
from convert.quantize import QuantState, setup_quant, step_fp16, step_int8_dynamic, step_int8_static
from core.errors import InputError
from core.manifest import Precision
from core.records import DynamicQuantParams, Fp16Params, Record, StaticQuantParams

#: A variant's step: makes its variant(s) from the state its section shares (each through attempt_variant).
VariantStep = Callable[[ConvertContext, QuantState], None]


@dataclass(frozen=True)
class Variant:
    """One row of the table: a variant step and everything that lists or checks it."""

    name: str  # the artifact it writes (or the prefix of several: int8_static_<method>)
    section: Literal["quant"]  # the ConvertConfig section it reads
    field: str | None  # the section's bool field that asks for it (None: named in QuantConfig.extra_variants)
    step: VariantStep
    params: type[Record]  # the record its artifacts carry (Artifact.params)
    precision: Precision
    checks: Callable[[QuantConfig], None] | None = None  # its own checks before the export (raise InputError)
    # how it is made file by file for a model exported as several files (None: refused for those models)
    per_component: PerComponent | None = None

    @property
    def flag(self) -> str | None:
        """The convert flag that asks for it: the one its section's field names (None: no field, no flag)."""
        extra = QuantConfig.model_fields[self.field].json_schema_extra if self.field is not None else None
        return str(extra["flag"]) if isinstance(extra, dict) and "flag" in extra else None

    def asked(self, cfg: QuantConfig) -> bool:
        return self.name in cfg.extra_variants or (self.field is not None and bool(getattr(cfg, self.field)))


def one_attempt(name: str, step: str, make: VariantStep) -> VariantStep:
    """A step that makes one optional variant ``name`` (derived from the FP32 reference)."""
    def run(ctx: ConvertContext, state: QuantState) -> None:
        attempt_variant(ctx, name, step, lambda: make(ctx, state), parent=state.reference)
    return run


#: Every variant step, in the order they run.
VARIANTS: dict[str, Variant] = {
    "fp16": Variant(name="fp16", section="quant", field="fp16",
                    step=one_attempt("fp16", "fp16", step_fp16), params=Fp16Params, precision="fp16",
                    per_component=FP16_PER_COMPONENT),
    "int8_dynamic": Variant(name="int8_dynamic", section="quant", field="int8_dynamic",
                            step=one_attempt("int8_dynamic", "quantize_dynamic", step_int8_dynamic),
                            params=DynamicQuantParams, precision="int8", per_component=INT8_DYNAMIC_PER_COMPONENT),
    "int8_static": Variant(name="int8_static", section="quant", field="int8_static",
                           step=step_int8_static,  # one attempt per calibration method inside (and int8_trt)
                           params=StaticQuantParams, precision="int8"),
    "int8_nncf": Variant(name="int8_nncf", section="quant", field="int8_nncf",  # an OpenVINO IR: openvino only
                         step=one_attempt("int8_nncf", "quantize_nncf", step_int8_nncf), params=Int8NncfParams,
                         precision="int8", checks=check_int8_nncf),
    "int4": Variant(name="int4", section="quant", field="int4", step=one_attempt("int4", "quantize_int4", step_int4),
                    params=Int4Params, precision="int4", checks=check_int4, per_component=INT4_PER_COMPONENT),
    "int4_ov": Variant(name="int4_ov", section="quant", field="int4_ov",  # an OpenVINO IR: the openvino backend only
                       step=one_attempt("int4_ov", "compress_weights_ov", step_int4_ov), params=Int4OvParams,
                       precision="int4", checks=check_int4_ov),
}


def asked_variants(cfg: QuantConfig) -> list[Variant]:
    """The rows ``cfg`` asks for, in the order they run."""
    return [v for v in VARIANTS.values() if v.asked(cfg)]


def check_variants(cfg: QuantConfig) -> None:
    """The table's own rules (the config's rules on the flags are ConvertConfig's validators): every name in
    ``extra_variants`` is a row, and each row asked for passes its checks."""
    if unknown := [n for n in cfg.extra_variants if n not in VARIANTS]:
        raise InputError(f"unknown variant step(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for v in asked_variants(cfg):
        if v.checks is not None:
            v.checks(cfg)


def per_component_flags() -> str:
    """"--fp16 and --int8-dynamic": the flags of the rows a model exported as several files gets, per component."""
    return join_flags([v.flag or v.name for v in VARIANTS.values() if v.per_component is not None], " and ")


def check_config(cfg: QuantConfig) -> None:
    """User errors that need no model: the flag rules, then that the data files exist and can be read."""
    check_variants(cfg)
    count_samples(cfg.calib.data)  # a missing folder/file or unreadable array fails now
    count_samples(cfg.gate.eval_data, EVAL_ROLE)


# -- the pipeline's steps ----------------------------------------------------------------------------
def check_quant_inputs(ctx: ConvertContext, cfg: QuantConfig) -> None:
    """Before the export: the flags, and for PyTorch models (whose IOSpec is known now) the data."""
    check_config(cfg)
    hf = ctx.loaded.hf  # several files: only the rows that say how to make them per component
    if hf is not None and not hf.single and (whole := [v for v in asked_variants(cfg) if v.per_component is None]):
        raise InputError(f"{whole[0].flag or whole[0].name}: {hf.task} exports as several files "
                         f"({', '.join(hf.components)}); a multi-file model gets {per_component_flags()} per "
                         "component, not this: drop it")
    if ctx.loaded.onnx_path is None:
        open_quant_data(cfg, ctx.spec, ctx.manifest.source.preprocessing)


def run_quant(ctx: ConvertContext, cfg: QuantConfig) -> None:
    """Every variant of the table ``cfg`` asks for, after the FP32 model exists. Intermediate files go to a work
    folder under the output folder, removed when the steps end, also when one of them fails."""
    if ctx.manifest.artifacts[ctx.best_fp32()].components:  # several files: each component on its own
        from core.models import is_random_init

        before = set(ctx.manifest.artifacts)
        run_component_variants(ctx, cfg, [(v.name, v.precision, v.per_component) for v in asked_variants(cfg)
                                          if v.per_component is not None])
        grade_new_variants(ctx, cfg.gate.generation, ctx.best_fp32(), before,  # encoder-decoders: decoded together
                           is_random_init(ctx.manifest.source))
        return
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=ctx.out) as work:
        state = setup_quant(ctx, cfg, Path(work))
        before = set(ctx.manifest.artifacts)
        for v in asked_variants(cfg):
            v.step(ctx, state)
        grade_new_variants(ctx, cfg.gate.generation, state.reference, before, state.random_init)  # KV-cache decoders
