"""Rebuild an agegender checkpoint from an fp32 agegender ONNX file (batch norm folded).

The exporter folds each batch norm into the conv before it, so the ONNX file holds the folded
conv weights and biases. They are loaded back into the timm network with every batch norm set to
"add the bias" (weight 1, mean 0, variance 1 - eps): the rebuilt network computes what the file
computes, and exporting it again gives the same graph. Used once to recover the torch weights of
the model shipped before checkpoints were kept in models/ (the quantization-aware fine-tuning
starts from them); the result is checked against the ONNX file before it is written.

    python scripts/onnx_to_checkpoint.py models/agegender_fp32.onnx runs/recovered.pt \
        --data /path/to/utkface --holdout 0.1 --fold 0
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from agegender.export.fakequant import conv_bn_pairs
from agegender.export.net import AgeGenderNet, ModelArgs, make_checkpoint, save_checkpoint


def rebuild(onnx_path: str) -> tuple[AgeGenderNet, dict[str, str]]:
    model = onnx.load(onnx_path)
    props = {p.key: p.value for p in model.metadata_props}
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    nodes = list(model.graph.node)
    sub = next(n for n in nodes if n.op_type == "Sub")
    div = next(n for n in nodes if n.op_type == "Div")
    mean = consts[sub.input[1]].reshape(-1) / 255.0
    std = consts[div.input[1]].reshape(-1) / 255.0
    size = int(props["input_size"])
    args = ModelArgs(arch=props["arch"], task=props["task"], img_size=size, mean=tuple(map(float, mean)),
                     std=tuple(map(float, std)))
    net = AgeGenderNet(args)
    convs = [n for n in nodes if n.op_type == "Conv"]
    pairs = [(conv, bn) for _, conv, bn in conv_bn_pairs(net, size)]
    if len(convs) != len(pairs):
        sys.exit(f"{onnx_path}: {len(convs)} convs in the file, {len(pairs)} in {args.arch}")
    with torch.no_grad():
        for node, (conv, bn) in zip(convs, pairs):
            w = inits[node.input[1]]
            b = inits[node.input[2]] if len(node.input) > 2 else torch.zeros(w.shape[0])
            if conv.weight.shape != w.shape:
                sys.exit(f"conv {node.name}: shape {tuple(w.shape)} vs {tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            if bn is None:
                conv.bias = nn.Parameter(b.clone())
                continue
            bn.weight.fill_(1.0)
            bn.bias.copy_(b)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        for gemm in (n for n in nodes if n.op_type == "Gemm"):
            head = gemm.input[1].split(".")[2]  # net.heads.<name>.weight
            net.heads[head].weight.copy_(inits[gemm.input[1]])
            net.heads[head].bias.copy_(inits[gemm.input[2]])
    return net.eval(), props


def check(net: AgeGenderNet, onnx_path: str, size: int) -> float:
    """Largest |difference| of probabilities between the rebuilt net and the file on random images."""
    x = np.random.default_rng(0).uniform(0, 255, (16, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = sess.run(names, {"image": x})
    with torch.no_grad():
        logits = net(torch.from_numpy(x))
    got = [torch.softmax(logits[n.removesuffix("_probs")], 1).numpy() for n in names]
    return max(float(np.abs(a - b).max()) for a, b in zip(ref, got))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx_model")
    p.add_argument("out")
    p.add_argument("--data", required=True, help="the dataset the model was trained on")
    p.add_argument("--format", default="utkface")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--nfolds", type=int, default=5)
    p.add_argument("--holdout", type=float, default=0.1)
    a = p.parse_args()
    net, props = rebuild(a.onnx_model)
    diff = check(net, a.onnx_model, net.args.img_size)
    print(f"rebuilt {props['arch']}: max |dprob| vs {a.onnx_model} = {diff:.2e}")
    if diff > 1e-4:
        sys.exit("the rebuilt network does not compute what the file computes")
    metrics = json.loads(props.get("metrics") or "{}")
    ckpt = make_checkpoint(net, crop_margin=float(props["crop_margin"]), config={"recovered_from": a.onnx_model},
                           data={"root": a.data, "format": a.format, "fold": a.fold, "nfolds": a.nfolds,
                                 "holdout": a.holdout},
                           train_data=props["train_data"], fold=a.fold, epoch=int(props.get("checkpoint_epoch") or 0),
                           metrics=metrics, bn_folded=True)
    save_checkpoint(a.out, ckpt)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
