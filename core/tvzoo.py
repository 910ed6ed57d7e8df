"""What each torchvision model family needs to be exported by name: the builder's keyword arguments, the sample
input, a wrapper where the model's own forward() cannot be an ONNX graph, and what a random init must fix.

Families, by the ``torchvision.models`` submodule that registers the builder (``list_models(module=...)``):

- classification, quantization (``quantized_*`` names): one image, NCHW at the weights' crop. A quantizable
  model is built with ``quantize=False``: its float architecture (QuantStub/DeQuantStub, fusable blocks), which
  exports as plain ONNX; PyTorch's own int8 kernels (fbgemm) do not export, and the toolkit's INT8 variants
  quantize the float graph instead. Its named weights are the float ones it was quantized from.
- segmentation: one image at the weights' resize (520); the backbone is random too (``weights_backbone=None``).
- video: one clip N x 3 x T x H x W at the weights' crop, T its ``min_temporal_size`` or 16 frames.
- optical flow (RAFT): two images (``image1``, ``image2``) at the weights' ``min_size`` (128 x 128, multiples
  of 8), fixed; the output is the final flow field (``flow``), not the list of every refinement.
- detection: a list of images in, one dict per image out. Exported through :class:`DetectorOutputs`: one image
  tensor at a FIXED batch of 1 in, at the model's own ``min_size`` (fixed too: the traced graph of an R-CNN
  gives other detections than PyTorch at a size it was not traced at), named outputs out (boxes, scores, labels,
  and masks or keypoints where the model has them).

A detector's count of detections depends on the data. It is built with a score threshold of 0, so it always
returns its ``detections_per_img`` best boxes (a count fixed by the builder, in the weights note), and at random
init its score and box-regression layers are rescaled (:func:`spread_scores`) so that scores differ between classes
and between inputs: at PyTorch's init every class scores ~1/91 and every ranking is a tie, which parity cannot
measure. Not solved: at random init an R-CNN's selections (the RPN's top-k proposals and NMS, then the ROI
heads' top detections) still differ between ONNX Runtime and PyTorch on some images, where float rounding moves
a candidate across an IoU threshold or the top-k boundary: keypointrcnn_resnet50_fpn fails parity so
(benchmarks/results/coverage_tv_cpu.md); SSDlite passes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Family = str  # "classification" | "quantization" | "detection" | "segmentation" | "video" | "optical_flow"

#: ``torchvision.models`` submodule -> family
_SUBMODULES = {"detection": "detection", "segmentation": "segmentation", "video": "video",
               "optical_flow": "optical_flow", "quantization": "quantization"}

#: A detector's score and box-regression layers, by architecture, in stages measured one forward pass each (module
#: paths; a ``ModuleList`` stands for each of its entries; ``True``: a score layer, ``False``: box deltas). The
#: RPN's objectness and deltas pick the boxes the ROI heads score, so those are measured after the RPN is set.
_HEAD_LAYERS: dict[str, tuple[tuple[tuple[str, bool], ...], ...]] = {
    "rcnn": ((("rpn.head.cls_logits", True), ("rpn.head.bbox_pred", False)),
             (("roi_heads.box_predictor.cls_score", True), ("roi_heads.box_predictor.bbox_pred", False))),
    "retinanet": ((("head.classification_head.cls_logits", True), ("head.regression_head.bbox_reg", False)),),
    "fcos": ((("head.classification_head.cls_logits", True), ("head.regression_head.bbox_ctrness", True)),),
    "ssd": ((("head.classification_head.module_list", True), ("head.regression_head.module_list", False)),),
}
#: Standard deviation the score logits get at random init (on a seeded sample image).
SCORE_LOGIT_STD = 4.0
#: Standard deviation a random-init detector's box deltas get: boxes near their anchors. At PyTorch's init a box
#: moves by up to e^4 times its anchor's size and most end clipped to the image border, degenerate boxes (a pixel
#: wide) whose pooled features turn the two runtimes' rounding into different detections.
BOX_DELTA_STD = 0.1
#: Detections a detector returns: its best by score, whatever the score (a fixed count). Fewer than the builders'
#: 100-300: the more detections, the lower the scores reached and the closer two of them (parity swaps two
#: detections whose scores differ by less than the rounding of two runtimes).
DETECTIONS = 20
#: RAFT's images at random init: its weights' ``min_size`` (a multiple of 8, which RAFT needs).
FLOW_SIZE = 128
#: Frames of a video clip where the weights do not say (the clip length torchvision's video models train on).
VIDEO_FRAMES = 16


def builders() -> list[str]:
    """Every torchvision model builder (``torchvision.models.list_models()``), sorted."""
    import torchvision

    return sorted(torchvision.models.list_models())


def family(name: str) -> Family:
    """The family of a builder in :func:`builders`."""
    import torchvision

    for sub, fam in _SUBMODULES.items():
        if name in torchvision.models.list_models(module=getattr(torchvision.models, sub)):
            return fam
    return "classification"


def weights_enum(name: str) -> Any:
    """The weights enum named weights are looked up in (a quantizable model's: the float weights it was
    quantized from, which ``quantize=False`` takes)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if family(name) == "quantization":
        float_w = enum.DEFAULT.meta.get("unquantized")
        if float_w is not None:
            return type(float_w)
    return enum


