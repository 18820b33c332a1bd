"""The console summary of optimize / compile: aligned size rows, the ops whose count changed with
totals, latency as median ± spread and a note when the model got slower."""
import math

from graphopt.cli.console import latency_text, op_changes, print_report, summary_lines


def a_report(**extra) -> dict:
    return {
        "before": {"params": 47_851, "size_bytes": 194_294, "compressed_bytes": 179_090, "macs": 484_992,
                   "nodes": 15, "sparsity": 0.0,
                   "ops": {"BatchNormalization": 3, "Conv": 3, "Dropout": 1, "Gemm": 2, "Relu": 4}},
        "after": {"params": 48_160, "size_bytes": 57_173, "compressed_bytes": 34_590, "macs": 484_992,
                  "nodes": 35, "sparsity": 0.0,
                  "ops": {"Conv": 3, "DequantizeLinear": 17, "Gemm": 2, "QuantizeLinear": 7, "Relu": 4}},
        "passes": [{"name": "canonicalize", "modified": True, "seconds": 0.1, "stats": {}, "refused": [],
                    "skipped": [], "decisions": {}}],
        "fidelity": {"outputs": {"logits": {"max_abs": 0.0, "cosine": 1.0, "sqnr_db": math.inf}}},
        "latency_ms": {"onnxruntime": {"before": 0.028, "after": 0.0351,
                                       "spread_pct": {"before": 12.2, "after": 4.0}}},
        **extra,
    }


def table(lines: list[str], first: str, last: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next(i for i, line in enumerate(lines) if line.startswith(last))
    return lines[start:end + 1]


def test_size_rows_are_aligned_compressed_bytes_included():
    lines = summary_lines(a_report())
    rows = table(lines, " ", "sparsity")
    assert any(r.startswith("compressed_bytes ") for r in rows)
    assert len({len(r) for r in rows}) == 1, rows  # every value column ends at the same place
    assert rows[0].rstrip().endswith("after")


def test_op_table_lists_only_changed_ops_and_totals():
    lines = summary_lines(a_report())
    ops = table(lines, "op ", "total")
    names = [line.split()[0] for line in ops[1:-1]]
    assert names == ["BatchNormalization", "DequantizeLinear", "Dropout", "QuantizeLinear"]
    assert ops[-1].split() == ["total", "13", "33"]
    assert len({len(r) for r in ops}) == 1 and len(ops[0]) == len(lines[0])  # same columns as the size table
    assert op_changes({"ops": {"Conv": 1}}, {"ops": {"Conv": 1}}) == []


def test_latency_is_median_with_spread_and_slower_is_said():
    lines = summary_lines(a_report())
    row = next(line for line in lines if line.startswith("ORT latency"))
    assert "0.0280 ms ±12%" in row and "0.0351 ms ±4%" in row and row.endswith("slower than the original")
    faster = a_report(latency_ms={"onnxruntime": {"before": 0.05, "after": 0.04}})
    row = next(line for line in summary_lines(faster) if line.startswith("ORT latency"))
    assert "slower" not in row and "0.0500 ms" in row and "±" not in row  # a report without spreads
    assert latency_text(None) == "n/a"


def test_library_latency_and_exact_fidelity():
    cg = {"library": "out/model.x86.so", "target": "x86", "build_seconds": 2.0, "latency_ms": 0.0153,
          "latency_spread_pct": 3.2, "fidelity": {"logits": {"max_abs": 4e-6, "cosine": 1.0, "sqnr_db": None}}}
    lines = summary_lines(a_report(codegen=cg))
    assert "fidelity logits: max_abs=0 cosine=1.000000 sqnr=inf dB" in lines
    assert any(line.endswith("sqnr=n/a dB; latency 0.0153 ms ±3%") for line in lines), lines


def test_print_report_ends_with_what_it_wrote(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    print_report(a_report(), tmp_path)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"wrote report.json in {tmp_path}"


def test_tvm_noise_on_fd_2_is_dropped_and_other_lines_are_kept(capfd):
    import os
    import sys

    from graphopt.deploy import quiet_tvm

    with quiet_tvm():
        os.write(2, b"[13:41:29] /project/src/relax/ir/block_builder.cc:67: Warning: BlockBuilder destroyed "
                    b"with remaining blocks!\n")
        os.write(2, b"[13:41:30] space_generator.cc:12: Warning: meta_schedule.pool_max is skipped\n")
        os.write(2, b"Check failed: something real\n")
        print("progress line", file=sys.stderr)
    err = capfd.readouterr().err
    assert "BlockBuilder" not in err and "pool_max" not in err
    assert "Check failed: something real" in err and "progress line" in err
