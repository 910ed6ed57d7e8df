"""A KV-cache decoder as OpenVINO's *stateful* model: the cache lives inside the infer request, not in host arrays.

The toolkit's decoder export (Optimum's ``text-generation-with-past``) is stateless: ``past_key_values.<i>.key/value``
inputs, ``present.<i>.key/value`` outputs, and a :class:`runtimes.session.KVCacheSession` feeds each step's present
back as the next step's past, through host memory. OpenVINO's own generation path (Optimum Intel, openvino-genai)
keeps the cache as internal *state* instead: :func:`make_stateful` is our small version of Optimum Intel's
``patch_stateful_decoder`` (``optimum/exporters/openvino/stateful.py``) against OpenVINO's public API:

- ``fuse_cache_reorder``: a ``beam_idx`` input (i32, one per sequence) and a ``Gather`` along the batch dim on every
  cache input, so a beam search can reorder the cache inside the model (greedy feeds ``arange(batch)``);
- ``apply_make_stateful_transformation`` (``openvino._offline_transformations``): each past input and its present
  output become one ``ReadValue``/``Assign`` variable named after the input (:func:`state_map` pairs them by layer
  and key/value, never by position);
- ``build_state_initializer``: each ``ReadValue`` starts as zeros of (the batch of ``input_ids``, kv heads, 0,
  head size), so a reset request begins with an empty cache at any batch.

The stateful model takes ``input_ids``, ``attention_mask``, ``position_ids`` (where the export has them) and
``beam_idx`` and gives ``logits`` only. :class:`StatefulSession` runs it: the first step resets the request's state
(one sequence per session), each step feeds the mask over past + new tokens and the new positions, and the cache's
bytes are read from the request's state. :func:`write_ir` saves the model as ``openvino_model.xml/.bin`` (what
openvino-genai's ``LLMPipeline`` reads: ``runtimes.ovgenai``).

Why (profiled on the 2-core AMD EPYC under load, so approximate): the stateless decode step on OpenVINO was not slow
from recompiling (one shape repeated costs about what growing shapes cost) nor mainly from copying the cache
(a few tenths of a ms); it is OpenVINO's per-call dynamic-shape work (the same graph reshaped static ran ~1 ms
faster) and, above all, the decomposed attention with the cache concatenated in the graph. Made stateful, the
llama export's attention becomes the CPU plugin's ``ScaledDotProductAttentionWithKVCache`` (a 4-layer, 192-wide
llama: 2.5 -> 0.8 ms per step, ORT 0.75, openvino-genai 0.5); the gpt2 export's attention (scale by ``Power``,
causal mask by ``Select`` on the ``bias`` buffer) is not fused, so gpt2 gains less (about 3.6 -> 3.0 ms, ORT 1.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import BackendUnavailableError, first_line
from core.sigstack import keep_valid
from runtimes.decoding import Decoder, DecodeSession, RunnerDecoder
from runtimes.session import PAST, PRESENT, has_kv_cache

if TYPE_CHECKING:
    from core.iospec import IOSpec
    from core.manifest import Artifact, Manifest
    from runtimes.decoding import Decoder
    from runtimes.openvino import OpenVinoRunner

BEAM_IDX = "beam_idx"
LOGITS = "logits"
#: the batch dim of every cache tensor of Optimum's export (batch, kv heads, past, head size)
BATCH_DIM = 0


def state_map(spec: IOSpec) -> dict[str, str]:
    """Each cache input's present output (``past_key_values.3.value`` -> ``present.3.value``): the pairs that become
    one state variable each."""
    if not has_kv_cache(spec):
        raise BackendUnavailableError(f"not a decoder with a KV cache (no {PAST}* inputs with {PRESENT}* outputs)")
    return {n: PRESENT + n[len(PAST):] for n in spec.input_names if n.startswith(PAST)}


def _names(port: Any) -> set[str]:
    return set(port.get_names())


def make_stateful(model: Any, pairs: dict[str, str]) -> Any:
    """``model`` (an ``ov.Model`` of the stateless export) made stateful in place (see the module docstring):
    the ``beam_idx`` input and reorder ``Gather``, then each (past input -> present output) pair of ``pairs`` made one
    variable, initialised to an empty cache of the batch of ``input_ids``."""
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    names = set().union(*(_names(p) for p in [*model.inputs, *model.outputs]))
    if BEAM_IDX in names:
        raise BackendUnavailableError("the model already has a beam_idx input (it is stateful already)")
    if missing := [n for pair in pairs.items() for n in pair if n not in names]:
        raise BackendUnavailableError(f"the OpenVINO model has no {', '.join(missing)}")
    # fuse_cache_reorder: beam_idx selects each sequence's cache row before the model reads it
    batch = model.input("input_ids").get_partial_shape()[0]
    beam_idx = opset13.parameter(name=BEAM_IDX, dtype=ov.Type.i32, shape=ov.PartialShape([batch]))
    beam_idx.output(0).get_tensor().add_names({BEAM_IDX})
    model.add_parameters([beam_idx])
    for past in pairs:
        port = model.input(past)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(BATCH_DIM))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    model.validate_nodes_and_infer_types()
    # make_stateful: past/present pairs -> ReadValue/Assign variables
    apply_make_stateful_transformation(model, dict(pairs))
    # build_state_initializer: an empty cache (past length 0) of the request's batch
    ids = model.input("input_ids")
    batch_of = opset13.gather(opset13.shape_of(ids, output_type="i64"), opset13.constant([0]), opset13.constant(0))
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims: list[Any] = [d.min_length for d in op.get_output_partial_shape(0)]
        dims[BATCH_DIM] = batch_of
        shape = opset13.concat([opset13.constant(np.array([d], np.int64)) if isinstance(d, int) else d for d in dims],
                               axis=0)
        op.set_arguments([opset13.broadcast(opset13.constant(0.0, dtype=op.get_output_element_type(0)), shape)])
    model.validate_nodes_and_infer_types()
    return model


def stateful_model(path: Path, spec: IOSpec, pairs: dict[str, str] | None = None) -> Any:
    """The decoder at ``path`` (the ONNX export, or an OpenVINO IR ``.xml`` of it such as ``int4_ov``) read by OpenVINO
    and made stateful; ``pairs``: the state mapping (default :func:`state_map` of ``spec``).

    After reading, OpenVINO's offline MOC transformations run (``apply_moc_transformations``, no constant folding), as
    ``ov.convert_model`` runs them on an ONNX file: they fuse the exported attention (MatMul, Softmax, MatMul) into
    ``ScaledDotProductAttention``, which the CPU plugin then runs with the state as one
    ``ScaledDotProductAttentionWithKVCache`` node. ``Core.read_model`` alone keeps the decomposed attention (as does
    an IR saved from it), and the cache is then concatenated and copied in the graph every step. (Reading then
    transforming takes 0.3 s on the tiny llama; ``ov.convert_model`` gives the same graph in 2.4 s.)"""
    import openvino as ov
    from openvino._offline_transformations import apply_moc_transformations

    try:
        model = ov.Core().read_model(str(path))
        apply_moc_transformations(model, cf=False)
    except Exception as exc:
        raise BackendUnavailableError(f"OpenVINO cannot read {path.name}: {first_line(exc)}") from None
    return make_stateful(model, state_map(spec) if pairs is None else pairs)


def write_ir(model: Any, folder: Path) -> Path:
    """``folder/openvino_model.xml`` (+ ``.bin``) of ``model``: the file name openvino-genai's LLMPipeline reads."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / "openvino_model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


