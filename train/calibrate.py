"""Probabilities that mean what they say: one temperature per head, fitted on the validation split.

Training with label smoothing leaves a model under-confident (faces it calls 75 % sure are right
more often than that). Dividing a head's logits by a temperature T fixes the scale without
changing any answer. T is fitted by minimising the validation negative log-likelihood, and folded
into the head's linear layer (weights and bias divided by T), so the exported graph, the int8
file and the runtime need nothing new.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..runtime.metrics import calibration_error

log = logging.getLogger(__name__)

TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(4.0), 241))


@torch.no_grad()
def head_logits(net: torch.nn.Module, faces: np.ndarray, idx: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    net.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(idx), batch):
        x = torch.from_numpy(np.ascontiguousarray(faces[idx[s:s + batch]].transpose(0, 3, 1, 2))).float()
        for k, v in net(x).items():
            outs.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, true: np.ndarray) -> float:
    """The T (on a log grid 0.25..4) with the lowest negative log-likelihood of the labelled faces."""
    keep = true >= 0
    z, t = logits[keep].astype(np.float64), true[keep]
    if len(t) < 20:
        return 1.0
    nll = [-np.log(_softmax(z / T)[np.arange(len(t)), t] + 1e-12).mean() for T in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


@torch.no_grad()
def calibrate(net: torch.nn.Module, faces: np.ndarray, idx: np.ndarray, labels: dict[str, np.ndarray]
              ) -> dict[str, dict[str, float]]:
    """Fit and fold a temperature into each head of ``net`` (in place) on the faces ``idx``.

    ``labels`` maps a head name to its labels for every face (-1 = unknown; age: -1 also where the
    exact age is outside every group). Returns {head: {temperature, ece_before, ece_after}}.
    """
    logits = head_logits(net, faces, idx)
    out = {}
    for head, z in logits.items():
        true = labels[head][idx]
        T = fit_temperature(z, true)
        out[head] = {"temperature": T, "ece_before": calibration_error(_softmax(z), true),
                     "ece_after": calibration_error(_softmax(z / T), true), "faces": int((true >= 0).sum())}
        layer = net.heads[head]
        layer.weight.div_(T)
        layer.bias.div_(T)
        log.info("calibration %s: T %.3f, validation ECE %.4f -> %.4f", head, T, out[head]["ece_before"],
                 out[head]["ece_after"])
    return out
