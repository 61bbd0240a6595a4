"""The int8 scheme in torch: fake quantization that matches what ``export-onnx --quantize`` writes.

onnxruntime's int8 convolutions multiply u8 activations by s8 weights. On x86 CPUs without VNNI
(AVX2 only) its fused kernels add pairs of those products in 16 bits with saturation: 255 x 127 x 2
overflows, so 8-bit weights answer differently there than on VNNI or ARM CPUs. Weights on the
symmetric grid -64..64 (onnxruntime's ``reduce_range``) cannot overflow (255 x 64 x 2 < 32767) and
give the same answers on every kernel. Quantization-aware fine-tuning (``train/qat.py``) trains
the network with exactly this scheme so that the 7-bit model keeps the float model's accuracy:

- every batch norm folded into the conv before it (onnxruntime quantizes the folded weights);
- conv weights per output channel, symmetric, scale = max|w| / 64, rounded to -64..64;
- each conv's input activation u8 with an affine range (min/max observed in training);
- the heads after the global pool and the softmax stay float, as ``quantize.head_nodes`` keeps them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

WEIGHT_QMIN, WEIGHT_QMAX = -64, 64  # onnxruntime's reduce_range int8 weights (7 bits + sign)
ACT_QMIN, ACT_QMAX = 0, 255
SCHEME = "7-bit symmetric per-channel weights (-64..64), u8 activations"


def conv_bn_pairs(net: nn.Module, size: int) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every conv in execution order with the batch norm that runs right after it (or None)."""
    names = {m: n for n, m in net.named_modules()}
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in net.modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    pairs = []
    for i, m in enumerate(order):
        if isinstance(m, nn.Conv2d):
            nxt = order[i + 1] if i + 1 < len(order) else None
            pairs.append((names[m], m, nxt if isinstance(nxt, nn.BatchNorm2d) else None))
    return pairs


@torch.no_grad()
def fold_batchnorm(pairs: list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]) -> None:
    """Fold each batch norm into its conv, in place; the norm is left as "add the bias" (weight 1,
    mean 0, variance 1 - eps) and frozen, so the state dict still fits the timm architecture and
    the export folds it again into the very weights trained here."""
    for _, conv, bn in pairs:
        if bn is None:
            continue
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
        bias = bn.bias - bn.running_mean * factor
        if conv.bias is not None:
            bias = bias + conv.bias * factor
            conv.bias.zero_()
        bn.bias.copy_(bias)
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.requires_grad_(False)
        bn.momentum = 0.0  # batch statistics never move the folded norm, even in train mode
        bn.track_running_stats = True


def freeze_norms(net: nn.Module) -> None:
    """Folded norms compute with their stored statistics also while the rest trains."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric fake quantization onto the -64..64 grid (straight-through)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.ndim))) / WEIGHT_QMAX).clamp_min(1e-12)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, WEIGHT_QMIN, WEIGHT_QMAX)


def _act_fq() -> FakeQuantize:
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=ACT_QMIN, quant_max=ACT_QMAX,
                        dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)


def set_range(fq: FakeQuantize, lo: float, hi: float) -> None:
    """Fix an activation's range (and the scale and zero point it implies); the observer stops."""
    pp = fq.activation_post_process
    pp.min_val, pp.max_val = torch.tensor(float(lo)), torch.tensor(float(hi))
    scale, zero = fq.calculate_qparams()
    fq.scale.resize_(scale.shape).copy_(scale)
    fq.zero_point.resize_(zero.shape).copy_(zero)
    fq.disable_observer()


class FakeQuantized:
    """Fake quantization attached to a network's convs; ``remove()`` bakes the weights onto the grid."""

    def __init__(self, net: nn.Module, pairs: list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]],
                 act_ranges: dict[str, tuple[float, float]] | None = None):
        self.net, self.pairs = net, pairs
        self.act: dict[str, FakeQuantize] = {}
        self.hooks = []
        for name, conv, _ in pairs:
            parametrize.register_parametrization(conv, "weight", WeightFakeQuant())
            fq = _act_fq()
            if act_ranges and name in act_ranges:
                set_range(fq, *act_ranges[name])
            self.act[name] = fq
            self.hooks.append(conv.register_forward_pre_hook(lambda m, inp, fq=fq: (fq(inp[0]),) + inp[1:]))

    def observe(self, on: bool) -> None:
        """Ranges follow the data while training; frozen for evaluation and export."""
        for fq in self.act.values():
            fq.enable_observer() if on else fq.disable_observer()

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {n: (float(fq.activation_post_process.min_val), float(fq.activation_post_process.max_val))
                for n, fq in self.act.items()}

    def remove(self) -> dict[str, Any]:
        """Detach everything; the conv weights keep their fake-quantized values (exactly on the grid)."""
        ranges = self.ranges()
        for h in self.hooks:
            h.remove()
        for _, conv, _ in self.pairs:
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        return {"scheme": SCHEME, "weight_qmin": WEIGHT_QMIN, "weight_qmax": WEIGHT_QMAX, "act_ranges": ranges}
