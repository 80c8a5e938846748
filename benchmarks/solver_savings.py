"""Fixed-point solvers on the trained base testbed: block evaluations per token vs accuracy.

    python benchmarks/solver_savings.py --run runs/solver --out benchmarks/results/solver_savings

Stages (each skipped when its output exists, so a re-run resumes):

  base    train the `base` testbed preset (24 layers; about 6 minutes on an H200)
  elm     write its training problems, build an ELM replacing M = 12 of 24 layers (50%, the seeds'
          M = 14 of 28) at the default middle start, train the block with SJFB
  sweep   greedy answers to the held-out test problems with the reference path (model.generate),
          for naive / Anderson / Broyden x a sweep of relative tolerances, and for fixed M
          evaluations; per generated token, the block evaluations until it converged

Writes results.json, report.md and solver_savings.png under --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from elmkit import testbed
from elmkit.api import ElmCompressConfig, compress_elm
from elmkit.data.chat import encode_prompt
from elmkit.eval.generate import generate_greedy
from elmkit.eval.math import score_gsm8k
from elmkit.io import read_json, save_figure, write_json
from elmkit.models.loading import load_model, load_tokenizer
from elmkit.testbed.card import read_recipe
from elmkit.testbed.problems import make_split
from elmkit.train.elm import ElmTrainConfig

SOLVERS = ("naive", "anderson", "broyden")


def evaluate(elm, tok, examples, settings: dict) -> dict:
    """Accuracy and per-token block evaluations over the generated tokens, one batch."""
    for k, v in settings.items():
        setattr(elm.config, k, v)
    prompts = [encode_prompt(tok, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # generate()'s own order
    counts: list[torch.Tensor] = []

    def hook(mod, args, out):
        if mod.last_info.iterations.shape[1] == 1:  # a decode step: one token per row
            counts.append(mod.last_info.iterations[:, 0].cpu())

    budget = max(len(tok(ex.output)["input_ids"]) for ex in examples) + 16
    handle = elm.block.register_forward_hook(hook)
    t0 = time.perf_counter()
    try:
        outs = generate_greedy(elm, tok, [prompts[i] for i in order], budget, len(prompts), False)
    finally:
        handle.remove()
    wall = time.perf_counter() - t0
    steps = torch.stack(counts)  # (S, B): decode step s consumes generated token s - 1
    lengths = torch.tensor([len(o) for o in outs])  # generated tokens before the stop token
    live = torch.arange(1, steps.shape[0] + 1)[:, None] <= lengths[None]  # inputs that are answer tokens
    evals = steps[live].float()
    correct = sum(score_gsm8k(tok.decode(o, skip_special_tokens=True), examples[i].answer)[1]
                  for o, i in zip(outs, order))
    return {**settings, "accuracy": correct / len(examples), "evals_per_token": float(evals.mean()),
            "evals_p90": float(evals.quantile(0.9)),
            "at_max": float((evals >= settings["max_iter"]).float().mean()),
            "tokens": int(live.sum()), "wall_s": wall}


def report(res: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, M = data["rows"], data["span"]
    fixed = next(r for r in rows if r["tol"] == 0)
    env = data["env"]
    lines = [
        "# Fixed-point solvers on the base testbed: evaluations per token vs accuracy", "",
        f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}. Base testbed "
        f"({data['dense_layers']} layers) with an ELM replacing M = {M} layers from layer "
        f"{data['start']}, trained "
        f"{data['train_steps']} SJFB steps; {data['n_test']} held-out test problems, greedy, reference "
        "path (model.generate). Dense accuracy on the same problems: "
        f"{data['dense_accuracy']:.3f}. Tolerance: ||phi(z) - z|| / ||phi(z)|| per token. "
        "Command: `python benchmarks/solver_savings.py`.", "",
        "| solver | tolerance | evals / token | p90 | at max | saved vs fixed | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["tol"] > 0, SOLVERS.index(r["solver"]), r["tol"])):
        tol = "fixed" if r["tol"] == 0 else f"{r['tol']:g}"
        saved = 1 - r["evals_per_token"] / fixed["evals_per_token"]
        lines.append(f"| {r['solver']} | {tol} | {r['evals_per_token']:.2f} | {r['evals_p90']:.0f} | "
                     f"{100 * r['at_max']:.0f}% | {100 * saved:.1f}% | {r['accuracy']:.3f} |")
    lines += ["", "## Checks", ""]
    for tol in sorted({r["tol"] for r in rows if r["tol"] > 0}):
        by = {r["solver"]: r for r in rows if r["tol"] == tol}
        if "naive" in by and "anderson" in by:
            n, a = by["naive"], by["anderson"]
            ea, en = a["evals_per_token"], n["evals_per_token"]
            lines.append(f"- tolerance {tol:g}: Anderson uses {100 * (1 - ea / en):.1f}% "
                         f"fewer evaluations than naive ({ea:.2f} vs {en:.2f}), "
                         f"{100 * (1 - a['evals_per_token'] / M):.1f}% fewer than fixed M = {M}; accuracy "
                         f"{a['accuracy']:.3f} vs {n['accuracy']:.3f} (fixed {fixed['accuracy']:.3f})")
    (res / "report.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s in SOLVERS:
        rs = sorted((r for r in rows if r["solver"] == s and r["tol"] > 0), key=lambda r: r["tol"])
        ax.plot([r["evals_per_token"] for r in rs], [r["accuracy"] for r in rs], "o-", label=s)
    ax.plot([fixed["evals_per_token"]], [fixed["accuracy"]], "k*", markersize=12, label=f"fixed {M}")
    ax.axhline(data["dense_accuracy"], color="gray", ls=":", label="dense")
    ax.set_xlabel("block evaluations per generated token (mean)")
    ax.set_ylabel("test accuracy")
    ax.set_title("ELM solvers on the base testbed (points: tolerances)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, res / "solver_savings.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/solver", help="folder for the base model, data and ELM")
    ap.add_argument("--out", default="benchmarks/results/solver_savings")
    ap.add_argument("--stages", default="base,elm,sweep")
    ap.add_argument("--span", type=int, default=12)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--tols", default="0.003,0.01,0.03,0.1")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--preset", default="base", help="(smoke tests) another testbed preset")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    run, res = Path(args.run), Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    base, data_dir, elm_dir = run / "base", run / "data", run / "elm"
    if not args.report_only:
        if "base" in stages and not (base / "model" / "config.json").exists():
            testbed.train(base, args.preset)
        if "elm" in stages and not (elm_dir / "model" / "config.json").exists():
            testbed.data(data_dir, args.preset, n_train=20_000)
            compress_elm(base / "model", data_dir / "train.json", elm_dir, ElmCompressConfig(
                span=args.span, max_iter=args.span, train=ElmTrainConfig(
                    steps=args.train_steps, batch_size=32, lr=2e-3, save_every=250)))
        if "sweep" in stages:
            from elmkit.io import environment

            tok = load_tokenizer(base / "model")
            recipe = read_recipe(base / "model")
            test = make_split("test", args.n_test, recipe["problems"], recipe["seed"])
            dense = load_model(base / "model", dtype="float32")
            dense_acc = evaluate_dense(dense, tok, test)
            del dense
            elm = load_model(elm_dir / "model", dtype="float32")
            M = elm.config.span
            rows = [evaluate(elm, tok, test, dict(solver="naive", tol=0.0, tol_mode="rel", max_iter=M))]
            print(rows[-1], flush=True)
            for tol in (float(t) for t in args.tols.split(",")):
                for s in SOLVERS:
                    rows.append(evaluate(elm, tok, test, dict(solver=s, tol=tol, tol_mode="rel", max_iter=M)))
                    print(rows[-1], flush=True)
            write_json(res / "results.json", {
                "env": environment(), "span": M, "start": elm.config.start, "n_test": args.n_test,
                "dense_layers": elm.config.dense_num_hidden_layers,
                "train_steps": args.train_steps, "dense_accuracy": dense_acc, "rows": rows,
                "elm_train": read_json(elm_dir / "metrics.json")})
    if (res / "results.json").exists():
        report(res, read_json(res / "results.json"))
        print((res / "report.md").read_text())


def evaluate_dense(model, tok, examples) -> float:
    prompts = [encode_prompt(tok, ex) for ex in examples]
    budget = max(len(tok(ex.output)["input_ids"]) for ex in examples) + 16
    outs = generate_greedy(model, tok, prompts, budget, len(prompts), False)
    return sum(score_gsm8k(tok.decode(o, skip_special_tokens=True), ex.answer)[1]
               for o, ex in zip(outs, examples)) / len(examples)


if __name__ == "__main__":
    main()
