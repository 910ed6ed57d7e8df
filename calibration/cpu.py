"""What this CPU can do for INT8 and FP16, and what that means for ONNX Runtime's quantized models.

ONNX Runtime documents (``quantize_static``'s docstring, "Choosing parameters for CPU inference") that
on x86-64 without VNNI the U8S8 integer kernels can saturate their 16-bit intermediates, so weights
should be quantized with ``reduce_range`` (7 bits). Without an int8 dot-product instruction (VNNI or
AMX on x86, the dot-product extension on ARM) INT8 kernels do not beat FP32 kernels by much, and often
lose (dynamic INT8 always does): the tool says so before the user finds out from a benchmark.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_ARM = {"aarch64", "arm64", "armv8l", "armv8", "arm"}


class CpuFeatures(BaseModel):
    """The instruction-set facts that decide how INT8/FP16 should be built and how fast they run."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="platform.machine()")
    model: str = Field(default="", description="CPU model name, when the OS tells it")
    avx2: bool = False
    avx512: bool = Field(default=False, description="AVX-512 Foundation")
    vnni: bool = Field(default=False, description="AVX512-VNNI or AVX-VNNI: int8 dot products")
    amx: bool = Field(default=False, description="AMX tiles with INT8 support")
    fp16_arith: bool = Field(default=False, description="Native FP16 arithmetic (AVX512-FP16, AMX-FP16, ARM fphp)")
    arm_dotprod: bool = Field(default=False, description="ARM SDOT/UDOT (asimddp)")
    fma: bool = Field(default=False, description="FMA3 fused multiply-add")
    avx512_vnni: bool = Field(default=False, description="AVX512-VNNI (one of the two kinds of vnni)")
    avx_vnni: bool = Field(default=False, description="AVX-VNNI, the 256-bit kind (Alder Lake, Zen 5 ...)")
    avx512_bf16: bool = Field(default=False, description="AVX512_BF16 bfloat16 dot products")
    amx_bf16: bool = Field(default=False, description="AMX tiles with BF16 support")
    avx512_fp16: bool = Field(default=False, description="AVX512-FP16 arithmetic")
    arm_i8mm: bool = Field(default=False, description="ARM int8 matrix multiply (i8mm)")
    arm_bf16: bool = Field(default=False, description="ARM BF16 instructions")
    source: str = Field(default="", description="Where the flags were read from")
    summary: str = ""
    isa: str = Field(default="", description="The ISA a reader needs to judge the timings, e.g. 'AVX2, FMA; no "
                                             "AVX-512, no VNNI' (see isa_text)")

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in _X86

    def isa_text(self) -> str:
        """What the CPU has for FP32/INT8/BF16/FP16 math and, on x86, the lacks that decide INT8's speed:
        e.g. "AVX2, FMA; no AVX-512, no VNNI" or "AVX2, FMA, AVX-512F, AVX512_VNNI, AVX512_BF16, AMX-BF16,
        AMX-INT8, AVX512-FP16". Works on the flags of older results files too (a plain "VNNI"/"AMX" there)."""
        vnni = [n for n, on in (("AVX512_VNNI", self.avx512_vnni), ("AVX_VNNI", self.avx_vnni)) if on] \
            or (["VNNI"] if self.vnni else [])
        amx = [n for n, on in (("AMX-BF16", self.amx_bf16), ("AMX-INT8", self.amx)) if on]
        fp16 = ["AVX512-FP16"] if self.avx512_fp16 else (["FP16 arithmetic"] if self.fp16_arith else [])
        if self.is_x86:
            have = [n for n, on in (("AVX2", self.avx2), ("FMA", self.fma), ("AVX-512F", self.avx512)) if on]
            have += vnni + (["AVX512_BF16"] if self.avx512_bf16 else []) + amx + fp16
            lacks = [n for n, on in (("AVX-512", self.avx512), ("VNNI", self.vnni)) if not on]
            if self.avx512 and not self.amx:  # AMX comes only with AVX-512: naming its lack elsewhere is noise
                lacks.append("AMX")
        else:
            have = [n for n, on in (("dot-product (SDOT/UDOT)", self.arm_dotprod), ("I8MM", self.arm_i8mm),
                                    ("BF16", self.arm_bf16)) if on] + fp16
            lacks = [] if self.arm_dotprod or self.arch.lower() not in _ARM else ["dot-product"]
        text = ", ".join(have) or "no wide SIMD flags found"
        return text + ("; " + ", ".join(f"no {n}" for n in lacks) if lacks else "")

    @property
    def int8_dot_product(self) -> bool:
        """An instruction that multiplies-and-accumulates int8 without 16-bit saturation."""
        return self.vnni or self.amx or self.arm_dotprod

    @property
    def needs_reduce_range(self) -> bool:
        """ONNX Runtime's guidance: U8S8 on x86-64 without VNNI -> quantize weights to 7 bits."""
        return self.is_x86 and not (self.vnni or self.amx)

    def int8_advice(self, dynamic: bool) -> str | None:
        """A warning when this CPU has no int8 dot-product instruction (INT8 gains little or loses), else None."""
        if self.int8_dot_product:
            return None
        missing = "AVX-VNNI/AVX512-VNNI or AMX" if self.is_x86 else "an int8 dot-product extension"
        have = "AVX2" if self.avx2 else ("AVX-512" if self.avx512 else "no wide SIMD")
        expect = ("dynamic INT8 is expected to be several times slower than FP32 here (it quantizes activations "
                  "at run time and runs ConvInteger/MatMulInteger kernels that have no fast path on this CPU)"
                  if dynamic else
                  "static INT8's speed-up over FP32 is limited here, depends on the model and may be none (its "
                  "u8s8 kernels multiply through 16-bit intermediates; reduce_range keeps them from saturating)")
        return (f"this CPU ({self.model or self.arch}: {have}, no {missing}) has no int8 dot-product instruction, "
                f"so {expect}; the sure gain on this CPU is a ~4x smaller file. Measure with `bench` before deploying")

    def fp16_advice(self) -> str | None:
        if self.fp16_arith:
            return None
        return (f"this CPU ({self.model or self.arch}) has no native FP16 arithmetic: ONNX Runtime casts FP16 "
                "to FP32 around most kernels, so expect FP16 to be slower than FP32 on CPU; FP16 is for GPUs "
                "(TensorRT, CUDA) and for a 2x smaller file")


