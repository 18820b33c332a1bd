"""Synthetic ONNX models with seeded random weights, shaped like the networks graphopt targets.

Built with onnx.helper only, so tests need no training, downloads or torch. Every model is
opset 17 / IR 8, has static input and output shapes, keeps weights as initializers, and leaves
the patterns compression passes look for (separate BatchNormalization, MatMul+Add, Erf-based
Gelu) unfused on purpose.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # older onnxruntime builds refuse newer IR versions


class _Net:
    """Accumulates nodes and initializers under unique names; methods return output names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def unique(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}_{n}"

    def const(self, owner: str, role: str, value: np.ndarray) -> str:
        name = f"{owner}.{role}"
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
        name = self.unique(op_type)
        out = f"{name}.out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def weight(self, shape: Sequence[int], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        name = self.unique("Conv")
        # He init keeps activation variance roughly constant through Conv+Relu.
        w = self.weight((cout, cin // group, k, k), math.sqrt(2.0 / (cin // group * k * k)))
        out = f"{name}.out"
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const(name, "weight", w)], [out], name=name, kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4, group=group))
        return out

    def bn(self, x: str, c: int, gamma_scale: float = 1.0) -> str:
        name = self.unique("BatchNormalization")
        # Non-trivial statistics so a BN fold changes the weights, not just copies them.
        gamma = self.rng.uniform(0.5, 1.5, c) * gamma_scale
        beta = self.rng.normal(0.0, 0.1, c)
        mean = self.rng.normal(0.0, 0.1, c)
        var = self.rng.uniform(0.5, 1.5, c)
        params = [self.const(name, role, v.astype(np.float32))
                  for role, v in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))]
        out = f"{name}.out"
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], [out], name=name,
                                           epsilon=1e-5))
        return out

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        name = self.unique("Clip")
        lo = self.const(name, "min", np.array(0.0, np.float32))
        hi = self.const(name, "max", np.array(6.0, np.float32))
        out = f"{name}.out"
        self.nodes.append(helper.make_node("Clip", [x, lo, hi], [out], name=name))
        return out

    def gemm(self, x: str, fin: int, fout: int) -> str:
        name = self.unique("Gemm")
        w = self.weight((fout, fin), math.sqrt(1.0 / fin))
        b = self.weight((fout,), 0.1)
        out = f"{name}.out"
        self.nodes.append(helper.make_node(
            "Gemm", [x, self.const(name, "weight", w), self.const(name, "bias", b)], [out],
            name=name, transB=1))
        return out

    def linear(self, x: str, fin: int, fout: int, std: float | None = None) -> str:
        """MatMul followed by a separate bias Add, the unfused form exporters emit."""
        name = self.unique("MatMul")
        w = self.weight((fin, fout), math.sqrt(1.0 / fin) if std is None else std)
        y = f"{name}.out"
        self.nodes.append(helper.make_node("MatMul", [x, self.const(name, "weight", w)], [y],
                                           name=name))
        bias = self.const(name, "bias", self.weight((fout,), 0.1))
        return self.op("Add", [y, bias])

    def head(self, x: str, features: int, classes: int) -> str:
        """GlobalAveragePool -> Flatten -> Gemm classifier."""
        pooled = self.op("GlobalAveragePool", [x])
        return self.gemm(self.op("Flatten", [pooled], axis=1), features, classes)

    def model(self, x: str, x_shape: Sequence[int], y: str, y_shape: Sequence[int],
              name: str) -> onnx.ModelProto:
        # Rename the final tensor so every model exposes "input" -> "output".
        for node in self.nodes:
            node.output[:] = ["output" if o == y else o for o in node.output]
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(y_shape))],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="graphopt.testing")
        model.ir_version = IR_VERSION
        return model


def _conv_bn(net: _Net, x: str, cin: int, cout: int, k: int, stride: int = 1,
             relu: bool = True, gamma_scale: float = 1.0) -> str:
    y = net.bn(net.conv(x, cin, cout, k, stride), cout, gamma_scale)
    return net.relu(y) if relu else y


# Shrinks the last BN of each residual branch so the identity path dominates and the
# variance does not compound over depth (the same idea as zero-init residual gamma).
_RESIDUAL_GAMMA = 0.3


def _residual_block(net: _Net, x: str, cin: int, planes: int, stride: int,
                    bottleneck: bool) -> tuple[str, int]:
    if bottleneck:
        cout = planes * 4
        y = _conv_bn(net, x, cin, planes, 1)
        y = _conv_bn(net, y, planes, planes, 3, stride)
        y = _conv_bn(net, y, planes, cout, 1, relu=False, gamma_scale=_RESIDUAL_GAMMA)
    else:
        cout = planes
        y = _conv_bn(net, x, cin, planes, 3, stride)
        y = _conv_bn(net, y, planes, cout, 3, relu=False, gamma_scale=_RESIDUAL_GAMMA)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = _conv_bn(net, x, cin, cout, 1, stride, relu=False)
    return net.relu(net.op("Add", [y, shortcut])), cout


