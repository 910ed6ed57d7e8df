"""A constant or all-zero reference output is "not measurable", never a perfect match (issue 28).

torchvision zero-initialises the ViT head, so a random-init ViT output exactly 0 for every input and every check
compared zeros with zeros: cosine 1.0, drop 0.000, parity passed. These tests fail on that code: the metrics
flag such a reference, the gates and parity fail on it in one line, and the toolkit's random-init ViT gets a
seeded head whose outputs vary with the input, so its INT8 variant shows a real drop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.config import Budget, CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
from convert.gates import gate_verdict
from convert.pipeline import run_convert
from core.errors import AccuracyGateError, ValidationError
from core.metrics import accuracy_drop, accuracy_stats, compare_outputs

ZERO_LINE = ("output logits of the FP32 reference is constant (all 0.0) on the 8 held-out inputs: accuracy not "
             "measurable")


def _scores(n: int = 8, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, classes)).astype(np.float32)


def test_zero_reference_is_flagged_never_a_perfect_cosine() -> None:
    zeros = np.zeros((8, 10), np.float32)
    cmp = compare_outputs([zeros], [zeros], ["logits"])
    assert cmp.cosine == 0.0 and cmp.per_output["logits"].cosine == 0.0
    assert cmp.not_measurable == {"logits": "all 0.0"}
    stats = accuracy_stats([zeros], [zeros], None, "eager:fp32", ["logits"])
    assert stats.cosine == 0.0 and stats.not_measurable == {"logits": "all 0.0"}
    # a reference that varies is measured as before, and says nothing is unmeasurable
    ref = _scores()
    ok = accuracy_stats([ref + 1e-3], [ref], None, "eager:fp32", ["logits"])
    assert ok.not_measurable == {} and 0.999 < ok.cosine < 1.0


def test_constant_reference_across_inputs_is_flagged_but_one_sample_is_not() -> None:
    bias = np.linspace(-0.03, 0.03, 10, dtype=np.float32)
    same = np.tile(bias, (8, 1))  # a head whose input contributes nothing: its bias for every input
    stats = accuracy_stats([same.copy()], [same], None, "eager:fp32", ["logits"])
    assert stats.not_measurable == {"logits": "identical for every input"} and stats.cosine == 0.0
    # one sample cannot be "the same for every input"; only all zeros is unmeasurable there
    assert compare_outputs([bias[None]], [bias[None]], ["logits"]).not_measurable == {}
    # rounding-level differences between rows are still constant; a real input dependence is not
    nudged = same + np.float32(1e-9) * np.arange(8, dtype=np.float32)[:, None]
    assert accuracy_stats([nudged], [nudged], None, "r", ["logits"]).not_measurable == {"logits":
                                                                                         "identical for every input"}
    varying = same + np.float32(1e-4) * _scores()
    assert accuracy_stats([varying], [varying], None, "r", ["logits"]).not_measurable == {}


@pytest.mark.parametrize("random_init", [True, False])
def test_gate_fails_in_one_line_on_an_all_zero_reference(random_init: bool) -> None:
    """Zeros against zeros: the old code passed the gate with a drop of 0.000 points and cosine 1.0."""
    zeros = np.zeros((8, 10), np.float32)
    stats = accuracy_stats([zeros], [zeros], None, "ort:fp32:fp32:cpu", ["logits"])
    # even the widest budget cannot pass what was not measured
    gate = gate_verdict(stats, Budget(max_accuracy_drop=100.0, min_cosine=-1.0), random_init=random_init)
    assert gate.passed is False and gate.drop_points is None
    assert gate.reason == ZERO_LINE
    with pytest.raises(AccuracyGateError, match="accuracy not measurable"):
        accuracy_drop(stats, random_init)


def test_a_constant_output_beside_one_that_varies_is_listed_not_fatal() -> None:
    """The cosine basis rests on the outputs that vary; the constant one is listed as unmeasured. A class-score
    output that is constant gives no top-1 basis (its top-1 is one class): the outputs that vary are graded."""
    ref = _scores()
    anchors = np.tile(np.arange(4, dtype=np.float32), (8, 1))
    stats = accuracy_stats([ref * 1.001, anchors], [ref, anchors], None, "r", ["logits", "anchors"])
    assert stats.not_measurable == {"anchors": "identical for every input"}
    assert stats.cosine > 0.9999  # the worst over the measurable output
    gate = gate_verdict(stats, Budget(), random_init=True)
    assert gate.passed is True and gate.drop_points is not None
    flat = accuracy_stats([anchors, ref], [anchors, ref], None, "r", ["anchors_scores", "logits"])
    assert flat.scored_output == "anchors_scores"  # the first [batch, N] output is taken as class scores
    assert flat.ref_top1_classes == 1 and flat.not_measurable == {"anchors_scores": "identical for every input"}
    top1 = gate_verdict(flat, Budget(), random_init=False)
    assert top1.passed is True and "top-1 is one class for all 8 inputs" in top1.basis
    ignoring = np.broadcast_to(ref.mean(0), ref.shape)  # logits that ignore the input: top-1 agrees 100% here
    blind = accuracy_stats([anchors, ignoring], [anchors, ref], None, "r", ["anchors_scores", "logits"])
    assert blind.top1_agreement == 1.0 and gate_verdict(blind, Budget(), random_init=False).passed is False


ZERO_HEAD = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


class ZeroHead(nn.Module):
    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 4)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.extra = extra

    def forward(self, x):
        f = self.features(x).flatten(1)
        return (self.aux(f), self.fc(f)) if self.extra else self.fc(f)


def build():
    return ZeroHead(False)


def build_two():
    return ZeroHead(True)
'''


def test_parity_with_an_all_zero_reference_fails_in_one_line(tmp_path: Path) -> None:
    """A model whose only output is 0 for every input: the old parity check passed it (zeros within tolerance of
    zeros, cosine 1.0)."""
    (tmp_path / "zero_head.py").write_text(ZERO_HEAD)
    cfg = ConvertConfig(export=ExportConfig(model=f"{tmp_path / 'zero_head.py'}:build"), out=tmp_path / "out")
    with pytest.raises(ValidationError) as exc:
        run_convert(cfg, log=lambda _m: None)
    assert ("parity at batch 1: output logits of the reference is constant (all 0.0) on the 1 random input: "
            "parity not measurable") in exc.value.failures
    assert any(f.startswith("parity at batch 2: ") and "on the 2 random inputs: parity not measurable" in f
               for f in exc.value.failures)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_parity_lists_a_constant_output_beside_a_measured_one(tmp_path: Path) -> None:
    (tmp_path / "zero_head.py").write_text(ZERO_HEAD)
    cfg = ConvertConfig(export=ExportConfig(model=f"{tmp_path / 'zero_head.py'}:build_two"), out=tmp_path / "out")
    manifest, _ = run_convert(cfg, log=lambda _m: None)
    parity = manifest.artifacts["fp32"].metrics.parity
    names = manifest.iospec.output_names
    assert set(parity) == {"batch_1", "batch_2"}
    for p in parity.values():
        assert p.not_measurable == {names[1]: "all 0.0"}
        assert p.per_output[names[1]].cosine == 0.0 and p.cosine > 0.9999  # measured on the output that varies


def _outputs(module: object, batch: int = 2, size: int = 224) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.random.default_rng(7).normal(size=(batch, 3, size, size)).astype(np.float32))
    with torch.inference_mode():
        return module(x).numpy()  # type: ignore[operator]


def test_random_init_vit_b_16_outputs_vary_with_the_input() -> None:
    """The ViT the toolkit loads without --weights: torchvision's zero head re-initialised (seeded), said in the
    weights note; outputs non-zero and different for different inputs."""
    from core.models import resolve_model

    loaded = resolve_model("vit_b_16", seed=0)
    assert loaded.source.weights_note is not None
    assert "zero-initialised head heads.head re-initialised (seeded)" in loaded.source.weights_note
    out = _outputs(loaded.module)
    assert np.abs(out).max() > 1e-3 and np.abs(out[0] - out[1]).max() > 1e-3
    assert compare_outputs([out], [out], ["logits"]).not_measurable == {}


def _tiny_vit() -> object:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def test_reinit_zero_head_is_seeded_and_touches_only_the_zero_head() -> None:
    import torch

    from core.models import reinit_zero_head

    torch.manual_seed(0)
    vit = _tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}  # type: ignore[attr-defined]
    assert not torch.any(before["heads.head.weight"]) and not torch.any(before["heads.head.bias"])
    assert not np.any(_outputs(vit, size=32))  # torchvision's random-init ViT: 0 for every input
    assert reinit_zero_head(vit, seed=0) == ["heads.head.weight", "heads.head.bias"]
    after = vit.state_dict()  # type: ignore[attr-defined]
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["heads.head.bias", "heads.head.weight"]
    bound = 1 / 32 ** 0.5  # nn.Linear's default scale for 32 inputs
    assert 0 < float(after["heads.head.weight"].abs().max()) <= bound
    out = _outputs(vit, size=32)
    assert np.abs(out[0] - out[1]).max() > 1e-3
    torch.manual_seed(123)  # another global seed: the same head from the same seed
    again = _tiny_vit()
    reinit_zero_head(again, seed=0)
    assert torch.equal(again.state_dict()["heads.head.weight"], after["heads.head.weight"])  # type: ignore[attr-defined]
    # a head that is not all zero is left alone
    assert reinit_zero_head(vit, seed=1) == []


TINY_VIT = '''
import torch
from torchvision.models import VisionTransformer

from core.models import reinit_zero_head

INPUT_SHAPE = (1, 3, 32, 32)


def build():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    reinit_zero_head(vit, seed=0)  # what core.models does for a torchvision model built without --weights
    return vit
'''


def test_random_init_tiny_vit_int8_has_a_measured_drop(tmp_path: Path) -> None:
    """Through convert (export, calibration, static INT8, the held-out gate): the INT8 variant of a random-init ViT
    loses something measurable on the random-init basis (100 x (1 - output cosine)), not exactly 0.000."""
    (tmp_path / "tiny_vit.py").write_text(TINY_VIT)
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data="imagenet_subset", size=16),
                        gate=GateConfig(max_accuracy_drop=100.0, min_cosine=-1.0, eval_size=16))
    cfg = ConvertConfig(export=ExportConfig(model=f"{tmp_path / 'tiny_vit.py'}:build"), out=tmp_path / "out",
                        quant=quant)
    manifest, _ = run_convert(cfg, log=lambda _m: None)
    int8 = [a for a in manifest.artifacts.values() if a.precision == "int8"]
    assert int8, "no INT8 variant was built"
    stats = int8[0].metrics.accuracy
    assert stats is not None and stats.not_measurable == {} and stats.samples >= 8
    gate = gate_verdict(stats, Budget(), random_init=True)
    assert gate.drop_points is not None and 0.0005 < gate.drop_points < 100.0
    assert f"{gate.drop_points:.3f}" != "0.000"


def test_a_random_init_whose_output_ignores_the_input_is_re_initialised() -> None:
    """googlenet's random init shrinks its features to 1e-11, so its output is the fc bias for every input: such a
    model gets PyTorch's default layer init (seeded, said in the note), and a model whose output varies is left as
    it is."""
    import torch

    from core.metrics import constant_reference
    from core.models import reinit_if_constant

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 5))
        with torch.no_grad():
            m[0].weight.mul_(1e-30)  # the features vanish, as googlenet's do
            m[0].bias.zero_()
        return m

    x = torch.randn(2, 3, 6, 6)
    m = build()
    assert constant_reference(m(x).detach().numpy(), 2) == "identical for every input"
    note = reinit_if_constant(m, 0, (2, 3, 6, 6))
    assert note is not None and "2 Conv2d/Linear layers re-initialised" in note
    assert constant_reference(m(x).detach().numpy(), 2) is None
    again = build()
    reinit_if_constant(again, 0, (2, 3, 6, 6))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values(), strict=True))
    varied = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 5))
    before = {k: v.clone() for k, v in varied.state_dict().items()}
    assert reinit_if_constant(varied, 0, (2, 3, 6, 6)) is None
    assert all(torch.equal(before[k], v) for k, v in varied.state_dict().items())