def _linux_flags() -> tuple[set[str], str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set(), ""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        if flags and model:
            break
    return flags, model


def _cpu_model_elsewhere() -> str:
    """The CPU's marketing name where /proc/cpuinfo has none: lscpu (Linux on ARM), sysctl (macOS), the registry
    (Windows); '' when none answers."""
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip()
        if sys.platform == "win32":
            import winreg

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE,
                                r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
                return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")), "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _numpy_flags() -> set[str]:
    """NumPy's own runtime CPU dispatch table (works on every OS), as lower-case cpuinfo-style names."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats  # type: ignore[no-redef]
        except ImportError:
            return set()
    names = {"AVX2": "avx2", "FMA3": "fma", "AVX512F": "avx512f", "AVX512_CLX": "avx512_vnni",
             "AVX512_CPX": "avx512_bf16", "AVX512_SPR": "avx512_fp16", "ASIMDDP": "asimddp", "ASIMDHP": "fphp"}
    return {names[k] for k, v in feats.items() if v and k in names}


@functools.cache
def cpu_features() -> CpuFeatures:
    """Detect the CPU's INT8/FP16-relevant features (Linux /proc/cpuinfo, else NumPy's dispatch table)."""
    arch = platform.machine() or "unknown"
    flags, model = _linux_flags()
    source = "/proc/cpuinfo" if flags else "numpy cpu dispatch"
    if not flags:
        flags = _numpy_flags()
    return features_from_flags(arch, model or _cpu_model_elsewhere() or platform.processor(), flags, source)


def features_from_flags(arch: str, model: str, flags: set[str], source: str = "") -> CpuFeatures:
    """The features named by a set of lower-case cpuinfo flags (x86 'flags' or ARM 'Features')."""
    feats = CpuFeatures(
        arch=arch, model=model,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"} & flags),
        amx=bool({"amx_int8"} & flags),
        fp16_arith=bool({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"} & flags),
        arm_dotprod=bool({"asimddp", "dotprod"} & flags),
        fma="fma" in flags,
        avx512_vnni=bool({"avx512_vnni", "avx512vnni"} & flags),
        avx_vnni=bool({"avx_vnni", "avxvnni"} & flags),
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        avx512_fp16="avx512_fp16" in flags,
        arm_i8mm="i8mm" in flags,
        arm_bf16="bf16" in flags and arch.lower() in _ARM,
        source=source,
    )
    feats.isa = feats.isa_text()
    # BF16: what decides whether bf16 rows run natively (AVX512_BF16 on an AMD EPYC without AMX included)
    bf16 = feats.avx512_bf16 or feats.amx_bf16 or feats.arm_bf16
    have = [n for n, on in (("AVX2", feats.avx2), ("AVX-512", feats.avx512), ("VNNI", feats.vnni), ("BF16", bf16),
                            ("AMX", feats.amx), ("FP16", feats.fp16_arith), ("dotprod", feats.arm_dotprod)) if on]
    lacks = [n for n, on in (("VNNI", feats.vnni), ("AMX", feats.amx)) if not on] if feats.is_x86 else []
    feats.summary = (f"{arch}{' ' + model if model else ''}: {', '.join(have) or 'no wide SIMD flags found'}"
                     + (f"; no {'/'.join(lacks)}" if lacks else "")
                     + (" -> INT8 reduce_range on" if feats.needs_reduce_range else ""))
    return feats


def describe_cpu(machine: Mapping[str, Any]) -> str:
    """The CPU of a results file's ``machine`` record, as a reader needs it to judge the timings: e.g.
    "AMD EPYC 7B13 (AVX2, FMA; no AVX-512, no VNNI), 2 cores". Older files have no ``cpu_model``/``cpu_isa``:
    the model and ISA then come from their ``cpu_flags`` (or ``processor``), and what is not recorded is left out."""
    flags = machine.get("cpu_flags")
    feats: CpuFeatures | None = None
    if isinstance(flags, Mapping):
        try:
            feats = CpuFeatures.model_validate({k: v for k, v in flags.items() if k in CpuFeatures.model_fields})
        except ValueError:  # a hand-edited or foreign record: say what the other fields say
            feats = None
    model = str(machine.get("cpu_model") or (feats.model if feats else "") or machine.get("processor")
                or "unknown CPU")
    isa = str(machine.get("cpu_isa") or (feats.isa or feats.isa_text() if feats else ""))
    cores = machine.get("cpu_count")
    return f"{model}" + (f" ({isa})" if isa else "") + (f", {cores} cores" if cores else "")


# -- the reduced float precisions a CPU computes natively (issue 32) ---------------------------------------------
#: The reduced float precisions a CPU may compute natively -> the units that do it (named in one-line refusals).
REDUCED_PRECISIONS: dict[str, str] = {"bf16": "AVX512_BF16 or AMX-BF16 (x86), BF16 (ARM)",
                                      "fp16": "AVX512-FP16 or AMX-FP16 (x86), FP16 arithmetic (ARM)"}
#: Overrides the probe (tests simulate a CPU with and without the units): a comma list of the reduced precisions to
#: treat as native ("bf16", "bf16,fp16"), or "none". Unset: what the CPU's flags say.
PRECISION_ENV = "ONNXKIT_CPU_PRECISIONS"


def native_precisions(feats: CpuFeatures | None = None, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """fp32 and the reduced precisions (REDUCED_PRECISIONS) this CPU computes natively: bf16 with AVX512_BF16 or
    AMX-BF16 (or ARM BF16), fp16 with AVX512-FP16 or AMX-FP16 (or ARM FP16 arithmetic). Without those units PyTorch
    emulates them (slower than FP32) and OpenVINO falls back to f32: a timing labelled bf16 there would be a fake.
    ``env`` (default: os.environ) holds PRECISION_ENV, the override; ``feats``: default this CPU's."""
    import os

    given = (os.environ if env is None else env).get(PRECISION_ENV)
    if given is not None:
        names = [p.strip().lower() for p in given.split(",") if p.strip()]
        if names in ([], ["none"]):
            return ("fp32",)
        if unknown := [p for p in names if p not in REDUCED_PRECISIONS]:
            raise InputError(f"{PRECISION_ENV}={given!r}: unknown precision(s) {unknown}; give a comma list of "
                             f"{', '.join(REDUCED_PRECISIONS)}, or none")
        return ("fp32", *(p for p in REDUCED_PRECISIONS if p in names))
    f = feats or cpu_features()
    have = {"bf16": f.avx512_bf16 or f.amx_bf16 or f.arm_bf16, "fp16": f.fp16_arith}
    return ("fp32", *(p for p in REDUCED_PRECISIONS if have[p]))


def precision_problem(precision: str, feats: CpuFeatures | None = None,
                      env: Mapping[str, str] | None = None) -> str | None:
    """None when this CPU computes ``precision`` natively (see native_precisions; a precision that is no reduced float
    one, fp32 or int8, is not this probe's question: None), else one line saying which units it lacks."""
    if precision not in REDUCED_PRECISIONS or precision in native_precisions(feats, env):
        return None
    f = feats or cpu_features()
    return (f"this CPU ({f.model or f.arch}: {f.isa or f.isa_text()}) has no {precision} units "
            f"({REDUCED_PRECISIONS[precision]})")
