"""Sessions that keep state across calls: a decoder's KV cache (prefill, then decode steps).

A decoder exported with its cache (Optimum's ``text-generation-with-past``) takes ``past_key_values.<i>.<key|value>``
inputs and gives ``present.<i>.<key|value>`` outputs; its IOSpec names the cache length ``past_sequence``. A
:class:`KVCacheSession` starts with an empty cache (length 0), feeds each step's present back as the next step's
past, and fills ``attention_mask`` (ones over past + new tokens) and ``position_ids`` (the new tokens' positions)
when the model takes them, so a step is fed only ``input_ids``. :func:`generate` is the greedy loop over a session:
prefill on the prompt, then one token per decode step; `runtimes.timing.time_unit` times such a loop as one unit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from core.errors import InputError
from runtimes.base import Session

if TYPE_CHECKING:
    from core.iospec import IOSpec
    from core.manifest import Manifest
    from runtimes.base import Runner

PAST, PRESENT = "past_key_values.", "present."
#: the IOSpec dim that is the cache's length
PAST_DIM = "past_sequence"


def has_kv_cache(spec: IOSpec) -> bool:
    """Whether every cache input has its present output (a decoder exported with its KV cache)."""
    past = [n for n in spec.input_names if n.startswith(PAST)]
    return bool(past) and all(PRESENT + n[len(PAST):] in spec.output_names for n in past)


def is_seq2seq(manifest: Manifest) -> bool:
    """An encoder-decoder exported with its decoder's cache (Optimum's components): an encoder and a merged decoder
    or a decoder with past (``runtimes.seq2seq`` decodes them together)."""
    comps = set(manifest.components())
    return "encoder_model" in comps and ("decoder_model_merged" in comps
                                         or {"decoder_model", "decoder_with_past_model"} <= comps)


def is_generation_artifact(manifest: Manifest) -> bool:
    """One decoder file with a KV cache, or an encoder-decoder with its decoder's cache (t5, bart, whisper):
    ``bench`` and ``tune`` run it as a generation loop (other models exported as several files are measured
    component by component)."""
    return is_seq2seq(manifest) or (not manifest.components() and has_kv_cache(manifest.iospec))


class KVCacheSession(Session):
    """A decoder's KV cache kept across steps (see the module docstring); host arrays, as ``infer`` gives them."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner)
        spec = runner.manifest.iospec
        if not has_kv_cache(spec):
            raise InputError(f"{runner.label}: the model has no KV cache (no {PAST}* inputs with {PRESENT}* outputs)")
        self.spec = spec
        self.past_names = [n for n in spec.input_names if n.startswith(PAST)]
        self.cache: dict[str, np.ndarray] = {}
        self.length = 0

    def _empty(self, name: str, batch: int) -> np.ndarray:
        """A cache input of length 0: the IOSpec's shape with the batch and past length bound."""
        t = self.spec.input(name)
        shape = [batch if d == "batch" else 0 if d == PAST_DIM else d for d in t.shape]
        if not all(isinstance(d, int) for d in shape):
            raise InputError(f"{name}: cannot start an empty cache of shape {t.shape}")
        return np.zeros([int(d) for d in shape], dtype=t.dtype)

    def step(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``feed`` holds ``input_ids`` (batch x new tokens) and any other input but the cache, mask and
        positions, which the session supplies."""
        ids = feed["input_ids"]
        batch, new = ids.shape
        full = dict(feed)
        for n in self.past_names:
            full[n] = self.cache[n] if self.cache else self._empty(n, batch)
        names = self.spec.input_names
        if "attention_mask" in names and "attention_mask" not in feed:
            full["attention_mask"] = np.ones((batch, self.length + new), dtype=np.int64)
        if "position_ids" in names and "position_ids" not in feed:
            full["position_ids"] = np.tile(np.arange(self.length, self.length + new, dtype=np.int64), (batch, 1))
        outs = super().step(full)
        by_name = dict(zip(self.spec.output_names, outs, strict=True))
        self.cache = {n: by_name[PRESENT + n[len(PAST):]] for n in self.past_names}
        self.length += new
        return outs

    def close(self) -> None:
        self.cache = {}
        self.length = 0


def generate(session: Session, prompt: np.ndarray, steps: int, logits: str = "logits") -> np.ndarray:
    """Greedy decoding: one prefill step on ``prompt`` (batch x tokens), then ``steps`` decode steps of one token
    each. Returns the ``steps + 1`` tokens chosen (batch x steps + 1): the prefill's, then each decode step's."""
    index = session.runner.manifest.iospec.output_names.index(logits)
    out = session.step({"input_ids": prompt})
    tokens = [out[index][:, -1].argmax(-1)]
    for _ in range(steps):
        out = session.step({"input_ids": tokens[-1][:, None].astype(prompt.dtype)})
        tokens.append(out[index][:, -1].argmax(-1))
    return np.stack(tokens, axis=1)