class StatefulSession:
    """One sequence on a stateful infer request (a :class:`runtimes.decoding.DecodeSession`): the first step resets
    the request's state; each step feeds ``input_ids`` with the mask and positions the model takes and
    ``beam_idx = arange(batch)``; ``logits`` stays on the request (``last_logits`` slices the last position).

    One request serves one session at a time: a step of a session that is no longer the request's last one is an
    error, never a read of another sequence's cache."""

    def __init__(self, owner: StatefulRequest) -> None:
        self.owner, self.length, self.batch = owner, 0, 0

    def run(self, ids: np.ndarray) -> Any:
        """One step on ``ids`` (batch x new tokens); the request's ``logits`` tensor (batch x new x vocab)."""
        o = self.owner
        if self.length == 0:
            o.request.reset_state()
            o.current, self.batch = self, int(ids.shape[0])
        elif o.current is not self:
            raise RuntimeError("another session ran on this OpenVINO request since this one started")
        batch, new = ids.shape
        feed: dict[str, np.ndarray] = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                                       BEAM_IDX: np.arange(batch, dtype=np.int32)}
        if "attention_mask" in o.inputs:
            feed["attention_mask"] = np.ones((batch, self.length + new), dtype=np.int64)
        if "position_ids" in o.inputs:
            feed["position_ids"] = np.tile(np.arange(self.length, self.length + new, dtype=np.int64), (batch, 1))
        o.request.infer(feed, share_inputs=True, share_outputs=True)  # no copies in or out (the step reads one row)
        self.length += new
        return o.request.get_tensor(LOGITS).data

    def step(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self.run(ids)[:, -1])

    def cache_bytes(self) -> int:
        """The bytes of the request's state variables (the KV cache) now."""
        if self.length == 0 or self.owner.current is not self:
            return 0
        return sum(int(s.state.data.nbytes) for s in self.owner.request.query_state())


