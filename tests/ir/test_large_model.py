"""A model whose weights are in external data: loaded as mapped views, checked and shape-inferred
on skeletons, run in onnxruntime on the graph's own arrays and saved a weight at a time, with
peak memory a bounded multiple of the model's size (measured in a fresh process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import io, ort, shared_weights, stream

LAYERS, K = 6, 2048  # 6 x 16 MiB = 96 MiB of weights


def build(folder, layers: int = LAYERS, k: int = K) -> tuple[str, np.ndarray]:
    """MatMul+Relu layers with float32 k x k weights in one external data file, and an input."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, k), dtype=np.float32) / k ** 0.5), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"y{i}"], name=f"relu{i}")]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", k])], inits)
    path = os.path.join(folder, "big.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, all_tensors_to_one_file=True, location="big.data")
    return path, rng.standard_normal((4, k)).astype(np.float32)


@pytest.fixture(scope="module")
def small_big(tmp_path_factory):
    """The same structure at 3 x 256 x 256, quick enough for functional checks."""
    return build(str(tmp_path_factory.mktemp("ext")), layers=3, k=256)


def test_weights_are_views_of_the_mapped_file_and_writes_stay_private(small_big):
    path, _ = small_big
    data = open(os.path.join(os.path.dirname(path), "big.data"), "rb").read()
    graph = io.load(path)
    w = graph.tensors()["w0"].values
    assert not w.flags.owndata and w.flags.writeable and w.flags.aligned
    w[...] = 0  # a pass writing in place gets private pages
    assert open(os.path.join(os.path.dirname(path), "big.data"), "rb").read() == data


def test_shared_session_computes_what_onnxruntime_computes_from_the_file(small_big):
    path, x = small_big
    graph = io.load(path)
    opts = ort.ort.SessionOptions()
    sess = shared_weights.session(graph, opts, ["CPUExecutionProvider"])
    # Without pre-packing onnxruntime takes another MatMul kernel: equal up to float rounding.
    np.testing.assert_allclose(ort.run(sess, {"x": x})["y2"], ort.run(path, {"x": x})["y2"], rtol=1e-5, atol=1e-6)


def test_stream_size_and_compressed_size_match_the_file(small_big, tmp_path):
    path, _ = small_big
    graph = io.load(path)
    out = io.save(graph, tmp_path / "inline.onnx")
    data = out.read_bytes()
    assert stream.size(graph) == len(data)
    assert stream.compressed_size(graph) == len(zlib.compress(data, 6))


def test_save_over_the_limit_streams_aligned_external_data(small_big, tmp_path, monkeypatch):
    path, x = small_big
    graph = io.load(path)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1 << 20)
    out = io.save(graph, tmp_path / "m.onnx")
    model = onnx.load(str(out), load_external_data=False)
    offsets = [int(dict((e.key, e.value) for e in t.external_data)["offset"]) for t in model.graph.initializer]
    assert offsets and all(o % stream.ALIGNMENT == 0 for o in offsets)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(ort.run(str(out), {"x": x})["y2"], ort.run(path, {"x": x})["y2"])


# The measured child: load, check, infer shapes, run in onnxruntime (twice), save with external data.
CHILD = textwrap.dedent("""
    import json, sys, numpy as np
    from graphopt.ir import io, ort, shared_weights, verify
    from graphopt.ir.graph import infer_shapes

    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    path, out, x = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak: imports are not the model's memory
    base = hwm()
    graph = infer_shapes(io.load(path))
    problems = verify.check(graph, verify.ALWAYS)
    outputs = [ort.run(shared_weights.session(graph, ort.ort.SessionOptions(), ["CPUExecutionProvider"]), {"x": x})
               for _ in range(2)]
    io.PROTOBUF_LIMIT = 1 << 20  # as a model over 2 GB is saved
    io.save(graph, out)
    print(json.dumps({"peak": hwm() - base, "problems": problems, "y": outputs[1]["y5"].tolist()}))
""")


def test_peak_memory_stays_near_the_model_size(tmp_path):
    path, x = build(str(tmp_path))
    np.save(tmp_path / "x.npy", x)
    size = os.path.getsize(tmp_path / "big.data")
    result = subprocess.run([sys.executable, "-c", CHILD, path, str(tmp_path / "out.onnx"), str(tmp_path / "x.npy")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["problems"] == []
    np.testing.assert_allclose(np.array(child["y"], np.float32), ort.run(path, {"x": x})["y5"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ort.run(str(tmp_path / "out.onnx"), {"x": x})["y5"], ort.run(path, {"x": x})["y5"])
    # The weights are read once, through one mapping shared with onnxruntime; structure and
    # onnxruntime's working memory are small beside them.
    assert child["peak"] <= 1.25 * size, f"peak {child['peak'] / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
