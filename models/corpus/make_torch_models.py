"""Build the torch-exported part of the model corpus (tests/corpus/manifest.toml, source "torch").

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers onnx onnxscript
    /tmp/torchvenv/bin/python models/corpus/make_torch_models.py [--only ID ...]

torch is never a dependency of graphopt: run this in its own venv. Weights are random (seeded),
so the files are not committed: they go to GRAPHOPT_CORPUS_CACHE (default
~/.cache/graphopt/corpus)/torch/<id>/, where the corpus tests and bench/corpus.py find them.
Each model has a symbolic batch; the exporters and opsets differ on purpose (TorchScript-based
exporter at opsets 11-17, the dynamo exporter at 18-21) to spread the corpus over both.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import onnx
import torch
import torchvision

# The manifest (read by tests/corpus/corpus_lib.py) says where each model goes.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "corpus"))
import corpus_lib

# Above this many bytes of weights a model is written with external data, as exporters do for
# large models, so that the corpus exercises loading and saving it.
EXTERNAL_DATA_BYTES = 64 << 20


def image_model(name: str) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build():
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        return model, (torch.rand(2, 3, 224, 224),), {"x": "image"}
    return build


def bert_token_classifier() -> tuple[torch.nn.Module, tuple, dict]:
    """A Hugging Face BERT (NER-style token classifier) from a config: no hub download."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128, num_labels=9)
    model = BertForTokenClassification(config).eval()
    model.config.return_dict = False
    ids = torch.randint(1, 8000, (2, 32))
    return model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), {
        "input_ids": "tokens", "attention_mask": "tokens", "token_type_ids": "tokens"}


class GreedyDecoder(torch.nn.Module):
    """A gated recurrent cell decoding greedily for `steps` steps (Loop), stopping early at token 0
    (If), with a scalar temperature: the control flow and scalar inputs traced CNNs never have.
    The cell is written out because torch.nn.GRUCell's input-rank check does not script-export."""

    def __init__(self, vocab: int = 64, hidden: int = 48):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.gate = torch.nn.Linear(2 * hidden, hidden)
        self.update = torch.nn.Linear(2 * hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, h: torch.Tensor, steps: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        token = torch.ones(h.shape[0], dtype=torch.long)
        logits = torch.zeros(h.shape[0], self.head.out_features)
        for _ in range(int(steps)):
            xh = torch.cat([self.embed(token), h], dim=1)
            z = torch.sigmoid(self.gate(xh))
            h = (1 - z) * h + z * torch.tanh(self.update(xh))
            logits = self.head(h) / temperature
            token = logits.argmax(-1)
            if bool((token == 0).all()):
                break
        return logits


def control_flow() -> tuple[torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = torch.jit.script(GreedyDecoder().eval())
    return model, (torch.randn(1, 48), torch.tensor(5), torch.tensor(0.7)), {"h": "state", "steps": None,
                                                                              "temperature": None}


def resnet18_digits() -> tuple[torch.nn.Module, tuple, dict]:
    """torchvision's ResNet-18 trained (not random) on scikit-learn's bundled digits, upsampled to
    112x112 RGB (bench/search.py's `digits_images`): a ResNet-18 whose predictions depend on its
    input, so that accuracy after compression means something (a random-weight ResNet predicts one
    class for every input). Trained on the 70% split models/make_digits_cnn.py trains on; its 30%
    is models/digits_test.npz. About 3 minutes on 2 cores."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from search import digits_images

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]
    x_train, _, y_train, _ = train_test_split(x, digits.target, test_size=0.3, stratify=digits.target, random_state=0)
    images, labels = torch.from_numpy(digits_images(x_train)), torch.from_numpy(y_train.astype("int64"))
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(6):
        for batch in torch.randperm(len(images)).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
        print(f"  epoch {epoch}: loss {loss.item():.4f}", flush=True)
    return model.eval(), (images[:2],), {"x": "image"}


class Recipe(NamedTuple):
    build: Callable[[], tuple[torch.nn.Module, tuple, dict]]
    exporter: str                 # "script": the TorchScript-based exporter (dynamo=False); "dynamo"
    opset: int
    functions: frozenset = frozenset()  # module classes exported as model-local functions ("script")


MODELS: dict[str, Recipe] = {
    "torch-resnet18": Recipe(image_model("resnet18"), "script", 11),
    "torch-resnet18-digits": Recipe(resnet18_digits, "script", 17),
    "torch-mobilenet-v2": Recipe(image_model("mobilenet_v2"), "script", 13),
    "torch-mobilenet-v3-small": Recipe(image_model("mobilenet_v3_small"), "script", 17,
                                       frozenset({torchvision.ops.SqueezeExcitation})),
    "torch-efficientnet-b0": Recipe(image_model("efficientnet_b0"), "dynamo", 18),
    "torch-convnext-tiny": Recipe(image_model("convnext_tiny"), "dynamo", 20),
    "torch-bert-ner": Recipe(bert_token_classifier, "dynamo", 21),
    "torch-greedy-decoder": Recipe(control_flow, "script", 16),
}


def export(model_id: str) -> Path:
    recipe = MODELS[model_id]
    model, args, inputs = recipe.build()
    out = corpus_lib.by_id(model_id).path
    out.parent.mkdir(parents=True, exist_ok=True)
    proto = (_dynamo(model, args, inputs, recipe.opset) if recipe.exporter == "dynamo"
             else _script(model, args, inputs, recipe, out))
    weights = "trained on digits (seed 0)" if model_id == "torch-resnet18-digits" else "random weights (seed 0)"
    proto.doc_string = f"graphopt corpus: {model_id}, {weights}, torch {torch.__version__}"
    onnx.helper.set_model_props(proto, {"corpus_id": model_id, "exporter": recipe.exporter})
    external = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    for stale in out.parent.iterdir():
        stale.unlink()
    onnx.save(proto, str(out), save_as_external_data=external, all_tensors_to_one_file=True,
              location=out.name + ".data")
    onnx.checker.check_model(str(out))
    return out


def _script(model, args, inputs: dict, recipe: Recipe, out: Path) -> onnx.ModelProto:
    """The TorchScript-based exporter, batch (axis 0) symbolic for every input that has one."""
    axes = {name: {0: "batch"} for name, kind in inputs.items() if kind}
    # PRESERVE keeps BatchNormalization nodes (eval mode), as many exporters write them, instead of
    # folding them away during export.
    torch.onnx.export(model, args, str(out), dynamo=False, opset_version=recipe.opset, input_names=list(inputs),
                      output_names=["output"], dynamic_axes=axes, training=torch.onnx.TrainingMode.PRESERVE,
                      export_modules_as_functions=set(recipe.functions) or False)
    return onnx.load(str(out))


def _dynamo(model, args, inputs: dict, opset: int) -> onnx.ModelProto:
    """The dynamo exporter, batch (and sequence, for token inputs) symbolic."""
    # Examples have batch 2: torch.export specializes a dimension of size 1.
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=128)
    shapes = {name: ({0: batch, 1: seq} if kind == "tokens" else {0: batch}) for name, kind in inputs.items()}
    program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=list(inputs),
                                output_names=["output"], dynamic_shapes=tuple(shapes.values()))
    return program.model_proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="build these models only")
    for model_id in parser.parse_args().only or MODELS:
        print(f"{model_id}: {export(model_id)}", flush=True)


if __name__ == "__main__":
    main()
