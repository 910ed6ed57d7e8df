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

A detector's count of detections depends on the data. It is built with a score threshold of 0 (an R-CNN's RPN
too), so it always returns its ``detections_per_img`` best boxes (a count fixed by the builder, in the weights note).

What a random init needs so that parity measures something (each applied only without --weights, seeded, and said
in the weights note):

- :func:`calibrate_norms` (detection, segmentation): BatchNorm statistics measured on seeded images. At PyTorch's
  init they normalise nothing and MobileNetV3's features vanish (~1e-8): deeplabv3_mobilenet_v3_large's output
  was constant, and every detection of fasterrcnn_mobilenet_v3_large_320_fpn had the same score, a tie that ONNX
  Runtime and PyTorch broke differently (boxes cosine 0.80).
- :func:`spread_scores` (detection): score and box-regression layers rescaled. At PyTorch's init every class
  scores ~1/91 (every ranking is a tie) and most boxes are clipped to the image border; the logits are kept where
  a float32 sigmoid resolves them in both runtimes (ONNX Runtime's Sigmoid is exactly 0 below -17: RetinaNet and
  FCOS had returned no detection in ONNX Runtime, 20 in PyTorch).

With both, the five detectors measured (keypointrcnn_resnet50_fpn, fasterrcnn_mobilenet_v3_large_320_fpn,
retinanet_resnet50_fpn, fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large) give PyTorch's detections in ONNX
Runtime within the fp32 tolerance on their sample image and on seeded uniform and normal images. A selection
(top-k, NMS, a threshold) can still flip where rounding moves a candidate across its boundary; that is rarer the
less the two runtimes' features differ, which is why one variance per BatchNorm layer, not per channel.
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
#: The largest score logit at random init (on that image): a sigmoid of the logits a detector ranks stays where
#: float32 resolves it in both runtimes (ONNX Runtime's Sigmoid is exactly 1 or not monotonic above ~16, 0 below -17).
SCORE_LOGIT_MAX = 6.0
#: At most this far below it, the best logit of the other image (a 0..1 one and a standard-normal one).
SCORE_LOGIT_SPAN = 10.0
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
#: Families whose random init gets its BatchNorm statistics measured (:func:`calibrate_norms`): the MobileNetV3
#: ones are otherwise constant. Classifiers keep PyTorch's init (every classifier passes at it, coverage_cpu.md).
CALIBRATED = {"detection", "segmentation"}
#: Seeded images a random init's BatchNorm statistics are measured on (:func:`calibrate_norms`; two or more: a
#: BatchNorm after a global pooling has one value per image).
CALIBRATION_IMAGES = 2
#: Largest side of those images for a model that takes any size (a detector's are its own fixed size).
CALIBRATION_SIDE = 256


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
    same with trained weights, so that the file and the module bench rebuilds from weights.pt agree), from an
    RPN without a score threshold."""
    fam = family(name)
    if fam == "quantization":
        return {"quantize": False}
    if fam == "segmentation":
        return {"weights_backbone": None}
    if fam == "detection":
        rcnn = "rcnn" in name
        # an R-CNN's RPN keeps every proposal of its top-k too (the MobileNet builders drop those of objectness
        # below 0.05 by default): a threshold on a sigmoid decides otherwise in ONNX Runtime (whose Sigmoid is off by
        # up to 2e-4 of its value) for a proposal near it (fasterrcnn_mobilenet_v3_large_320_fpn: 0.0499991)
        rpn = {"rpn_score_thresh": 0.0} if rcnn else {}
        return {"weights_backbone": None, "box_score_thresh" if rcnn else "score_thresh": 0.0,
                "box_detections_per_img" if rcnn else "detections_per_img": DETECTIONS, **rpn}
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


def calibrate_norms(name: str, module: Any, inputs: Inputs, seed: int) -> str:
    """For a model of a CALIBRATED family, set its BatchNorm layers' running statistics from their inputs on
    CALIBRATION_IMAGES seeded images (one pass in eval mode, each layer set before its first call, so from the
    activations the layers before it give once set): each channel's mean, and one variance for every channel of a
    layer (their mean); the note saying so, or "" where the model has no BatchNorm.

    At PyTorch's init every BatchNorm holds mean 0 and variance 1, which normalises nothing: in MobileNetV3 each
    block then shrinks its activations about tenfold, so that the features reaching a detector's or a segmentation
    model's head are ~1e-8 and its outputs those of the head's biases, the same for every input and every box
    (deeplabv3_mobilenet_v3_large: a constant output; fasterrcnn_mobilenet_v3_large_320_fpn: every detection the
    same score, a tie each runtime breaks its own way). One variance per layer, not per channel: dividing each
    channel by its own spread magnifies the channels that barely vary, and with them the rounding of every
    runtime, block after block (per channel, ONNX Runtime's features of fasterrcnn_mobilenet_v3_large_320_fpn
    differed from PyTorch's by 5e-3 of their largest value on a random-normal image, 1e-4 so)."""
    import torch

    if family(name) not in CALIBRATED:
        return ""
    images = torch.from_numpy(calibration_images(name, inputs, seed))
    if not (count := measure_norms(module, images)):
        return ""
    shape = "x".join(map(str, images.shape[1:]))
    return (f"its {count} BatchNorm layers' running statistics set from their inputs on {len(images)} seeded "
            f"{shape} images (each channel's mean, one variance per layer; at PyTorch's init they are mean 0, variance "
            "1: no normalisation, features that vanish block by block, an output that ignores the input)")


def measure_norms(module: Any, images: Any) -> int:
    """Set ``module``'s BatchNorm layers' running statistics from their inputs on ``images`` (a tensor the module is
    called with; see :func:`calibrate_norms`): each channel's mean and one variance per layer. How many layers."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    done: set[int] = set()

    def measure(norm: Any, args: tuple[Any, ...]) -> None:
        """Before the layer's first call: its statistics from its input (the upstream layers already set)."""
        if id(norm) in done:
            return
        done.add(id(norm))
        x = args[0].detach().double()
        dims = [d for d in range(x.ndim) if d != 1]
        with torch.no_grad():
            norm.running_mean.copy_(x.mean(dim=dims))
            norm.running_var.fill_(float(x.var(dim=dims).mean()))

    hooks = [m.register_forward_pre_hook(measure) for m in norms]
    try:
        with torch.no_grad():
            module(images)  # a detector's wrapper: every image of the batch goes through the model
    finally:
        for h in hooks:
            h.remove()
    return len(norms)


def calibration_images(name: str, inputs: Inputs, seed: int) -> np.ndarray:
    """CALIBRATION_IMAGES seeded images at the model's sample size (a segmentation model's at most
    CALIBRATION_SIDE a side: its statistics are per channel): smooth random shapes of varied brightness and
    contrast with fine noise, values 0..1 for a detector (which normalises inside), normalised otherwise. Unlike
    pure noise, images differ in their mean, which the global pooling of a segmentation head (ASPP) measures."""
    if inputs.example_inputs is not None:
        shape = next(iter(inputs.example_inputs.values())).shape
    else:
        shape = inputs.default_shape or (1, 3, 224, 224)
    height, width = (min(int(v), CALIBRATION_SIDE) for v in shape[-2:]) if family(name) != "detection" \
        else (int(v) for v in shape[-2:])
    gen = np.random.default_rng(seed + 1)
    n, chans = CALIBRATION_IMAGES, int(shape[1])
    coarse = gen.random((n, chans, 6, 6))
    rows = np.linspace(0, 5, height)
    cols = np.linspace(0, 5, width)
    r0, c0 = np.floor(rows).astype(int).clip(0, 4), np.floor(cols).astype(int).clip(0, 4)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    smooth = (coarse[:, :, r0][:, :, :, c0] * (1 - fr) * (1 - fc) + coarse[:, :, r0 + 1][:, :, :, c0] * fr * (1 - fc)
              + coarse[:, :, r0][:, :, :, c0 + 1] * (1 - fr) * fc + coarse[:, :, r0 + 1][:, :, :, c0 + 1] * fr * fc)
    contrast = gen.uniform(0.3, 1.0, (n, 1, 1, 1))
    brightness = gen.uniform(0.0, 1.0 - contrast)
    images = brightness + contrast * (0.8 * smooth + 0.2 * gen.random((n, chans, height, width)))
    if family(name) != "detection":
        images = (images - 0.45) / 0.225
    return images.astype(np.float32)


def spread_scores(name: str, module: Any, images: np.ndarray) -> str:
    """Rescale a random-init detector's score and box-regression layers, measured on ``images`` (the sample) and
    on a seeded standard-normal image (the random inputs bench feeds an artifact without held-out data); the note
    saying so. Only the last Conv2d/Linear of each layer is changed: its weight scaled, its bias replaced by one
    value for every channel (0 for box deltas). The rest of the model keeps its init.

    - box deltas: standard deviation BOX_DELTA_STD on both images, around 0;
    - score logits: standard deviation SCORE_LOGIT_STD on both images, or less where the best logit of one image is
      more than SCORE_LOGIT_SPAN above the other's (a normal image's features are several times a 0..1 image's),
      shifted so that the best logit of both is SCORE_LOGIT_MAX: the logits a detector ranks are where a float32
      sigmoid resolves them in both runtimes, on either kind of input.

    The bias is not scaled with the weight: at init the bias is most of such a layer's output (RetinaNet's prior
    -4.6), and scaling it as much as the input's part had put every logit near -40, where a sigmoid is 1e-10 in
    PyTorch and exactly 0 in ONNX Runtime (whose Sigmoid is 0 below -17 and not monotonic above 16): a score
    threshold of 0 then kept every box in PyTorch and none in ONNX Runtime."""
    import torch

    detector = module.model
    noise = np.random.default_rng(0).standard_normal(images.shape[1:], dtype=np.float32)[None]
    done: list[str] = []
    for stage in _HEAD_LAYERS[_arch(name)]:
        leaves: list[tuple[Any, bool]] = []
        for path, is_score in stage:
            layer = detector.get_submodule(path)
            parts = list(layer) if isinstance(layer, torch.nn.ModuleList) else [layer]
            leaves += [([m for m in part.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)][-1], is_score)
                       for part in parts]
            done.append(path)
        seen: list[dict[int, list[Any]]] = []  # per image: leaf -> its outputs less the bias
        for image in (images[:1], noise):
            got: dict[int, list[Any]] = {i: [] for i in range(len(leaves))}
            hooks = [leaf.register_forward_hook(lambda m, _i, out, i=i, got=got: got[i].append(_without_bias(m, out)))
                     for i, (leaf, _) in enumerate(leaves)]
            try:
                with torch.no_grad():
                    module(torch.from_numpy(image))
            finally:
                for h in hooks:
                    h.remove()
            seen.append(got)
        for i, (leaf, is_score) in enumerate(leaves):
            outs = [torch.cat([o.flatten() for o in got[i]]) for got in seen if got[i]]
            if not outs:
                continue
            std = float(torch.cat(outs).std())
            factor = (SCORE_LOGIT_STD if is_score else BOX_DELTA_STD) / std if std > 0 else 1.0
            tops = [float(o.max()) for o in outs]
            if is_score and max(tops) - min(tops) > 0:
                factor = min(factor, SCORE_LOGIT_SPAN / (max(tops) - min(tops)))
            shift = SCORE_LOGIT_MAX - factor * max(tops) if is_score else 0.0
            with torch.no_grad():
                leaf.weight.mul_(factor)
                if leaf.bias is None:
                    leaf.bias = torch.nn.Parameter(torch.zeros(leaf.weight.shape[0]))
                leaf.bias.fill_(shift)
    return (f"{', '.join(done)} rescaled to score logits of std up to {SCORE_LOGIT_STD:g}, the best at "
            f"{SCORE_LOGIT_MAX:g}, and box deltas of std {BOX_DELTA_STD:g} on a seeded 0..1 image and a seeded "
            "normal one (at PyTorch's init every class scores alike, every ranking of detections is a tie, and most "
            "boxes are clipped to the image border)")


def _without_bias(layer: Any, out: Any) -> Any:
    """A Conv2d/Linear's output less its bias: the part that depends on the input."""
    if layer.bias is None:
        return out.detach()
    shape = (1, -1) + (1,) * (out.ndim - 2) if out.ndim > 2 else (1, -1)
    return out.detach() - layer.bias.detach().reshape(shape)
