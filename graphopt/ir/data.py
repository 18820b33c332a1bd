"""Input data for a model: an .npz file, a folder of .npy files, or seeded random tensors."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.errors import DataError
from graphopt.ir.graph import np_dtype


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints, or str/None for symbolic dimensions


def input_specs(graph: gs.Graph) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and (possibly symbolic) shape."""
    return [InputSpec(t.name, np.dtype(np.float32) if t.dtype is None else np_dtype(t.dtype),
                      tuple(t.shape or ())) for t in graph.inputs if isinstance(t, gs.Variable)]


def random_feeds(specs: list[InputSpec], seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal floats, small non-negative ints; symbolic dims become `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else batch for d in s.shape)
        if np.issubdtype(s.dtype, np.floating):
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            feeds[s.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[s.name] = rng.integers(0, 4, shape).astype(s.dtype)
    return feeds


def load_feeds(path: str | os.PathLike, specs: list[InputSpec], limit: int | None = None
               ) -> dict[str, np.ndarray]:
    """Feeds from `path`: an .npz keyed by input name (or `x` for a single input), a folder of
    `<input name>.npy` files, or one .npy file (read as `x`). Arrays are cast to the input's dtype
    and checked for rank."""
    path = Path(path)
    arrays = _read_arrays(path)
    feeds = {}
    for s in specs:
        key = s.name if s.name in arrays else ("x" if len(specs) == 1 and "x" in arrays else None)
        if key is None:
            raise DataError(f"{path}: no array for model input '{s.name}' (has: {', '.join(sorted(arrays))})")
        a = np.asarray(arrays[key])
        if s.shape and a.ndim != len(s.shape):
            raise DataError(f"{path}: array '{key}' has shape {a.shape}, input '{s.name}' needs rank {len(s.shape)}")
        if limit and a.ndim:
            a = a[:limit]
        try:
            feeds[s.name] = a.astype(s.dtype, copy=False)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: array '{key}' cannot be cast to {s.dtype} for input '{s.name}' ({e})"
                            ) from None
    return feeds


def batches(feeds: dict[str, np.ndarray], size: int):
    """Split feeds along the first axis into batches of at most `size`."""
    n = min((len(v) for v in feeds.values()), default=0)
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.is_dir():
            return {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"x": loaded}
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read input data ({e})") from None
