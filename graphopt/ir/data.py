"""Input data for a model: an .npz file, a folder of .npy files, or seeded random tensors.

Models take every kind of input: batched images, int64 token ids, bool or int masks, scalars
(a sample rate), recurrent state of a fixed shape, several inputs at once. Feeds are checked
against the model (name, dtype, rank, every static dim) before onnxruntime sees them, so a
mismatch is one line naming the input and the dim. `Batching` says which inputs carry samples
along their first axis (those whose leading dim is symbolic, or a multiple of a fixed one) and
which are held fixed for every run (scalars, state, anything else).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.errors import DataError
from graphopt.ir.graph import np_dtype

# Random int64 inputs named like these are token ids: kept below a vocabulary any model has.
TOKEN_ID_RANGE = 100
# Random inputs larger than this (per input) are refused before allocating: a declared dim of
# 2^40 is a hostile or broken model, and real dims come from --input-shape or --data.
MAX_RANDOM_BYTES = 1 << 30
# An array in --data larger than this is refused from its header, before it is read.
MAX_DATA_BYTES = 1 << 34


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple | None  # ints, or str/None for symbolic dimensions; None when the rank is unknown

    @property
    def symbolic_batch(self) -> bool:
        """The leading dim is symbolic: the input takes any number of samples."""
        return bool(self.shape) and not is_static(self.shape[0])


def is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def input_specs(graph: gs.Graph) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and (possibly symbolic) shape."""
    return [InputSpec(t.name, np.dtype(np.float32) if t.dtype is None else np_dtype(t.dtype),
                      None if t.shape is None else tuple(t.shape)) for t in graph.inputs if isinstance(t, gs.Variable)]


def random_feeds(specs: list[InputSpec], seed: int = 0, batch: int = 1,
                 shapes: dict[str, tuple[int, ...]] | None = None, source: str = "model") -> dict[str, np.ndarray]:
    """Standard-normal floats; masks of ones, token ids in 0..99, token types and other ints small.
    An input's shape is `shapes[name]` when given, else its own with symbolic dims as `batch`.
    Every size is checked before anything is allocated (DataError naming `source` and the input)."""
    rng = np.random.default_rng(seed)
    planned = {}
    for s in specs:
        given = (shapes or {}).get(s.name)
        shape = tuple(given) if given is not None else tuple(int(d) if is_static(d) else batch for d in s.shape or ())
        _check_random_size(s, shape, source)
        planned[s.name] = shape
    return {s.name: _random(rng, s, planned[s.name]) for s in specs}


def _check_random_size(spec: InputSpec, shape: tuple[int, ...], source: str) -> None:
    if any(int(d) < 0 for d in shape):
        raise DataError(f"{source}: input '{spec.name}' has negative dims {list(shape)}")
    # Generation works in float64 before casting: count 8 bytes an element whatever the dtype.
    nbytes = 8
    for d in shape:
        nbytes *= int(d)
    if nbytes > MAX_RANDOM_BYTES:
        raise DataError(f"{source}: input '{spec.name}' of shape {_show(shape)} is {_size(nbytes)}, too large for "
                        f"random inputs (limit {_size(MAX_RANDOM_BYTES)}); give its dims with --input-shape "
                        f"{spec.name}=D0,D1,... or real inputs with --data")


def _size(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}" if unit != "bytes" else f"{nbytes} bytes"
        nbytes /= 1024
    return f"{nbytes:.3g} PiB"


