"""Generative decoders on this CPU (issue 31): a small byte-level GPT-2 trained here on the Python standard library's
own source, tiny random-init gpt2 and llama configs, and a "wide" random-init llama (106 M parameters, bound by weight
bandwidth, for the INT4 speed target), each converted by the toolkit with its KV cache (FP32, dynamic INT8, INT4 with
ONNX Runtime's MatMulNBits and INT4 with NNCF for OpenVINO), then measured by the generation benchmark
(``runtimes.generation``) on eager PyTorch, torch.compile, ONNX Runtime, ONNX Runtime GenAI's generator (genai),
OpenVINO's stateful model (openvino) and openvino-genai's LLMPipeline (ovgenai).

    python benchmarks/run_generate.py            # the recorded run: benchmarks/results/generate_cpu.{json,md}
    python benchmarks/run_generate.py --quick    # a few minutes, smaller everything; written under --work only

The trained model: GPT-2 (4 layers, width 192, 4 heads, 640 positions) over UTF-8 bytes (vocabulary 256: no
tokenizer to download), trained for ``--train-seconds`` with AdamW on the standard library files of the training split
(``calibration.text``: a file is held out by the hash of its name); perplexity is measured on windows of the held-out
files, which it never saw. The random-init models get greedy agreement and logits cosine only (perplexity measures
nothing on random weights), said so in the results.

Per model and variant: perplexity (trained model), greedy agreement with eager, logits cosine per step under teacher
forcing, the KV-cache path against the no-cache path; per backend, prompt length (32, 128, 512) and batch (1, 4):
time to first token, time per output token, tokens/s and the RSS delta with the KV cache's bytes, every target on the
same seeded prompts in interleaved rounds with the interval of the per-round p50s. Targets, each met or missed with
the reason: INT4 file at most 30% of FP32's; INT4 decode tokens/s at least 1.5x FP32 (the best FP32 variant of the
same backend) on the best backend at batch 1; INT4 perplexity within 5% of FP32 (trained model); the KV-cache path
at least 3x the no-cache path in tokens/s for 128 new tokens; greedy agreement with eager, reported per variant.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine, write

#: the trained decoder's config (GPT-2 over bytes)
#: (width 192: a training step of 8 x 128 bytes takes about a quarter second on two cores, so the 1-2 minutes give
#: a few hundred steps; width 256 at batch 16 took 4-10 s a step on this shared machine)
TRAINED = {"n_layer": 4, "n_embd": 192, "n_head": 4, "n_positions": 640}
TRAIN_SEQ, TRAIN_BATCH, LR = 128, 8, 3e-3
#: held-out perplexity windows
PPL_WINDOW = 256
#: "wide": a random-init llama large enough that a decode step is bound by reading its weights (about 106 M
#: parameters, 0.4 GB in FP32, far beyond the CPU's caches), which is the regime 4-bit weights are for; the trained
#: model (1.8 M parameters) fits in cache, so its INT4 rows cannot show that gain. Speed only: its gate is opened
#: (random weights give near-tied logits) and its agreement is reported as measured.
WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": 8192}


def log(msg: str) -> None:
    print(msg, flush=True)


def train_decoder(folder: Path, seconds: float, seed: int) -> dict[str, Any]:
    """Train the byte-level GPT-2 for ``seconds`` on the training split and save it with ``save_pretrained``."""
    import torch
    import transformers

    from calibration.text import BYTE_VOCAB, encode, stdlib_bytes, stdlib_files

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=BYTE_VOCAB, bos_token_id=10, eos_token_id=10, **TRAINED)
    model = transformers.GPT2LMHeadModel(cfg)
    data = torch.from_numpy(encode(stdlib_bytes("train")))
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    model.train()
    t0, step, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - t0) < seconds:
        starts = torch.from_numpy(rng.integers(0, len(data) - TRAIN_SEQ, size=TRAIN_BATCH))
        x = torch.stack([data[s:s + TRAIN_SEQ] for s in starts])
        # warm-up over 20 steps, then decay with the time spent (the budget is time, not steps)
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - elapsed / seconds))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"  train step {step}: loss {np.mean(losses[-25:]):.3f} nats/byte ({elapsed:.0f} s)")
    model.eval().save_pretrained(folder)
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "batch": TRAIN_BATCH, "seq": TRAIN_SEQ,
            "final_loss_nats_per_byte": round(float(np.mean(losses[-10:])), 4) if losses else None,
            "train_files": len(stdlib_files("train")), "train_bytes": len(data),
            "heldout_files": len(stdlib_files("heldout")), "config": TRAINED | {"vocab_size": BYTE_VOCAB}}


def random_init(folder: Path, family: str, positions: int) -> None:
    """Tiny random-init configs (seeded): agreement and cosine only."""
    import torch
    import transformers as t

    torch.manual_seed(0)
    if family == "wide":
        t.LlamaForCausalLM(t.LlamaConfig(**WIDE, max_position_embeddings=positions)).save_pretrained(folder)
        return
    if family == "gpt2":
        t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, n_positions=positions,
                                       initializer_range=0.2)).save_pretrained(folder)
    else:
        t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                         max_position_embeddings=positions, initializer_range=0.2)
                           ).save_pretrained(folder)


def int4_available() -> str | None:
    """None when ``convert --int4`` exists here, else why not."""
    try:
        from convert.variants import VARIANTS
    except ImportError as exc:
        return f"convert.variants cannot be imported: {exc}"
    return None if "int4" in VARIANTS else "convert has no --int4 variant row (convert/variants.py) in this tree"


def int4_ov_available() -> str | None:
    """None when ``convert --int4-ov`` (NNCF's INT4 for OpenVINO, an OpenVINO IR) runs here, else why not."""
    try:
        from convert.ovir import nncf_problem
        from convert.variants import VARIANTS
    except ImportError as exc:
        return f"convert.int4_ov cannot be imported: {exc}"
    return nncf_problem("--int4-ov") if "int4_ov" in VARIANTS else "convert has no --int4-ov variant row in this tree"


def convert(folder: Path, out: Path, quick: bool, int4: bool, int4_ov: bool = False, wide: bool = False
            ) -> dict[str, Any]:
    """``cli.py convert hf:FOLDER --task text-generation-with-past --int8-dynamic [--int4] [--int4-ov]``; exit 5 (a
    variant failed its gate) is a verdict, the folder is written with that variant marked failed. ``wide``: no
    optimizer variants, and the gate opened (speed only; its agreement is still measured and reported)."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "convert", f"hf:{folder}", "--task", "text-generation-with-past",
           "--int8-dynamic", "--out", str(out)] + (["--int4"] if int4 else []) + (["--int4-ov"] if int4_ov else []) \
        + (["--no-optimize"] if quick or wide else []) \
        + (["--min-token-agreement", "0", "--min-cosine", "-1"] if wide else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 5):
        raise RuntimeError(f"convert failed (exit {done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"command": shlex.join(["python", "cli.py", *cmd[2:]]), "exit": done.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def heldout_windows(count: int, seed: int) -> np.ndarray:
    from calibration.text import encode, stdlib_bytes, windows

    return windows(encode(stdlib_bytes("heldout")), PPL_WINDOW, count, seed)


def run_model(name: str, folder: Path, art: Path, args: argparse.Namespace, trained: bool) -> dict[str, Any]:
    from core.manifest import Manifest
    from runtimes.decoding import GenerationConfig
    from runtimes.generation import run_generation

    q = args.quick
    wide = name == "wide"
    backends = args.backends.split(",")
    if not trained and "compile" in backends:
        backends.remove("compile")  # minutes of Inductor per model on two cores; the trained model has the row
    if wide and "eager" in backends:
        backends.remove("eager")  # speed of the ONNX variants; its agreement is against ORT FP32 (said so)
    cfg = GenerationConfig(
        artifact_dir=art, backends=backends,
        variants=[v for v in ("fp32", "int8_dynamic", "int4", "int4_ov") if v in Manifest.load(art).artifacts]
        if q or wide else None,  # int4_ov: an OpenVINO IR, run by openvino only (the others skip it, saying so)
        prompt_lengths=[32] if q or wide else [32, 128, 512], batch_sizes=[1] if q or wide else [1, 4],
        new_tokens=8 if q else 32, no_cache_tokens=0 if wide else 32 if q else 128, check_prompts=4,
        check_tokens=8 if q or wide else 32, warmup=1, iters=3 if q else 6 if wide else 10, rounds=3 if q else 5,
        round_warmup=0 if q else 1, threads=args.threads, seed=0)
    text = prompts = None
    if trained:
        from calibration.text import encode, stdlib_bytes, windows

        text = heldout_windows(8 if q else 32, seed=1)
        prompts = windows(encode(stdlib_bytes("heldout")), cfg.prompt_lengths[0], cfg.check_prompts, seed=2)
    t0 = time.perf_counter()
    gen = run_generation(cfg, log=log, progress=lambda s: log(f"  {name}: {s}"), text=text, check_prompts=prompts)
    manifest = Manifest.load(art)
    return {"model": name, "source": str(folder), "trained": trained, "artifact_dir": str(art),
            "seconds": round(time.perf_counter() - t0, 1),
            "sizes_bytes": {a.name: a.file.size_bytes + sum(d.size_bytes for d in a.file.external_data)
                            for a in manifest.artifacts.values()},  # an OpenVINO IR: .xml + .bin
            "failed_variants": {f.name: f"{f.status}: {f.reason}" for f in manifest.failed_variants},
            "generation": gen.model_dump(mode="json")}


# -- targets ------------------------------------------------------------------------------------------------------------
def _target(name: str, met: bool | None, value: str, reason: str) -> dict[str, Any]:
    status = "met" if met else "missed" if met is not None else "not measured"
    return {"target": name, "status": "reported" if value == "reported" else status,
            "value": value, "reason": reason}


def int4_speed(gen: Any, model: str, why_no_int4: str, note: str) -> dict[str, Any]:
    """INT4 decode tokens/s over the best FP32 variant's, on the backend where INT4 is fastest (batch 1, shortest
    prompt, the longest run); ``int4_ov`` (NNCF's INT4 IR) counts on openvino."""
    from core.metrics import latency_differs

    name = f"INT4 decode tokens/s >= 1.5x FP32, best backend, batch 1 ({model})"
    shortest = min((r.prompt_length for r in gen.rows), default=0)
    best: tuple[float, str, float, str] | None = None
    ratios: list[str] = []
    for backend in sorted({r.backend for r in gen.rows}):
        rows = [r for r in gen.rows if r.backend == backend and r.kv_cache and r.batch_size == 1
                and r.prompt_length == shortest]
        if not rows:
            continue
        longest = max(r.new_tokens for r in rows)
        rows = [r for r in rows if r.new_tokens == longest]
        int4 = max((r for r in rows if r.precision == "int4"), key=lambda r: r.decode_tokens_per_s, default=None)
        fp32 = max((r for r in rows if r.precision == "fp32"), key=lambda r: r.decode_tokens_per_s, default=None)
        if int4 is None or fp32 is None:
            continue
        sure = latency_differs(int4.tpot_ms, fp32.tpot_ms)
        detail = (f"{backend}: {int4.variant} {int4.decode_tokens_per_s:.0f} vs {fp32.variant} "
                  f"{fp32.decode_tokens_per_s:.0f} decode tokens/s (TPOT {'differs' if sure else 'within the noise'})")
        ratios.append(f"{backend} {int4.decode_tokens_per_s / fp32.decode_tokens_per_s:.2f}x")
        if best is None or int4.decode_tokens_per_s > best[0]:  # the best backend: where INT4 decodes fastest
            best = (int4.decode_tokens_per_s, backend, int4.decode_tokens_per_s / fp32.decode_tokens_per_s, detail)
    if best is None:
        return _target(name, None, "-", f"no INT4 rows: {why_no_int4 or 'no backend ran an INT4 and an FP32 variant'}")
    return _target(name, best[2] >= 1.5, f"{best[2]:.2f}x on {best[1]}",
                   f"{best[3]}; every backend: {', '.join(ratios)}; prompt {shortest}. {note}")


def targets(models: dict[str, dict[str, Any]], int4_missing: str | None, quick: bool) -> list[dict[str, Any]]:
    from reports.generation import GenerationResults

    out = []
    trained = next((m for m in models.values() if m["trained"]), None)
    why_no_int4 = int4_missing or ""
    if trained is not None and "int4" not in trained["sizes_bytes"]:
        why_no_int4 = why_no_int4 or trained["failed_variants"].get("int4", "convert wrote no int4 variant")
    # 1. size
    if trained is not None and "int4" in trained["sizes_bytes"]:
        s = trained["sizes_bytes"]
        ratio = s["int4"] / s["fp32"]
        out.append(_target("INT4 file <= 30% of FP32 (trained)", ratio <= 0.30, f"{ratio:.1%}",
                           f"{s['int4'] / 2**20:.2f} MB vs {s['fp32'] / 2**20:.2f} MB; embeddings (Gather) stay FP32 "
                           "in ONNX Runtime's MatMulNBits quantizer"))
    else:
        out.append(_target("INT4 file <= 30% of FP32 (trained)", None, "-", f"no INT4 variant: {why_no_int4}"))
    if trained is not None and "int4_ov" in trained["sizes_bytes"]:
        s = trained["sizes_bytes"]
        ratio = s["int4_ov"] / s["fp32"]
        out.append(_target("INT4 (OpenVINO IR, NNCF) file <= 30% of FP32 (trained)", ratio <= 0.30, f"{ratio:.1%}",
                           f"{s['int4_ov'] / 2**20:.2f} MB (.xml + .bin) vs {s['fp32'] / 2**20:.2f} MB ONNX; embeddings "
                           "and LM head INT8 (NNCF's default)"))
    if (wide := models.get("wide")) is not None:  # the INT4 speed target where weight bandwidth binds
        out.append(int4_speed(GenerationResults.model_validate(wide["generation"]), "wide", why_no_int4,
                              "random-init llama, 106 M parameters (0.4 GB FP32): each decode step reads every "
                              "weight"))
    if trained is None:
        return out
    gen = GenerationResults.model_validate(trained["generation"])
    # 2. INT4 decode speed on the best backend, batch 1, shortest prompt, against the best FP32 variant there: the
    # trained model (in cache) and, where run, the wide one (bound by weight bandwidth)
    out.append(int4_speed(gen, "trained", why_no_int4, "A model this small (1.8 M parameters) fits in the CPU's "
                          "caches: it is not bound by weight bandwidth, which is what 4-bit weights save"))
    # 3. perplexity
    ppl = {(c.backend, c.variant): c.perplexity for c in gen.checks if c.perplexity is not None}
    if ("ort", "int4") in ppl and ("ort", "fp32") in ppl:
        r = ppl[("ort", "int4")] / ppl[("ort", "fp32")]
        out.append(_target("INT4 perplexity within 5% of FP32 (trained)", r <= 1.05,
                           f"{ppl[('ort', 'int4')]:.3f} vs {ppl[('ort', 'fp32')]:.3f} ({r - 1:+.1%})",
                           "ONNX Runtime, byte-level perplexity on held-out standard library files"))
    else:
        out.append(_target("INT4 perplexity within 5% of FP32 (trained)", None, "-",
                           f"no INT4 perplexity on ort: {why_no_int4 or 'not measured'}"))
    if ("openvino", "int4_ov") in ppl and ("openvino", "fp32") in ppl:
        r = ppl[("openvino", "int4_ov")] / ppl[("openvino", "fp32")]
        out.append(_target("INT4 (OpenVINO IR, NNCF) perplexity within 5% of FP32 (trained)", r <= 1.05,
                           f"{ppl[('openvino', 'int4_ov')]:.3f} vs {ppl[('openvino', 'fp32')]:.3f} ({r - 1:+.1%})",
                           "OpenVINO, byte-level perplexity on held-out standard library files"))
    # 4. KV cache vs no cache
    speed = gen.cache_speedups()
    if speed:
        n = speed[0][0].new_tokens
        fp32_pairs = [(kv, x) for kv, _, x in speed if kv.precision == "fp32"]
        worst = min(fp32_pairs or [(kv, x) for kv, _, x in speed], key=lambda p: p[1])
        met = worst[1] >= 3.0 and n >= 128
        out.append(_target("KV cache >= 3x no-cache tokens/s at 128 new tokens (trained, FP32 rows)", met,
                           f"lowest {worst[1]:.1f}x ({worst[0].backend}:{worst[0].variant})",
                           "; ".join(f"{kv.backend}:{kv.variant} {x:.1f}x" for kv, _, x in speed)
                           + f"; batch 1, prompt {speed[0][0].prompt_length}, {n} new tokens"
                           + (" (quick mode: fewer than 128 tokens, not the target's setting)" if n < 128 else "")))
    else:
        out.append(_target("KV cache >= 3x no-cache tokens/s at 128 new tokens", None, "-", "no-cache path not run"))
    # 5. agreement, every model and variant
    for m in models.values():
        g = GenerationResults.model_validate(m["generation"])
        text = "; ".join(f"{c.backend}:{c.variant} {c.agreement:.0%} (forced {c.forced_agreement:.0%}, cos min "
                         f"{c.cosine_min:.4f})" for c in g.checks if c.backend != "eager")
        out.append(_target(f"greedy agreement with eager ({m['model']})", None, "reported", text))
    if quick:
        for t in out:
            t["reason"] += " [quick mode]"
    return out


def markdown(payload: dict[str, Any]) -> str:
    from reports.generation import GenerationResults, generation_markdown

    m = payload["machine"]
    lines = ["# Generation benchmark (CPU)", "", f"- command: `{payload['command']}`",
             f"- CPU: {m.get('cpu_model')} ({m.get('cpu_isa', '')}), {m.get('cpu_count')} cores visible",
             f"- mode: {'quick (not the recorded settings)' if payload['quick'] else 'full'}",
             f"- INT4: {payload['int4'] or 'available'}",
             f"- INT4 for OpenVINO (--int4-ov): {payload.get('int4_ov') or 'available'}", ""]
    if payload.get("training"):
        t = payload["training"]
        lines += [f"Trained byte-level GPT-2 {t['config']}: {t['steps']} steps in {t['seconds']} s (batch {t['batch']} "
                  f"x {t['seq']} bytes) on {t['train_files']} standard library files ({t['train_bytes']} bytes); "
                  f"final training loss {t['final_loss_nats_per_byte']} nats/byte; perplexity on "
                  f"{t['heldout_files']} held-out files.", ""]
    lines += ["## Targets", "", "| target | status | value | reason |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['status']} | {t['value']} | {t['reason']} |" for t in payload["targets"]]
    for name, model in payload["models"].items():
        sizes = ", ".join(f"{k} {v / 2**20:.2f} MB" for k, v in model["sizes_bytes"].items())
        lines += ["", f"# {name}{' (trained)' if model['trained'] else ' (random init: agreement and cosine only)'}",
                  "", f"- files: {sizes}", f"- convert: `{model['convert']['command']}` (exit {model['convert']['exit']})"]
        if model["failed_variants"]:
            lines.append(f"- failed variants: {model['failed_variants']}")
        lines += generation_markdown(GenerationResults.model_validate(model["generation"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="minutes: short training, one prompt length and batch, "
                                                          "fp32/int8/int4 only, no optimizer variants")
    ap.add_argument("--train-seconds", type=float, default=None, help="training time (default 120, quick 20)")
    ap.add_argument("--models", default="trained,gpt2,llama,wide",
                    help="trained, gpt2, llama (tiny random init), wide (random-init llama bound by weight bandwidth)")
    ap.add_argument("--backends", default="eager,compile,ort,genai,openvino,ovgenai")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="work folder (default artifacts/bench_generate[_quick])")
    ap.add_argument("--out", default=None, help="results name under benchmarks/results (default generate_cpu; quick: "
                                                "written under --work)")
    args = ap.parse_args()
    work = Path(args.work or ROOT / "artifacts" / ("bench_generate_quick" if args.quick else "bench_generate"))
    work.mkdir(parents=True, exist_ok=True)
    int4_missing = int4_available()
    if int4_missing:
        log(f"INT4 not measured: {int4_missing}")
    if int4_ov_missing := int4_ov_available():
        log(f"INT4 for OpenVINO not measured: {int4_ov_missing}")
    payload: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/run_generate.py", *sys.argv[1:]]),
                               "machine": machine(), "quick": args.quick, "int4": int4_missing,
                               "int4_ov": int4_ov_missing, "models": {}}
    positions = TRAINED["n_positions"]
    for name in args.models.split(","):
        folder, art = work / f"{name}-src", work / f"{name}-art"
        if name == "trained":
            log(f"training the byte-level GPT-2 ({args.train_seconds or (20 if args.quick else 120)} s)")
            payload["training"] = train_decoder(folder, args.train_seconds or (20 if args.quick else 120), seed=0)
        else:
            random_init(folder, name, positions)
        if art.exists():
            import shutil

            shutil.rmtree(art)
        log(f"converting {name}")
        conv = convert(folder, art, args.quick, int4_missing is None, int4_ov_missing is None, wide=name == "wide")
        log(f"measuring {name}")
        payload["models"][name] = run_model(name, folder, art, args, name == "trained") | {"convert": conv}
    payload["targets"] = targets(payload["models"], int4_missing, args.quick)
    md = markdown(payload)
    if args.quick and args.out is None:
        import json

        (work / "generate_cpu_quick.json").write_text(json.dumps(payload, indent=2) + "\n")
        (work / "generate_cpu_quick.md").write_text(md)
        log(f"wrote {work / 'generate_cpu_quick.json'} and .md")
    else:
        j, m = write(args.out or "generate_cpu", payload, md)
        log(f"wrote {j} and {m}")
    for t in payload["targets"]:
        log(f"{t['status']:>12}: {t['target']}: {t['value']} ({t['reason']})")


if __name__ == "__main__":
    main()
