"""The sandbox's cost: HumanEval canonical solutions executed per second, by number of workers.

    python benchmarks/sandbox_throughput.py --data ../shared/data/humaneval/HumanEval.jsonl.gz \
        --out benchmarks/results/sandbox_throughput

Writes results.json and report.md. Every program must pass (the canonical solutions are correct),
so the run doubles as a check of the sandbox.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from elmkit.eval import bubblewrap, sandbox
from elmkit.eval.code import build_program, read_humaneval
from elmkit.eval.sandbox import SandboxConfig, run_many
from elmkit.io import atomic_write_text, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="HumanEval.jsonl(.gz)")
    ap.add_argument("--out", required=True, help="folder for results.json and report.md")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to time")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per worker count (best kept)")
    args = ap.parse_args()

    problems = read_humaneval(args.data)
    programs = [build_program("humaneval", p, p.reference) for p in problems]
    cfg = SandboxConfig()
    rows = []
    for w in args.workers:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = run_many(programs, cfg, workers=w, progress=False)
            times.append(time.perf_counter() - t0)
            failed = [p.task_id for p, r in zip(problems, res) if not r.passed]
            if failed:
                raise SystemExit(f"canonical solutions failed in the sandbox: {failed[:5]}")
        best = min(times)
        per = sorted(r.wall_s for r in res)
        rows.append({"workers": w, "programs": len(programs), "best_wall_s": best,
                     "samples_per_s": len(programs) / best, "median_program_wall_s": per[len(per) // 2],
                     "all_wall_s": times})
        print(f"workers {w}: {len(programs) / best:.1f} programs/s ({best:.1f} s for {len(programs)})")
    # how programs ran: under the kernel layer (bwrap; how it reached the interpreter) or the weak one
    jail = bubblewrap.jail(sandbox._PYTHON) if bubblewrap.unavailable() is None else None
    layer = ("kernel (bwrap" + (", fresh uid per program" if jail.own_uid else "")
             + (", interpreter staged" if jail.staged else "") + ")") if jail else "weak (allow_weak)"
    env = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
           "caller_is_root": os.geteuid() == 0, "sandbox_layer": layer}
    out = Path(args.out)
    write_json(out / "results.json", {"rows": rows, "sandbox": cfg, "environment": env})
    lines = ["# Sandbox throughput: HumanEval canonical solutions", "",
             f"{len(programs)} programs (all pass), {env['cpus']} CPU cores, Python {env['python']}, "
             f"sandbox defaults (timeout {cfg.timeout_s} s, memory {cfg.memory_mb} MB). Best of "
             f"{args.repeats} passes. Sandbox layer: {layer}.", "",
             "| workers | wall s | programs / s | median wall s per program |", "|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['best_wall_s']:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['median_program_wall_s']:.3f} |" for r in rows]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
