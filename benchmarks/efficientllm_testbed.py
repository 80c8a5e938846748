"""Pruning-aware pretraining (EfficientLLM) vs its two alternatives at one token budget, on one GPU.

    python benchmarks/efficientllm_testbed.py --out runs/effllm --results benchmarks/results/efficientllm

Three ways to end with a model of the `base` preset's size after S training steps (same batches,
same batch size, so the same tokens):

  efficientllm  `base-wide` (1.5x wider) from scratch, pruned while it trains down to `base`'s
                parameter count between steps start and end, then trained on to S
  scratch       the `base` architecture trained from scratch for S steps
  llm-pruner    `base-wide` trained densely for `end` steps (the tokens EfficientLLM has spent when
                it reaches the target), cut by LLM-Pruner (every layer) to the same parameter count,
                then trained on for S - end steps

Each arm writes its own run folder and is skipped when finished (a re-run resumes). Writes
results.json, report.md, accuracy_loss.png and the architecture EfficientLLM found
(architecture.png) under --results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from elmkit import pretrain
from elmkit.io import atomic_write_text, environment, read_json, save_figure, write_json
from elmkit.methods import llm_pruner
from elmkit.methods.efficientllm import EfficientLLMConfig, resolve_target
from elmkit.models import count_parameters, load_model, load_tokenizer
from elmkit.testbed import PRESETS
from elmkit.testbed.card import write_recipe
from elmkit.testbed.problems import make_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/effllm")
    ap.add_argument("--results", default="benchmarks/results/efficientllm")
    ap.add_argument("--steps", type=int, default=1000, help="S: training steps of every arm")
    ap.add_argument("--start", type=int, default=100, help="first pruning step")
    ap.add_argument("--end", type=int, default=500, help="step by which the target size is reached")
    ap.add_argument("--interval", type=int, default=20, help="steps between pruning steps")
    ap.add_argument("--large", default="base-wide")
    ap.add_argument("--small", default="base")
    ap.add_argument("--arms", default="efficientllm,scratch,llm-pruner")
    ap.add_argument("--train-examples", type=int, default=None, help="(smoke tests) fewer training problems")
    ap.add_argument("--test-examples", type=int, default=None, help="(smoke tests) fewer test problems")
    ap.add_argument("--batch-size", type=int, default=None, help="(smoke tests) smaller batches")
    ap.add_argument("--val-examples", type=int, default=None, help="(smoke tests) fewer validation problems")
    args = ap.parse_args()
    out, res = Path(args.out), Path(args.results)
    sizes = {k: v for k, v in (("train_examples", args.train_examples), ("test_examples", args.test_examples),
                               ("batch_size", args.batch_size), ("val_examples", args.val_examples))
             if v is not None}
    large = dataclasses.replace(PRESETS[args.large], steps=args.steps, eval_every=0, **sizes)
    small = dataclasses.replace(PRESETS[args.small], steps=args.steps, eval_every=0, **sizes)
    rows = {}
    for arm in args.arms.split(","):
        done = out / arm / "result.json"
        if done.is_file():
            rows[arm] = read_json(done)
            continue
        t0 = time.time()
        if arm == "efficientllm":
            m = pretrain(out / arm, args.large, prune_to=args.small, cfg=large,
                         prune=EfficientLLMConfig(start=args.start, end=args.end, interval=args.interval))
        elif arm == "scratch":
            m = pretrain(out / arm, args.small, cfg=small)
        elif arm == "llm-pruner":
            m = _llm_pruner_arm(out / arm, args, large)
        else:
            raise SystemExit(f"unknown arm {arm}")
        row = {"arm": arm, "test_accuracy": m["test_accuracy"], "parameters": m["parameters"],
               "test_loss": _test_loss(_model_dir(out / arm), small), "wall_s": round(time.time() - t0, 1),
               "loss_curve": _curve(out / arm)}
        write_json(done, row)
        rows[arm] = row
    _report(rows, args, res, out)


def _llm_pruner_arm(folder: Path, args, large) -> dict:
    """Dense `large` for `end` steps, LLM-Pruner to the small preset's size, then S - end steps."""
    dense_dir = folder / "dense"
    if not (dense_dir / "metrics.json").is_file():
        pretrain(dense_dir, args.large,
                 cfg=dataclasses.replace(large, steps=args.end, warmup=min(large.warmup, args.end // 2)))
    cut = folder / "cut" / "model"
    if not (cut / "config.json").is_file():
        model = load_model(dense_dir / "model", dtype="float32")
        tok = load_tokenizer(dense_dir / "model")
        target = resolve_target(args.small, model, tok)
        r = PRESETS[args.large]
        ex = make_split("validation", 64, r.problems, r.seed)
        from elmkit.data.calibration import Calibration

        calib = Calibration.from_examples(tok, ex, 512)
        base = llm_pruner.LLMPrunerConfig(layer_start=0, layer_end=r.layers)
        from elmkit.methods.common import non_embedding_parameters

        frac = (count_parameters(model) - target) / non_embedding_parameters(model)
        cfg = llm_pruner.for_target(base, model, frac)
        slim, _, _ = llm_pruner.compress_(model, calib, cfg)
        tmp = cut.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        slim.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        write_recipe(tmp, large, args.large)
        tmp.rename(cut)
    rest = dataclasses.replace(large, steps=args.steps - args.end)
    return pretrain(folder / "continued", args.large, init=cut, cfg=rest) | {
        "parameters": count_parameters(load_model(folder / "continued" / "model", dtype="float32"))}


def _model_dir(folder: Path) -> Path:
    return folder / "model" if (folder / "model").is_dir() else folder / "continued" / "model"


@torch.no_grad()
def _test_loss(model_dir: Path, cfg) -> float:
    """Mean cross-entropy of the answer tokens of the test problems."""
    from elmkit.data.calibration import Calibration

    model, tok = load_model(model_dir, dtype="float32"), load_tokenizer(model_dir)
    calib = Calibration.from_examples(tok, make_split("test", cfg.test_examples, cfg.problems, cfg.seed), 512)
    dev = next(model.parameters()).device
    total, n = 0.0, 0
    for ids, mask, target in calib.target_batches(100, dev):
        labels = ids.masked_fill(target == 0, -100)
        k = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * k
        n += k
    return total / n


def _curve(folder: Path) -> list:
    logs = [folder / "train_log.jsonl"] if (folder / "train_log.jsonl").is_file() else \
        [folder / "dense" / "train_log.jsonl", folder / "continued" / "train_log.jsonl"]
    out, offset = [], 0
    for log in logs:
        rows = [json.loads(l) for l in log.read_text().splitlines()]
        out += [[r["step"] + offset, r["loss"]] for r in rows[::10]]
        offset += rows[-1]["step"] if rows else 0
    return out


def _report(rows: dict, args, res: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res.mkdir(parents=True, exist_ok=True)
    # the machine the arms ran on (this report may be assembled elsewhere from their folders)
    env = next((read_json(_model_dir(out / a).parent / "metrics.json")["env"] for a in rows
                if (_model_dir(out / a).parent / "metrics.json").is_file()), environment())
    write_json(res / "results.json", {"settings": vars(args), "env": env, "rows": rows})
    arch = out / "efficientllm" / "architecture.png"
    if arch.is_file():
        shutil.copy(arch, res / "architecture.png")
        shutil.copy(out / "efficientllm" / "architecture.json", res / "architecture.json")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    names = list(rows)
    axes[0].bar(names, [rows[a]["test_accuracy"] for a in names],
                color=["#55a868", "#4c72b0", "#c44e52"][:len(names)])
    for i, a in enumerate(names):
        axes[0].text(i, rows[a]["test_accuracy"] + 0.01, f"{rows[a]['test_accuracy']:.3f}", ha="center")
    axes[0].set(ylabel="test accuracy", ylim=(0, 1.1), title=f"{args.steps} steps each")
    for a in names:
        c = rows[a]["loss_curve"]
        axes[1].plot([p[0] for p in c], [p[1] for p in c], label=a)
    axes[1].set(xlabel="step", ylabel="train loss (answer tokens)", yscale="log", title="training loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, res / "accuracy_loss.png")
    lines = [
        "# Pruning-aware pretraining (EfficientLLM) vs training small and vs prune-then-train",
        "",
        f"Every arm ends with a model of the `{args.small}` preset's size after {args.steps} training steps "
        f"of the same batches. EfficientLLM starts from `{args.large}` and prunes from step {args.start} to "
        f"{args.end} (every {args.interval} steps); LLM-Pruner cuts `{args.large}` after {args.end} dense "
        f"steps, then trains on for {args.steps - args.end}. Machine: {env['device']}, torch {env['torch']}, "
        f"transformers {env['transformers']}.",
        "",
        "| arm | parameters | test accuracy | test loss (answer tokens) | wall s |",
        "|---|---|---|---|---|",
    ]
    for a in names:
        r = rows[a]
        lines.append(f"| {a} | {r['parameters']:,} | {r['test_accuracy']:.3f} | {r['test_loss']:.4f} "
                     f"| {r['wall_s']} |")
    lines += ["", "![accuracy and loss](accuracy_loss.png)", "",
              "Architecture EfficientLLM found (kept heads and MLP channels per layer; "
              "size over training):", "",
              "![architecture](architecture.png)", "",
              f"Command: `python benchmarks/efficientllm_testbed.py --steps {args.steps} "
              f"--start {args.start} "
              f"--end {args.end} --interval {args.interval}`", ""]
    atomic_write_text(res / "report.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