class StatefulRequest:
    """A stateful decoder compiled for the CPU with one infer request (see the module docstring)."""

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        import openvino as ov

        self.inputs = {n for p in model.inputs for n in p.get_names()}
        try:
            self.compiled = ov.Core().compile_model(model, "CPU", config)
        except Exception as exc:
            raise BackendUnavailableError(f"OpenVINO cannot compile the stateful decoder: {first_line(exc)}") from None
        self.request = self.compiled.create_infer_request()
        self.current: StatefulSession | None = None

    def session(self) -> StatefulSession:
        return StatefulSession(self)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits of ``ids`` from an empty cache (a session of one step)."""
        return np.array(self.session().run(ids))


#: OpenVINO's CPU plugin keeps a stateful model's KV cache in u8 by default (its ``KV_CACHE_PRECISION``): on the tiny
#: llama that moved logits by 0.17 after the prefill and changed greedy tokens. The cache is pinned to the compute
#: precision, as ``INFERENCE_PRECISION_HINT`` is pinned to f32 (``core.flops.openvino_config``).
KV_CACHE_PRECISION = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


class StatefulDecoder(Decoder):
    """A decoder whose sessions and forward run on a :class:`StatefulRequest` (``stateful``, set by ``load``): the
    openvino backend's, and openvino-genai's for what its pipeline does not expose (logits, teacher forcing)."""

    stateful: StatefulRequest | None = None

    def _request(self) -> StatefulRequest:
        if self.stateful is None:
            raise RuntimeError(f"{self.label}: load() first")
        return self.stateful

    def session(self) -> DecodeSession:
        return self._request().session()

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return self._request().forward(ids)


class OvStatefulDecoder(StatefulDecoder, RunnerDecoder):
    """The openvino generation backend: an ONNX variant on OpenVINO as its stateful model (the module docstring).

    ``load`` first loads the variant's :class:`runtimes.openvino.OpenVinoRunner` (its crash probe in a child process,
    its compile settings and the check that it computes in the precision asked), then compiles the stateful model
    with the same settings and the KV cache in the compute precision; decoding never feeds the cache through host
    arrays."""

    def __init__(self, runner: OpenVinoRunner, pairs: dict[str, str] | None = None) -> None:
        super().__init__(runner)
        self.ov_runner, self.pairs = runner, pairs
        self.stateful: StatefulRequest | None = None

    def load(self) -> None:
        runner = self.ov_runner
        runner.load()
        try:
            config = dict(runner.config)
            config["KV_CACHE_PRECISION"] = KV_CACHE_PRECISION.get(str(config.get("INFERENCE_PRECISION_HINT")), "f32")
            path = runner.base / runner.artifact.file.path
            self.stateful = StatefulRequest(stateful_model(path, runner.manifest.iospec, self.pairs), config)
        except BackendUnavailableError:
            self.close()
            raise
        # the stateless compile was for the checks above; decoding runs on the stateful request only
        runner.request = runner.compiled = None
        keep_valid()  # the CPU plugin may have put back a freed signal stack (core.sigstack)

    def close(self) -> None:
        self.stateful = None
        self.runner.close()  # and the signal stack made valid again (core.sigstack)

    def extra(self) -> dict[str, Any]:
        return {"openvino_stateful": True}


def openvino_decoders(manifest: Manifest, base: Path, variants: list[Artifact], threads: int | None) -> list[Decoder]:
    """The openvino generation backend's decoders: an :class:`OvStatefulDecoder` per variant (ONNX files and OpenVINO
    IRs, e.g. ``int4_ov``), with the request's threads (``runtimes.genbackends`` picks the variants)."""
    from runtimes.base import RunnerOptions
    from runtimes.openvino import OpenVinoRunner

    opts = RunnerOptions(threads=threads)
    return [OvStatefulDecoder(OpenVinoRunner(manifest, base, a, opts)) for a in variants]
