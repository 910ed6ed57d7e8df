"""Training a PyTorch module to mimic the FP32 teacher: the fine-tuning of ``--recover distill`` and the
student of ``--distill-into``.

* Data: ``--train-data`` (image folder or ``.npz``, labels optional) read through the calibration
  sources into memory; a seeded held-out split of it is used for early stopping only, never trained on.
* Teacher: the FP32 ONNX artifact run once by ONNX Runtime on every sample; its outputs are the soft
  targets (so the teacher is exactly the model the variants are gated against, PyTorch or ONNX input).
* Loss: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, plus ``label_weight`` x cross-entropy
  where the data has labels. Adam, seeded shuffles; the weights of the epoch with the best held-out
  agreement are kept. A fixed mask (2:4) is re-applied to the gradients and the weights at every step,
  so zeros stay zero.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from calibration.pools import InputPool, source_pool
from convert.config import TrainConfig
from convert.heldout import HeldOutEvaluator, PoolData
from core.errors import InputError
from core.iospec import IOSpec
from core.manifest import SourceInfo
from core.training import EpochStat, TrainingRecord

#: (epoch, epochs, train loss, held-out agreement) after every epoch.
Progress = Callable[[int, int, float, float], None]
DEFAULT_LABEL_WEIGHT = 0.5


@dataclass
class TrainSet:
    """DATA in memory, the teacher's outputs on it, and the seeded train / held-out split."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    teacher: np.ndarray  # the teacher's first output, one row per sample
    train_idx: np.ndarray
    held_idx: np.ndarray
    source: str
    sha256: str


def read_train_data(cfg: TrainConfig, spec: IOSpec, source: SourceInfo, flag: str) -> InputPool:
    """``--train-data`` as an in-memory pool; a missing, empty or synthetic one is one clear InputError."""
    data = cfg.data.strip()
    if not data:
        raise InputError(f"{flag} needs --train-data DATA (an image folder or .npz; labels optional)")
    if data == "synthetic":
        raise InputError("--train-data synthetic: random inputs teach nothing; give an image folder or .npz")
    if not Path(data).expanduser().exists() and data != "imagenet_subset":
        raise InputError(f"--train-data {data} does not exist (expected an image folder or a .npz file)")
    try:
        pool = source_pool(data, spec, source, seed=cfg.seed, size=cfg.max_samples)
    except InputError as exc:
        raise InputError(f"--train-data {data}: {exc}") from None
    if pool.size < 2:
        raise InputError(f"--train-data {data} holds {pool.size} sample(s): at least 2 are needed (one to train "
                         "on, one held out for early stopping)")
    if (cfg.label_weight or 0) > 0 and pool.labels is None:
        raise InputError(f"--label-weight {cfg.label_weight:g} needs labels, and --train-data {data} has none "
                         "(.npz: a 'labels' array; image folder: one sub-folder per class)")
    return pool


def teacher_set(pool: InputPool, teacher: Path, cfg: TrainConfig, fixed_batch: int | None) -> TrainSet:
    """The teacher's outputs on every sample of ``pool`` (ONNX Runtime), and the seeded split."""
    ev = HeldOutEvaluator(PoolData(pool), 64, fixed_batch)
    outs, _ = ev.outputs(teacher)
    order = np.random.default_rng(cfg.seed).permutation(pool.size)
    n_held = min(pool.size - 1, max(1, round(cfg.heldout_fraction * pool.size)))
    return TrainSet(arrays=pool.arrays, labels=pool.labels, teacher=outs[0], train_idx=np.sort(order[n_held:]),
                    held_idx=np.sort(order[:n_held]), source=pool.source,
                    sha256=PoolData(pool).manifest_record()["sha256"])


def check_student_output(student: Any, teacher_rows: np.ndarray, example: tuple[Any, ...], what: str) -> None:
    """A student whose (first) output is not shaped like the teacher's is one clear InputError."""
    import torch

    with torch.inference_mode():
        got = _first(student.eval()(*example))
    want = (len(example[0]), *teacher_rows.shape[1:])
    if tuple(got.shape) != want:
        raise InputError(f"{what}: the student's output shape {tuple(got.shape)} differs from the teacher's {want}; "
                         "it must predict the same classes")


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def _kd_loss(student: Any, teacher: Any, temperature: float) -> Any:
    import torch.nn.functional as F

    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, c) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


