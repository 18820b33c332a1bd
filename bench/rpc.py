"""Benchmark: tuning throughput through TVM's RPC tracker with 1 vs 2 local servers.

    python bench/rpc.py [--trials 24] [--servers 1,2] [--no-local]

For each server count, a farm (`graphopt.farm`: a tracker and that many `rpc_server`s on
127.0.0.1) and a fresh database; `graphopt.codegen.tune` tunes the digits CNN (8 kernels) with
`--trials` through it. Also, for reference, the same tuning with MetaSchedule's local runner.
Reported: wall seconds and trials per minute, overall and split in two phases: the first 8
trials (each kernel's default schedule, built and measured in one batch, as many sessions at
once as there are servers) and the rest (MetaSchedule's search: batches of 4 candidates, evolved
and built on this machine, then measured). Also how many sessions each server served, and the
1-minute load average after each run (other work on a shared machine slows the search).

On one machine the servers share its cores with the tuner's own search and builds, and kernels
that run at once on two servers of one CPU slow each other: what a second server buys here is
parallel measurement only, an upper bound on nothing. Separate devices measure without that
contention. Writes bench/results/rpc.json, with the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
RESULTS = REPO / "bench" / "results" / "rpc.json"
MODEL = REPO / "models" / "digits_cnn.onnx"
KERNELS = 8


def tune_once(trials: int, remote, folder: Path) -> dict:
    from graphopt.codegen import tune

    marks: list[tuple[int, float]] = []
    start = time.perf_counter()
    result = tune.tune(MODEL, "x86", folder / "db", trials=trials, remote=remote,
                       progress=lambda done, total, best: marks.append((done, time.perf_counter() - start)))
    seconds = time.perf_counter() - start
    seeded = next((t for done, t in marks if done >= KERNELS), seconds)
    searched = result.trials - KERNELS
    return {"trials": result.trials, "seconds": round(seconds, 1),
            "trials_per_minute": round(60 * result.trials / seconds, 1),
            "defaults_seconds": round(seeded, 1),
            "search_trials_per_minute": round(60 * searched / (seconds - seeded), 1) if searched > 0 else None}


def with_farm(servers: int, trials: int, folder: Path) -> dict:
    from graphopt import farm

    started = farm.up(servers, folder / "farm", port=None, key="bench")
    try:
        row = tune_once(trials, started.remote, folder)
    finally:
        farm.down(folder / "farm")
    row["sessions_per_server"] = [len(re.findall("connected from", Path(p.log).read_text()))
                                  for p in started.servers]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--servers", default="1,2", help="server counts to compare (default 1,2)")
    parser.add_argument("--no-local", action="store_true", help="skip the local-runner reference")
    args = parser.parse_args()
    from timing import machine

    with tempfile.TemporaryDirectory() as tmp:  # untimed: the first run in a process pays for imports and caches
        tune_once(KERNELS, None, Path(tmp))
    rows = {}
    configs = [] if args.no_local else ["local"]
    configs += [f"{n} server(s)" for n in map(int, args.servers.split(","))]
    for config in configs:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if config == "local":
                rows[config] = tune_once(args.trials, None, folder)
            else:
                rows[config] = with_farm(int(config.split()[0]), args.trials, folder)
        rows[config]["load_average"] = round(os.getloadavg()[0], 2)
        print(f"{config}: {rows[config]}", file=sys.stderr, flush=True)
    print(f"\ndigits CNN, {args.trials} trials, x86 ({machine()['cpu']})")
    header = (f"{'runner':<12} {'seconds':>8} {'trials/min':>11} {'defaults s':>11} {'search trials/min':>18} "
              f"{'load':>5}  sessions")
    print(header)
    print("-" * len(header))
    for config, row in rows.items():
        search = row["search_trials_per_minute"]
        print(f"{config:<12} {row['seconds']:>8} {row['trials_per_minute']:>11} {row['defaults_seconds']:>11} "
              f"{'-' if search is None else search:>18} {row['load_average']:>5}  {row.get('sessions_per_server', '-')}")
    RESULTS.write_text(json.dumps({"model": "digits_cnn", "target": "x86", "trials": args.trials,
                                   "machine": machine(), "results": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
