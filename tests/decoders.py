"""Tiny random-init decoders exported with their KV cache by `cli.py convert` (Optimum's text-generation-with-past),
shared by the generation tests through the fixtures of tests/conftest.py (gpt2_art, llama_art). initializer_range 0.5: the random model's greedy continuation changes token from step
to step (at 0.02 it repeats one token, which a broken cache could repeat too)."""

from __future__ import annotations

from pathlib import Path

from tests.test_hf_optimum import _cli

LAYERS, HEADS, HEAD_DIM = 2, 2, 16


def export(root: Path, name: str, model: object) -> Path:
    """``model`` saved under ``root/name`` and converted with its KV cache (no optimizer variants) to ``root/art_name``."""
    model.save_pretrained(root / name)  # type: ignore[attr-defined]
    out = root / f"art_{name}"
    proc = _cli("convert", f"hf:{root / name}", "--task", "text-generation-with-past", "--no-optimize", "--out",
                str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


def tiny_gpt2() -> object:
    import torch
    import transformers as t

    torch.manual_seed(0)
    return t.GPT2LMHeadModel(t.GPT2Config(n_layer=LAYERS, n_head=HEADS, n_embd=HEADS * HEAD_DIM, vocab_size=100,
                                          n_positions=64, initializer_range=0.5))


def tiny_llama() -> object:
    """Grouped-query attention (1 KV head for 2 heads), attention_mask and position_ids inputs."""
    import torch
    import transformers as t

    torch.manual_seed(0)
    return t.LlamaForCausalLM(t.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, max_position_embeddings=64, initializer_range=0.5))
