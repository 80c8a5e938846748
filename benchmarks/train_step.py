"""Cost of one ELM training step on one GPU: SJFB vs full backprop through all M iterations.

    python benchmarks/train_step.py --out benchmarks/results/train_step

Qwen2.5-1.5B shape (random bf16 weights), the block at start 2 replacing M = 8 layers, one
sequence of 2,048 tokens, CE on every position + distillation to the dense teacher, AdamW on the
block, gradient clipping: the step of ``elmkit.train.elm`` (``sjfb_loss``), with the teacher held
as a ``SpanTeacher`` (the M replaced layers; everything else shared with the ELM), as
``elmkit elm`` does. Variants:

  sjfb   m ~ U{0..4} evaluations without gradient, n ~ U{1..4} with (the defaults for M = 8)
  full   0 without, M = 8 with gradient: backprop through every iteration

each with the default settings (the kept layers after the block stored, CE head in chunks of 1,024
tokens) and with the memory-lean ones (``recompute_tail``: those layers recomputed in the backward
pass one at a time; CE chunks of 256); SJFB also with ``compile`` (torch.compile of phi and the
layers after the block); the lean pair again at 4 and 8 x 2,048 tokens. Reported: mean step time,
tokens/s, peak allocated memory over the timed steps, and the step's own memory (peak minus what is
resident before the step: weights and optimizer state). Then SJFB steps on the Qwen2.5-7B shape.
``--profile`` also records one SJFB step (eager and compiled) with torch.profiler: wall time, GPU
busy time and kernel launches, which says whether the step waits on the host. Writes results.json
and report.md under --out.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from gpu_shapes import OFFICIAL_ELM, gpu_info, random_model

from elmkit.io import read_json, write_json
from elmkit.methods import elm as elm_method
from elmkit.train.elm import ElmTrainConfig, SpanTeacher, compile_step, iteration_draws, sjfb_loss

ELM = dict(start=2, span=8, max_iter=8)


def setup(shape: str, compiled: bool):
    dense = random_model(shape)
    teacher = SpanTeacher(dense, ELM["start"], ELM["span"])
    elm = elm_method.apply_(dense, elm_method.plan(dense, **ELM))
    for p in [*teacher.parameters(), *elm.parameters()]:
        p.requires_grad_(False)
    params = list(elm.block.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    elm.train()
    teacher.eval()
    comp = compile_step(elm) if compiled else None
    return teacher, elm, params, opt, comp


def one_step(teacher, elm, params, opt, comp, ids, m, n, recompute, chunk):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = sjfb_loss(elm, teacher, ids, torch.ones_like(ids), ids, m, n, 1.0, 1.0,
                      recompute_tail=recompute, ce_chunk=chunk, compiled=comp)
    r.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return r


def tokens_of(batch: int, seq: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randint(1, 100000, (batch, seq), device="cuda", generator=g)


def run(shape: str, variant: str, recompute: bool, chunk: int, compiled: bool, batch: int, seq: int,
        warmup: int, steps: int) -> dict:
    teacher, elm, params, opt, comp = setup(shape, compiled)
    ids = tokens_of(batch, seq)
    tokens = ids.numel()
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
        r = one_step(teacher, elm, params, opt, comp, ids, m, n, recompute, chunk)
        b.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(a.elapsed_time(b) / 1e3)
            peaks.append(torch.cuda.max_memory_allocated())
            draws.append((m, n))
    ms = 1e3 * statistics.mean(times)
    rec = {"shape": shape, "variant": variant, "recompute_tail": recompute, "ce_chunk": chunk,
           "compile": compiled, "batch": batch, "tokens": tokens,
           "steps": steps, "ms_per_step": ms, "ms_median": 1e3 * statistics.median(times),
           "tokens_per_s": tokens / (ms / 1e3), "peak_gb": max(peaks) / 1e9,
           "resident_gb": resident / 1e9, "step_gb": (max(peaks) - resident) / 1e9,
           "mean_step_gb": (statistics.mean(peaks) - resident) / 1e9, "draws": draws,
           "loss": float(r.loss), "trainable": sum(p.numel() for p in params)}
    del teacher, elm, opt, r, comp
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rec


def profile_step(shape: str, compiled: bool, seq: int, out: Path) -> dict:
    """One SJFB step (m = 2, n = 2) under torch.profiler: wall vs GPU-busy time, kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    teacher, elm, params, opt, comp = setup(shape, compiled)
    ids = tokens_of(1, seq)
    for _ in range(3):
        one_step(teacher, elm, params, opt, comp, ids, 2, 2, False, 1024)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        one_step(teacher, elm, params, opt, comp, ids, 2, 2, False, 1024)
        b.record()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    name = f"profile_{shape}_{'compiled' if compiled else 'eager'}.txt"
    (out / name).write_text(events.table(sort_by="self_cuda_time_total", row_limit=30,
                                         max_name_column_width=60))
    rec = {"shape": shape, "compile": compiled, "tokens": seq, "m": 2, "n": 2,
           "wall_ms": a.elapsed_time(b), "gpu_busy_ms": gpu_us / 1e3, "kernel_launches": launches,
           "table": name}
    del teacher, elm, opt, comp
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rec


def key(r: dict) -> tuple:
    return (r["shape"], r["variant"], r["recompute_tail"], r["ce_chunk"], r.get("compile", False),
            r.get("batch", 1))


