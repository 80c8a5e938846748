"""KV-cache bytes and peak memory at 4K context: dense vs ELM one-step vs ELM per-iteration.

    python benchmarks/kv_memory.py --out benchmarks/results/kv_memory

Qwen2.5-1.5B shape (random bf16 weights), batch 1, a 4,096-position cache. For the dense model and
ELMs replacing M = 8 and M = 14 layers (start 2, M evaluations), with one K/V slot for the block
(one-step) or one per evaluation (per-iteration), this measures:

  static   bytes of elmkit.infer's preallocated K and V tensors for 4,096 positions
  dynamic  bytes of the K and V tensors of transformers' cache after the reference forward of a
           4,096-token prompt (the ELM's extra per-iteration slots included)
  peak     peak allocated memory above the weights while the fast path decodes 32 tokens after a
           4,064-token prompt

and checks static == dynamic == (slots / N) x dense, slots = N - M + 1 (one-step) or N - M + M.
Writes results.json and report.md under --out.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from gpu_shapes import gpu_info, random_model

from elmkit.eval.footprint import cache_bytes
from elmkit.infer import DecodeConfig, Decoder
from elmkit.io import read_json, write_json
from elmkit.methods import elm as elm_method
from elmkit.models.adapters import output_cache

CONTEXT = 4096
SHAPE = "qwen2.5-1.5b"
# (seed figure, MB in 16-bit at 4K): dense 114.8, one-step M = 8: 86.0, M = 14: 61.6 (cited)
SEED_MB = {("dense", 0): 114.8, ("one_step", 8): 86.0, ("one_step", 14): 61.6}


def measure(kind: str, span: int) -> dict:
    model = random_model(SHAPE)
    n = model.config.num_hidden_layers
    if kind != "dense":
        model = elm_method.apply_(model, elm_method.plan(model, start=2, span=span, max_iter=span,
                                                         kv_mode=kind))
    ids = torch.randint(1, 100000, (1, CONTEXT), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
    dynamic = cache_bytes(output_cache(out))
    del out
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dec = Decoder(model, 1, CONTEXT)
    static = dec.cache_bytes()
    dec.generate(ids[:, :CONTEXT - 32], cfg=DecodeConfig(max_new_tokens=32, stop_at_eos=False))
    peak = torch.cuda.max_memory_allocated() - weights
    slots = n if kind == "dense" else n - span + (1 if kind == "one_step" else span)
    rec = {"kind": kind, "span": span, "layers": n, "slots": slots, "static_bytes": static,
           "dynamic_bytes": dynamic, "peak_above_weights_bytes": peak, "weights_bytes": weights}
    dec.close()
    del dec, model
    gc.collect()  # the compiled step refers back to the decoder: free the next kind's memory now
    torch.cuda.empty_cache()
    return rec


def report(res: Path, data: dict) -> None:
    rows = data["rows"]
    env = data["env"]
    dense = next(r for r in rows if r["kind"] == "dense")
    lines = [
        "# KV cache at 4K context: dense vs ELM one-step vs ELM per-iteration", "",
        f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}; Qwen2.5-1.5B shape, "
        "bf16, batch 1, 4,096 positions; ELM start 2, M evaluations. MB = 10^6 bytes. "
        "Command: `python benchmarks/kv_memory.py`.", "",
        "| model | slots | static cache MB | transformers cache MB | / dense | expected (slots / N) | "
        "peak above weights MB | seed MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "dense" if r["kind"] == "dense" else f"ELM M={r['span']} {r['kind'].replace('_', '-')}"
        seed = SEED_MB.get((r["kind"], r["span"]))
        lines.append(f"| {name} | {r['slots']} | {r['static_bytes'] / 1e6:.1f} | "
                     f"{r['dynamic_bytes'] / 1e6:.1f} | "
                     f"{r['static_bytes'] / dense['static_bytes']:.4f} | {r['slots'] / r['layers']:.4f} | "
                     f"{r['peak_above_weights_bytes'] / 1e6:.1f} | {seed if seed else ''} |")
    lines += ["", "## Checks", ""]
    for r in rows:
        exact = r["static_bytes"] * r["layers"] == dense["static_bytes"] * r["slots"]
        same = r["static_bytes"] == r["dynamic_bytes"]
        lines.append(f"- {r['kind']} M={r['span']}: static x N == dense x slots: {exact}; "
                     f"static == transformers' cache: {same}")
    (res / "report.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kv_memory")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    res = Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    js = res / "results.json"
    if not args.report_only:
        if not torch.cuda.is_available():
            raise SystemExit("kv_memory.py measures a GPU; none is present")
        rows = [measure(k, s) for k, s in
                (("dense", 0), ("one_step", 8), ("per_iter", 8), ("one_step", 14), ("per_iter", 14))]
        write_json(js, {"env": gpu_info(), "rows": rows})
    report(res, read_json(js))
    print((res / "report.md").read_text())


if __name__ == "__main__":
    main()
