"""graphopt.pack: canonical Huffman, the .gopt container's byte-exact round trip, codec choice,
Deep Compression's size on digits, and how damaged files and bad paths are refused."""
from __future__ import annotations

import filecmp
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.ir.errors import ModelError
from graphopt.pack import container, huffman, pack, pack_bytes, unpack, unpack_bytes
from graphopt.pack.varint import Corrupt, Reader, varint

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


# ---------------------------------------------------------------- Huffman

def _entropy_bits(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum()) * symbols.size


def _streams():
    rng = np.random.default_rng(0)
    yield "uniform-256", rng.integers(0, 256, 50_000).astype(np.uint8)
    yield "geometric", np.minimum(rng.geometric(0.3, 50_000) - 1, 255).astype(np.uint8)
    yield "zipf-nibbles", np.minimum(rng.zipf(1.6, 40_000) - 1, 15).astype(np.uint8)
    yield "one-symbol", np.full(1000, 7, np.uint8)
    yield "two-symbols-rare", (rng.random(20_000) < 0.001).astype(np.uint8)
    # Fibonacci counts make a tree deeper than MAX_BITS: the length cap must hold.
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    yield "fibonacci", np.repeat(np.arange(25, dtype=np.uint8), fib)
    yield "empty", np.zeros(0, np.uint8)


@pytest.mark.parametrize("name,symbols", list(_streams()), ids=[n for n, _ in _streams()])
def test_huffman_round_trip_within_entropy_plus_one_bit(name, symbols):
    stream = huffman.encode(symbols)
    r = Reader(stream)
    assert np.array_equal(huffman.decode(r, symbols.size), symbols)
    assert r.left() == 0
    r = Reader(stream)
    lengths = np.frombuffer(r.take(r.varint()), np.uint8)
    assert lengths.max(initial=0) <= huffman.MAX_BITS
    nbits = 8 * r.varint()
    # The code proper (padding to a byte aside) is at most one bit a symbol over the entropy.
    assert nbits - 7 <= _entropy_bits(symbols) + symbols.size if symbols.size else nbits == 0


def test_huffman_rejects_a_length_table_that_is_no_prefix_code():
    bad = varint(3) + bytes([1, 1, 1]) + varint(1) + b"\x00"
    with pytest.raises(Corrupt, match="prefix code"):
        huffman.decode(Reader(bad), 4)
    with pytest.raises(Corrupt, match="cannot hold"):  # more symbols than bits, before allocating
        huffman.decode(Reader(varint(2) + bytes([1, 1]) + varint(1) + b"\x00"), 10**12)


# ---------------------------------------------------------------- models

