"""Real labelled data that ships with scikit-learn (8x8 digits), and a CNN trained on it in seconds.

Split: train (fits the model), calib (calibration only), test (held out: accuracy gates and checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FACTORY = Path(__file__).resolve().parent / "fixtures" / "digits_cnn.py"
INPUT_NAME = "input"


@dataclass
class DigitsModel:
    factory: str  # "path/to/digits_cnn.py:build"
    weights: Path  # trained state dict
    x_train: np.ndarray  # N x 1 x 16 x 16 float32
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    calib_npz: Path  # {"input": x_calib}
    test_accuracy: float  # FP32 PyTorch accuracy on x_test


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Digits as N x 1 x 16 x 16 float32 (nearest-upsampled, scaled to about [-1, 1]) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, None]
    return np.ascontiguousarray((x - 0.5) / 0.5), d.target.astype(np.int64)


def train_digits_model(out_dir: Path, epochs: int = 12, seed: int = 0) -> DigitsModel:
    import torch

    from core.models import resolve_model

    x, y = digits_arrays()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    tr, ca = 1197, 1397  # 1197 train, 200 calib, 400 test
    torch.manual_seed(seed)
    model = resolve_model(f"{FACTORY}:build", seed=seed).module.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:tr]), torch.from_numpy(y[:tr])
    for _ in range(epochs):
        perm = torch.randperm(tr)
        for i in range(0, tr, 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        acc = float((model(torch.from_numpy(x[ca:])).argmax(1).numpy() == y[ca:]).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "digits_cnn.pt"
    torch.save(model.state_dict(), weights)
    calib_npz = out_dir / "digits_calib.npz"
    np.savez(calib_npz, **{INPUT_NAME: x[tr:ca]})
    return DigitsModel(factory=f"{FACTORY}:build", weights=weights, x_train=x[:tr], y_train=y[:tr],
                       x_calib=x[tr:ca], y_calib=y[tr:ca], x_test=x[ca:], y_test=y[ca:], calib_npz=calib_npz,
                       test_accuracy=acc)
