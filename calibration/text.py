"""Real text that ships on every machine, as byte tokens, and perplexity over it.

The Python standard library's own ``.py`` files (source and docstrings) are the corpus: no download, the same on
every machine with the same Python. A file is in the training split or the held-out split by a hash of its name
(about one in ten held out), so held-out text never shares a file with training text. Tokens are the UTF-8
bytes (a vocabulary of 256: no tokenizer to download; a transformers GPT-2 with ``vocab_size=256`` embeds them as
ids 0..255).

:func:`perplexity_from_logits` is the one perplexity formula (convert's generation gate and the generation
benchmark both use it): exp of the mean next-token negative log-likelihood.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Literal

import numpy as np

from core.errors import InputError

#: the byte vocabulary
BYTE_VOCAB = 256
#: one file in HELD_OUT_EVERY is held out (by the hash of its name)
HELD_OUT_EVERY = 10

Split = Literal["train", "heldout"]


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> Split:
    """Which split a file belongs to, by the sha1 of its name: fixed, independent of the file's content."""
    return "heldout" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0 else "train"


def stdlib_files(split: Split) -> list[Path]:
    """The standard library's top-level ``.py`` files of one split, sorted by name."""
    files = [p for p in sorted(stdlib_folder().glob("*.py")) if split_of(p.name) == split]
    if not files:
        raise InputError(f"no {split} .py files found in the standard library folder {stdlib_folder()}")
    return files


def stdlib_bytes(split: Split, max_bytes: int | None = None) -> bytes:
    """The split's files concatenated (each followed by a blank line), at most ``max_bytes``."""
    out = bytearray()
    for p in stdlib_files(split):
        out += p.read_bytes() + b"\n\n"
        if max_bytes is not None and len(out) >= max_bytes:
            return bytes(out[:max_bytes])
    return bytes(out)


def encode(text: bytes | str) -> np.ndarray:
    """Byte token ids (int64)."""
    data = text.encode() if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode(ids: np.ndarray) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def windows(ids: np.ndarray, length: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` windows of ``length`` tokens from ``ids`` at seeded random offsets: (count, length) int64."""
    if ids.size < length + 1:
        raise InputError(f"the text has {ids.size} tokens; windows of {length} need more")
    starts = np.random.default_rng(seed).integers(0, ids.size - length, size=count)
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int64)


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """(sum of the negative log-likelihoods of each next token, how many): ``logits`` (batch, seq, vocab) of the
    model on ``ids`` (batch, seq); position t predicts token t + 1. Float64 log-softmax."""
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {logits.shape} do not match ids {ids.shape}")
    x = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    m = x.max(-1, keepdims=True)
    logz = (m[..., 0] + np.log(np.exp(x - m).sum(-1)))
    picked = np.take_along_axis(x, target[..., None], -1)[..., 0]
    return float((logz - picked).sum()), int(target.size)


def perplexity_from_logits(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) of ``logits`` on ``ids`` (see :func:`next_token_nll`)."""
    total, count = next_token_nll(logits, ids)
    return float(np.exp(total / count))