class _Trainer:
    """One run: the tensors, the loss, one epoch, the held-out check."""

    def __init__(self, module: Any, data: TrainSet, cfg: TrainConfig, names: list[str],
                 masks: dict[str, Any]) -> None:
        import torch

        self.torch, self.cfg, self.data, self.names = torch, cfg, data, names
        self.device = torch.device(cfg.device)
        self.module = module.to(self.device)
        self.x = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in data.arrays.items()}
        self.t = torch.from_numpy(np.ascontiguousarray(data.teacher))
        self.y = None if data.labels is None else torch.from_numpy(np.asarray(data.labels, np.int64))
        self.alpha = (DEFAULT_LABEL_WEIGHT if cfg.label_weight is None else cfg.label_weight) if self.y is not None \
            else 0.0
        params = dict(module.named_parameters())
        self.masks = [(params[n], m.to(self.device)) for n, m in masks.items()]
        self.opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _loss(self, idx: Any) -> tuple[Any, Any]:
        out = _first(self.module(*[self.x[n][idx].to(self.device) for n in self.names]))
        loss = _kd_loss(out, self.t[idx].to(self.device), self.cfg.temperature) * (1.0 - self.alpha)
        if self.alpha > 0 and self.y is not None:
            loss = loss + self.alpha * self.torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), self.y[idx].to(self.device))
        return loss, out

    def epoch(self) -> float:
        torch = self.torch
        self.module.train()
        train = torch.from_numpy(self.data.train_idx)
        order = train[torch.randperm(len(train), generator=self.gen)]
        total, seen = 0.0, 0
        for s in range(0, len(order), self.cfg.batch_size):
            idx = order[s:s + self.cfg.batch_size]
            if len(idx) < 2 and len(order) > 1:
                continue  # a batch of one breaks BatchNorm in train mode
            self.opt.zero_grad()
            loss, _ = self._loss(idx)
            loss.backward()
            for p, m in self.masks:
                p.grad.mul_(m)
            self.opt.step()
            with torch.no_grad():
                for p, m in self.masks:
                    p.mul_(m)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        return total / max(seen, 1)

    def heldout(self) -> tuple[float, float, float | None]:
        """(distillation loss, agreement with the teacher, accuracy or None) on the held-out split."""
        torch = self.torch
        self.module.eval()
        idx = torch.from_numpy(self.data.held_idx)
        with torch.inference_mode():
            out = _first(self.module(*[self.x[n][idx].to(self.device) for n in self.names])).cpu()
        t = self.t[idx]
        loss = float(_kd_loss(out, t, self.cfg.temperature))
        pred = out.reshape(-1, out.shape[-1]).argmax(-1)
        agree = float((pred == t.reshape(-1, t.shape[-1]).argmax(-1)).float().mean())
        acc = None if self.y is None else float((pred == self.y[idx]).float().mean())
        return loss, agree, acc


def train_to_mimic(module: Any, data: TrainSet, cfg: TrainConfig, *, names: list[str], teacher: str,
                   masks: dict[str, Any] | None = None, progress: Progress | None = None) -> TrainingRecord:
    """Train ``module`` in place to mimic the teacher's outputs in ``data``; keep the weights of the epoch
    with the best held-out agreement (ties: the lower held-out loss). Seeded: the same inputs give the
    same weights. ``masks``: parameter name -> 0/1 tensor held fixed (zeros stay zero)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--train-device cuda: no CUDA device is visible to PyTorch; use --train-device cpu")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(module, data, cfg, teacher, _Trainer(module, data, cfg, names, masks or {}), progress)
    finally:
        torch.set_num_threads(threads)


def _run(module: Any, data: TrainSet, cfg: TrainConfig, teacher: str, tr: _Trainer,
         progress: Progress | None) -> TrainingRecord:
    """The epochs, early stopping and the time budget; the record."""
    start = time.perf_counter()
    curve: list[EpochStat] = []
    best: tuple[float, float] | None = None
    stopped_by: Literal["epochs", "early_stopping", "time"] = "epochs"
    best_state, best_epoch, stale = copy.deepcopy(module.state_dict()), 0, 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss = tr.epoch()
        h_loss, agree, acc = tr.heldout()
        curve.append(EpochStat(epoch=epoch, train_loss=round(loss, 6), heldout_loss=round(h_loss, 6),
                               heldout_agreement=round(agree, 6), heldout_accuracy=acc,
                               seconds=round(time.perf_counter() - t0, 3)))
        if progress is not None:
            progress(epoch, cfg.epochs, loss, agree)
        if best is None or (agree, -h_loss) > best:
            best, best_state, best_epoch, stale = (agree, -h_loss), copy.deepcopy(module.state_dict()), epoch, 0
        else:
            stale += 1
        if stale >= cfg.patience and epoch < cfg.epochs:
            stopped_by = "early_stopping"
            break
        if cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds and epoch < cfg.epochs:
            stopped_by = "time"
            break
    module.load_state_dict(best_state)
    module.to("cpu").eval()
    return TrainingRecord(
        teacher=teacher, loss=f"T^2 x KL(teacher/T || student/T), T={cfg.temperature:g}"
        + (f", + {tr.alpha:g} x cross-entropy with the labels" if tr.alpha else ""),
        data=data.source, data_sha256=data.sha256, train_samples=len(data.train_idx),
        heldout_samples=len(data.held_idx), labels=data.labels is not None, label_weight=tr.alpha,
        temperature=cfg.temperature, lr=cfg.lr, batch_size=cfg.batch_size, optimizer="Adam", seed=cfg.seed,
        device=cfg.device, max_epochs=cfg.epochs, epochs_run=len(curve), best_epoch=best_epoch,
        early_stopping_epoch=len(curve) if stopped_by == "early_stopping" else None, stopped_by=stopped_by,
        max_seconds=cfg.max_seconds, seconds=round(time.perf_counter() - start, 3),
        mask="2:4 (fixed)" if tr.masks else None, loss_curve=curve)
