"""Generation coverage: decoder families the generation path was not built on (it was built on gpt2 and llama),
run through the toolkit's CLI as a user would, side by side with Optimum's own ORTModelForCausalLM.

    python benchmarks/run_gen_coverage.py [--only qwen2,phi3] [--timeout 900] [--keep DIR] [--name gen_coverage_cpu]

Per family (qwen2, mistral, phi, phi3, gemma, gemma2, stablelm, gpt_neox, opt, falcon, bloom, granite, olmo: every one
Optimum 0.1.0 exports as ``text-generation-with-past``, checked with its TasksManager) a tiny random-init model is
built here (hidden 64, 2 layers, vocabulary 256, 64 positions, seeded; ``initializer_range`` 0.5 so greedy tokens are
not near-ties: the smallest top-1 margin of eager's greedy steps is recorded) and saved with ``save_pretrained``; no
tokenizer is written (every backend is fed token ids). Then, each step a child process under the family's timeout:

1. ``cli.py convert hf:FOLDER --task text-generation-with-past --int4 --int4-ov`` (exit 5 is a verdict: INT4 of random
   weights fails its greedy gate, the files are written and the variant marked failed);
2. ``cli.py bench OUT --backends eager,ort,genai,openvino,ovgenai --variants <every ONNX/IR variant>`` (prompt 16,
   batch 1, one timed unit: this is a coverage run, not a timing run); its ``results.json`` gives each (backend,
   variant)'s greedy agreement with eager, KV-cache vs no-cache, and what it skipped with the reason;
3. the token child (this script, ``--tokens-child``): on bench's own check prompts (``runtimes.generation.
   seeded_prompts``, 4 x 16 tokens, 16 new) eager transformers' ``generate`` (greedy), Optimum's
   ``ORTModelForCausalLM.from_pretrained(dir).generate`` on the *same* FP32 ``model.onnx`` convert exported (linked
   beside the source's config.json), and each of our backends' greedy loop (``runtimes.decoding.greedy``), so a miss
   names the first position where tokens differ from eager.

A cell (family, backend, variant) is ``pass``, ``miss: <one line>`` or ``n/a`` (an OpenVINO IR on an ONNX-only
backend). FP32 variants (fp32, opt, fused) pass when their greedy tokens equal eager's and the KV-cache path equals
the no-cache path. INT4 variants of random weights do not keep eager's tokens (that is what 4 bits do to such a model,
not a fault): they pass when they run and their KV-cache path equals their no-cache path, their agreement reported.
A toolkit failure with a traceback or "internal error" instead of one clear line is marked INTERNAL.
Writes benchmarks/results/<name>.{json,md} (rewritten after every family; families not run are kept unless --fresh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, write
from benchmarks.run_coverage_hf import (
    GATE_EXIT,
    Arch,
    _cell,
    _is_internal,
    _reason,
    _run,
    _tail,
    build_folder,
    cpuinfo_model,
    git_state,
    versions,
)

# hidden 64, 2 layers, 4 heads (2 KV heads where the family has grouped-query attention), vocabulary 256, 64 positions;
# initializer_range 0.5: logits far apart, so a greedy token is not a near-tie that a kernel's rounding flips
_SIZE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "initializer_range": 0.5,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_GQA = {**_SIZE, "num_key_value_heads": 2}

FAMILIES: dict[str, Arch] = {
    "qwen2": Arch("decoder", "Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "mistral": Arch("decoder", "MistralConfig", "MistralForCausalLM", _GQA),
    "phi": Arch("decoder", "PhiConfig", "PhiForCausalLM", _SIZE),
    "phi3": Arch("decoder", "Phi3Config", "Phi3ForCausalLM", _GQA),
    "gemma": Arch("decoder", "GemmaConfig", "GemmaForCausalLM", {**_GQA, "head_dim": 16}),
    # untied head: with gemma2's extra norms the tied head gave back the input token at every step (one token per
    # prompt: a broken cache would repeat it too)
    "gemma2": Arch("decoder", "Gemma2Config", "Gemma2ForCausalLM", {**_GQA, "head_dim": 16,
                                                                    "query_pre_attn_scalar": 16,
                                                                    "tie_word_embeddings": False}),
    "stablelm": Arch("decoder", "StableLmConfig", "StableLmForCausalLM", _GQA),
    "gpt_neox": Arch("decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM", _SIZE),
    "opt": Arch("decoder", "OPTConfig", "OPTForCausalLM",
                {**{k: v for k, v in _SIZE.items() if k not in ("intermediate_size", "initializer_range")},
                 "ffn_dim": 128, "word_embed_proj_dim": 64, "init_std": 0.5, "pad_token_id": 1, "bos_token_id": 2,
                 "eos_token_id": 2}),
    "falcon": Arch("decoder", "FalconConfig", "FalconForCausalLM",
                   {k: v for k, v in _SIZE.items() if k != "intermediate_size"}),
    "bloom": Arch("decoder", "BloomConfig", "BloomForCausalLM",
                  {"vocab_size": 256, "hidden_size": 64, "n_layer": 2, "n_head": 4, "initializer_range": 0.5,
                   "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
    "granite": Arch("decoder", "GraniteConfig", "GraniteForCausalLM", _GQA),
    "olmo": Arch("decoder", "OlmoConfig", "OlmoForCausalLM", _GQA),
}

BACKENDS = ["eager", "ort", "genai", "openvino", "ovgenai"]
#: bench's check prompts (runtimes.generation: ``seeded_prompts(manifest, check_prompts, prompt length, seed + 1)``)
PROMPTS, PROMPT_LEN, NEW_TOKENS, SEED = 4, 16, 16, 0
#: variants whose tokens must equal eager's (FP32 files); the others are INT4 of random weights
FP32_VARIANTS = ("fp32", "opt", "fused")


#: causes established by hand for misses this run found in the peer libraries (not the toolkit's code), appended to
#: the miss's line where the cell misses: (family or "*", backend, variant or "*") -> the diagnosis
_OPTIMUM_GQA = ("optimum-onnx 0.1.0's ORTModelForCausalLM reads num_key_value_heads only for the model types listed in "
                "modeling_decoder.py (llama, mistral, qwen2, gemma, granite, stablelm, ...): for this type it feeds an "
                "empty past of num_attention_heads (4) heads where the export has num_key_value_heads (2)")
_PA = ("openvino-genai 2026.4.1's default attention backend (PA: SDPAToPagedAttention rewrites the stateful model) "
       "gives other tokens from the first one on this file; the same pipeline with ATTENTION_BACKEND=SDPA gives "
       "eager's tokens (checked by hand)")
DIAGNOSED: dict[tuple[str, str, str], str] = {
    ("phi3", "optimum", "fp32"): _OPTIMUM_GQA, ("gemma2", "optimum", "fp32"): _OPTIMUM_GQA,
    ("olmo", "optimum", "fp32"): _OPTIMUM_GQA, ("gemma", "ovgenai", "*"): _PA,
}


def diagnosis(family: str, backend: str, variant: str) -> str | None:
    return next((v for (f, b, var), v in DIAGNOSED.items()
                 if f in (family, "*") and b == backend and var in (variant, "*")), None)


def log(msg: str) -> None:
    print(msg, flush=True)


def export_task_supported(model_type: str) -> str | None:
    """None when Optimum exports ``model_type`` as text-generation-with-past, else why not."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers Optimum's ONNX configs
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError as exc:
        return f"optimum: {str(exc).strip()[:200]}"
    return None if "text-generation-with-past" in tasks else f"optimum exports {model_type} only as {list(tasks)}"


