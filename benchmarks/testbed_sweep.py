"""Sweep tiny-testbed recipes side by side (GPU: one process per variant on one device).

Each variant trains with the tiny preset's loop in fp32 (as on the CPU) and reports validation
accuracy over training, final test accuracy and the ShortGPT-25% depth check, so the CPU preset
can be chosen without 20-minute trials.

    python benchmarks/testbed_sweep.py --out runs/sweep            # all variants
    python benchmarks/testbed_sweep.py --out runs/sweep --only h96_v99
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from elmkit.testbed.pretrain import PRESETS  # noqa: E402
from elmkit.testbed.problems import ProblemConfig  # noqa: E402

TINY = PRESETS["tiny"]
P199 = ProblemConfig(1, 3, digits=1, max_value=199)
P99 = ProblemConfig(1, 3, digits=1, max_value=99)
VARIANTS = {
    "h96_v199": dict(problems=P199),
    "h96_v99": dict(problems=P99),
    "h96_v199_lr1e-3": dict(problems=P199, lr=1e-3),
    "h128_v199_1000": dict(problems=P199, hidden=128, intermediate=384, steps=1000),
    "h64_v199_2200": dict(problems=P199, hidden=64, intermediate=192, steps=2200),
    "h96_v199_bs64_800": dict(problems=P199, batch_size=64, steps=800),
    # second round: fit the 2-core CPU budget (~0.85 s/step at d=96)
    "h96_1200": dict(problems=P199, steps=1200),
    "h96_1250_lr4e-3": dict(problems=P199, steps=1250, lr=4e-3),
    "h64_1800": dict(problems=P199, hidden=64, intermediate=192, steps=1800),
    "h64_2000_lr4e-3": dict(problems=P199, hidden=64, intermediate=192, steps=2000, lr=4e-3),
    "h80_1400": dict(problems=P199, hidden=80, intermediate=224, steps=1400),
    "h96_1250_wd0": dict(problems=P199, steps=1250, weight_decay=0.0),
}


def run_one(name: str, out: Path, n_test: int) -> dict:
    from elmkit.testbed import train

    cfg = dataclasses.replace(TINY, precision="fp32", eval_every=250, **VARIANTS[name])
    t = time.time()
    res = train(out / name, "tiny", cfg, progress=False)
    log = [json.loads(l) for l in (out / name / "train_log.jsonl").read_text().splitlines()]
    return {"variant": name, "steps": cfg.steps, "hidden": cfg.hidden, "params": res["parameters"],
            "val_curve": [(r["step"], r["val_accuracy"]) for r in log if "val_accuracy" in r],
            "final_loss": res["final_loss"], "test_accuracy": res["dense_accuracy"],
            "shortgpt_accuracy": res["shortgpt"]["accuracy"],
            "shortgpt_retained": res["shortgpt"]["retained"], "wall_s": round(time.time() - t, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--one")
    ap.add_argument("--n-test", type=int, default=1000)
    a = ap.parse_args()
    out = Path(a.out)
    if a.one:  # worker
        res = run_one(a.one, out, a.n_test)
        (out / f"{a.one}.result.json").write_text(json.dumps(res, indent=1))
        return
    names = a.only or list(VARIANTS)
    out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--one", n,
                               "--n-test", str(a.n_test)],
                              stdout=open(out / f"{n}.log", "w"), stderr=subprocess.STDOUT)
             for n in names]
    for p in procs:
        p.wait()
    rows = []
    for n in names:
        f = out / f"{n}.result.json"
        rows.append(json.loads(f.read_text()) if f.exists() else {"variant": n, "error": True})
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    print("| variant | steps | params | val curve | test acc | ShortGPT-25% acc (retained) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            print(f"| {r['variant']} | failed (see its log) |")
            continue
        curve = " ".join(f"{s}:{v:.2f}" for s, v in r["val_curve"])
        print(f"| {r['variant']} | {r['steps']} | {r['params']:,} | {curve} | {r['test_accuracy']:.3f} "
              f"| {r['shortgpt_accuracy']:.3f} ({r['shortgpt_retained']:.2f}) | {r['wall_s']} |")


if __name__ == "__main__":
    main()