def _gather_model(indices: TensorProto, codebook: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    """y = x @ Gather(codebook, Cast(indices)): a cluster-weights layer as the pass writes it."""
    rows, cols = indices.dims
    nodes = [helper.make_node("Cast", ["idx"], ["idx64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["codebook", "idx64"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "clustered", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                              initializer=[numpy_helper.from_array(codebook.astype(np.float32), "codebook"), indices])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _nibbles(values: np.ndarray) -> bytes:
    flat = np.concatenate([values.reshape(-1), np.zeros(values.size % 2, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _skewed_indices(shape, seed: int = 0) -> np.ndarray:
    # Few levels carry most weights, and index 0 is rare: Huffman's case, not relative indexing's.
    p = 0.6 ** np.arange(16)
    p = np.roll(p / p.sum(), 3)
    return np.random.default_rng(seed).choice(16, size=shape, p=p).astype(np.uint8)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _kmeans(values: np.ndarray, k: int, iters: int = 15) -> tuple[np.ndarray, np.ndarray]:
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        nearest = np.abs(values[:, None] - centres[None, :]).argmin(1)
        centres = np.array([values[nearest == j].mean() if np.any(nearest == j) else centres[j] for j in range(k)])
    return centres, np.abs(values[:, None] - centres[None, :]).argmin(1)


def _deep_compressed_digits(path: Path, nibble: bool) -> Path:
    """digits_cnn as canonicalize + prune-magnitude(0.5) + cluster-weights(bits=4) would leave it:
    batch norms folded into the convolutions, every weight pruned to 50% by magnitude and mapped to
    16 levels (index 0 = zero) stored as a float codebook, uint8 or uint4 indices and a Gather."""
    model = onnx.load(str(DIGITS))
    g = model.graph
    init = {t.name: numpy_helper.to_array(t).copy() for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes = []
    for n in g.node:
        if n.op_type == "BatchNormalization":  # fold into the Conv before it
            conv = producer[n.input[0]]
            scale, beta, mean, var = (init.pop(name) for name in n.input[1:])
            s = scale / np.sqrt(var + 1e-5)
            init[conv.input[1]] *= s[:, None, None, None]
            init[conv.input[2]] = (init[conv.input[2]] - mean) * s + beta
            conv.output[0] = n.output[0]
            continue
        nodes.append(n)
    tensors, gathers = [], []
    for name, w in init.items():
        if not name.endswith(".weight"):
            tensors.append(numpy_helper.from_array(w, name))
            continue
        flat = w.reshape(-1)
        kept = np.abs(flat) > np.quantile(np.abs(flat), 0.5)
        centres, nearest = _kmeans(flat[kept], 15)
        indices = np.zeros(flat.size, np.uint8)
        indices[kept] = nearest + 1
        tensors.append(numpy_helper.from_array(np.concatenate([[0.0], centres]).astype(np.float32), name + ".codebook"))
        tensors.append(helper.make_tensor(name + ".idx", TensorProto.UINT4, w.shape, _nibbles(indices), raw=True)
                       if nibble else numpy_helper.from_array(indices.reshape(w.shape), name + ".idx"))
        gathers += [helper.make_node("Cast", [name + ".idx"], [name + ".i64"], to=TensorProto.INT64),
                    helper.make_node("Gather", [name + ".codebook", name + ".i64"], [name])]
    del g.node[:], g.initializer[:]
    g.node.extend(gathers + nodes)
    g.initializer.extend(tensors)
    model.opset_import[0].version = 21 if nibble else 17
    onnx.checker.check_model(model)
    return _save(model, path)


# ---------------------------------------------------------------- round trips and codec choice

def test_digits_round_trip_is_byte_exact(tmp_path):
    stats = pack(DIGITS, tmp_path / "d.gopt")
    unpack(tmp_path / "d.gopt", tmp_path / "d.onnx")
    assert filecmp.cmp(DIGITS, tmp_path / "d.onnx", shallow=False)
    assert stats.packed_bytes == (tmp_path / "d.gopt").stat().st_size < stats.original_bytes
    assert stats.original_bytes == DIGITS.stat().st_size and stats.zlib_bytes > 0


@pytest.mark.parametrize("nibble", [False, True], ids=["uint8", "uint4"])
def test_index_tensor_is_huffman_coded_smaller_than_zlib(tmp_path, nibble):
    idx = _skewed_indices((128, 256))
    tensor = (helper.make_tensor("idx", TensorProto.UINT4, idx.shape, _nibbles(idx), raw=True) if nibble
              else numpy_helper.from_array(idx, "idx"))
    src = _save(_gather_model(tensor, np.linspace(-1, 1, 16), opset=21 if nibble else 17), tmp_path / "c.onnx")
    stats = pack(src, tmp_path / "c.gopt")
    unpack(tmp_path / "c.gopt", tmp_path / "u.onnx")
    assert filecmp.cmp(src, tmp_path / "u.onnx", shallow=False)
    assert stats.codecs["huffman"]["tensors"] == 1
    assert stats.codecs["huffman"]["bytes"] < len(zlib.compress(tensor.raw_data, 9))
    assert stats.packed_bytes < stats.zlib_bytes


def test_half_sparse_float_weights_pick_relative_indexing(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 256)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "sparse",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                              initializer=[numpy_helper.from_array(w, "W")])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    data = src.read_bytes()
    blob, stats = pack_bytes(data)
    assert unpack_bytes(blob) == data
    assert stats.codecs["sparse"]["tensors"] == 1
    assert stats.packed_bytes < stats.zlib_bytes


@pytest.mark.parametrize("nibble", [False, True], ids=["uint8", "uint4"])
def test_deep_compressed_digits_is_ten_times_smaller(tmp_path, nibble):
    src = _deep_compressed_digits(tmp_path / "dc.onnx", nibble)
    stats = pack(src, tmp_path / "dc.gopt")
    unpack(tmp_path / "dc.gopt", tmp_path / "u.onnx")
    assert filecmp.cmp(src, tmp_path / "u.onnx", shallow=False)
    assert DIGITS.stat().st_size >= 10 * (tmp_path / "dc.gopt").stat().st_size, stats.as_dict()


# ---------------------------------------------------------------- untrusted input

@pytest.fixture(scope="module")
def packed_digits() -> bytes:
    return pack_bytes(DIGITS.read_bytes())[0]


def _refused(blob: bytes) -> str:
    with pytest.raises(ModelError) as e:
        unpack_bytes(blob, "x.gopt")
    line = str(e.value)
    assert "\n" not in line and line.startswith("x.gopt: ")
    return line


def test_truncated_files_are_refused(packed_digits):
    for n in (0, 3, 5, 20, 40, 60, len(packed_digits) // 2, len(packed_digits) - 1):
        _refused(packed_digits[:n])
    assert "truncated" in _refused(packed_digits[:-10])
    _refused(packed_digits + b"\0")  # trailing bytes: not the file that was written


def test_wrong_magic_version_and_sizes_are_refused(packed_digits):
    assert "magic" in _refused(b"PK\x03\x04" + packed_digits[4:])
    assert "version 9" in _refused(packed_digits[:4] + b"\x09" + packed_digits[5:])
    huge = container.MAGIC + bytes([container.VERSION]) + varint(2**40) + packed_digits[5 + 3:]
    assert "limit" in _refused(huge)
    # A table that claims more tensors than the file holds is refused before the table is read.
    assert "tensors" in _refused(container.MAGIC + bytes([container.VERSION]) + varint(10) + bytes(32)
                                 + bytes([1]) + varint(5) + varint(5) + varint(10**9))


def test_every_flipped_byte_is_refused_or_harmless(packed_digits):
    original = DIGITS.read_bytes()
    for i in range(0, len(packed_digits), max(1, len(packed_digits) // 400)):
        damaged = bytearray(packed_digits)
        damaged[i] ^= 0x5A
        try:
            assert unpack_bytes(bytes(damaged), "x.gopt") == original
        except ModelError as e:
            assert "\n" not in str(e)


def test_external_data_and_non_onnx_inputs_are_refused(tmp_path):
    model = onnx.load(str(DIGITS))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    with pytest.raises(ModelError, match=r"ext\.onnx: .*external file 'w\.bin'"):
        pack(tmp_path / "ext.onnx", tmp_path / "ext.gopt")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelError, match="not an ONNX model"):
        pack(tmp_path / "junk.onnx", tmp_path / "junk.gopt")
    assert not list(tmp_path.glob("*.gopt")) and not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------- command line

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, cwd=ROOT, check=False)


def test_cli_pack_unpack_inspect(tmp_path):
    p = _cli("pack", str(DIGITS), "-o", str(tmp_path / "m.gopt"))
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()) == 1 and "x smaller" in p.stdout
    assert _cli("unpack", str(tmp_path / "m.gopt"), "-o", str(tmp_path / "m.onnx")).returncode == 0
    assert filecmp.cmp(DIGITS, tmp_path / "m.onnx", shallow=False)
    assert main(["inspect", str(tmp_path / "m.gopt")]) == 0


def test_cli_damaged_files_exit_2_with_one_line(tmp_path):
    good = pack_bytes(DIGITS.read_bytes())[0]
    for name, blob in (("short.gopt", good[:len(good) // 3]), ("magic.gopt", b"XXXX" + good[4:]),
                       ("flip.gopt", good[:-50] + bytes([good[-50] ^ 1]) + good[-49:])):
        (tmp_path / name).write_bytes(blob)
        p = _cli("unpack", str(tmp_path / name), "-o", str(tmp_path / "out.onnx"))
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and name in p.stderr
        assert not (tmp_path / "out.onnx").exists()
    assert main(["inspect", str(tmp_path / "short.gopt")]) == 2


def test_cli_never_overwrites_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DIGITS.read_bytes())
    (tmp_path / "sub").mkdir()
    for out in (src, tmp_path / "sub" / ".." / "m.onnx"):
        p = _cli("pack", str(src), "-o", str(out))
        assert p.returncode == 2 and "input" in p.stderr
    assert main(["pack", str(src), "-o", str(tmp_path / "m.gopt")]) == 0
    assert main(["unpack", str(tmp_path / "m.gopt"), "-o", str(tmp_path / "m.gopt")]) == 2
    assert filecmp.cmp(DIGITS, src, shallow=False)
    assert (tmp_path / "m.gopt").read_bytes()[:4] == container.MAGIC
