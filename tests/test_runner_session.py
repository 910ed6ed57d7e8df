"""The session seam: a runner opens a session that keeps state across calls, and a sequence of calls is timed as one
unit. A real stateful use: ONNX Runtime over a tiny GPT-2 exported with its KV cache by the toolkit; the session
feeds each step's present back as the next step's past, and its greedy tokens and logits equal a recomputation of
the whole sequence without any cache (transformers, use_cache=False). Tiny random-init config; nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.manifest import Manifest
from core.metrics import LatencyStats
from runtimes.base import RunnerOptions, Session
from runtimes.ort import OrtRunner
from runtimes.session import KVCacheSession, generate
from runtimes.timing import time_units

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from tests.test_hf_optimum import _cli  # noqa: E402  (after the skips: it needs transformers too)

PROMPT = np.array([[5, 17, 42, 7, 9, 11]], np.int64)
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the saved transformers folder, the artifact folder `convert --task text-generation-with-past` wrote).
    initializer_range 0.5: at the default 0.02 the random model repeats one token, which a broken cache could
    repeat too; here its greedy continuation of PROMPT changes token from step to step."""
    import torch

    root = tmp_path_factory.mktemp("kv")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                                         n_positions=64, initializer_range=0.5)) \
        .save_pretrained(root / "gpt2")
    out = root / "art"
    proc = _cli("convert", f"hf:{root / 'gpt2'}", "--task", "text-generation-with-past", "--no-optimize",
                "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return root / "gpt2", out


def _no_cache_reference(folder: Path, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy continuation of PROMPT, every step recomputed over the whole sequence with no cache: (the tokens,
    each step's last-position logits)."""
    import torch

    model = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    ids, logits = torch.from_numpy(PROMPT), []
    with torch.inference_mode():
        for _ in range(steps + 1):
            last = model(ids, use_cache=False).logits[:, -1]
            logits.append(last.numpy())
            ids = torch.cat([ids, last.argmax(-1)[:, None]], 1)
    return ids[:, PROMPT.shape[1]:].numpy(), logits


def _runner(art: Path) -> OrtRunner:
    manifest = Manifest.load(art)
    return OrtRunner(manifest, art, manifest.artifacts["fp32"], RunnerOptions(threads=1, ort_spinning=False))


def test_kv_cache_session_equals_a_no_cache_recomputation(decoder: tuple[Path, Path]) -> None:
    folder, art = decoder
    want_tokens, want_logits = _no_cache_reference(folder, DECODE_STEPS)
    assert len(set(want_tokens[0].tolist())) > 2  # the check below could tell a wrong continuation

    with _runner(art) as runner:
        index = runner.manifest.iospec.output_names.index("logits")
        with runner.open_session() as session:  # the steps by hand: each one's logits
            assert isinstance(session, KVCacheSession)
            got_logits = [session.step({"input_ids": PROMPT})[index][:, -1]]
            for token in want_tokens[0, :DECODE_STEPS]:
                got_logits.append(session.step({"input_ids": np.array([[token]], np.int64)})[index][:, -1])
            assert session.length == PROMPT.shape[1] + DECODE_STEPS  # the last token chosen is not fed
            assert session.cache["past_key_values.0.key"].shape[2] == session.length
        with runner.open_session() as session:  # the greedy loop, tokens chosen from the session's own logits
            tokens = generate(session, PROMPT, DECODE_STEPS)
            assert session.steps == DECODE_STEPS + 1

    np.testing.assert_array_equal(tokens, want_tokens)
    for got, want in zip(got_logits, want_logits, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # The same decode step without the cache (a session that forgets) sees one token, not the sequence: the
    # comparison above would fail on it.
    with _runner(art) as runner, runner.open_session() as forgetful:
        first_decode = forgetful.step({"input_ids": want_tokens[:, :1]})[index][:, -1]
    assert not np.allclose(first_decode, want_logits[1], rtol=1e-4, atol=1e-4)


def test_prefill_and_decode_steps_timed_as_one_unit(decoder: tuple[Path, Path]) -> None:
    """The unit is prefill + 4 decode steps in a fresh session; its figures come from the one-shot timing's
    interval machinery (rounds, per-round p50s, the interval of their median)."""
    _, art = decoder
    steps: list[int] = []
    with _runner(art) as runner:

        def unit() -> None:
            with runner.open_session() as session:
                generate(session, PROMPT, DECODE_STEPS)
                steps.append(session.steps)

        timed = time_units([unit], warmup=1, iters=6, rounds=3, block_warmup=1)[0]
    lat = LatencyStats.from_samples(timed.samples, timed.rounds)
    assert steps == [DECODE_STEPS + 1] * (1 + 3 + 6)  # warm-up, one untimed per round, the timed units
    assert lat.iters == 6 and len(lat.round_p50s) == 3 and lat.p50_interval is not None
    assert 0 < lat.min <= lat.p50 <= lat.max
    assert timed.warmup_calls == [1, 1, 1]


def test_a_stateless_runner_gets_the_default_session(tiny_artifacts: Path) -> None:
    """No KV cache: each step is one infer, nothing kept; a session needs a loaded runner."""
    manifest = Manifest.load(tiny_artifacts)
    runner = OrtRunner(manifest, tiny_artifacts, manifest.artifacts["fp32"], RunnerOptions(threads=1))
    with pytest.raises(RuntimeError, match="loaded runner"):
        runner.open_session()
    feed = manifest.iospec.random_feed(2, seed=0)
    with runner, runner.open_session() as session:
        assert type(session) is Session
        got = session.step(feed)
        np.testing.assert_array_equal(got[0], runner.infer(feed)[0])
        assert session.steps == 1
