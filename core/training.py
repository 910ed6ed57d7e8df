"""Typed records of a fine-tuning or distillation run (``convert --recover distill`` / ``--distill-into``).

Kept apart from :mod:`core.records` (which imports them) so that each module stays one topic: these say
how a PyTorch module was trained against the FP32 teacher, on what data, and how the loss went.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EpochStat(BaseModel):
    """One epoch: the training loss, and the student against the teacher on the held-out split."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    train_loss: float = Field(description="Mean loss over the training batches")
    heldout_loss: float = Field(description="Distillation loss (KL, temperature-softened) on the held-out split")
    heldout_agreement: float = Field(description="Top-1 agreement with the teacher on the held-out split")
    heldout_accuracy: float | None = Field(default=None, description="Top-1 accuracy on the held-out split "
                                                                     "(labelled data only)")
    seconds: float


class TrainingRecord(BaseModel):
    """How a module was trained to mimic the teacher: data (and its digest), settings, and the loss curve."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["distillation"] = "distillation"
    teacher: str = Field(description="The teacher: the FP32 ONNX artifact whose outputs are the soft targets")
    loss: str = Field(description="The loss, in words")
    data: str = Field(description="What --train-data was, as read")
    data_sha256: str = Field(description="sha256 over the samples read (inputs, in order)")
    train_samples: int
    heldout_samples: int = Field(description="Held-out split of DATA: early stopping only, never trained on")
    labels: bool = Field(description="DATA had labels (then cross-entropy is part of the loss)")
    label_weight: float = Field(description="Weight of the cross-entropy term (0: distillation only)")
    temperature: float
    lr: float
    batch_size: int
    optimizer: str
    seed: int
    device: str
    max_epochs: int
    epochs_run: int
    best_epoch: int = Field(description="The epoch whose weights were kept (best held-out agreement)")
    early_stopping_epoch: int | None = Field(default=None, description="The epoch early stopping ended the run "
                                                                       "at; None when it did not")
    stopped_by: Literal["epochs", "early_stopping", "time"]
    max_seconds: float | None = None
    seconds: float
    mask: str | None = Field(default=None, description="A sparsity mask held fixed while training (2:4)")
    loss_curve: list[EpochStat] = Field(default_factory=list)