def _random(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    name = spec.name.lower()
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if "mask" in name:  # attention and padding masks: attend everywhere
        return np.ones(shape, spec.dtype)
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if "type" in name or "segment" in name:  # BERT's token_type_ids index a 2-row embedding
        return np.zeros(shape, spec.dtype)
    if "position" in name and shape:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
    high = TOKEN_ID_RANGE if "id" in name or "token" in name else 4
    return rng.integers(0, high, shape).astype(spec.dtype)


def load_feeds(path: str | os.PathLike, specs: list[InputSpec], limit: int | None = None
               ) -> dict[str, np.ndarray]:
    """Feeds from `path`: an .npz keyed by input name (or `x` for a single input), a folder of
    `<input name>.npy` files, or one .npy file (read as `x`), checked by `check_feeds`. `limit`
    keeps the first samples of the inputs that carry samples."""
    return load_data(path, specs, limit)[0]


def load_data(path: str | os.PathLike, specs: list[InputSpec], limit: int | None = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """`load_feeds`, and the labels: an array `y` (that is no model input) with one entry per
    sample, or None."""
    path = Path(path)
    arrays = _read_arrays(path)
    named = {}
    for s in specs:
        key = s.name if s.name in arrays else ("x" if len(specs) == 1 and "x" in arrays else None)
        if key is None:
            raise DataError(f"{path}: no array for model input '{s.name}' (has: {', '.join(sorted(arrays))})")
        named[s.name] = np.asarray(arrays[key])
    feeds = check_feeds(named, specs, str(path))
    batching = Batching.of(specs, feeds)
    labels = None if "y" in named or "y" not in arrays else np.asarray(arrays["y"])
    if labels is not None and len(labels) != batching.samples:
        raise DataError(f"{path}: {len(labels)} labels in y for {batching.samples} samples of the inputs")
    if limit:
        feeds = batching.first(feeds, limit)
        kept = [len(v) for k, v in feeds.items() if k in batching.batched]
        labels = labels[:kept[0]] if labels is not None and kept else labels
    return feeds, labels


# Fewer samples than this are not split: calibration and the held-aside measurement share them.
MIN_SPLIT = 8


@dataclass(frozen=True)
class Split:
    """Data divided into the part passes calibrate on and the held-aside part the gate, fidelity
    and accuracy are measured on (never judge a pass on the samples it learned from)."""
    calibration: dict[str, np.ndarray]
    held: dict[str, np.ndarray]
    labels: np.ndarray | None   # of the held-aside samples
    held_samples: int
    calibration_samples: int
    shared: bool                # too few samples to split: both parts are all of them


def hold_aside(feeds: dict[str, np.ndarray], specs: list[InputSpec], labels: np.ndarray | None,
               seed: int = 0) -> Split:
    """Half the samples (whole runs, chosen at random with `seed`) held aside, the rest for calibration."""
    b = Batching.of(specs, feeds)
    unit = b.run or 1
    units = b.samples // unit
    if not b.batched or units < MIN_SPLIT // unit or units < 2:
        return Split(feeds, feeds, labels, b.samples, b.samples, shared=True)
    order = np.random.default_rng(seed).permutation(units)
    held_units, calib_units = np.sort(order[:units // 2]), np.sort(order[units // 2:])

    def take(chosen: np.ndarray) -> np.ndarray:
        return (chosen[:, None] * unit + np.arange(unit)).ravel()

    held, calib = take(held_units), take(calib_units)
    pick = lambda idx: {k: v[idx] if k in b.batched else v for k, v in feeds.items()}  # noqa: E731
    return Split(pick(calib), pick(held), None if labels is None else labels[held], len(held), len(calib), shared=False)


def check_feeds(feeds: dict[str, np.ndarray], specs: list[InputSpec], source: str = "data"
                ) -> dict[str, np.ndarray]:
    """`feeds` cast to each input's dtype, after checking name, dtype kind, rank and every static
    dim (symbolic ones may differ between inputs, as onnxruntime lets them); DataError naming
    `source`, input and dim."""
    out = {}
    for s in specs:
        if s.name not in feeds:
            raise DataError(f"{source}: no array for model input '{s.name}' (has: {', '.join(sorted(feeds))})")
        a = _cast(np.asarray(feeds[s.name]), s, source)
        if s.shape is not None:
            _check_dims(a, s, source)
        _check_values(a, s, source)
        out[s.name] = a
    return out


def _check_values(a: np.ndarray, spec: InputSpec, source: str) -> None:
    """No empty batch (it would measure nothing and report perfect fidelity) and no NaN or Inf
    (every comparison against the original would be meaningless)."""
    if a.ndim > 0 and a.shape[0] == 0:
        raise DataError(f"{source}: input '{spec.name}' has 0 samples (shape {list(a.shape)})")
    if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        kind = "NaN" if np.isnan(a[index]) else "Inf"
        where = f" at index {list(index)}" if index else ""
        raise DataError(f"{source}: input '{spec.name}' holds {kind}{where}; graphopt needs finite inputs "
                        f"to measure passes against the original")


def _cast(a: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """Casts within a kind (float64 -> float32, int32 -> int64) and ints to floats; other casts
    only where every value survives them (whole floats to ints, 0/1 to bool), since a truncated
    token id or mask would change the results silently."""
    if np.can_cast(a.dtype, spec.dtype, "same_kind"):
        return a.astype(spec.dtype, copy=False)
    try:
        cast = a.astype(spec.dtype)
        exact = a.dtype.kind in "biuf" and np.array_equal(cast.astype(a.dtype), a)
    except (TypeError, ValueError):
        exact = False
    if not exact:
        raise DataError(f"{source}: input '{spec.name}': the data is {a.dtype}, the model wants {spec.dtype}"
                        f"{' (the values do not fit)' if a.dtype.kind in 'biuf' else ''}")
    return cast


def _check_dims(a: np.ndarray, spec: InputSpec, source: str) -> None:
    if a.ndim != len(spec.shape):
        raise DataError(f"{source}: input '{spec.name}': the data has shape {a.shape} (rank {a.ndim}), the model "
                        f"wants rank {len(spec.shape)} ({_show(spec.shape)})")
    for i, (have, want) in enumerate(zip(a.shape, spec.shape)):
        if is_static(want):
            # A fixed leading dim may hold several runs' worth of samples (24 samples, batch 8).
            several = i == 0 and want > 0 and have > want and have % want == 0
            if have != want and not several:
                more = f" (or a multiple of it, run {want} at a time)" if i == 0 and want > 0 else ""
                raise DataError(f"{source}: input '{spec.name}': dim {i} is {have}, the model wants {want}{more}")


def _show(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if is_static(d) else str(d or "?") for d in shape) + "]"


@dataclass(frozen=True)
class Batching:
    """How feeds split into runs: `batched` inputs carry `samples` samples along axis 0; the
    others are passed whole to every run. `run` is the samples per run a fixed leading dim
    imposes, None when the model takes any number."""
    batched: frozenset[str]
    samples: int
    run: int | None

    @classmethod
    def of(cls, specs: list[InputSpec], feeds: dict[str, np.ndarray]) -> Batching:
        """Inputs with a symbolic leading dim carry samples, when all such dims have one name;
        without any, inputs whose data fills a fixed leading dim a whole number of times do. The
        first such input sets the sample count; another whose first axis differs is held fixed."""
        symbolic = [s for s in specs if s.symbolic_batch and np.ndim(feeds.get(s.name)) > 0]
        if len({s.shape[0] for s in symbolic}) > 1 or len({len(feeds[s.name]) for s in symbolic}) > 1:
            # Leading dims named apart, or of different lengths (a graph network's atoms, edges and
            # index lists; exporters reuse one name for unrelated dims, and onnxruntime lets them
            # differ) are no common batch: slicing them apart would break what links them.
            return cls(frozenset(), 1, None)
        fixed = [s for s in specs if s.shape and is_static(s.shape[0]) and s.shape[0] > 0
                 and np.ndim(feeds.get(s.name)) > 0 and len(feeds[s.name]) % s.shape[0] == 0]
        carriers = symbolic or fixed
        if not carriers:
            return cls(frozenset(), 1, None)
        samples = len(feeds[carriers[0].name])
        batched = [s for s in carriers if len(feeds[s.name]) == samples]
        run = next((int(s.shape[0]) for s in batched if is_static(s.shape[0])), None)
        return cls(frozenset(s.name for s in batched), samples, run)

    def batches(self, feeds: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
        """Runs of at most `size` samples (exactly `run` when the model fixes it)."""
        step = self.run or size
        for start in range(0, self.samples, step):
            yield {k: v[start:start + step] if k in self.batched else v for k, v in feeds.items()}

    def first(self, feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """The first `n` samples (rounded up to whole runs); inputs held fixed as they are."""
        n = -(-n // self.run) * self.run if self.run else n
        return {k: v[:n] if k in self.batched else v for k, v in feeds.items()}

    def sample_shapes(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """Each input's shape for one run of one sample (what MACs are counted on): a symbolic
        batch counts 1, a fixed one its own size."""
        return {k: ((self.run or 1),) + v.shape[1:] if k in self.batched else v.shape for k, v in feeds.items()}


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.is_dir():
            return {p.stem: _load_npy(p) for p in sorted(path.glob("*.npy"))}
        if not zipfile.is_zipfile(path):
            return {"x": _load_npy(path)}
        with zipfile.ZipFile(path) as z:
            arrays = {}
            for member in z.namelist():
                key = member.removesuffix(".npy")
                with z.open(member) as f:
                    _check_header(path, key, f)
                with z.open(member) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
            return arrays
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError, KeyError) as e:
        raise DataError(f"{path}: cannot read input data ({type(e).__name__}: {e})") from None
    except MemoryError:
        raise DataError(f"{path}: an array is too large to read into memory") from None


def _load_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        _check_header(path, path.stem, f)
    return np.load(path, allow_pickle=False)


def _check_header(path: Path, key: str, f) -> None:
    """Refuse an array whose header declares more than MAX_DATA_BYTES, before reading it."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * dtype.itemsize
    if nbytes > MAX_DATA_BYTES:
        raise DataError(f"{path}: array '{key}' of shape {list(shape)} declares {_size(nbytes)}, over the "
                        f"{_size(MAX_DATA_BYTES)} limit")
