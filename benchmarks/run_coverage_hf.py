"""Hugging Face coverage: tiny random-init architectures through Optimum's ``main_export`` and through the
toolkit's ``convert hf:FOLDER`` + ``bench``, side by side on the same ``save_pretrained`` folder.

    python benchmarks/run_coverage_hf.py [--only bert,gpt2,...] [--jobs 1] [--timeout 600] [--keep DIR]
                                         [--no-validation] [--fresh] [--name coverage_hf_cpu]

Every architecture of ARCHS is built here from a config class with tiny sizes (hidden 32, 2 layers, 2 heads,
vocabulary 128, 32x32 images, short audio), seeded, random init, saved with ``save_pretrained``; nothing is
downloaded and no tokenizer or processor is written. Only architectures Optimum has an ONNX config for are listed
(``TasksManager.get_supported_tasks_for_model_type(type, "onnx", library_name="transformers")``). Each one runs
its default task (Optimum's own choice for the saved class: ``TasksManager.infer_task_from_model(class)``) and,
where Optimum supports it, that task's ``-with-past`` variant. For each (model, task), each in its own processes
with a per-step timeout:
  (a) Optimum: ``optimum.exporters.onnx.main_export(folder, task=..., do_validation=...)`` in a child process:
      ok (its validation warning noted, e.g. a tolerance miss it only logs), or the exception's one line, and
      the files it wrote;
  (b) the toolkit: ``cli.py convert hf:FOLDER --task TASK --out ...``: pass (exit 0), gate failed (exit 5,
      AccuracyGateError: the files are written with a variant marked failed) or fail, with its last ``error:``
      line; then ``cli.py bench OUT --backends ort,eager --batch-sizes 1`` with a few iterations;
  (c) a toolkit failure whose output has "internal error" or a Python traceback is marked INTERNAL (issue 29's
      target: every failure is one clear line).
Target (issue 29): the toolkit passes every (model, task) Optimum exports; no INTERNAL row.
The results are rewritten after every row (an interrupted run keeps what it measured); rows of architectures a
run does not check (``--only``) are kept from the earlier file unless ``--fresh``.
Writes benchmarks/results/<name>.{json,md} (default coverage_hf_cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, write

# Tiny sizes shared by the families (each row below adds what its config class names differently).
_TEXT = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 37, "max_position_embeddings": 64}
_DECODER = {**_TEXT, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_LLAMA = {**_DECODER, "num_key_value_heads": 1}  # grouped-query attention: 2 query heads share 1 KV head
_SEQ2SEQ = {"vocab_size": 128, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 37,
            "decoder_ffn_dim": 37, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0,
            "eos_token_id": 2, "decoder_start_token_id": 2}
_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
        "image_size": 32, "patch_size": 8, "num_channels": 3, "num_labels": 3}
_T5 = {"vocab_size": 128, "d_model": 32, "d_kv": 16, "d_ff": 37, "num_layers": 2, "num_decoder_layers": 2,
       "num_heads": 2, "relative_attention_num_buckets": 8, "pad_token_id": 0, "eos_token_id": 1,
       "decoder_start_token_id": 0}
_W2V = {"vocab_size": 32, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 37, "conv_dim": [16, 16], "conv_stride": [5, 4], "conv_kernel": [10, 8],
        "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "num_labels": 3}
_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic", "num_labels": 3}


@dataclass(frozen=True)
class Arch:
    """One architecture: its family, config class and tiny config, and the model class saved (whose task
    Optimum infers); ``processor``: an image processor class and its settings, saved alongside only where
    Optimum's exporter reads one (DINOv2's dummy-input generator loads the folder's preprocessor); ``norm_images``:
    the side of the seeded images its BatchNorm statistics are measured on before saving (``core.tvzoo.measure_norms``),
    where at init (mean 0, variance 1) the activations vanish block by block and every input gets the same output."""

    family: str
    config_class: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    processor: tuple[str, dict[str, Any]] | None = None
    norm_images: int | None = None


ARCHS: dict[str, Arch] = {
    # text encoders
    "bert": Arch("text-encoder", "BertConfig", "BertForMaskedLM", _TEXT),
    "roberta": Arch("text-encoder", "RobertaConfig", "RobertaForMaskedLM", {**_TEXT, "pad_token_id": 1}),
    "distilbert": Arch("text-encoder", "DistilBertConfig", "DistilBertForSequenceClassification",
                       {"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 37,
                        "max_position_embeddings": 64, "num_labels": 3}),
    "albert": Arch("text-encoder", "AlbertConfig", "AlbertForMaskedLM", {**_TEXT, "embedding_size": 16}),
    "electra": Arch("text-encoder", "ElectraConfig", "ElectraForTokenClassification",
                    {**_TEXT, "embedding_size": 16, "num_labels": 3}),
    "deberta-v2": Arch("text-encoder", "DebertaV2Config", "DebertaV2ForMaskedLM",
                       {**_TEXT, "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"]}),
    "deberta": Arch("text-encoder", "DebertaConfig", "DebertaForQuestionAnswering", _TEXT),
    "xlm-roberta": Arch("text-encoder", "XLMRobertaConfig", "XLMRobertaForMaskedLM", {**_TEXT, "pad_token_id": 1}),
    "mpnet": Arch("text-encoder", "MPNetConfig", "MPNetForMaskedLM", {**_TEXT, "pad_token_id": 1}),
    "convbert": Arch("text-encoder", "ConvBertConfig", "ConvBertForMaskedLM", {**_TEXT, "embedding_size": 32}),
    "roformer": Arch("text-encoder", "RoFormerConfig", "RoFormerForMaskedLM", {**_TEXT, "embedding_size": 32}),
    "modernbert": Arch("text-encoder", "ModernBertConfig", "ModernBertForMaskedLM",
                       {**_TEXT, "global_attn_every_n_layers": 2, "local_attention": 16, "pad_token_id": 0,
                        "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}),
    # decoders
    "gpt2": Arch("decoder", "GPT2Config", "GPT2LMHeadModel",
                 {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
                  "bos_token_id": 1, "eos_token_id": 2}),
    "llama": Arch("decoder", "LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "mistral": Arch("decoder", "MistralConfig", "MistralForCausalLM", {**_LLAMA, "sliding_window": 32}),
    "qwen2": Arch("decoder", "Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    "qwen3": Arch("decoder", "Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA, "head_dim": 16}),
    "gemma": Arch("decoder", "GemmaConfig", "GemmaForCausalLM", {**_LLAMA, "head_dim": 16}),
    "phi": Arch("decoder", "PhiConfig", "PhiForCausalLM", _DECODER),
    "phi3": Arch("decoder", "Phi3Config", "Phi3ForCausalLM", _DECODER),
    "gpt_neox": Arch("decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER),
    "opt": Arch("decoder", "OPTConfig", "OPTForCausalLM",
                {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "ffn_dim": 37, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 1,
                 "bos_token_id": 2, "eos_token_id": 2}),
    "bloom": Arch("decoder", "BloomConfig", "BloomForCausalLM",
                  {"vocab_size": 128, "hidden_size": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 1,
                   "eos_token_id": 2, "pad_token_id": 0}),
    "falcon": Arch("decoder", "FalconConfig", "FalconForCausalLM",
                   {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_neo": Arch("decoder", "GPTNeoConfig", "GPTNeoForCausalLM",
                    {"vocab_size": 128, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                     "attention_types": [[["global", "local"], 1]], "window_size": 16, "intermediate_size": 37,
                     "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}),
    "gptj": Arch("decoder", "GPTJConfig", "GPTJForCausalLM",
                 {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2, "rotary_dim": 8, "n_positions": 64,
                  "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_bigcode": Arch("decoder", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                        {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
                         "bos_token_id": 1, "eos_token_id": 2}),
    # encoder-decoders
    "t5": Arch("encoder-decoder", "T5Config", "T5ForConditionalGeneration", _T5),
    "mt5": Arch("encoder-decoder", "MT5Config", "MT5ForConditionalGeneration", _T5),
    "bart": Arch("encoder-decoder", "BartConfig", "BartForConditionalGeneration", _SEQ2SEQ),
    "mbart": Arch("encoder-decoder", "MBartConfig", "MBartForConditionalGeneration", _SEQ2SEQ),
    "marian": Arch("encoder-decoder", "MarianConfig", "MarianMTModel",
                   {**_SEQ2SEQ, "pad_token_id": 0, "decoder_start_token_id": 0, "decoder_vocab_size": 128}),
    "pegasus": Arch("encoder-decoder", "PegasusConfig", "PegasusForConditionalGeneration",
                    {**_SEQ2SEQ, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}),
    "m2m_100": Arch("encoder-decoder", "M2M100Config", "M2M100ForConditionalGeneration", _SEQ2SEQ),
    "blenderbot": Arch("encoder-decoder", "BlenderbotConfig", "BlenderbotForConditionalGeneration", _SEQ2SEQ),
    # vision
    "vit": Arch("vision", "ViTConfig", "ViTForImageClassification", _VIT),
    "deit": Arch("vision", "DeiTConfig", "DeiTForImageClassification", _VIT),
    "beit": Arch("vision", "BeitConfig", "BeitForImageClassification", {**_VIT, "vocab_size": 128}),
    "dinov2": Arch("vision", "Dinov2Config", "Dinov2ForImageClassification", _VIT,
                   ("BitImageProcessor", {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})),
    "resnet": Arch("vision", "ResNetConfig", "ResNetForImageClassification", _RESNET),
    "regnet": Arch("vision", "RegNetConfig", "RegNetForImageClassification",
                   {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "groups_width": 8,
                    "num_labels": 3}),
    "convnext": Arch("vision", "ConvNextConfig", "ConvNextForImageClassification",
                     {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "image_size": 32, "num_labels": 3}),
    "swin": Arch("vision", "SwinConfig", "SwinForImageClassification",
                 {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
                  "window_size": 4, "num_labels": 3}),
    # at init their logits are ~1e-26 and exactly 0.0 for every input: BatchNorm statistics measured
    "mobilenet_v2": Arch("vision", "MobileNetV2Config", "MobileNetV2ForImageClassification",
                         {"image_size": 32, "depth_multiplier": 0.25, "min_depth": 4, "num_labels": 3}, norm_images=32),
    "mobilevit": Arch("vision", "MobileViTConfig", "MobileViTForImageClassification",
                      {"image_size": 32, "patch_size": 2, "hidden_sizes": [16, 16, 16],
                       "neck_hidden_sizes": [8, 8, 16, 16, 16, 16, 32], "num_attention_heads": 2,
                       "num_labels": 3}, norm_images=32),
    "segformer": Arch("vision", "SegformerConfig", "SegformerForSemanticSegmentation",
                      {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
                       "num_attention_heads": [1, 2], "patch_sizes": [7, 3], "strides": [4, 2],
                       "mlp_ratios": [2, 2], "decoder_hidden_size": 32, "image_size": 32, "num_labels": 3}),
    "detr": Arch("vision", "DetrConfig", "DetrForObjectDetection",
                 {"use_timm_backbone": False, "use_pretrained_backbone": False, "backbone": None,
                  "backbone_config": {"model_type": "resnet", **_RESNET, "out_features": ["stage2"]},
                  "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                  "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 5,
                  "num_labels": 3}),
    "yolos": Arch("vision", "YolosConfig", "YolosForObjectDetection",
                  {**_VIT, "image_size": [32, 32], "num_detection_tokens": 5}),
    # audio
    "whisper": Arch("audio", "WhisperConfig", "WhisperForConditionalGeneration",
                    {"vocab_size": 128, "num_mel_bins": 16, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                     "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 37,
                     "decoder_ffn_dim": 37, "max_source_positions": 1500, "max_target_positions": 32,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
                     "suppress_tokens": [], "begin_suppress_tokens": []}),
    "wav2vec2": Arch("audio", "Wav2Vec2Config", "Wav2Vec2ForCTC", _W2V),
    "hubert": Arch("audio", "HubertConfig", "HubertForSequenceClassification", _W2V),
    "wavlm": Arch("audio", "WavLMConfig", "WavLMForCTC", {**_W2V, "num_buckets": 16, "max_bucket_distance": 32}),
    "audio-spectrogram-transformer": Arch("audio", "ASTConfig", "ASTForAudioClassification",
                                          {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                           "intermediate_size": 37, "num_mel_bins": 16, "max_length": 32,
                                           "patch_size": 16, "frequency_stride": 10, "time_stride": 10,
                                           "num_labels": 3}),
    "speech_to_text": Arch("audio", "Speech2TextConfig", "Speech2TextForConditionalGeneration",
                           {**_SEQ2SEQ, "input_feat_per_channel": 16, "num_conv_layers": 2, "conv_channels": 16,
                            "conv_kernel_sizes": [5, 5], "max_source_positions": 64, "max_target_positions": 64}),
    # multimodal
    "clip": Arch("multimodal", "CLIPConfig", "CLIPModel",
                 {"text_config": {**_TEXT, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                  "vision_config": {k: v for k, v in _VIT.items() if k != "num_labels"}, "projection_dim": 16}),
    "siglip": Arch("multimodal", "SiglipConfig", "SiglipModel",
                   {"text_config": {**_TEXT, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                    "vision_config": {k: v for k, v in _VIT.items() if k != "num_labels"}}),
    "vision-encoder-decoder": Arch("multimodal", "VisionEncoderDecoderConfig", "VisionEncoderDecoderModel",
                                   {"encoder": {"model_type": "vit", **{k: v for k, v in _VIT.items()
                                                                        if k != "num_labels"}},
                                    "decoder": {"model_type": "gpt2", "vocab_size": 128, "n_embd": 32, "n_layer": 2,
                                                "n_head": 2, "n_positions": 64, "bos_token_id": 1,
                                                "eos_token_id": 2, "add_cross_attention": True, "is_decoder": True},
                                    "decoder_start_token_id": 1, "pad_token_id": 0, "eos_token_id": 2}),
}

FAMILIES = ["text-encoder", "decoder", "encoder-decoder", "vision", "audio", "multimodal"]

#: Exit code of a variant that failed its accuracy gate (core.errors.AccuracyGateError): the run wrote its files.
GATE_EXIT = 5


# ---------------------------------------------------------------------------------------------- building folders


def build_folder(model_type: str, arch: Arch, folder: Path) -> None:
    """Save the tiny random-init model (seeded, so every run measures the same weights)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, arch.config_class)(**arch.config)
    if config.model_type != model_type:
        raise ValueError(f"{arch.config_class} builds model_type {config.model_type!r}, not {model_type!r}")
    model = getattr(transformers, arch.model_class)(config).eval()
    if arch.norm_images is not None:
        from core.tvzoo import measure_norms

        side = arch.norm_images
        measure_norms(model, torch.randn(16, config.num_channels, side, side, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(folder)
    if arch.processor is not None:
        name, settings = arch.processor
        getattr(transformers, name)(**settings).save_pretrained(folder)


def tasks_for(model_type: str, arch: Arch) -> tuple[list[str], str]:
    """Optimum's default task for the saved class and, where Optimum exports it, its ``-with-past`` task; and how
    the default was chosen. ``infer_task_from_model(class)`` first (what Optimum does for a local folder's
    architecture); where that gives a task Optimum cannot export for this type (``fill-mask`` for
    BartForConditionalGeneration, the masked-LM auto mapping coming first) or none (DeiT's class is one of a
    tuple), the first exportable task whose transformers auto mapping lists the class."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers Optimum's ONNX configs with the TasksManager
    import transformers
    from optimum.exporters.tasks import TasksManager

    supported = list(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx",
                                                                     library_name="transformers"))
    try:
        inferred: str | None = str(TasksManager.infer_task_from_model(getattr(transformers, arch.model_class)))
    except ValueError:
        inferred = None
    if inferred in supported:
        task, source = str(inferred), "infer_task_from_model"
    else:
        mapped = [t for t, mapping in TasksManager._TRANSFORMERS_TASKS_TO_MODEL_MAPPINGS.items()
                  if t in supported and any(arch.model_class == v or (isinstance(v, tuple) and arch.model_class in v)
                                            for v in mapping.values())]
        if not mapped:
            raise ValueError(f"no ONNX task of Optimum's {supported} maps {arch.model_class} "
                             f"(infer_task_from_model: {inferred})")
        task, source = mapped[0], f"class mapping (infer_task_from_model gives {inferred}, not exportable)"
    return [task, *([f"{task}-with-past"] if f"{task}-with-past" in supported else [])], source


# ---------------------------------------------------------------------------------------------- running processes


def _run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, stdout + stderr, seconds). The child runs in its own process group so a
    timeout kills the whole tree (Optimum's validation, ORT's threads)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "1000"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        log.seek(0)
        return code, log.read(), time.perf_counter() - t0


def _is_internal(output: str) -> bool:
    return "internal error" in output or "Traceback (most recent call last)" in output


def _reason(output: str, code: int | None, timeout: float) -> str:
    """The failure's line: the last ``error:`` / ``internal error:`` line the CLI printed, else the last line."""
    if code is None:
        return f"timed out after {timeout:.0f} s"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    if code < 0:
        return f"killed by signal {-code}" + (f" during: {line}" if line else "")
    return line or f"exit {code}"


def _tail(output: str, n: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-n:])[-3000:]


# ---------------------------------------------------------------------------------------------- Optimum (child)


def optimum_child(folder: str, out: str, task: str, validate: bool, result: str) -> None:
    """Run in its own process: Optimum's main_export, its outcome as JSON in ``result``."""
    import logging
    import traceback

    warned: list[str] = []

    class _Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "succeeded with the warning" in msg:
                warned.append(msg.split("succeeded with the warning:", 1)[-1].strip().splitlines()[0])

    logging.getLogger("optimum").addHandler(_Warnings(logging.WARNING))
    res: dict[str, Any] = {"do_validation": validate}
    try:
        from optimum.exporters.onnx import main_export

        main_export(folder, output=out, task=task, do_validation=validate, device="cpu",
                    library_name="transformers")
        res["status"] = "ok"
    except Exception as exc:  # the benchmark records every failure as one line
        cause = exc.__cause__ or exc  # Optimum wraps validation errors: "An error occurred during validation"
        lines = (str(cause).strip() or type(cause).__name__).splitlines()
        res["status"] = "fail"
        res["error"] = f"{type(cause).__name__}: {lines[0][:400]}"
        traceback.print_exc()
    if warned:
        res["warning"] = warned[-1][:400]
    root = Path(out)
    res["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*.onnx*")) if root.is_dir() else []
    Path(result).write_text(json.dumps(res))


