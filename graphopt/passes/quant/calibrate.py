"""Calibration: per-tensor ranges of activations observed in onnxruntime, batch by batch.

    stats = calibrate(graph, ["conv0.out", ...], feeds, batch_size=32, progress=cb)
    lo, hi = stats["conv0.out"].range("entropy")

The model runs with the observed tensors added as extra outputs; each batch updates a running
min, max and a 2048-bin histogram of |x| (graphopt.kernels.histogram) and is then dropped, so
memory is bounded by one batch of activations plus 2048 floats per tensor. Methods: "minmax",
"percentile" (of |x|), "entropy" (TensorRT's KL-divergence search) and "mse" (the clipping
threshold with least expected squared error). The clipped methods are symmetric in |x|: the range
is the observed [min, max] cut to [-T, T]. Samples are sliced along the batch axis of the inputs
that have one (`graphopt.ir.data.Batching`); scalars and fixed-shape state go whole into every run.
A model whose batch dimension is fixed runs in batches of that size.
Verified by: tests/passes/quant/test_calibrate.py (batched vs whole-data statistics, numpy
references) and tests/kernels/test_histogram.py (kernels vs slow references).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import ort
from graphopt.ir.data import Batching, input_specs
from graphopt.ir.errors import PipelineError
from graphopt.kernels import histogram

METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class TensorStats:
    """Running statistics of one tensor; `range(method)` turns them into a float range."""
    lo: float = np.inf
    hi: float = -np.inf
    hist: np.ndarray | None = None
    top: float = 0.0
    count: int = 0
    cache: dict = field(default_factory=dict)

    def update(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.lo = min(self.lo, float(np.nanmin(values)))
        self.hi = max(self.hi, float(np.nanmax(values)))
        self.hist, self.top = histogram.accumulate(self.hist, self.top, values)
        self.count += int(values.size)
        self.cache.clear()

    def range(self, method: str, percentile: float = 99.99, levels: int = 128) -> tuple[float, float]:
        """(lo, hi) including 0, as a quantizer needs zero exactly representable."""
        if self.count == 0:
            raise PipelineError("calibration saw no values for a tensor (empty calibration data?)")
        key = (method, percentile, levels)
        if key not in self.cache:
            self.cache[key] = self._range(method, percentile, levels)
        return self.cache[key]

    def _range(self, method: str, percentile: float, levels: int) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if method == "minmax":
            return lo, hi
        if method == "percentile":
            t = histogram.percentile_threshold(self.hist, self.top, percentile)
        elif method == "entropy":
            t = histogram.kl_threshold(self.hist, self.top, levels)
        elif method == "mse":
            t = histogram.mse_threshold(self.hist, self.top, levels - 1)
        else:
            raise PipelineError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
        return max(lo, -t), min(hi, t)


def with_outputs(graph: gs.Graph, names: list[str]) -> gs.Graph:
    """A copy of the graph with `names` added as (float) graph outputs, so onnxruntime returns them.
    A graph, not a ModelProto: onnxruntime then shares the weights of a large model (ir.ort)."""
    copy = graph.copy()
    tensors = copy.tensors()
    present = {t.name for t in copy.outputs}
    for name in names:
        if name not in present:
            tensor = tensors[name]
            tensor.dtype = tensor.dtype or np.float32
            copy.outputs.append(tensor)
    return copy


def calibrate(graph: gs.Graph, names: list[str], feeds: dict[str, np.ndarray], batch_size: int = 32,
              progress: Callable[[int, int], None] | None = None) -> dict[str, TensorStats]:
    """Statistics of each tensor in `names` over all samples of `feeds`, one batch at a time."""
    stats = {name: TensorStats() for name in names}
    if not names:
        return stats
    batching = Batching.of(input_specs(graph), feeds)
    if batching.samples == 0:
        raise PipelineError("calibration data is empty: pass --data with at least one sample")
    session = ort.session(with_outputs(graph, names))
    done = 0
    for batch in batching.batches(feeds, batch_size):
        outputs = ort.run(session, batch)
        for name in names:
            stats[name].update(outputs[name])
        done = min(done + (batching.run or batch_size), batching.samples)
        if progress:
            progress(done, batching.samples)
    return stats


@dataclass
class ChannelStats:
    """Per channel of one tensor: the lowest and highest value and the mean square, over all samples."""
    lo: np.ndarray
    hi: np.ndarray
    mean_square: np.ndarray

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.lo), np.abs(self.hi))


def channel_statistics(graph: gs.Graph, axes: dict[str, int], feeds: dict[str, np.ndarray], batch_size: int = 32,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, ChannelStats]:
    """Per tensor name in `axes` (its channel axis, negative from the end), per-channel statistics
    over all samples of `feeds`, one batch at a time (SmoothQuant's max |x| per input channel)."""
    if not axes:
        return {}
    batching = Batching.of(input_specs(graph), feeds)
    if batching.samples == 0:
        raise PipelineError("calibration data is empty: pass --data with at least one sample")
    session = ort.session(with_outputs(graph, list(axes)))
    found: dict[str, tuple] = {}
    done = 0
    for batch in batching.batches(feeds, batch_size):
        outputs = ort.run(session, batch)
        for name, axis in axes.items():
            x = np.moveaxis(np.asarray(outputs[name], np.float64), axis, -1).reshape(-1, outputs[name].shape[axis])
            lo, hi, squares, count = found.get(name, (np.inf, -np.inf, 0.0, 0))
            lo, hi = np.minimum(lo, x.min(axis=0, initial=np.inf)), np.maximum(hi, x.max(axis=0, initial=-np.inf))
            found[name] = (lo, hi, squares + (x * x).sum(axis=0), count + len(x))
        done = min(done + (batching.run or batch_size), batching.samples)
        if progress:
            progress(done, batching.samples)
    return {name: ChannelStats(lo, hi, squares / max(count, 1)) for name, (lo, hi, squares, count) in found.items()}
