"""Train graphopt's second bundled model: a CNN on MNIST-1D (Greydanus 2020), for measuring the
data-aware passes on a model other than digits.

Run:
    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 mnist1d scipy matplotlib onnx onnxruntime
    /tmp/torchvenv/bin/python models/make_mnist1d_cnn.py

MNIST-1D is generated on the spot by the `mnist1d` package from its ten 1-D digit templates
(`make_dataset`, seed 42: 4000 training and 1000 test signals of length 40), no download. The
signals are laid out as 1 x 40 images so that the network is made of 2-D Conv layers (kernels
1 x k), the layers graphopt's passes rewrite. Writes, next to this script:
    mnist1d_cnn.onnx   input "x" float32 (N, 1, 1, 40), output "logits" (N, 10); opset 17, IR 8;
                       BatchNormalization kept as its own nodes.
    mnist1d_test.npz   the 1000 test signals: x (N, 1, 1, 40) float32, y (N,) int64.
    mnist1d_calib.npz  512 calibration signals drawn from the training split: x.

torch and mnist1d are needed only here; graphopt never imports them. Output is deterministic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mnist1d.data import get_dataset_args, make_dataset
from onnx import TensorProto, helper, numpy_helper
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 80
BATCH = 100
CALIB = 512


def load_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = make_dataset(get_dataset_args())
    shape = lambda a: a.astype(np.float32)[:, None, None, :]  # noqa: E731 - (N, 40) -> (N, 1, 1, 40)
    return shape(data["x"]), shape(data["x_test"]), data["y"].astype(np.int64), data["y_test"].astype(np.int64)


def make_net() -> nn.Sequential:
    def block(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, (1, k), stride=(1, stride), padding=(0, k // 2)), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 32, 5, 1), *block(32, 64, 3, 2), *block(64, 64, 3, 2),
                         nn.Flatten(), nn.Linear(640, 128), nn.ReLU(), nn.Linear(128, 10))


def train(net: nn.Sequential, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
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


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def to_onnx(net: nn.Sequential) -> onnx.ModelProto:
    """The eval-mode network layer by layer, BatchNormalization kept as its own nodes."""
    nodes, inits, x = [], [], "x"

    def add(op: str, params: dict[str, np.ndarray], **attrs) -> str:
        name = f"{op.lower()}{len(nodes)}"
        names = [f"{name}.{k}" for k in params]
        inits.extend(numpy_helper.from_array(v, n) for n, v in zip(names, params.values()))
        nodes.append(helper.make_node(op, [x, *names], [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    for layer in net:
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            ph, pw = layer.padding
            x = add("Conv", {"weight": numpy_of(layer.weight), "bias": numpy_of(layer.bias)},
                    kernel_shape=[kh, kw], strides=list(layer.stride), pads=[ph, pw, ph, pw])
        elif isinstance(layer, nn.BatchNorm2d):
            x = add("BatchNormalization", {"scale": numpy_of(layer.weight), "bias": numpy_of(layer.bias),
                                           "mean": numpy_of(layer.running_mean), "var": numpy_of(layer.running_var)},
                    epsilon=layer.eps)
        elif isinstance(layer, nn.ReLU):
            x = add("Relu", {})
        elif isinstance(layer, nn.Flatten):
            x = add("Flatten", {}, axis=1)
        elif isinstance(layer, nn.Linear):
            x = add("Gemm", {"weight": numpy_of(layer.weight), "bias": numpy_of(layer.bias)}, transB=1)
        else:
            raise TypeError(f"no ONNX translation for {type(layer).__name__}")
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(nodes, "mnist1d_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 40])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="graphopt.models.make_mnist1d_cnn")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


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
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"x": x_test})[0]
    diff = float(np.abs(got - expected).max())
    if diff >= 1e-4:
        raise SystemExit(f"onnxruntime disagrees with torch: max abs diff {diff:.3g}")
    print(f"ort vs torch max abs diff {diff:.3g}; test accuracy {(got.argmax(1) == y_test).mean():.4f} "
          f"on {len(y_test)} signals")
    calib = np.random.default_rng(SEED).choice(len(x_train), CALIB, replace=False)
    onnx.save(model, HERE / "mnist1d_cnn.onnx")
    np.savez_compressed(HERE / "mnist1d_test.npz", x=x_test, y=y_test)
    np.savez_compressed(HERE / "mnist1d_calib.npz", x=x_train[np.sort(calib)])


if __name__ == "__main__":
    main()
