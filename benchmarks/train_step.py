"""Cost of one ELM training step on one GPU: SJFB vs full backprop through all M iterations.

    python benchmarks/train_step.py --out benchmarks/results/train_step

Qwen2.5-1.5B shape (random bf16 weights), the block at start 2 replacing M = 8 layers, one
sequence of 2,048 tokens, CE on every position + distillation to the dense teacher, AdamW on the
block, gradient clipping: the step of ``elmkit.train.elm`` (``sjfb_loss``). Variants:

  sjfb   m ~ U{0..4} evaluations without gradient, n ~ U{1..4} with (the defaults for M = 8)
  full   0 without, M = 8 with gradient: backprop through every iteration

each with the default settings (the kept layers after the block stored, CE head in chunks of 1,024
tokens) and with the memory-lean ones (``recompute_tail``: those layers recomputed in the backward
pass one at a time; CE chunks of 256). Reported: mean step time, tokens/s, peak allocated memory
over the timed steps, and the step's own memory (peak minus what is resident before the step: both models'
weights and the optimizer state). Then one SJFB step on the Qwen2.5-7B shape. Writes results.json
and report.md under --out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from gpu_shapes import OFFICIAL_ELM, gpu_info, random_model

from elmkit.io import read_json, write_json
from elmkit.methods import elm as elm_method
from elmkit.train.elm import ElmTrainConfig, iteration_draws, sjfb_loss

ELM = dict(start=2, span=8, max_iter=8)


def run(shape: str, variant: str, recompute: bool, chunk: int, tokens: int, warmup: int, steps: int) -> dict:
    teacher = random_model(shape)
    elm = elm_method.apply_(copy.deepcopy(teacher), elm_method.plan(teacher, **ELM))
    for p in [*teacher.parameters(), *elm.parameters()]:
        p.requires_grad_(False)
    params = list(elm.block.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    elm.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(1, 100000, (1, tokens), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    cfg = ElmTrainConfig(steps=warmup + steps)
    times, peaks, draws = [], [], []
    resident = None
    for step in range(warmup + steps):
        m, n = iteration_draws(step, ELM["span"], cfg) if variant == "sjfb" else (0, ELM["span"])
        if step == warmup:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r = sjfb_loss(elm, teacher, ids, mask, ids, m, n, 1.0, 1.0, recompute_tail=recompute,
                          ce_chunk=chunk)
        r.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        b.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(a.elapsed_time(b) / 1e3)
            peaks.append(torch.cuda.max_memory_allocated())
            draws.append((m, n))
    ms = 1e3 * statistics.mean(times)
    rec = {"shape": shape, "variant": variant, "recompute_tail": recompute, "ce_chunk": chunk,
           "tokens": tokens,
           "steps": steps, "ms_per_step": ms, "ms_median": 1e3 * statistics.median(times),
           "tokens_per_s": tokens / (ms / 1e3), "peak_gb": max(peaks) / 1e9,
           "resident_gb": resident / 1e9, "step_gb": (max(peaks) - resident) / 1e9,
           "mean_step_gb": (statistics.mean(peaks) - resident) / 1e9, "draws": draws,
           "loss": float(r.loss), "trainable": sum(p.numel() for p in params)}
    del teacher, elm, opt, r
    torch.cuda.empty_cache()
    return rec


def report(res: Path, data: dict) -> None:
    rows = data["rows"]
    env = data["env"]
    lo_ms, hi_ms = OFFICIAL_ELM["train_step_ms"]
    lo_gb, hi_gb = OFFICIAL_ELM["train_peak_gb"]
    lines = [
        "# ELM training step: SJFB vs full backprop through M iterations", "",
        f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}; "
        "bf16 autocast on bf16 weights, random weights, 1 x 2,048 tokens, start 2, M = 8, CE on every "
        "position + distillation, AdamW on the block. Command: `python benchmarks/train_step.py`.", "",
        "peak = max allocated over the timed steps; resident = weights of teacher and ELM + optimizer "
        "state before the step; step memory = peak - resident.", "",
        "| shape | variant | recompute tail | CE chunk | ms/step | tokens/s | peak GB | resident GB "
        "| step GB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['variant']} | {'yes' if r['recompute_tail'] else 'no'} | "
                     f"{r['ce_chunk']} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gb']:.2f} | "
                     f"{r['resident_gb']:.2f} | {r['step_gb']:.2f} |")
    lines += ["", "## Checks", ""]
    by = {(r["shape"], r["variant"], r["recompute_tail"]): r for r in rows}
    for rec in (False, True):
        s, f = by.get(("qwen2.5-1.5b", "sjfb", rec)), by.get(("qwen2.5-1.5b", "full", rec))
        if s and f:
            lines.append(f"- recompute tail {'on' if rec else 'off'}: SJFB / full backprop: peak "
                         f"{s['peak_gb'] / f['peak_gb']:.2f}x, "
                         f"step memory {s['step_gb'] / f['step_gb']:.2f}x, "
                         f"time {s['ms_per_step'] / f['ms_per_step']:.2f}x")
        if s:
            lines.append(f"- SJFB (recompute tail {'on' if rec else 'off'}) vs the official step "
                         f"({lo_ms:.0f}-{hi_ms:.0f} ms, {lo_gb}-{hi_gb} GB peak, cited): "
                         f"{s['tokens_per_s']:,.0f} tokens/s vs {2048 / (hi_ms / 1e3):,.0f}-"
                         f"{2048 / (lo_ms / 1e3):,.0f}; peak {s['peak_gb']:.2f} GB")
    (res / "report.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_step")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--big", default="qwen2.5-7b", help="shape of the single large-model run ('' to skip)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    res = Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    js = res / "results.json"
    data = read_json(js) if js.exists() else {"rows": []}
    if not args.report_only:
        if not torch.cuda.is_available():
            raise SystemExit("train_step.py measures a GPU; none is present")
        data["env"] = gpu_info()
        # the default settings, then the memory-lean ones (tail recomputed, small CE chunks)
        runs = [("qwen2.5-1.5b", v, rc, ch) for rc, ch in ((False, 1024), (True, 256))
                for v in ("sjfb", "full")]
        if args.big:
            runs += [(args.big, "sjfb", False, 1024), (args.big, "sjfb", True, 256)]
        done = {(r["shape"], r["variant"], r["recompute_tail"], r.get("ce_chunk")) for r in data["rows"]}
        for shape, variant, rc, ch in runs:
            if (shape, variant, rc, ch) in done:
                continue
            steps = args.steps if shape == "qwen2.5-1.5b" else max(3, args.steps // 4)
            rec = run(shape, variant, rc, ch, args.tokens, args.warmup, steps)
            data["rows"].append(rec)
            write_json(js, data)
            print(f"{shape} {variant:5s} recompute={rc!s:5s} chunk={ch} {rec['ms_per_step']:7.1f} ms "
                  f"{rec['tokens_per_s']:9.0f} tok/s peak {rec['peak_gb']:.2f} GB "
                  f"step {rec['step_gb']:.2f} GB",
                  flush=True)
    report(res, data)
    print((res / "report.md").read_text())


if __name__ == "__main__":
    main()