def run_optimum(folder: Path, out: Path, task: str, validate: bool, timeout: float) -> dict[str, Any]:
    result = out.parent / f"{out.name}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--optimum-child", str(folder), str(out), task,
           "1" if validate else "0", str(result)]
    code, output, secs = _run(cmd, timeout)
    if result.is_file():
        res = json.loads(result.read_text())
    else:  # killed, timed out or crashed before writing its result
        res = {"do_validation": validate, "status": "fail", "error": _reason(output, code, timeout),
               "files": sorted(str(p.relative_to(out)) for p in out.rglob("*.onnx*")) if out.is_dir() else []}
    if res["status"] != "ok":
        res["output_tail"] = _tail(output)
    return {**res, "seconds": round(secs, 1)}


# ---------------------------------------------------------------------------------------------- the toolkit


def run_toolkit(folder: Path, out: Path, task: str, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(convert's record, bench's record)."""
    cli = str(ROOT / "cli.py")
    code, output, secs = _run([sys.executable, cli, "convert", f"hf:{folder}", "--task", task, "--out", str(out)],
                              timeout)
    status = "pass" if code == 0 else "gate failed" if code == GATE_EXIT else "fail"
    conv: dict[str, Any] = {"status": status, "exit_code": code, "seconds": round(secs, 1),
                            "internal": code != 0 and _is_internal(output)}
    if out.is_dir():  # the files it wrote, to compare with Optimum's (one file or several components)
        conv["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*.onnx"))
    if code != 0:
        conv["line"] = _reason(output, code, timeout)
        conv["output_tail"] = _tail(output)
    if code not in (0, GATE_EXIT) or not (out / "manifest.json").is_file():
        return conv, {"status": "skipped"}
    code, output, secs = _run([sys.executable, cli, "bench", str(out), "--backends", "ort,eager", "--batch-sizes", "1",
                               "--warmup", "1", "--iters", "3", "--rounds", "1", "--accuracy-samples", "4"], timeout)
    bench: dict[str, Any] = {"status": "pass" if code == 0 else "fail", "exit_code": code, "seconds": round(secs, 1),
                             "internal": code != 0 and _is_internal(output)}
    if code != 0:
        bench["line"] = _reason(output, code, timeout)
        bench["output_tail"] = _tail(output)
    return conv, bench


# ---------------------------------------------------------------------------------------------- one row


def check_row(model_type: str, arch: Arch, task: str, task_source: str, folder: Path, work: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    """One (model, task): Optimum and the toolkit on the same folder; nothing raised escapes a row."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model_type": model_type, "family": arch.family, "model_class": arch.model_class,
                           "task": task, "task_source": task_source}
    slot = work / f"{model_type}__{task}"
    try:
        shutil.rmtree(slot, ignore_errors=True)
        slot.mkdir(parents=True)
        row["optimum"] = run_optimum(folder, slot / "optimum", task, not args.no_validation, args.timeout)
        row["convert"], row["bench"] = run_toolkit(folder, slot / "toolkit", task, args.timeout)
    except Exception as exc:  # a harness failure is recorded on its row, the others still run
        row.setdefault("optimum", {"status": "fail", "error": f"harness: {type(exc).__name__}: {exc}"})
        row.setdefault("convert", {"status": "fail", "line": f"harness: {type(exc).__name__}: {exc}",
                                   "internal": False})
        row.setdefault("bench", {"status": "skipped"})
    finally:
        if not args.keep:
            shutil.rmtree(slot, ignore_errors=True)
    return _verdict(row, t0)