def resnet(blocks: Sequence[int] = (1, 1), width: int = 16, bottleneck: bool = False,
           num_classes: int = 10, image: int = 32, batch: int = 1, seed: int = 0,
           stem: str = "cifar") -> onnx.ModelProto:
    """A ResNet with unfolded BatchNormalization.

    ``stem="cifar"`` is a 3x3 stride-1 conv; ``stem="imagenet"`` is the 7x7 stride-2 conv plus
    3x3 stride-2 MaxPool of the original ResNet. Stage ``i`` has ``width * 2**i`` planes and
    halves the resolution at its first block when ``i > 0``.
    """
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem {stem!r}")
    net = _Net(seed)
    if stem == "imagenet":
        x = _conv_bn(net, "input", 3, width, 7, stride=2)
        x = net.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    else:
        x = _conv_bn(net, "input", 3, width, 3)
    channels = width
    for stage, count in enumerate(blocks):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            x, channels = _residual_block(net, x, channels, width * 2**stage, stride, bottleneck)
    y = net.head(x, channels, num_classes)
    return net.model("input", (batch, 3, image, image), y, (batch, num_classes), "resnet")


def resnet50(batch: int = 1, image: int = 224, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 topology (about 25.6M initializer elements, BN statistics included)."""
    return resnet(blocks=(3, 4, 6, 3), width=64, bottleneck=True, num_classes=1000,
                  image=image, batch=batch, seed=seed, stem="imagenet")


def mobilenet(width: int = 16, blocks: int = 3, image: int = 32, num_classes: int = 10,
              batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """MobileNet-style separable convolutions.

    Each block is depthwise 3x3 -> BN -> Clip(0, 6) -> pointwise 1x1 -> BN -> Relu; odd-numbered
    blocks use stride 2 and double the channels.
    """
    net = _Net(seed)
    x = _conv_bn(net, "input", 3, width, 3)
    channels = width
    for i in range(blocks):
        stride = 2 if i % 2 == 1 else 1
        cout = channels * stride
        x = net.relu6(net.bn(net.conv(x, channels, channels, 3, stride, group=channels), channels))
        x = _conv_bn(net, x, channels, cout, 1)
        channels = cout
    y = net.head(x, channels, num_classes)
    return net.model("input", (batch, 3, image, image), y, (batch, num_classes), "mobilenet")


def mlp(sizes: Sequence[int] = (64, 128, 64, 10), batch: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Hidden layers as MatMul + Add + Relu (left for a Gemm fusion), the last layer as Gemm."""
    if len(sizes) < 2:
        raise ValueError("mlp needs at least an input and an output size")
    net = _Net(seed)
    x = "input"
    for fin, fout in zip(sizes[:-2], sizes[1:-1]):
        x = net.relu(net.linear(x, fin, fout, std=math.sqrt(2.0 / fin)))
    y = net.gemm(x, sizes[-2], sizes[-1])
    return net.model("input", (batch, sizes[0]), y, (batch, sizes[-1]), "mlp")


def _gelu(net: _Net, x: str) -> str:
    """Gelu spelled out with Erf, the pattern exporters produce before a Gelu fusion."""
    name = net.unique("Gelu")
    scaled = net.op("Div", [x, net.const(name, "sqrt2", np.array(math.sqrt(2.0), np.float32))])
    one = net.const(name, "one", np.array(1.0, np.float32))
    one_plus = net.op("Add", [net.op("Erf", [scaled]), one])
    half_x = net.op("Mul", [x, net.const(name, "half", np.array(0.5, np.float32))])
    return net.op("Mul", [half_x, one_plus])


def _layer_norm(net: _Net, x: str, d: int) -> str:
    name = net.unique("LayerNorm")
    scale = net.const(name, "scale", net.rng.uniform(0.5, 1.5, d).astype(np.float32))
    bias = net.const(name, "bias", net.weight((d,), 0.1))
    return net.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)


def _attention(net: _Net, x: str, batch: int, seq: int, d_model: int, heads: int) -> str:
    d_head = d_model // heads
    name = net.unique("Attention")
    split = net.const(name, "split_shape", np.array([batch, seq, heads, d_head], np.int64))
    merge = net.const(name, "merge_shape", np.array([batch, seq, d_model], np.int64))

    def project(perm: list[int]) -> str:
        return net.op("Transpose", [net.op("Reshape", [net.linear(x, d_model, d_model), split])],
                      perm=perm)

    q = project([0, 2, 1, 3])  # (B, H, S, Dh)
    k = project([0, 2, 3, 1])  # (B, H, Dh, S): transposed so Q @ K needs no extra op
    v = project([0, 2, 1, 3])
    scores = net.op("MatMul", [q, k])
    scale = net.const(name, "scale", np.array(1.0 / math.sqrt(d_head), np.float32))
    probs = net.op("Softmax", [net.op("Mul", [scores, scale])], axis=-1)
    context = net.op("Transpose", [net.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    return net.linear(net.op("Reshape", [context, merge]), d_model, d_model)


def transformer(batch: int = 1, seq: int = 16, d_model: int = 64, heads: int = 4,
                d_ff: int = 128, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Post-norm Transformer encoder: (batch, seq, d_model) -> same shape.

    Each layer is multi-head self-attention + residual + LayerNormalization, then a
    MatMul+Add -> Gelu(Erf) -> MatMul+Add feed-forward + residual + LayerNormalization.
    """
    if d_model % heads:
        raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
    net = _Net(seed)
    x = "input"
    for _ in range(layers):
        x = _layer_norm(net, net.op("Add", [x, _attention(net, x, batch, seq, d_model, heads)]),
                        d_model)
        hidden = _gelu(net, net.linear(x, d_model, d_ff, std=math.sqrt(2.0 / d_model)))
        x = _layer_norm(net, net.op("Add", [x, net.linear(hidden, d_ff, d_model)]), d_model)
    shape = (batch, seq, d_model)
    return net.model("input", shape, x, shape, "transformer")
