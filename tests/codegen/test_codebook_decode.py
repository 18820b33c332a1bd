"""Codebook-coded weights (cluster-weights, ternarize, binarize) compile with TVM: `decode_codebooks`
turns them into float initializers before import, exactly as onnxruntime decodes them."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import codegen
from graphopt.codegen.onnx_import import decode_codebooks
from graphopt.ir import ort
from graphopt.ir.graph import export
from graphopt.optimize import optimize

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS = MODELS / "digits_cnn.onnx"


def coded(spec: str) -> onnx.ModelProto:
    return export(optimize(DIGITS, spec, data=MODELS / "digits_calib.npz", latency=False, min_cosine=0.0).graph)


def test_decoding_is_exact_and_drops_the_uint4_indices():
    model = coded("canonicalize,cluster-weights(bits=4),binarize(include=gemm12,keep=none)")
    assert any(i.data_type == onnx.TensorProto.UINT4 for i in model.graph.initializer)
    decoded = decode_codebooks(model)
    assert not any(n.op_type in ("Gather", "Cast", "Mul") for n in decoded.graph.node)
    assert not any(i.data_type == onnx.TensorProto.UINT4 for i in decoded.graph.initializer)
    onnx.checker.check_model(decoded)
    # Each decoded weight is bit for bit what onnxruntime's Gather (and Mul) compute.
    weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, None) for w in weights)
    x = np.load(MODELS / "digits_test.npz")["x"][:32]
    ran = ort.run(probe, {"x": x})
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in decoded.graph.initializer}
    for w in weights:
        np.testing.assert_array_equal(inits[w], ran[w])
    # onnxruntime may lay out constant and computed weights differently: float rounding only.
    np.testing.assert_allclose(ort.run(decoded, {"x": x})["logits"], ran["logits"], rtol=1e-5, atol=1e-5)
    assert decode_codebooks(decoded) is decoded  # nothing left to decode: the same model back


@pytest.mark.parametrize("spec", ["canonicalize,prune-magnitude(sparsity=0.5),cluster-weights(bits=4)",
                                  "canonicalize,binarize"])
def test_coded_digits_compile_and_match_onnxruntime(spec, tmp_path):
    model = coded(spec)
    lib = codegen.load(codegen.compile(model, "x86", tmp_path).library)
    x = np.load(MODELS / "digits_test.npz")["x"][:64]
    reference = ort.run(model, {"x": x})["logits"]
    compiled = np.concatenate([lib(s[None]) for s in x])
    assert np.abs(compiled - reference).max() < 1e-4
    assert (compiled.argmax(1) == reference.argmax(1)).all()
