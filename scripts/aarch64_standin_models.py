"""Stand-in models for scripts/check-aarch64.sh while the shipped ones do not exist yet.

    python scripts/aarch64_standin_models.py OUTDIR [--kind conv|contract]

Writes OUTDIR/agegender_fp32.onnx and OUTDIR/agegender_int8.onnx (never into models/). Needs the
dev extra (onnx) and onnxruntime's quantization tools.

- ``contract``: tests/contract_model.py's tiny model (mean colour -> softmax) and its int8 QDQ copy.
- ``conv`` (default): a small random CNN with the same contract (input 64 px; Conv/BatchNorm-free
  Conv+ReLU stack, depthwise conv, GlobalAveragePool, two heads), quantized the way the export
  does it (QDQ, U8 activations, S8 per-channel weights): it exercises the int8 convolution
  kernels, where x86 and ARM code paths differ most.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from contract_model import build_contract_model, contract_metadata  # noqa: E402


def _features(path: Path, size: int) -> np.ndarray:
    """The pooled features of the headless network on varied inputs (noise, flat colours, drawn faces)."""
    import cv2
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "scripts"))
    from aarch64_helper import drawn_face

    rng = np.random.default_rng(7)
    imgs = [rng.uniform(0, 255, (size, size, 3)) for _ in range(8)]
    imgs += [np.full((size, size, 3), rng.uniform(0, 255, 3)) for _ in range(8)]
    imgs += [cv2.resize(drawn_face(200, tuple(int(v) for v in rng.integers(60, 230, 3)),
                                   tuple(int(v) for v in rng.integers(0, 160, 3)), i), (size, size))
             for i in range(24)]
    batch = np.stack([im[..., ::-1].transpose(2, 0, 1) for im in imgs]).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["feat"], {"image": batch})[0]


def build_conv_model(path: Path, size: int = 64, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([255.0], np.float32), "c255"),
             numpy_helper.from_array(np.array([0.5], np.float32), "half")]
    nodes = [helper.make_node("Div", ["image", "c255"], ["x0"]), helper.make_node("Sub", ["x0", "half"], ["x"])]
    prev, ch = "x", 3
    layers = [(16, 3, 2, 1), (16, 3, 1, 16), (32, 1, 1, 1), (32, 3, 2, 32), (48, 1, 1, 1), (48, 3, 2, 48),
              (64, 1, 1, 1)]  # (out channels, kernel, stride, groups)
    for i, (out, k, stride, groups) in enumerate(layers):
        fan_in = ch // groups * k * k
        w = rng.normal(0, np.sqrt(2.0 / fan_in), (out, ch // groups, k, k)).astype(np.float32)
        b = rng.normal(0, 0.05, out).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[k, k],
                                   strides=[stride, stride], pads=[k // 2] * 4, group=groups),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, ch = f"r{i}", out
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["feat"], axis=1)]
    # standardize the pooled features (measured on varied inputs) so the heads give varied, clear top-1s
    body = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           ["N", 3, size, size])],
                             [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", ch])], inits)
    body_model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
    body_model.ir_version = 8
    onnx.save(body_model, str(path))
    feat = _features(path, size)
    mean, std = feat.mean(0), feat.std(0) + 1e-3
    outputs = []
    for name, n in (("age_probs", 8), ("gender_probs", 2)):
        w = rng.normal(0, 1.5 / np.sqrt(ch), (ch, n)) / std[:, None]
        b = -mean @ w
        w, b = w.astype(np.float32), b.astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
        nodes += [helper.make_node("Gemm", ["feat", f"{name}_w", f"{name}_b"], [f"{name}_z"]),
                  helper.make_node("Softmax", [f"{name}_z"], [name], axis=1)]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", n]))
    graph = helper.make_graph(nodes, "agegender_standin_conv",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="agegender-aarch64")
    model.ir_version = 8
    meta = contract_metadata("both", size, 0.1)
    meta["arch"] = "standin-conv (random weights)"
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def quantize(fp32: Path, int8: Path, size: int, seed: int = 1) -> Path:
    import onnx
    from onnx import helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self._batches = iter([{"image": rng.uniform(0, 255, (1, 3, size, size)).astype(np.float32)}
                                  for _ in range(16)])

        def get_next(self):
            return next(self._batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    model = onnx.load(str(int8))  # quantize_static keeps metadata_props only in some versions: set them again
    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    meta["quantization"] = "QDQ static int8 (U8 activations, S8 per-channel weights), stand-in"
    del model.metadata_props[:]
    helper.set_model_props(model, meta)
    onnx.save(model, str(int8))
    return int8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--kind", choices=("conv", "contract"), default="conv")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    if out.resolve().is_relative_to((REPO / "models").resolve()):
        ap.error("write stand-in models outside the repository's models/")
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "agegender_fp32.onnx", out / "agegender_int8.onnx"
    if args.kind == "conv":
        size = 64
        build_conv_model(fp32, size)
    else:
        size = 32
        build_contract_model(fp32, input_size=size)
    quantize(fp32, int8, size)
    print(f"{fp32}\n{int8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
