"""Commands that use devices through a TVM RPC tracker: `tune --rpc` and `farm up | status | down`.

`farm` imports neither onnx nor the passes (graphopt.cli.jobs does), so that it answers at once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_tune(args) -> int:
    """`graphopt tune`; with --rpc, measured on the tracker's servers under --rpc-key."""
    from graphopt.cli import jobs

    if args.rpc is None:
        return jobs.cmd_tune(args)
    from graphopt import deploy
    from graphopt.cli.progress import ProgressBar
    from graphopt.codegen import rpc
    from graphopt.ir import io

    remote = rpc.Remote.parse(args.rpc, args.rpc_key)
    target = jobs._target(args)
    graph = io.load(args.model)
    bar = None if args.quiet else ProgressBar(f"tuning on {remote.key}@{remote.address}")
    try:
        result = deploy.tune_for_target(graph, target, Path(args.db), args.trials, args.time_budget, bar,
                                        remote=remote)
    except KeyboardInterrupt:
        raise jobs.Interrupted("interrupted" + jobs.TUNING_NOTE) from None
    if bar:
        bar.close()
    print(json.dumps(result, indent=2))
    return 0


def cmd_farm(args) -> int:
    from graphopt import farm

    folder = Path(args.dir) if args.dir else None
    if args.farm_command == "up":
        print(f"starting a tracker and {args.servers} RPC server(s) on {farm.HOST} ...", file=sys.stderr, flush=True)
        started = farm.up(args.servers, folder, port=args.port, key=args.key, arm=args.arm)
        remote = started.remote
        print(f"farm up: tracker {remote.address}, {len(started.servers)} server(s) under key '{remote.key}' "
              f"(state and logs: {started.folder})")
        print(f"tune through it with: --rpc {remote.address} --rpc-key {remote.key}")
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
