"""Build the models `bench/models.py` times: real architectures exported by torch, random weights.

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 torchvision transformers onnx onnxscript numpy
    /tmp/torchvenv/bin/python models/make_bench_models.py [--only NAME ...]

torch is never a dependency of graphopt: run this in its own venv. The files are large (BERT-base
is ~440 MB) and the weights random (seeded), so they go to GRAPHOPT_BENCH_MODELS (default
~/.cache/graphopt/bench_models)/<name>.onnx, not into the repository. Every model has a symbolic
batch (the benchmark runs and compiles batch 1): torchvision's ResNet-18, ResNet-50, MobileNetV2 and
EfficientNet-B0 at 3x224x224, and a BERT-base-class encoder (Hugging Face BertModel from a
BertConfig: hidden 768, 12 layers, 12 heads, intermediate 3072) at sequence 128 with int64
`input_ids` and `attention_mask`. The exporters follow the corpus script
(models/corpus/make_torch_models.py, whose model builders and TorchScript export this reuses):
the TorchScript-based exporter at opset 17 (BatchNormalization kept, as deployed models have it)
for the older CNNs, the dynamo exporter at opset 18 for EfficientNet-B0 and BERT.

This module imports torch only when it builds, so the benchmark reads MODELS and `path` from it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

BERT_SEQUENCE = 128
BERT_VOCAB = 30522  # bert-base-uncased's


class BenchModel(NamedTuple):
    kind: str        # "image": one float input x, 1x3x224x224; "bert": input_ids + attention_mask, 1x128
    source: str      # torchvision.models name, or "bert-base"
    exporter: str    # "script" (TorchScript-based, dynamo=False) or "dynamo"
    opset: int


MODELS: dict[str, BenchModel] = {
    "resnet18": BenchModel("image", "resnet18", "script", 17),
    "resnet50": BenchModel("image", "resnet50", "script", 17),
    "mobilenet_v2": BenchModel("image", "mobilenet_v2", "script", 17),
    "efficientnet_b0": BenchModel("image", "efficientnet_b0", "dynamo", 18),
    "bert_base": BenchModel("bert", "bert-base", "dynamo", 18),
}
BUILD_COMMAND = "/tmp/torchvenv/bin/python models/make_bench_models.py"


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPHOPT_BENCH_MODELS", Path.home() / ".cache" / "graphopt" / "bench_models"))


def path(name: str) -> Path:
    return cache_dir() / f"{name}.onnx"


def _corpus_script():
    """models/corpus/make_torch_models.py, for its seeded builders and TorchScript export."""
    _torchvision_without_ops()
    sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
    import make_torch_models

    return make_torch_models


def _torchvision_without_ops() -> None:
    """PyPI's torchvision wheel is linked against CUDA torch; beside the CPU torch wheel its C ops
    do not load, and `import torchvision` then fails registering fake kernels for two ops it never
    defined (torchvision::nms, qnms). The models need none of its ops: declare those two."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    extension = Path(spec.origin).parent if spec and spec.origin else None
    if extension is None or "torchvision" in sys.modules:
        return
    try:
        torch.ops.load_library(str(next(extension.glob("_C*.so"))))
    except (OSError, StopIteration):
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_without_ops.library = library  # kept alive: dropping it undefines the ops


def _image(spec: BenchModel):
    model, args, inputs = _corpus_script().image_model(spec.source)()  # seeded, weights=None, eval, batch 2
    return model, args, inputs, ["output"]


def _bert(spec: BenchModel):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=BERT_VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    model = BertModel(config).eval()
    model.config.return_dict = False
    ids = torch.randint(1, BERT_VOCAB, (2, BERT_SEQUENCE), generator=torch.Generator().manual_seed(0))
    # "ids": the corpus script's kind for an input whose batch alone is symbolic (the sequence stays 128).
    return model, (ids, torch.ones_like(ids)), {"input_ids": "ids", "attention_mask": "ids"}, \
        ["last_hidden_state", "pooler_output"]


def export(name: str) -> Path:
    import onnx
    import torch

    spec = MODELS[name]
    corpus = _corpus_script()
    model, args, inputs, outputs = (_bert if spec.kind == "bert" else _image)(spec)
    out = path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The corpus script's exporters: batch (axis 0) symbolic, the example batch 2 (torch.export
    # specializes a dimension of size 1). The bench runs batch 1; a symbolic batch is what lets
    # graphopt calibrate on 32 samples (a model fixed at batch 1 takes one sample per run, and
    # graphopt.optimize's reference run does not split data into such runs).
    with torch.no_grad():
        if spec.exporter == "script":
            proto = corpus._script(model, args, inputs, corpus.Recipe(None, "script", spec.opset), out)
        else:
            proto = corpus._dynamo(model, args, inputs, spec.opset)
    if len(proto.graph.output) != len(outputs):
        raise SystemExit(f"{name}: the export has {len(proto.graph.output)} outputs, expected {len(outputs)}")
    proto.doc_string = f"graphopt bench model: {name}, random weights (seed 0), torch {torch.__version__}"
    onnx.helper.set_model_props(proto, {"bench_model": name, "exporter": spec.exporter})
    # Under 2 GB (BERT-base is ~440 MB): one file, which every runtime and onnxruntime's quantizer read as is.
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="build these models only")
    for name in parser.parse_args().only or MODELS:
        print(f"{name}: {export(name)}", flush=True)


if __name__ == "__main__":
    main()
