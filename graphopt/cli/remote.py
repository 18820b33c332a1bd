"""Commands around devices reached through a TVM RPC tracker: `farm up | status | down`, `measure`.

`farm` imports neither onnx nor the passes (graphopt.cli.jobs does), so that it answers at once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_farm(args) -> int:
    from graphopt import farm

    folder = Path(args.dir) if args.dir else None
    if args.farm_command == "up":
        kind = " emulated aarch64" if args.arm else ""
        print(f"starting a tracker and {args.servers}{kind} RPC server(s) on {farm.HOST} ...", file=sys.stderr,
              flush=True)
        started = farm.up(args.servers, folder, port=args.port, key=args.key, arm=args.arm)
        remote = started.remote
        print(f"farm up: tracker {remote.address}, {len(started.servers)}{kind} server(s) under key '{remote.key}' "
              f"(state and logs: {started.folder})")
        target = " --target arm" if args.arm else ""
        print(f"tune through it with:{target} --rpc {remote.address} --rpc-key {remote.key}")
        if args.arm:
            print("times measured there are qemu's emulation speed, not an ARM device's")
        return 0
    if args.farm_command == "status":
        found, summary = farm.status(folder)
        if args.json:
            print(json.dumps({"tracker": found.remote.address, "folder": str(found.folder), **summary}, indent=2))
            return 0
        print(f"tracker {found.remote.address} (farm in {found.folder}; started: {len(found.servers)} server(s) "
              f"under '{found.key}')")
        print(_table(summary))
        return 0
    stopped = farm.down(folder)
    where = folder or farm.default_folder()
    print(f"farm down: stopped the tracker {stopped.remote.address} and {len(stopped.servers)} server(s)"
          if stopped else f"no farm was up in {where}")
    return 0


def _table(summary: dict) -> str:
    """Servers, free and pending requests per key, as the tracker counts them."""
    registered: dict[str, int] = {}
    for server in summary.get("server_info", []):
        key = server.get("key", "").partition(":")[2]
        registered[key] = registered.get(key, 0) + 1
    queues = summary.get("queue_info", {})
    keys = sorted(set(registered) | set(queues))
    rows = [("key", "servers", "free", "pending")]
    rows += [(k, str(registered.get(k, 0)), str(queues.get(k, {}).get("free", 0)),
              str(queues.get(k, {}).get("pending", 0))) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) if keys else "\n".join(lines + ["(no server registered)"])


def cmd_measure(args) -> int:
    """`graphopt measure LIB`: the library run on --data (or random inputs) here or, with --rpc, on
    a device; compared with onnxruntime on the ONNX model it was built from, and timed."""
    import numpy as np

    from graphopt import codegen, deploy
    from graphopt.cli.jobs import _remote
    from graphopt.codegen import rpc
    from graphopt.ir import fidelity, io, ort
    from graphopt.ir.data import input_specs, load_feeds, random_feeds

    remote = _remote(args)
    model = _built_from(Path(args.library), args.model)
    graph = io.load(model)
    specs = input_specs(graph)
    feeds = load_feeds(args.data, specs) if args.data else random_feeds(specs, args.seed)
    session = rpc.connect(remote) if remote else None
    lib = codegen.load(args.library, session=session)
    batches = deploy._batches(lib, feeds)
    runs = [lib.run(b) for b in batches]
    got = {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}
    reference = ort.run(graph, {k: v[:len(next(iter(got.values())))] for k, v in feeds.items()})
    metrics = fidelity.compare(reference, got)
    ms = lib.benchmark(batches[0], repeat=args.repeat, warmup=3)
    where = f"{remote.key}@{remote.address}" if remote else "this machine"
    emulated = rpc.emulated(session) if session is not None else None
    result = {"library": str(lib.library), "model": str(model), "device": where, "emulated": emulated or False,
              "runs": len(batches), "latency_ms": round(ms, 4),
              "fidelity": {k: m.as_dict() for k, m in metrics.items()}}
    worst = min(m.cosine for m in metrics.values())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, m in metrics.items():
            print(f"{name}: max_abs={m.max_abs:.6g} cosine={m.cosine:.6f} (library on {where} vs onnxruntime on "
                  f"{Path(model).name}, {len(batches)} run(s))")
        note = f" ({emulated})" if emulated else ""
        print(f"latency: {ms:.4g} ms median of {args.repeat} runs on {where}{note}")
    if worst < args.min_cosine:
        print(f"cosine {worst:.6f} is below --min-cosine {args.min_cosine}", file=sys.stderr)
        return 1
    return 0


def _built_from(library: Path, given: str | None) -> Path:
    """The ONNX model a library was built from: --model, else the optimized model beside it
    (optimize writes model.opt.onnx), else the input compile's report.json names."""
    from graphopt.cli.jobs import UsageError

    if given:
        return Path(given)
    folder = library if library.is_dir() else library.parent
    if (folder / "model.opt.onnx").is_file():
        return folder / "model.opt.onnx"
    try:
        named = json.loads((folder / "report.json").read_text()).get("model")
    except (OSError, ValueError):
        named = None
    if named and Path(named).is_file():
        return Path(named)
    raise UsageError(f"{library}: cannot tell which ONNX model it was built from (no model.opt.onnx or report.json "
                     "naming one beside it): give --model")
