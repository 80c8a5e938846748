"""GPPO against enumeration on the tiny testbed (CPU).

Trains an ELM at *every* start layer with the same budget and measures test accuracy; runs GPPO
once; reports whether GPPO's argmax is among the best two starts, the Spearman correlation of the
final theta with the enumerated accuracies, the start the cosine-similarity criterion would pick
(LLM-Streamline style: the span whose input and output hidden states are most alike) with its
accuracy, and the cost (wall time, peak resident memory) of GPPO vs enumeration, each measured
in its own process.

    python benchmarks/gppo_vs_enumeration.py --out benchmarks/results/gppo_vs_enumeration
"""

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ELM_STEPS, GPPO_STEPS, SPAN, N_TEST, N_TRAIN = 200, 300, 3, 200, 4000


def _setup():
    from elmkit.models import load_model, load_tokenizer
    from elmkit.testbed import TINY_PATH
    from elmkit.testbed.card import read_recipe
    from elmkit.testbed.problems import make_split

    path = "testbed:tiny"
    tok = load_tokenizer(path)
    dense = load_model(path, dtype="float32")
    recipe = read_recipe(TINY_PATH)
    problems, seed = recipe["problems"], recipe["seed"]
    return (dense, tok, make_split("train", N_TRAIN, problems, seed),
            make_split("test", N_TEST, problems, seed), make_split("validation", 32, problems, seed))


def phase_enumerate(out: Path) -> dict:
    from elmkit.methods import elm
    from elmkit.testbed.accuracy import test_accuracy
    from elmkit.train.elm import ElmTrainConfig, train_elm

    dense, tok, train, test, _ = _setup()
    rows = {"dense": test_accuracy(dense, tok, test, 100)}
    n = dense.config.num_hidden_layers
    for a in range(n - SPAN + 1):
        model = elm.apply_(copy.deepcopy(dense), elm.plan(dense, start=a, span=SPAN, max_iter=4))
        train_elm(model, dense, tok, train, Path("runs") / "gppo_vs_enumeration" / f"start{a}",
                  ElmTrainConfig(steps=ELM_STEPS, lr=2e-3), progress=False)
        rows[a] = test_accuracy(model, tok, test, 100)
        print(f"start {a}: accuracy {rows[a]:.3f}", flush=True)
    return rows


def phase_gppo(out: Path) -> dict:
    from elmkit.methods import gppo

    dense, tok, train, _, _ = _setup()
    thetas = []
    p = gppo.plan(dense, tok, train, gppo.GppoConfig(span=SPAN, steps=GPPO_STEPS), progress=False,
                  thetas=thetas)
    return {"start": p.start, "theta": list(p.theta), "theta_history": thetas}


def phase_cosine(out: Path) -> dict:
    import torch

    from elmkit.data.calibration import Calibration
    from elmkit.models import capture_hidden_states

    dense, tok, _, _, calib_ex = _setup()
    calib = Calibration.from_examples(tok, calib_ex)
    hs = capture_hidden_states(dense, calib.input_ids, calib.attention_mask)
    valid = calib.attention_mask.bool()
    n = dense.config.num_hidden_layers
    sims = []
    for a in range(n - SPAN + 1):
        cos = torch.nn.functional.cosine_similarity(hs[a], hs[a + SPAN], dim=-1)[valid]
        sims.append(float(cos.mean()))
    return {"similarity": sims, "start": max(range(len(sims)), key=lambda i: sims[i])}


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gppo_vs_enumeration")
    ap.add_argument("--phase", choices=["enumerate", "gppo", "cosine"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.phase:  # worker: one phase in its own process, so its peak memory is its own
        t = time.time()
        res = {"enumerate": phase_enumerate, "gppo": phase_gppo, "cosine": phase_cosine}[a.phase](out)
        res["wall_s"] = round(time.time() - t, 1)
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (out / f".{a.phase}.json").write_text(json.dumps(res))
        return
    results = {}
    for phase in ("cosine", "gppo", "enumerate"):
        subprocess.run([sys.executable, __file__, "--out", str(out), "--phase", phase], check=True)
        results[phase] = json.loads((out / f".{phase}.json").read_text())
        (out / f".{phase}.json").unlink()
    enum = results["enumerate"]
    starts = list(range(len(results["gppo"]["theta"])))
    acc = [enum[str(s)] if str(s) in enum else enum[s] for s in starts]
    best = sorted(starts, key=lambda s: -acc[s])
    g, c = results["gppo"]["start"], results["cosine"]["start"]
    summary = {
        "command": "python benchmarks/gppo_vs_enumeration.py --out " + str(out),
        "span": SPAN, "elm_steps_per_start": ELM_STEPS, "gppo_steps": GPPO_STEPS,
        "test_problems": N_TEST, "dense_accuracy": enum["dense"],
        "enumerated_accuracy": dict(zip(starts, acc)), "best_starts": best[:3],
        "gppo_start": g, "gppo_accuracy": acc[g], "gppo_in_top2": g in best[:2],
        "spearman_theta_vs_accuracy": _spearman(results["gppo"]["theta"], acc),
        "cosine_start": c, "cosine_accuracy": acc[c],
        "gppo": results["gppo"], "cosine": results["cosine"],
        "cost": {p: {"wall_s": results[p]["wall_s"], "peak_rss_mb": results[p]["peak_rss_mb"]}
                 for p in ("gppo", "enumerate", "cosine")},
    }
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "gppo_vs_enumeration.png", starts, acc, results["gppo"]["theta"], g, c)
    lines = ["# GPPO vs enumeration (tiny testbed, CPU)", "", f"`{summary['command']}`", "",
             "| start | enumerated accuracy | GPPO theta | cosine sim. |", "|---|---|---|---|"]
    for s in starts:
        mark = (" (GPPO)" if s == g else "") + (" (cosine)" if s == c else "")
        lines.append(f"| {s}{mark} | {acc[s]:.3f} | {results['gppo']['theta'][s]:.3f} "
                     f"| {results['cosine']['similarity'][s]:.4f} |")
    lines += ["", f"Dense: {enum['dense']:.3f}. Best starts by enumeration: {best[:3]}. GPPO picks "
              f"{g} (in top 2: {g in best[:2]}); Spearman(theta, accuracy) = "
              f"{summary['spearman_theta_vs_accuracy']:.3f}. Cosine criterion picks {c} "
              f"({acc[c]:.3f}).", "",
              "| search | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
    for p in ("gppo", "enumerate", "cosine"):
        lines.append(f"| {p} | {summary['cost'][p]['wall_s']} | {summary['cost'][p]['peak_rss_mb']} |")
    lines += ["", "![gppo vs enumeration](gppo_vs_enumeration.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _plot(png, starts, acc, theta, g, c):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.bar(starts, acc, color=["#55a868" if s == g else "#4c72b0" for s in starts])
    ax.set(xlabel="start layer", ylabel="accuracy after brief ELM training", ylim=(0, 1))
    ax2 = ax.twinx()
    ax2.plot(starts, theta, color="#c44e52", marker="o", label="GPPO theta")
    ax2.set_ylabel("GPPO theta")
    ax.axvline(c, color="gray", ls="--", lw=1)
    ax.set_title(f"green: GPPO choice ({g}); dashed: cosine choice ({c})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
