"""Real text that ships on every machine, as byte tokens, and perplexity over it.

The Python standard library's own ``.py`` files (source and docstrings) are the corpus: no download, the same on
every machine with the same Python. A file is in the training split or the held-out split by a hash of its name
(about one in ten held out), so held-out text never shares a file with training text. Tokens are the UTF-8
bytes (a vocabulary of 256: no tokenizer to download; a transformers GPT-2 with ``vocab_size=256`` embeds them as
ids 0..255).

:func:`perplexity_from_logits` is the one perplexity formula (convert's generation gate and the generation
benchmark both use it): exp of the mean next-token negative log-likelihood.

:func:`heldout_text` is what a user's ``--text`` becomes (``bench`` on a KV-cache decoder, convert's perplexity
gate): ``stdlib`` (the held-out split above) or a UTF-8 file, tokenized by the model's own tokenizer where its
Hugging Face folder has one, else as bytes (a vocabulary of at least 256), cut into seeded windows.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
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


# -- held-out text as a user gives it (--text) -------------------------------------------------------------------------
#: ``--text stdlib``: the held-out standard library files
STDLIB = "stdlib"
#: at most this many bytes of the held-out standard library are read (windows are drawn from all of them)
STDLIB_TEXT_BYTES = 512 * 1024
#: perplexity windows: how many, and their most tokens (the model's positions cap it)
PPL_WINDOWS, PPL_WINDOW = 16, 128
#: files in a Hugging Face folder that mean it has its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class HeldOutText:
    """A held-out text as token ids (``ids``: the whole stream), where it came from and how it was tokenized."""

    ids: np.ndarray
    source: str
    tokens: str

    def windows(self, length: int, count: int, seed: int = 0) -> np.ndarray:
        return windows(self.ids, length, count, seed)

    def basis(self, ppl_windows: np.ndarray) -> str:
        """What a perplexity measured on ``ppl_windows`` (rows x tokens) of this text is."""
        return (f"next-token perplexity on {ppl_windows.shape[0]} windows of {ppl_windows.shape[1]} {self.tokens} "
                f"of {self.source}")


def check_text_source(source: str, flag: str = "--text") -> None:
    """A held-out text source is ``stdlib`` or a file that is there; else one clear line naming ``flag``."""
    if source != STDLIB and not Path(source).is_file():
        raise InputError(f"{flag} {source!r}: no such file (give a UTF-8 text file, or {STDLIB!r} for the held-out "
                         "standard library files)")


def text_bytes(source: str) -> tuple[bytes, str]:
    """(the text, what it is) of ``--text``: ``stdlib`` or a UTF-8 file; anything else is one clear line."""
    check_text_source(source)
    if source == STDLIB:
        return stdlib_bytes("heldout", STDLIB_TEXT_BYTES), \
            f"the held-out standard library files ({stdlib_folder()}, 1 file in {HELD_OUT_EVERY} by name)"
    path = Path(source)
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--text {source}: not UTF-8 text (byte {exc.start})") from None
    return data, str(path)


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES)


def heldout_text(source: str, vocab: int | None, tokenizer_folder: Path | None = None) -> HeldOutText:
    """``--text`` as token ids: by the tokenizer of ``tokenizer_folder`` (the model's Hugging Face folder) where it
    has one, else UTF-8 bytes; refused in one line when an id falls outside the model's ``vocab``."""
    data, what = text_bytes(source)
    if tokenizer_folder is not None and has_tokenizer(tokenizer_folder):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
            ids = np.asarray(tok(data.decode("utf-8"))["input_ids"], dtype=np.int64)
        except Exception as exc:
            raise InputError(f"--text: the tokenizer of {tokenizer_folder} cannot tokenize it: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        tokens = "tokens (the model's tokenizer)"
    else:
        ids, tokens = encode(data), "byte tokens"
    if ids.size and vocab is not None and int(ids.max()) >= vocab:
        hint = "" if tokens != "byte tokens" else \
            f": byte tokens need a vocabulary of {BYTE_VOCAB} and the model's folder has no tokenizer"
        raise InputError(f"--text {source}: token id {int(ids.max())} is outside the model's vocabulary of "
                         f"{vocab}{hint}")
    return HeldOutText(ids=ids, source=what, tokens=tokens)