def builder_kwargs(name: str) -> dict[str, Any]:
    """The builder's arguments besides ``weights``: nothing is downloaded (a random backbone), a quantizable
    model in float, a detector that returns its DETECTIONS best boxes whatever their score (a fixed count, the
    same with trained weights, so that the file and the module bench rebuilds from weights.pt agree)."""
    fam = family(name)
    if fam == "quantization":
        return {"quantize": False}
    if fam == "segmentation":
        return {"weights_backbone": None}
    if fam == "detection":
        rcnn = "rcnn" in name
        return {"weights_backbone": None, "box_score_thresh" if rcnn else "score_thresh": 0.0,
                "box_detections_per_img" if rcnn else "detections_per_img": DETECTIONS}
    return {}


def _arch(name: str) -> str:
    return next(a for a in ("rcnn", "retinanet", "fcos", "ssd") if a in name)


@functools.cache
def _detector_class() -> Any:
    import torch

    class DetectorOutputs(torch.nn.Module):
        """A torchvision detector as an ONNX-exportable module: ``images`` (1 x 3 x H x W, values 0..1; the
        model normalises and resizes inside) -> the one image's detections by name. The batch is fixed at 1:
        the detector takes a Python list of images, which the trace unrolls, and the count of detections of each
        image is its own, so several images cannot share one output tensor."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: Any) -> dict[str, Any]:
            det = self.model(list(images))[0]
            keys = [k for k in ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores") if k in det]
            return {k: det[k] for k in keys}

    return DetectorOutputs


@functools.cache
def _flow_class() -> Any:
    import torch

    class FinalFlow(torch.nn.Module):
        """RAFT returns the flow after each of its refinement steps; the exported model returns the last one,
        the prediction (``flow``: N x 2 x H x W)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, image1: Any, image2: Any) -> Any:
            return self.model(image1, image2)[-1]

    return FinalFlow


def is_wrapped(module: Any) -> bool:
    """Whether ``module`` is one of this file's wrappers around a torchvision model (at ``.model``)."""
    return isinstance(module, (_detector_class(), _flow_class()))


def state_target(module: Any, state: dict[str, Any]) -> Any:
    """The module a state dict loads into: the wrapper for the weights.pt an artifact saved (keys under
    ``model.``), the torchvision model inside it for a plain torchvision state dict."""
    if is_wrapped(module) and not all(k.startswith("model.") for k in state):
        return module.model
    return module


@dataclass
class Inputs:
    """The sample input of a family: one image-like shape (``default_shape``; ``--input-shape`` replaces it), or
    named example inputs with their symbolic dims."""

    default_shape: tuple[int, ...] | None = None
    example_inputs: dict[str, np.ndarray] | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None
    #: why the batch is fixed at the examples' (None: it follows --dynamic-batch)
    fixed_batch: str | None = None
    notes: list[str] = field(default_factory=list)


def crop_of(default_weights: Any, fam: Family) -> int | None:
    """The image size the weights were evaluated at: the crop (classification, video), the resize
    (segmentation, which has no crop)."""
    try:
        t = default_weights.transforms()
    except Exception:
        return None
    size = getattr(t, "crop_size", None) or (getattr(t, "resize_size", None) if fam == "segmentation" else None)
    return int(size[0]) if size else None