def _verdict(row: dict[str, Any], t0: float) -> dict[str, Any]:
    conv, bench = row["convert"], row["bench"]
    row["toolkit"] = ("pass" if conv["status"] == "pass" and bench["status"] == "pass" else
                      "gate failed" if conv["status"] == "gate failed" and bench["status"] == "pass" else "fail")
    row["internal"] = bool(conv.get("internal") or bench.get("internal"))
    row["reason"] = (conv.get("line") if conv["status"] != "pass" else "") or bench.get("line", "")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["run"] = time.strftime("%Y-%m-%d")
    return row


def build_failed_row(model_type: str, arch: Arch, exc: BaseException) -> dict[str, Any]:
    line = f"building the tiny model failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return {"model_type": model_type, "family": arch.family, "model_class": arch.model_class, "task": "-",
            "optimum": {"status": "fail", "error": line}, "convert": {"status": "skipped"},
            "bench": {"status": "skipped"}, "toolkit": "fail", "internal": False, "reason": line, "seconds": 0.0,
            "run": time.strftime("%Y-%m-%d"), "build_failed": True}


# ---------------------------------------------------------------------------------------------- results


def cpuinfo_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("transformers", "optimum-onnx", "optimum", "torch", "onnxruntime", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_state() -> str:
    """The commit measured, and whether the toolkit's files differ from it (a run during development)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT, check=False).stdout

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
    return git("rev-parse", "--short", "HEAD").strip() + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _optimum_cell(o: dict[str, Any]) -> str:
    if o["status"] == "ok":
        files = o.get("files", [])
        text = f"ok ({len(files)} file{'s' if len(files) != 1 else ''}: {', '.join(files)})"
        return text + (f"; validation warning: {o['warning']}" if o.get("warning") else "")
    return f"FAIL: {o.get('error', '')}"


def _step_cell(s: dict[str, Any]) -> str:
    if s["status"] in ("pass", "skipped"):
        return s["status"]
    return f"{s['status']} (exit {s.get('exit_code')})" + (" INTERNAL" if s.get("internal") else "")


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    exported = [r for r in rows if r["optimum"]["status"] == "ok"]
    passed = [r for r in exported if r["toolkit"] == "pass"]
    return {"rows": len(rows), "architectures": len({r["model_type"] for r in rows}),
            "optimum_exports": len(exported), "toolkit_passes_of_optimum": len(passed),
            "toolkit_passes": sum(r["toolkit"] == "pass" for r in rows),
            "toolkit_gate_failed": sum(r["toolkit"] == "gate failed" for r in rows),
            "internal": sum(bool(r["internal"]) for r in rows)}


def grouped_reasons(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Distinct toolkit failure lines, each with the (model, task) pairs it stopped, most frequent first."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["toolkit"] != "pass" and r.get("reason"):
            step = "bench" if r["convert"]["status"] == "pass" else "convert"  # a gate failure is convert's line
            key = f"{step}: {r['reason']}" + (" [INTERNAL]" if r["internal"] else "")
            groups.setdefault(key, []).append(f"{r['model_type']}/{r['task']}")
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def markdown(payload: dict[str, Any]) -> str:
    rows, s = payload["rows"], payload["summary"]
    v = payload["versions"]
    lines = ["# Hugging Face coverage: Optimum `main_export` vs the toolkit's `convert hf:` + `bench`, side by side",
             "", f"Command: `{payload['command']}` (rows of architectures it did not check are kept from earlier "
             "runs of this script; each row names its date)", "",
             f"Date: {payload['date']}. CPU: {payload['cpu_model']} ({payload['cpu_count']} logical cores). "
             f"Versions: transformers {v['transformers']}, optimum-onnx {v['optimum-onnx']} (optimum "
             f"{v['optimum']}), torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}. "
             f"Toolkit: {payload.get('git', '?')}.", "",
             "Tiny random-init configs built by the script (hidden 32, 2 layers, 2 heads, vocabulary 128, 32x32 "
             "images, short audio; whisper keeps its 3000 mel frames, the length Optimum's dummy input has), one "
             "`save_pretrained` folder per architecture shared by both sides, no tokenizer (an image processor "
             "only for DINOv2, whose Optimum dummy input reads it). Task: "
             "Optimum's choice for the saved class (`TasksManager.infer_task_from_model`) and its `-with-past` "
             f"task where Optimum has one. Optimum: `main_export(..., do_validation={payload['do_validation']})`; "
             "a validation tolerance miss it only logs is noted as a warning. Toolkit: `cli.py convert hf:FOLDER "
             "--task TASK` (exit 5: a variant failed its accuracy gate, files written) then `cli.py bench OUT "
             "--backends ort,eager --batch-sizes 1` (3 iterations, 4 accuracy samples). INTERNAL: the toolkit's "
             "output has 'internal error' or a Python traceback instead of one clear line.", "",
             f"**Toolkit passes {s['toolkit_passes_of_optimum']} of the {s['optimum_exports']} (model, task) pairs "
             f"Optimum exports** ({s['rows']} pairs over {s['architectures']} architectures; toolkit passes "
             f"{s['toolkit_passes']} in all, {s['toolkit_gate_failed']} more with a failed accuracy gate; "
             f"{s['internal']} INTERNAL). Target (issue 29): every pair Optimum exports, no INTERNAL -> "
             + ("met" if s["toolkit_passes_of_optimum"] == s["optimum_exports"] and not s["internal"] else "MISSED"),
             "", "| family | model type | task | Optimum | toolkit convert | toolkit bench | s | reason |",
             "|---|---|---|---|---|---|---|---|"]
    order = {f: i for i, f in enumerate(FAMILIES)}
    for r in sorted(rows, key=lambda r: (order.get(r["family"], 99), r["model_type"], r["task"])):
        lines.append(f"| {r['family']} | {r['model_type']} | {r['task']} | {_cell(_optimum_cell(r['optimum']))} | "
                     f"{_step_cell(r['convert'])} | {_step_cell(r['bench'])} | {r['seconds']} | "
                     f"{_cell(r.get('reason') or '')} |")
    mapped = sorted({f"{r['model_type']} ({r['model_class']}): {r['task_source']}" for r in rows
                     if r.get("task_source", "infer_task_from_model") != "infer_task_from_model"})
    if mapped:
        lines += ["", "Default tasks not from `infer_task_from_model`: " + "; ".join(mapped) + "."]
    groups = grouped_reasons(rows)
    if groups:
        lines += ["", "## Toolkit failures by line", "", "| pairs | line | (model, task) |", "|---|---|---|"]
        lines += [f"| {len(who)} | {_cell(line)} | {', '.join(who)} |" for line, who in groups]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def interleaved() -> list[str]:
    """Every architecture, one family after another in turn: an interrupted run has checked every family."""
    by_family = [[t for t, a in ARCHS.items() if a.family == f] for f in FAMILIES]
    return [group[i] for i in range(max(map(len, by_family))) for group in by_family if i < len(group)]


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--optimum-child":
        optimum_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"Comma-separated model types (default: all {len(ARCHS)})")
    ap.add_argument("--jobs", type=int, default=1, help="Rows run at once (each in its own processes)")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds per step (Optimum export, convert, bench)")
    ap.add_argument("--keep", default=None, help="Keep the model folders and every export under this folder")
    ap.add_argument("--no-validation", action="store_true", help="Optimum: main_export(do_validation=False)")
    ap.add_argument("--fresh", action="store_true", help="Forget the rows of an earlier results file")
    ap.add_argument("--name", default="coverage_hf_cpu", help="Results file name under benchmarks/results")
    args = ap.parse_args()
    only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else interleaved()
    unknown = [t for t in only if t not in ARCHS]
    if unknown:
        ap.error(f"unknown model type(s) {unknown}; known: {', '.join(ARCHS)}")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="coverage_hf_"))
    work.mkdir(parents=True, exist_ok=True)
    old = RESULTS / f"{args.name}.json"
    before = {} if args.fresh or not old.is_file() else json.loads(old.read_text())
    kept = [r for r in before.get("rows", []) if r["model_type"] not in only]
    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                               "cpu_model": cpuinfo_model(), "cpu_count": os.cpu_count(), "versions": versions(),
                               "git": git_state(),
                               "do_validation": not args.no_validation, "timeout_s": args.timeout, "rows": kept}
    lock = threading.Lock()

    def record(row: dict[str, Any]) -> None:
        with lock:
            payload["rows"].append(row)
            payload["summary"] = summary(payload["rows"])
            write(args.name, payload, markdown(payload))
            o = row["optimum"]
            print(f"{row['model_type']:>30} {row['task']:<40} optimum {o['status']:<4} toolkit {row['toolkit']:<11}"
                  f"{' INTERNAL' if row['internal'] else ''} {row['seconds']:>6} s  {row.get('reason') or ''}"[:300],
                  flush=True)

    jobs: list[tuple[str, Arch, str, str, Path]] = []
    for model_type in only:  # folders first, in this process: each build is a second or less
        arch, folder = ARCHS[model_type], work / "models" / model_type
        try:
            if not (folder / "config.json").is_file():
                build_folder(model_type, arch, folder)
            tasks, source = tasks_for(model_type, arch)
            jobs += [(model_type, arch, task, source, folder) for task in tasks]
        except Exception as exc:  # recorded as that architecture's row
            record(build_failed_row(model_type, arch, exc))
    print(f"{len(jobs)} (model, task) pairs over {len(only)} architectures; work folder {work}", flush=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for fut in [pool.submit(check_row, *job, work, args) for job in jobs]:
                record(fut.result())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    s = payload["summary"] = summary(payload["rows"])
    write(args.name, payload, markdown(payload))
    print(f"toolkit passes {s['toolkit_passes_of_optimum']} of the {s['optimum_exports']} (model, task) pairs Optimum "
          f"exports; {s['internal']} INTERNAL -> {RESULTS / args.name}.md", flush=True)


if __name__ == "__main__":
    main()