def report(res: Path, data: dict) -> None:
    rows = data["rows"]
    env = data["env"]
    lo_ms, hi_ms = OFFICIAL_ELM["train_step_ms"]
    lo_gb, hi_gb = OFFICIAL_ELM["train_peak_gb"]
    lines = [
        "# ELM training step: SJFB vs full backprop through M iterations", "",
        f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}; "
        "bf16 autocast on bf16 weights, random weights, sequences of 2,048 tokens, start 2, M = 8, CE on "
        "every position + distillation to the span teacher, AdamW on the block. "
        "Command: `python benchmarks/train_step.py --profile`.", "",
        "peak = max allocated over the timed steps; resident = the ELM, the teacher's M span layers and "
        "the optimizer state before the step; step memory = peak - resident.", "",
        "| shape | variant | batch | recompute tail | CE chunk | compile | ms/step | tokens/s | peak GB "
        "| resident GB | step GB |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    yes = {True: "yes", False: "no"}
    for r in rows:
        lines.append(f"| {r['shape']} | {r['variant']} | {r.get('batch', 1)} | {yes[r['recompute_tail']]} | "
                     f"{r['ce_chunk']} | {yes[r.get('compile', False)]} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gb']:.2f} | "
                     f"{r['resident_gb']:.2f} | {r['step_gb']:.2f} |")
    prof = data.get("profile", [])
    if prof:
        lines += ["", "One SJFB step (m = 2, n = 2, 1 x 2,048 tokens) under torch.profiler:", "",
                  "| shape | compile | wall ms | GPU busy ms | busy % | kernel launches |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in prof:
            lines.append(f"| {r['shape']} | {yes[r['compile']]} | {r['wall_ms']:.1f} | "
                         f"{r['gpu_busy_ms']:.1f} | {100 * r['gpu_busy_ms'] / r['wall_ms']:.0f}% | "
                         f"{r['kernel_launches']:,} |")
    lines += ["", "## Checks", ""]
    by = {key(r): r for r in rows}
    s15 = "qwen2.5-1.5b"
    for rec, ch in ((False, 1024), (True, 256)):
        for batch in (1, 4, 8):
            s = by.get((s15, "sjfb", rec, ch, False, batch))
            f = by.get((s15, "full", rec, ch, False, batch))
            if s and f:  # the resident weights alone set a floor under the peak ratio
                lines.append(f"- batch {batch}, recompute tail {'on' if rec else 'off'}: SJFB / full "
                             f"backprop: peak {s['peak_gb'] / f['peak_gb']:.2f}x, "
                             f"step memory {s['step_gb'] / f['step_gb']:.2f}x, "
                             f"time {s['ms_per_step'] / f['ms_per_step']:.2f}x; the resident memory "
                             f"alone is {s['resident_gb'] / f['peak_gb']:.2f}x full backprop's peak")
    for rec, ch in ((False, 1024), (True, 256)):
        for comp in (False, True):
            s = by.get((s15, "sjfb", rec, ch, comp, 1))
            if s:
                lines.append(f"- SJFB (recompute tail {'on' if rec else 'off'}, compile "
                             f"{'on' if comp else 'off'}) vs the official step ({lo_ms:.0f}-{hi_ms:.0f} ms, "
                             f"{lo_gb}-{hi_gb} GB peak, cited): "
                             f"{s['tokens_per_s']:,.0f} tokens/s vs {2048 / (hi_ms / 1e3):,.0f}-"
                             f"{2048 / (lo_ms / 1e3):,.0f}; peak {s['peak_gb']:.2f} GB")
    (res / "report.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--big", default="qwen2.5-7b", help="shape of the large-model runs ('' to skip)")
    ap.add_argument("--profile", action="store_true", help="also profile one SJFB step, eager and compiled")
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
        s15 = "qwen2.5-1.5b"
        # (shape, variant, recompute tail, CE chunk, compile, batch): the default settings, the
        # memory-lean ones, SJFB compiled, the lean pair at 4 sequences, then the large shape
        runs = [(s15, v, rc, ch, False, 1) for rc, ch in ((False, 1024), (True, 256))
                for v in ("sjfb", "full")]
        runs += [(s15, "sjfb", False, 1024, True, 1), (s15, "sjfb", True, 256, True, 1)]
        runs += [(s15, v, True, 256, False, b) for b in (4, 8) for v in ("sjfb", "full")]
        if args.big:
            runs += [(args.big, "sjfb", False, 1024, False, 1), (args.big, "sjfb", True, 256, False, 1),
                     (args.big, "sjfb", False, 1024, True, 1)]
        done = {key(r) for r in data["rows"]}
        if any(k not in done for k in runs):  # the first run in a process measured slow (cold
            run(s15, "sjfb", False, 1024, False, 1, args.seq, 2, 4)  # host caches): a throwaway one
        for run_key in runs:
            if run_key in done:
                continue
            shape, variant, rc, ch, comp, batch = run_key
            steps = args.steps if shape == s15 and batch == 1 else max(3, args.steps // 4)
            rec = run(shape, variant, rc, ch, comp, batch, args.seq, args.warmup, steps)
            data["rows"].append(rec)
            write_json(js, data)
            print(f"{shape} {variant:5s} b{batch} recompute={rc!s:5s} chunk={ch} compile={comp!s:5s} "
                  f"{rec['ms_per_step']:7.1f} ms {rec['tokens_per_s']:9.0f} tok/s "
                  f"peak {rec['peak_gb']:.2f} GB step {rec['step_gb']:.2f} GB", flush=True)
        if args.profile:
            have = {(r["shape"], r["compile"]) for r in data.get("profile", [])}
            for comp in (False, True):
                if (s15, comp) not in have:
                    rec = profile_step(s15, comp, args.seq, res)
                    data.setdefault("profile", []).append(rec)
                    write_json(js, data)
                    print(rec, flush=True)
    report(res, data)
    print((res / "report.md").read_text())


if __name__ == "__main__":
    main()