# ---------------------------------------------------------------------------------------------- the token child


def _first_diff(a: Any, b: Any) -> int | None:
    """The first generated position (0-based, any prompt) where ``a`` and ``b`` differ; None when equal."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return 0
    cols = np.nonzero((a != b).any(axis=0))[0]
    return int(cols[0]) if cols.size else None


def tokens_child(art: str, folder: str, out: str, variants: str) -> None:
    """Eager ``generate``, Optimum's ORTModelForCausalLM ``generate`` on convert's FP32 file, and our backends' greedy
    loops, on bench's check prompts; their tokens and first differences from eager as JSON in ``out``."""
    import torch
    import transformers

    from core.errors import first_line
    from core.manifest import Manifest
    from runtimes.decoding import GenerationConfig, greedy, own_attention
    from runtimes.generation import build_decoders, seeded_prompts

    manifest = Manifest.load(Path(art))
    prompts = seeded_prompts(manifest, PROMPTS, PROMPT_LEN, SEED + 1)
    res: dict[str, Any] = {"prompts": prompts.tolist(), "tokens": {}, "errors": {}}
    ids, mask = torch.from_numpy(prompts), torch.ones(prompts.shape, dtype=torch.int64)
    # EOS never stops a sequence (our loops ignore it too); no minimum length, which would mask EOS's logit
    gen = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=None,
                                        pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    # the model's own attention where transformers' default SDPA would drop part of it (gemma2's logit softcapping)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **own_attention(Path(folder))).eval()
    model.generation_config.eos_token_id = None  # else generate fills in the model's EOS id and stops at it
    with torch.inference_mode():
        out_e = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    eager = out_e.sequences[:, prompts.shape[1]:].numpy()
    top2 = torch.stack(out_e.scores).float().topk(2, dim=-1).values  # steps x batch x 2
    res["eager_min_top1_margin"] = round(float((top2[..., 0] - top2[..., 1]).min()), 4)
    res["tokens"]["eager-generate"] = eager.tolist()
    res["eager_distinct_per_prompt"] = min(len(set(row)) for row in eager.tolist())  # 1: it repeats one token
    # Optimum: ORTModelForCausalLM on the same FP32 model.onnx convert exported, with the source's config
    peer = Path(tempfile.mkdtemp(prefix="gencov-optimum-"))
    try:
        fp32 = manifest.artifacts["fp32"].file
        for rel in fp32.paths():
            os.symlink((Path(art) / rel).resolve(), peer / Path(rel).name)
        for name in ("config.json", "generation_config.json"):
            if (Path(folder) / name).is_file():
                shutil.copyfile(Path(folder) / name, peer / name)
        from optimum.onnxruntime import ORTModelForCausalLM

        ort_model = ORTModelForCausalLM.from_pretrained(peer, file_name=Path(fp32.path).name, use_cache=True,
                                                        use_io_binding=False)
        ort_model.generation_config.eos_token_id = None
        out_o = ort_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        res["tokens"]["optimum-ort:fp32"] = out_o.sequences[:, prompts.shape[1]:].numpy().tolist()
    except Exception as exc:  # the peer's failure is a row of the results, with its one line
        # the whole message on one line: ORT's names the input and the dims it got and expected on later lines
        res["errors"]["optimum-ort:fp32"] = f"optimum: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    finally:
        shutil.rmtree(peer, ignore_errors=True)
    # ours: each backend's greedy loop, as bench's checks run it
    cfg = GenerationConfig(artifact_dir=Path(art), backends=BACKENDS, variants=variants.split(","))
    skipped: list[str] = []
    for d in build_decoders(manifest, Path(art), cfg, skipped):
        try:
            d.load()
            res["tokens"][d.label] = greedy(d, prompts, NEW_TOKENS - 1).tokens.tolist()
        except Exception as exc:
            res["errors"][d.label] = first_line(exc, with_type=True)[:300]
        finally:
            d.close()
    res["skipped"] = skipped
    res["first_diff_from_eager"] = {k: _first_diff(v, eager) for k, v in res["tokens"].items()}
    Path(out).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------- one family


