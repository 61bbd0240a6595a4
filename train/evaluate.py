"""Evaluation during training, the export gate's own: ``parity.predict_torch`` on the runtime's
input and ``parity.metrics_of``, so a fold's numbers and the int8 gate's are computed alike."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..export.net import AgeGenderNet, ProbsModel
from ..export.parity import metrics_of, predict_torch
from ..runtime.datasets import Record


class _DeviceProbs(torch.nn.Module):
    """``ProbsModel`` on the training device, fed and read on the CPU as ``parity.predict_torch`` does."""

    def __init__(self, net: AgeGenderNet, device: torch.device):
        super().__init__()
        self.probs, self.device = ProbsModel(net), device
        self.output_names = self.probs.output_names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.cpu() for p in self.probs(image.to(self.device)))


def predict(net: AgeGenderNet, faces: np.ndarray, idx: np.ndarray, device: torch.device,
            chunk: int = 1024) -> dict[str, np.ndarray]:
    """Softmax probabilities per head ({"age": ..., "gender": ...}) of the eval faces, the runtime's own
    input; in chunks so a large fold is never copied out of the cache whole."""
    net.eval()
    model = _DeviceProbs(net, device)
    parts = [predict_torch(model, faces[idx[s:s + chunk]], batch=256) for s in range(0, len(idx), chunk)]
    return {k.removesuffix("_probs"): np.concatenate([p[k] for p in parts]) for k in model.output_names}


def evaluate(net: AgeGenderNet, faces: np.ndarray, records: list[Record], idx: np.ndarray, device: torch.device
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metrics, probabilities) on the faces ``idx``, computed as the export gate computes them."""
    probs = predict(net, faces, idx, device)
    return metrics_of({f"{k}_probs": v for k, v in probs.items()}, [records[i] for i in idx]), probs


def score_of(m: dict) -> float:
    """What picks the best epoch: the mean of age exact and gender accuracy (the heads present)."""
    vals = [m[k] for k in ("age_exact", "gender_acc") if k in m and not math.isnan(m[k])]
    return float(np.mean(vals)) if vals else 0.0
