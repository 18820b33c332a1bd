"""Train the small digits CNN that graphopt's end-to-end tests compress.

Run:
    python3 -m venv /tmp/gv-train
    /tmp/gv-train/bin/pip install torch==2.13.0 numpy scikit-learn onnx onnxruntime
    /tmp/gv-train/bin/python models/make_digits_cnn.py

Trains on scikit-learn's bundled 8x8 digits (no download) and writes, next to this script:
    digits_cnn.onnx    input "x" float32 (N, 1, 8, 8), output "logits" (N, 10); opset 17, IR 8.
                       BatchNormalization and Dropout are kept as separate nodes on purpose so
                       canonicalisation and folding passes have real work.
    digits_test.npz    held-out 30% stratified split: x (N, 1, 8, 8) float32 in [0, 1],
                       y (N,) int64.
    digits_calib.npz   256 calibration inputs drawn from the training split: x (256, 1, 8, 8).

torch is needed only here; graphopt itself never imports it. Output is deterministic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 60
BATCH = 64
DROPOUT = 0.25
CALIB = 256


def load_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1] as (N, 1, 8, 8), split 70/30 stratified."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.3, stratify=y, random_state=SEED)


def conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def make_net() -> nn.Sequential:
    return nn.Sequential(
        *conv_block(1, 16), *conv_block(16, 32), nn.MaxPool2d(2), *conv_block(32, 32),
        nn.Flatten(), nn.Dropout(DROPOUT), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))


def train(net: nn.Sequential, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    net.eval()


class OnnxWriter:
    """Collects nodes and initializers with unique names for the ONNX export."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def add(self, op: str, inputs: list[str], params: dict[str, np.ndarray] | None = None,
            **attrs) -> str:
        name = f"{op.lower()}{len(self.nodes)}"
        names = [f"{name}.{k}" for k in (params or {})]
        for pname, value in zip(names, (params or {}).values()):
            self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), pname))
        out = f"{name}.out"
        self.nodes.append(helper.make_node(op, inputs + names, [out], name=name, **attrs))
        return out


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def to_onnx(net: nn.Sequential) -> onnx.ModelProto:
    """Translate the eval-mode network layer by layer, keeping BN and Dropout as their own nodes."""
    w = OnnxWriter()
    x = "x"
    for layer in net:
        if isinstance(layer, nn.Conv2d):
            x = w.add("Conv", [x], {"weight": as_numpy(layer.weight), "bias": as_numpy(layer.bias)},
                      kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif isinstance(layer, nn.BatchNorm2d):
            x = w.add("BatchNormalization", [x],
                      {"scale": as_numpy(layer.weight), "bias": as_numpy(layer.bias),
                       "mean": as_numpy(layer.running_mean), "var": as_numpy(layer.running_var)},
                      epsilon=layer.eps)
        elif isinstance(layer, nn.ReLU):
            x = w.add("Relu", [x])
        elif isinstance(layer, nn.MaxPool2d):
            x = w.add("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        elif isinstance(layer, nn.Flatten):
            x = w.add("Flatten", [x], axis=1)
        elif isinstance(layer, nn.Dropout):
            # No training_mode input: inference semantics, an identity for the optimizer to remove.
            x = w.add("Dropout", [x], {"ratio": np.array(layer.p, np.float32)})
        elif isinstance(layer, nn.Linear):
            x = w.add("Gemm", [x], {"weight": as_numpy(layer.weight), "bias": as_numpy(layer.bias)},
                      transB=1)
        else:
            raise TypeError(f"no ONNX translation for {type(layer).__name__}")
    w.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        w.nodes, "digits_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="graphopt.models.make_digits_cnn")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"x": x})[0]


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x_train, x_test, y_train, y_test = load_splits()
    net = make_net()
    train(net, x_train, y_train)
    model = to_onnx(net)

    with torch.no_grad():
        expected = net(torch.from_numpy(x_test)).numpy()
    got = run_onnx(model, x_test)
    diff = float(np.abs(got - expected).max())
    if diff >= 1e-4:
        raise SystemExit(f"onnxruntime disagrees with torch: max abs diff {diff:.3g}")
    accuracy = float((got.argmax(1) == y_test).mean())
    print(f"ort vs torch max abs diff {diff:.3g}; "
          f"test accuracy {accuracy:.4f} on {len(y_test)} digits")

    calib = np.random.default_rng(SEED).choice(len(x_train), CALIB, replace=False)
    onnx.save(model, HERE / "digits_cnn.onnx")
    np.savez_compressed(HERE / "digits_test.npz", x=x_test, y=y_test)
    np.savez_compressed(HERE / "digits_calib.npz", x=x_train[np.sort(calib)])


if __name__ == "__main__":
    main()