def _step(cmd: list[str], deadline: float) -> tuple[int | None, str, float, float]:
    budget = max(1.0, deadline - time.monotonic())
    code, output, secs = _run(cmd, budget)
    return code, output, secs, budget


def run_family(name: str, arch: Arch, work: Path, timeout: float) -> dict[str, Any]:
    """Build, convert, bench and the token child for one family, within ``timeout`` seconds in all."""
    t0, deadline = time.perf_counter(), time.monotonic() + timeout
    fam: dict[str, Any] = {"family": name, "config_class": arch.config_class, "run": time.strftime("%Y-%m-%d")}
    folder, art = work / f"{name}-src", work / f"{name}-art"
    shutil.rmtree(art, ignore_errors=True)
    if (why := export_task_supported(name)) is not None:
        fam["skipped"] = why
        return fam
    try:
        if not (folder / "config.json").is_file():
            build_folder(name, arch, folder)
    except Exception as exc:  # the family's row says why
        fam["build_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        return fam
    cli = [sys.executable, str(ROOT / "cli.py")]
    convert = [*cli, "convert", f"hf:{folder}", "--task", "text-generation-with-past", "--int4", "--int4-ov",
               "--out", str(art)]
    code, output, secs, budget = _step(convert, deadline)
    fam["convert"] = {"command": " ".join(["python", "cli.py", *convert[2:]]), "exit_code": code,
                      "seconds": round(secs, 1), "internal": code not in (0, GATE_EXIT) and _is_internal(output)}
    if code not in (0, GATE_EXIT) or not (art / "manifest.json").is_file():
        fam["convert"]["line"], fam["convert"]["output_tail"] = _reason(output, code, budget), _tail(output)
        return fam
    from core.manifest import Manifest

    manifest = Manifest.load(art)
    variants = [a.name for a in manifest.artifacts.values() if a.kind in ("onnx", "openvino_ir")]
    fam["variants"] = {a.name: f"{a.kind} {a.status}" for a in manifest.artifacts.values()
                       if a.kind in ("onnx", "openvino_ir")}
    fam["failed_variants"] = {f.name: f.reason for f in manifest.failed_variants}
    results = work / f"{name}-bench.json"
    bench = [*cli, "bench", str(art), "--backends", ",".join(BACKENDS), "--variants", ",".join(variants),
             "--dims", f"sequence={PROMPT_LEN}", "--batch-sizes", "1", "--warmup", "0", "--iters", "1",
             "--rounds", "1", "--out", str(results)]
    code, output, secs, budget = _step(bench, deadline)
    fam["bench"] = {"command": " ".join(["python", "cli.py", *bench[2:]]), "exit_code": code,
                    "seconds": round(secs, 1), "internal": code != 0 and _is_internal(output)}
    if code != 0 or not results.is_file():
        fam["bench"]["line"], fam["bench"]["output_tail"] = _reason(output, code, budget), _tail(output)
    else:
        gen = json.loads(results.read_text())["generation"]
        fam["bench"]["checks"] = {f"{c['backend']}:{c['variant']}": {
            "agreement": c["agreement"], "forced_agreement": c["forced_agreement"], "cosine_min": c["cosine_min"],
            "kv_matches_no_cache": c["kv_matches_no_cache"]} for c in gen["checks"]}
        fam["bench"]["skipped"] = gen["skipped"]
    tokens = work / f"{name}-tokens.json"
    child = [sys.executable, str(Path(__file__).resolve()), "--tokens-child", str(art), str(folder), str(tokens),
             ",".join(variants)]
    code, output, secs, budget = _step(child, deadline)
    fam["tokens"] = json.loads(tokens.read_text()) if tokens.is_file() else \
        {"error": _reason(output, code, budget), "output_tail": _tail(output)}
    fam["tokens"]["seconds"] = round(secs, 1)
    fam["cells"] = cells(fam, variants)
    fam["seconds"] = round(time.perf_counter() - t0, 1)
    return fam


def _skip_reason(skipped: list[str], label: str) -> str | None:
    return next((s[len(label) + 2:] for s in skipped if s.startswith(f"{label}: ")), None)


def cells(fam: dict[str, Any], variants: list[str]) -> dict[str, dict[str, str]]:
    """backend -> variant -> 'pass', 'n/a: why', 'miss: why' (see the module docstring)."""
    out: dict[str, dict[str, str]] = {}
    bench, tok = fam.get("bench", {}), fam.get("tokens", {})
    checks, skipped = bench.get("checks", {}), bench.get("skipped", [])
    diff, errors = tok.get("first_diff_from_eager", {}), tok.get("errors", {})
    for backend in BACKENDS:
        row = out.setdefault(backend, {})
        for v in (["torch"] if backend == "eager" else variants):
            label = f"{backend}:{v}"
            why = _skip_reason(skipped, label) or _skip_reason(skipped, backend)
            if why is not None and "OpenVINO IR" in why and "only openvino runs it" in why:
                row[v] = "n/a: an OpenVINO IR; ONNX-only backend"
            elif bench.get("line"):
                row[v] = f"miss: bench failed: {bench['line']}"
            elif why is not None:
                row[v] = f"miss: {why}"
            elif label not in checks:
                row[v] = "miss: bench measured no check for it"
            else:
                c, k = checks[label], diff.get(label)
                exact = v in FP32_VARIANTS or v == "torch"
                agree = f"agreement {c['agreement']:.0%} with eager"
                if not c["kv_matches_no_cache"]:
                    row[v] = f"miss: KV-cache tokens differ from the no-cache path ({agree})"
                elif exact and c["agreement"] < 1.0:
                    row[v] = f"miss: tokens differ from eager at position {k if k is not None else '?'} ({agree})"
                elif label in errors:
                    row[v] = f"miss: token child: {errors[label]}"
                else:
                    row[v] = "pass" + ("" if exact else f" ({agree}, forced {c['forced_agreement']:.0%}; INT4 of "
                                                        "random weights)")
    peer = "optimum-ort:fp32"
    if peer in errors:
        out["optimum"] = {"fp32": f"miss: {errors[peer]}"}
    elif peer in diff:
        k = diff[peer]
        out["optimum"] = {"fp32": "pass" if k is None else f"miss: tokens differ from eager at position {k}"}
    elif tok.get("error"):
        out["optimum"] = {"fp32": f"miss: token child failed: {tok['error']}"}
    for backend, row in out.items():
        for v, c in row.items():
            if c.startswith("miss") and (why := diagnosis(fam["family"], backend, v)) is not None:
                row[v] = f"{c}; diagnosed: {why}"
    return out


# ---------------------------------------------------------------------------------------------- results


def all_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = versions()
    for pkg in ("openvino", "openvino-genai", "onnxruntime-genai", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def family_line(fam: dict[str, Any]) -> str | None:
    """The one line that stopped the family before bench's cells, if any."""
    if fam.get("skipped"):
        return f"not run: {fam['skipped']}"
    if fam.get("build_error"):
        return f"building the tiny model failed: {fam['build_error']}"
    conv = fam.get("convert", {})
    if conv.get("line"):
        return f"convert failed (exit {conv['exit_code']}){' INTERNAL' if conv.get('internal') else ''}: {conv['line']}"
    return None


def summary(families: dict[str, dict[str, Any]]) -> dict[str, int]:
    cells_ = [c for f in families.values() for row in f.get("cells", {}).values() for c in row.values()]
    return {"families": len(families), "cells": len(cells_), "pass": sum(c.startswith("pass") for c in cells_),
            "miss": sum(c.startswith("miss") for c in cells_), "n/a": sum(c.startswith("n/a") for c in cells_),
            "families_stopped": sum(family_line(f) is not None for f in families.values()),
            "internal": sum(bool(f.get(s, {}).get("internal")) for f in families.values() for s in ("convert", "bench"))}


def _short(cell: str) -> str:
    return "pass" if cell.startswith("pass") else "n/a" if cell.startswith("n/a") else "**miss**"


def markdown(payload: dict[str, Any]) -> str:
    fams, s, v = payload["families"], payload["summary"], payload["versions"]
    lines = ["# Generation coverage over decoder families (CPU): the toolkit's backends beside Optimum's "
             "ORTModelForCausalLM", "",
             f"Command: `{payload['command']}` (families not run by it are kept from earlier runs; each names its date)",
             *(["", "Runs that wrote these rows: " + "; ".join(f"`{r}`" for r in payload["runs"])]
               if payload.get("runs") else []),
             "", f"Date: {payload['date']}. CPU: {payload['cpu_model']} ({payload['cpu_count']} logical cores). "
             f"Versions: {', '.join(f'{k} {x}' for k, x in v.items())}. Toolkit: {payload['git']}.", "",
             "Tiny random-init models built by the script (hidden 64, 2 layers, vocabulary 256, 64 positions, "
             "initializer_range 0.5, seeded; no tokenizer: every backend is fed token ids). Per family: `cli.py convert "
             "hf:FOLDER --task text-generation-with-past --int4 --int4-ov`, then `cli.py bench` with backends "
             f"{', '.join(BACKENDS)} on every variant (prompt {PROMPT_LEN}, batch 1), then greedy tokens on bench's "
             f"{PROMPTS} check prompts ({NEW_TOKENS} new tokens) from eager `generate`, Optimum's "
             "`ORTModelForCausalLM.generate` on convert's FP32 `model.onnx`, and each of our backends. A cell is "
             "pass/miss per variant: FP32 files (fp32, opt, fused) must give eager's tokens and the KV-cache path "
             "the no-cache path's; INT4 variants of random weights must run and match their own no-cache path "
             "(their agreement with eager is in the JSON and in the misses list). n/a: the OpenVINO IR `int4_ov` on "
             "an ONNX-only backend.", "",
             f"**{s['pass']} pass, {s['miss']} miss, {s['n/a']} n/a** over {s['families']} families "
             f"({s['families_stopped']} stopped before bench; {s['internal']} INTERNAL).", "",
             "| family | " + " | ".join([*BACKENDS, "optimum"]) + " | eager top-1 margin min | eager distinct tokens "
             "min | s |", "|---|" + "---|" * (len(BACKENDS) + 4)]
    for name in sorted(fams, key=lambda n: list(FAMILIES).index(n) if n in FAMILIES else 99):
        f = fams[name]
        if (line := family_line(f)) is not None:
            lines.append(f"| {name} | {_cell(line)} |" + " |" * (len(BACKENDS) + 3))
            continue
        row = [", ".join(f"{var} {_short(c)}" for var, c in f["cells"].get(b, {}).items()) or "-"
               for b in [*BACKENDS, "optimum"]]
        tok = f.get("tokens", {})
        if "eager-generate" in tok.get("tokens", {}):  # rows written before the field was recorded
            tok.setdefault("eager_distinct_per_prompt", min(len(set(r)) for r in tok["tokens"]["eager-generate"]))
        lines.append(f"| {name} | {' | '.join(row)} | {tok.get('eager_min_top1_margin', '-')} | "
                     f"{tok.get('eager_distinct_per_prompt', '-')} | {f.get('seconds', '-')} |")
    lines += ["", "eager top-1 margin min: the smallest gap between eager's two highest logits over its "
              f"{PROMPTS} x {NEW_TOKENS} greedy steps (a margin near 0 is a near-tie that a kernel's rounding may flip "
              "without a fault; a family with one is still graded on exact tokens, so a flip there shows as a miss "
              "to read with it). eager distinct tokens min: the fewest distinct tokens in one prompt's "
              f"{NEW_TOKENS} (a model that repeats one token would hide a broken cache)."]
    misses = [(n, b, var, c) for n, f in fams.items() for b, row in f.get("cells", {}).items()
              for var, c in row.items() if c.startswith("miss")]
    stopped = [(n, family_line(f)) for n, f in fams.items() if family_line(f) is not None]
    if misses or stopped:
        lines += ["", "## Misses, one line each", "", "| family | backend | variant | reason |", "|---|---|---|---|"]
        lines += [f"| {n} | - | - | {_cell(str(line))} |" for n, line in stopped]
        lines += [f"| {n} | {b} | {var} | {_cell(c[len('miss: '):])} |" for n, b, var, c in misses]
    int4 = {n: [(f"{b}:{var}", f["bench"]["checks"].get(f"{b}:{var}")) for b in BACKENDS for var in ("int4", "int4_ov")
                if f"{b}:{var}" in f["bench"]["checks"]] for n, f in fams.items() if f.get("bench", {}).get("checks")}
    if any(int4.values()):
        lines += ["", "## INT4 variants of random weights: greedy agreement with eager (teacher-forced in brackets)",
                  "", "Not a verdict: 4-bit weights move a random model's near-tied logits; the cells above grade "
                  "that each runs and its KV-cache path equals its no-cache path.", "",
                  "| family | agreement |", "|---|---|"]
        lines += [f"| {n} | " + ", ".join(f"{k} {c['agreement']:.0%} ({c['forced_agreement']:.0%})" for k, c in rows)
                  + " |" for n, rows in int4.items() if rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--tokens-child":
        tokens_child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"Comma-separated families (default: {','.join(FAMILIES)})")
    ap.add_argument("--timeout", type=float, default=900, help="Seconds per family (build, convert, bench, tokens)")
    ap.add_argument("--keep", default=None, help="Keep the model folders and artifacts under this folder")
    ap.add_argument("--fresh", action="store_true", help="Forget the families of an earlier results file")
    ap.add_argument("--name", default="gen_coverage_cpu", help="Results file name under benchmarks/results")
    ap.add_argument("--rewrite", action="store_true", help="Run nothing: grade the results file's rows again by this "
                                                             "script's rules and rewrite its .json and .md")
    args = ap.parse_args()
    if args.rewrite:
        done: dict[str, Any] = json.loads((RESULTS / f"{args.name}.json").read_text())
        for fam in done["families"].values():
            if "cells" in fam:
                fam["cells"] = cells(fam, list(fam["variants"]))
        done["summary"] = summary(done["families"])
        write(args.name, done, markdown(done))
        return
    only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else list(FAMILIES)
    if unknown := [t for t in only if t not in FAMILIES]:
        ap.error(f"unknown famil(ies) {unknown}; known: {', '.join(FAMILIES)}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gen_coverage_"))
    work.mkdir(parents=True, exist_ok=True)
    old = RESULTS / f"{args.name}.json"
    before = {} if args.fresh or not old.is_file() else json.loads(old.read_text())
    payload: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu_model": cpuinfo_model(), "cpu_count": os.cpu_count(), "versions": all_versions(), "git": git_state(),
        "timeout_s": args.timeout, "runs": [*before.get("runs", []),
                                            f"{time.strftime('%Y-%m-%d %H:%M')}: python {' '.join(sys.argv)}"],
        "families": {n: f for n, f in before.get("families", {}).items() if n not in only}}
    for fam in payload["families"].values():  # kept rows graded by this script's rules (its diagnoses included)
        if "cells" in fam:
            fam["cells"] = cells(fam, list(fam["variants"]))
    try:
        for name in only:
            log(f"== {name}")
            fam = run_family(name, FAMILIES[name], work, args.timeout)
            payload["families"][name] = fam
            payload["summary"] = summary(payload["families"])
            write(args.name, payload, markdown(payload))
            if (line := family_line(fam)) is not None:
                log(f"   {line}")
            for b, row in fam.get("cells", {}).items():
                for var, c in row.items():
                    log(f"   {b}:{var}: {c}"[:300])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    s = payload["summary"] = summary(payload["families"])
    write(args.name, payload, markdown(payload))
    log(f"{s['pass']} pass, {s['miss']} miss, {s['n/a']} n/a -> {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
