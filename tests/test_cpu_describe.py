"""The report names the CPU by model and ISA (not the hostname), from new results files and old ones alike."""

from __future__ import annotations

from typing import Any

from calibration.cpu import cpu_features, describe_cpu, features_from_flags
from reports.html import _machine_text
from reports.models import BenchResults, machine_info
from reports.recommend import recommend
from reports.writers import to_markdown
from tests.reports_data import R18, load

#: Flags as /proc/cpuinfo prints them (abridged to the ones that matter plus a few that do not).
ZEN3 = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni vaes"
ICELAKE = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_vbmi2"
SAPPHIRE_RAPIDS = ICELAKE + " avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8 avx_vnni"
ALDER_LAKE = ZEN3 + " avx_vnni"
GRAVITON3 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16"


def _isa(flags: str, arch: str = "x86_64") -> str:
    return features_from_flags(arch, "", set(flags.split())).isa


def test_isa_text_names_what_decides_int8_and_bf16_speed() -> None:
    assert _isa(ZEN3) == "AVX2, FMA; no AVX-512, no VNNI"
    assert _isa(ICELAKE) == "AVX2, FMA, AVX-512F, AVX512_VNNI; no AMX"
    assert _isa(SAPPHIRE_RAPIDS) == ("AVX2, FMA, AVX-512F, AVX512_VNNI, AVX_VNNI, AVX512_BF16, AMX-BF16, AMX-INT8, "
                                     "AVX512-FP16")
    assert _isa(ALDER_LAKE) == "AVX2, FMA, AVX_VNNI; no AVX-512"
    assert _isa(GRAVITON3, "aarch64") == "dot-product (SDOT/UDOT), I8MM, BF16, FP16 arithmetic"
    assert _isa("fp asimd", "aarch64") == "no wide SIMD flags found; no dot-product"


def test_machine_info_records_the_cpu_model_and_isa() -> None:
    m = machine_info()
    here = cpu_features()
    assert m["cpu_isa"] == here.isa and m["cpu_isa"]
    assert m["cpu_model"] == (here.model or m["processor"]) and m["cpu_model"]
    assert describe_cpu(m) == f"{m['cpu_model']} ({here.isa}), {m['cpu_count']} cores"


def _results(machine: dict[str, Any]) -> BenchResults:
    data = load(R18)
    data["machine"] = machine
    return BenchResults.model_validate(data)


NEW = {"hostname": "vm", "processor": "x86_64", "cpu_count": 2, "ram_gb": 23.5, "cpu_model": "AMD EPYC 7B13",
       "cpu_isa": "AVX2, FMA; no AVX-512, no VNNI"}


def test_report_markdown_and_html_name_the_cpu_not_the_host() -> None:
    res = _results(NEW)
    want = "AMD EPYC 7B13 (AVX2, FMA; no AVX-512, no VNNI), 2 cores"
    (rec,) = recommend(res, 1.0)
    line = next(e for e in rec.evidence if e.startswith("Measured on"))
    assert line.startswith(f"Measured on {want} (host vm) with ")
    assert f"- machine: {want}, 23.5 GiB" in to_markdown(res)
    assert _machine_text(res).startswith(f"{want}, 23.5 GiB RAM (host vm)")


def test_old_results_files_fall_back_to_what_they_recorded() -> None:
    old = load(R18)["machine"]  # a real file from before cpu_model/cpu_isa: cpu_flags without fma
    assert "cpu_model" not in old and "cpu_isa" not in old
    assert describe_cpu(old) == "AMD EPYC (AVX2; no AVX-512, no VNNI), 2 cores"
    (rec,) = recommend(BenchResults.load(R18), 1.0)
    assert any(e.startswith("Measured on AMD EPYC (AVX2; no AVX-512, no VNNI), 2 cores (host vm)")
               for e in rec.evidence)
    older = {"hostname": "vm", "processor": "x86_64", "cpu_count": 2}  # no cpu_flags at all
    assert describe_cpu(older) == "x86_64, 2 cores"
    assert describe_cpu({}) == "unknown CPU"
    assert "- machine: x86_64, 2 cores" in to_markdown(_results(older))
    odd = {"cpu_flags": {"arch": "x86_64", "avx2": "maybe"}, "processor": "x86_64"}  # not a CpuFeatures record
    assert describe_cpu(odd) == "x86_64"


def test_the_summary_names_bf16_where_the_cpu_has_it_without_amx() -> None:
    """An AMD EPYC with AVX512_BF16 and no AMX (Zen 4) computes bf16 natively: its summary, which every results file
    records, says BF16; an AVX2-only one does not."""
    from calibration.cpu import features_from_flags

    zen4 = features_from_flags("x86_64", "AMD EPYC", set(ICELAKE.split()) | {"avx512_bf16"})
    assert "BF16" in zen4.summary.split(":", 1)[1] and "no AMX" in zen4.summary, zen4.summary
    avx2 = features_from_flags("x86_64", "AMD EPYC", {"avx2", "fma"})
    assert "BF16" not in avx2.summary, avx2.summary
