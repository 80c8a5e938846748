"""The real-model benchmark: ELM against the baselines on SmolLM2-135M-Instruct at equal budgets.

    python benchmarks/real_model.py --model smollm2-135m --data ../shared/data \\
        --out benchmarks/results/real_model --run runs/real_model [--budget-s 540]

On one GPU. Every unit of work (one training run and its evaluations) is saved under --out as it
finishes, so a run stopped by --budget-s (or killed) continues where it stopped: run the same
command again, also on another machine, as long as --out travels with the repository.

Stages so far:

  recipe  General retention at M = 8 of 30 (the block replaces layers placed by the cosine
          criterion): the ELM's distillation loss (mse, the paper's; relative; channel) x peak
          learning rate. The block trains by SJFB on the shared C4 sample 1 (sequences of 256
          tokens, 16 per step) and is scored on held-out text only: perplexity on C4 sample 2
          (validation), after 4k, 8k, 16k and 32k training sequences, from one training run per
          recipe; the final block also at 1, 2, 4 and 8 evaluations per token. Dense and ShortGPT
          (7 layers deleted: the same layer count and KV cache) without training are the
          reference rows.

The report (recipe.md, recipe.json, recipe.png under --out) is rewritten after every unit, and
with --report-only from the saved units.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from results_table import Budget  # this script's folder is on sys.path

from elmkit.io import atomic_write_text, read_json, save_figure, write_json

SPAN = 8  # M of 30: the seeds' 8 of 28
LOSSES = ("mse", "relative", "channel")
LRS = (1e-3, 3e-4)
BATCH, SEQ = 16, 256
EVAL_AT = (250, 500, 1000, 2000)  # steps: 4k, 8k, 16k, 32k sequences
EVALUATIONS = (1, 2, 4, 8)
VAL_WINDOW, VAL_WINDOWS = 512, 64
SMOKE = {"on": False}


def texts(data: Path) -> dict[str, list[str]]:
    """C4 sample 1 trains and calibrates; sample 2 is validation text, never trained on."""
    from elmkit.data.formats import read_text

    train = read_text(data / "calibration" / "redpajama_c4_sample1.jsonl")
    val = read_text(data / "calibration" / "redpajama_c4_sample2.jsonl")[:200]
    if SMOKE["on"]:
        train, val = train[:40], val[:4]
    return {"train": train, "val": val}


def settings() -> dict:
    steps = EVAL_AT if not SMOKE["on"] else (2, 4)
    small = SMOKE["on"]
    return {"span": 3 if small else SPAN, "batch": 2 if small else BATCH, "seq": 32 if small else SEQ,
            "eval_at": list(steps), "val_window": VAL_WINDOW if not SMOKE["on"] else 64,
            "val_windows": VAL_WINDOWS if not SMOKE["on"] else 2, "smoke": SMOKE["on"]}


def stage_recipe(model: str, data: Path, out: Path, run: Path, budget: Budget) -> bool:
    """Every (loss, lr) unit not yet saved; False when the budget stopped it."""
    from elmkit.data.calibration import CalibConfig
    from elmkit.eval.perplexity import perplexity
    from elmkit.methods import elm as elm_method
    from elmkit.methods import shortgpt
    from elmkit.models import load_model, load_tokenizer
    from elmkit.train.elm import ElmTrainConfig, SpanTeacher, train_elm

    s = settings()
    folder = out / "recipe"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(loss, lr) for loss in LOSSES for lr in LRS if not (folder / unit_name(loss, lr)).is_file()]
    if not todo and (folder / "reference.json").is_file():
        return True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(model)
    master = load_model(model, dtype="float32", device="cpu")
    span = s["span"]
    t = texts(data)
    val = "\n\n".join(t["val"])
    calib = CalibConfig(samples=64 if not SMOKE["on"] else 4, seq_len=256 if not SMOKE["on"] else 32,
                        seed=0).build(tok, t["train"])

    def val_ppl(m) -> dict:
        r = perplexity(m, tok, val, window=s["val_window"], max_windows=s["val_windows"], progress=False)
        return {"ppl": round(r["ppl"], 4), "tokens": r["tokens"]}

    ref_path = folder / "reference.json"
    if ref_path.is_file():
        ref = read_json(ref_path)
    else:
        t0 = time.time()
        dense = copy.deepcopy(master).to(device)
        start, sims = elm_method.cosine_start(dense, calib, span)
        sg = shortgpt.plan(dense, calib, shortgpt.ShortGPTConfig(n_remove=span - 1))
        short = shortgpt.apply_(copy.deepcopy(dense), sg)
        ref = {"settings": s, "model": model, "start": start, "cosine": [round(x, 5) for x in sims],
               "dense": val_ppl(dense), "shortgpt": {**val_ppl(short), "removed": list(sg.drop)},
               "layers": dense.config.num_hidden_layers, "device": _device_name(), "seconds": 0.0}
        ref["seconds"] = round(time.time() - t0, 1)
        write_json(ref_path, ref)
        del dense, short
    if ref["settings"] != s:
        raise SystemExit(f"{folder} holds results of other settings; use another --out")

    for loss, lr in todo:
        need = max([read_json(p)["seconds"] for p in folder.glob("unit_*.json")] or [300.0])
        if not budget.left(need):
            print(f"stopped at the time budget before {unit_name(loss, lr)}; run again to continue")
            return False
        t0 = time.time()
        dense = copy.deepcopy(master).to(device)
        plan = elm_method.plan(dense, start=ref["start"], span=span, max_iter=span)
        teacher = SpanTeacher(dense, plan.start, plan.span)
        elm = elm_method.apply_(dense, plan)
        curve: list[dict] = []
        on_step = _checkpoint_evals(elm, curve, s, val_ppl)

        cfg = ElmTrainConfig(steps=s["eval_at"][-1], batch_size=s["batch"], max_len=s["seq"], lr=lr,
                             lambda_ce=0.0, distill_loss=loss, save_every=10**9, seed=0)
        work = run / unit_name(loss, lr).removesuffix(".json")  # checkpoints and model: not committed
        fit = train_elm(elm, teacher, tok, t["train"], work, cfg, progress=False, on_step=on_step)
        per_k = {}
        for k in EVALUATIONS if not SMOKE["on"] else (1, span):
            elm.config.max_iter = k
            per_k[str(k)] = val_ppl(elm)["ppl"]
        unit = {"loss": loss, "lr": lr, "curve": curve, "evaluations": per_k,
                "first_distill": fit["first_distill"], "final_distill": fit["final_distill"],
                "final_residual": fit["final_residual"], "train_s": fit["train_time_s"],
                "seconds": round(time.time() - t0, 1), "device": _device_name()}
        write_json(folder / unit_name(loss, lr), unit)
        print(f"{loss} lr {lr:g}: " + ", ".join(f"{c['sequences']}: {c['ppl']:.2f}" for c in curve)
              + f"  ({unit['seconds']:.0f} s)", flush=True)
        report(out)
        del elm, teacher, dense
        if device == "cuda":
            torch.cuda.empty_cache()
    report(out)
    return True


def _checkpoint_evals(elm, curve: list, s: dict, val_ppl):
    """An ``on_step`` callback: the validation perplexity at each step of ``s["eval_at"]``."""
    def on_step(step: int, _loss: float) -> None:
        if step in s["eval_at"]:
            curve.append({"step": step, "sequences": step * s["batch"], **val_ppl(elm)})
    return on_step


def unit_name(loss: str, lr: float) -> str:
    return f"unit_{loss}_lr{lr:g}.json"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def report(out: Path) -> None:
    """recipe.md / recipe.json / recipe.png from the saved units."""
    folder = out / "recipe"
    ref = read_json(folder / "reference.json")
    units = sorted((read_json(p) for p in folder.glob("unit_*.json")), key=lambda u: (u["loss"], -u["lr"]))
    if not units:
        return
    write_json(folder / "recipe.json", {"reference": ref, "units": units})
    _plot(folder / "recipe.png", ref, units)
    seqs = [c["sequences"] for c in units[0]["curve"]]
    best = min(units, key=lambda u: u["curve"][-1]["ppl"])
    lines = [
        "## ELM recipe on the real model: distillation loss x learning rate (validation only)",
        "",
        f"`{ref['model']}`: the block replaces layers {ref['start']}-"
        f"{ref['start'] + ref['settings']['span'] - 1} ({ref['settings']['span']} of {ref['layers']}, "
        "cosine criterion); SJFB on C4 sample 1, "
        f"{ref['settings']['batch']} x {ref['settings']['seq']} tokens per step, distillation only; "
        f"perplexity on held-out C4 (sample 2, {ref['dense']['tokens']:,} tokens, windows of "
        f"{ref['settings']['val_window']}). One seed per recipe. Device: {units[0]['device']}.",
        "",
        f"Reference: dense {ref['dense']['ppl']:.2f}; ShortGPT deleting {ref['settings']['span'] - 1} layers "
        f"{ref['shortgpt']['removed']}, untrained: {ref['shortgpt']['ppl']:.2f}.",
        "",
        "| loss | lr | " + " | ".join(f"{n:,} seq" for n in seqs) + " | "
        + " | ".join(f"x{k}" for k in units[0]["evaluations"]) + " | distill first -> last | s |",
        "|---|---|" + "---|" * (len(seqs) + len(units[0]["evaluations"]) + 2),
    ]
    for u in units:
        lines.append(f"| {u['loss']} | {u['lr']:g} | " + " | ".join(f"{c['ppl']:.2f}" for c in u["curve"])
                     + " | " + " | ".join(f"{v:.2f}" for v in u["evaluations"].values())
                     + f" | {u['first_distill']:.4g} -> {u['final_distill']:.4g} | {u['seconds']:.0f} |")
    lines += ["", f"Lowest validation perplexity at {seqs[-1]:,} sequences: {best['loss']}, "
              f"lr {best['lr']:g} ({best['curve'][-1]['ppl']:.2f}). Columns xk: the final block at k "
              "evaluations per token.",
              "", "![recipe](recipe.png)", ""]
    atomic_write_text(folder / "recipe.md", "\n".join(lines))


def _plot(png: Path, ref: dict, units: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for u in units:
        ax.plot([c["sequences"] for c in u["curve"]], [c["ppl"] for c in u["curve"]], marker="o",
                ls="-" if u["lr"] == max(LRS) else "--", label=f"{u['loss']}, lr {u['lr']:g}")
    ax.axhline(ref["dense"]["ppl"], color="k", ls=":", label="dense")
    ax.axhline(ref["shortgpt"]["ppl"], color="#c44e52", ls=":", label="ShortGPT, untrained")
    ax.set(xscale="log", yscale="log", xlabel="training sequences", ylabel="validation perplexity (C4)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model folder, .gguf file or named model")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="folder holding calibration/redpajama_c4_sample{1,2}.jsonl")
    ap.add_argument("--out", default="benchmarks/results/real_model", help="results folder (committed)")
    ap.add_argument("--run", default="runs/real_model", help="work folder: trained models (not committed)")
    ap.add_argument("--budget-s", type=float, default=540, help="stop cleanly after this many seconds")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the saved units")
    ap.add_argument("--smoke", action="store_true", help="check the plumbing with a few steps (CPU)")
    args = ap.parse_args()
    SMOKE["on"] = args.smoke
    out = Path(args.out)
    if args.report_only:
        report(out)
        return
    data = Path(args.data)
    if not (data / "calibration").is_dir():
        raise SystemExit(f"{data}/calibration not found: pass --data with the C4 samples")
    done = stage_recipe(args.model, data, out, Path(args.run), Budget(args.budget_s))
    print(json.dumps({"recipe": "done" if done else "stopped at the budget"}))
    sys.exit(0)


if __name__ == "__main__":
    main()