def build(name: str, weights: Any, seed: int) -> tuple[Any, Inputs]:
    """The module to export (wrapped where the family needs it) and its sample input. ``weights``: a weights
    enum member, or None for a random init (seeded by the caller)."""
    import torchvision

    fam = family(name)
    model = torchvision.models.get_model(name, weights=weights, **builder_kwargs(name)).eval()
    default = getattr(torchvision.models.get_model_weights(name), "DEFAULT", None)
    size = (crop_of(default, fam) if default is not None else None) or 224
    gen = np.random.default_rng(seed)
    if fam == "detection":
        module = _detector_class()(model).eval()
        side = int(model.transform.min_size[0])
        images = gen.random((1, 3, side, side), dtype=np.float32)
        count = _detections_per_img(model)
        why = (f"{name}: batch fixed at 1: a torchvision detector takes a list of images and returns one dict per "
               f"image, each with its own count of detections; the ONNX model takes one 1x3x{side}x{side} image "
               f"(0..1; height and width fixed too: the traced resize holds only at the traced size) and returns "
               f"{', '.join(_detector_outputs(model))}: its {count} best detections (score threshold 0)")
        return module, Inputs(example_inputs={"images": images}, fixed_batch=why, notes=[why])
    if fam == "optical_flow":
        module = _flow_class()(model).eval()
        pair = {k: gen.random((1, 3, FLOW_SIZE, FLOW_SIZE), dtype=np.float32) for k in ("image1", "image2")}
        note = (f"{name}: two {FLOW_SIZE}x{FLOW_SIZE} images in (fixed: RAFT needs multiples of 8), the final flow "
                "out (of its refinement steps)")
        # named in dynamic_axes: the output's name (the batch of each, as for any model)
        axes = {"image1": {0: "batch"}, "image2": {0: "batch"}, "flow": {0: "batch"}}
        return module, Inputs(example_inputs=pair, dynamic_axes=axes, notes=[note])
    if fam == "video":
        meta = default.meta if default is not None else {}
        frames = max(int(meta.get("min_temporal_size") or 1), VIDEO_FRAMES)
        return model, Inputs(default_shape=(1, 3, frames, size, size))
    return model, Inputs(default_shape=(1, 3, size, size))


def detections_note(name: str, module: Any) -> str:
    """What a detector's outputs hold, for the weights note: a count fixed by its builder."""
    thresh = next(iter(k for k in builder_kwargs(name) if k.endswith("score_thresh")))
    return (f"outputs: the {_detections_per_img(module.model)} best detections by score ({thresh}=0.0: a fixed "
            "count wherever the image has that many candidate boxes)")


def _detections_per_img(model: Any) -> int:
    count: Any = getattr(getattr(model, "roi_heads", None), "detections_per_img", None)
    return int(count if count is not None else getattr(model, "detections_per_img", 0))


def _detector_outputs(model: Any) -> list[str]:
    heads = getattr(model, "roi_heads", None)
    names = ["boxes", "scores", "labels"]
    if heads is not None and getattr(heads, "mask_predictor", None) is not None:
        names.append("masks")
    if heads is not None and getattr(heads, "keypoint_predictor", None) is not None:
        names += ["keypoints", "keypoints_scores"]
    return names


def spread_scores(name: str, module: Any, images: np.ndarray) -> str:
    """Rescale a random-init detector's score layers so that their logits have standard deviation
    SCORE_LOGIT_STD on ``images``, and its box-regression layers to deltas of BOX_DELTA_STD; the note saying so.
    Only the last Conv2d/Linear of each layer is scaled (weight and bias by one factor): the rest of the model
    keeps its init."""
    import torch

    detector = module.model
    done: list[str] = []
    for stage in _HEAD_LAYERS[_arch(name)]:
        leaves: list[tuple[Any, float]] = []
        for path, is_score in stage:
            layer = detector.get_submodule(path)
            parts = list(layer) if isinstance(layer, torch.nn.ModuleList) else [layer]
            leaves += [([m for m in part.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)][-1],
                        SCORE_LOGIT_STD if is_score else BOX_DELTA_STD) for part in parts]
            done.append(path)
        seen: dict[int, list[Any]] = {i: [] for i in range(len(leaves))}
        hooks = [leaf.register_forward_hook(lambda _m, _i, out, i=i, seen=seen: seen[i].append(out.detach()))
                 for i, (leaf, _) in enumerate(leaves)]
        try:
            with torch.no_grad():
                module(torch.from_numpy(images))
        finally:
            for h in hooks:
                h.remove()
        for i, (leaf, target) in enumerate(leaves):
            std = float(torch.cat([o.flatten() for o in seen[i]]).std()) if seen[i] else 0.0
            if std > 0:
                with torch.no_grad():
                    leaf.weight.mul_(target / std)
                    if leaf.bias is not None:
                        leaf.bias.mul_(target / std)
    return (f"{', '.join(done)} rescaled to score logits of std {SCORE_LOGIT_STD:g} and box deltas of std "
            f"{BOX_DELTA_STD:g} on a seeded image (at PyTorch's init every class scores alike, every ranking of "
            "detections is a tie, and most boxes are clipped to the image border)")
