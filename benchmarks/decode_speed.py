"""Decode speed on one GPU: transformers' eager generate vs elmkit's fast path, dense and ELM.

    python benchmarks/decode_speed.py --out benchmarks/results/decode_speed

For each shape (Qwen2.5-1.5B and 7B, random bf16 weights), batch size and prompt length, the
decode rate after the prompt (tokens/s summed over the batch) and the per-token latency of:

  hf-eager       model.generate, transformers' dynamic cache, eager (per step: the time of N new
                 tokens minus that of 1, over N - 1, so the prompt cancels out)
  fast           elmkit.infer.Decoder: static cache, the whole step in one CUDA graph, RMSNorm,
                 RoPE and SiLU x up fused by torch.compile
  fast-unfused   the same without the fused kernels (eager kernels in the graph; not run unless
                 named in --paths)
  elm-fixed      the ELM (start 2, M = 8, one-step KV) with 8 evaluations per token, fast path
  elm-anderson   the same ELM with Anderson and a per-token tolerance (adaptive stop), fast path

Each rate is set against the HBM roofline: batch / (bytes a step must read / copy bandwidth),
where the bytes are every weight the step multiplies by (the block's once per evaluation) plus the
KV cache up to the mean context, and the bandwidth is a device-to-device copy measured in the same
run. The ELM starts from random weights (W_z small, W_h = I), so its adaptive stop converges in the
evaluations shown; on a trained model, see solver_savings.py. Results accumulate in results.json
(finished rows are skipped, so a re-run resumes); report.md and decode_speed.png are rebuilt from it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from gpu_shapes import OFFICIAL_ELM, SHAPES, copy_bandwidth, gpu_info, random_model

from elmkit.infer import DecodeConfig, Decoder
from elmkit.io import read_json, save_figure, write_json
from elmkit.methods import elm as elm_method

PATHS = ("hf-eager", "fast-unfused", "fast", "elm-fixed", "elm-anderson")
DEFAULT_PATHS = ("hf-eager", "fast", "elm-fixed", "elm-anderson")
ELM = dict(start=2, span=8, max_iter=8)
ADAPTIVE = dict(solver="anderson", tol=1e-2, tol_mode="rel")


def _key(r: dict) -> tuple:
    return r["shape"], r["path"], r["batch"], r["prompt"]


def weight_bytes(model, evaluations: float | None = None) -> float:
    """Bytes of weights one decode step reads (embedding rows excluded, tied head counted once)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.nbytes for p in model.parameters())
    if head.data_ptr() != emb.data_ptr():
        total -= emb.nbytes  # only B rows of the table are gathered
    if evaluations is not None:  # the block is read once per evaluation, W_h once per token
        block = model.block
        one = sum(p.nbytes for p in block.parameters()) - block.proj.weight.nbytes // 2
        total += one * (evaluations - 1)
    return total


def kv_bytes_read(model, batch: int, context: float, evaluations: float | None = None) -> float:
    """K and V bytes a step reads at a given context length (one slot per layer; the block's
    slot once per evaluation)."""
    c = model.config.base_config() if model.config.model_type == "elm" else model.config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = 2 * batch * c.num_key_value_heads * d_head * context * 2  # bf16 K + V
    layers = c.num_hidden_layers + ((evaluations or 1) - 1)
    return per_layer * layers


def hf_eager(model, ids: torch.Tensor, new: int) -> float:
    """Seconds per decode step of model.generate (prefill cancelled out)."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)  # warm-up
    return (run(new) - run(1)) / (new - 1)


def fast(model, ids: torch.Tensor, new: int, repeats: int = 3, fuse: bool = True):
    """(seconds per decode step, stats) of the fast path, median of ``repeats`` after a warm-up."""
    dec = Decoder(model, ids.shape[0], ids.shape[1] + new, fuse=fuse)
    cfg = DecodeConfig(max_new_tokens=new, stop_at_eos=False)
    dec.generate(ids, cfg=cfg)  # captures the graphs
    runs = [dec.generate(ids, cfg=cfg)[1] for _ in range(repeats)]
    per = statistics.median(s.decode_s / (s.new_tokens - 1) for s in runs)
    del dec
    torch.cuda.empty_cache()
    return per, runs[-1]


def measure(shape: str, batches, prompts, new: int, paths, done: set, bw: float, emit) -> None:
    model, elm = random_model(shape), None
    for path in sorted(paths, key=PATHS.index):  # dense first: building the ELM consumes the model
        if path.startswith("elm") and elm is None:
            elm = elm_method.apply_(model, elm_method.plan(model, **ELM))
            model = None
        for B in batches:
            for T in prompts:
                if (shape, path, B, T) in done:
                    continue
                torch.manual_seed(B * 7919 + T)
                ids = torch.randint(1, 1000, (B, T), device="cuda")
                rec = {"shape": shape, "path": path, "batch": B, "prompt": T, "new_tokens": new}
                evals = None
                if path == "hf-eager":
                    per = hf_eager(model, ids, min(new, 32))
                    rec["new_tokens"] = min(new, 32)
                    m = model
                elif path in ("fast", "fast-unfused"):
                    per, _ = fast(model, ids, new, fuse=path == "fast")
                    m = model
                else:
                    for k, v in {"tol": 0.0, "solver": "naive", "tol_mode": "abs"}.items():
                        setattr(elm.config, k, v)
                    if path == "elm-anderson":
                        for k, v in ADAPTIVE.items():
                            setattr(elm.config, k, v)
                    per, stats = fast(elm, ids, new)
                    evals = stats.block_launches
                    rec.update(block_evaluations=stats.block_evaluations, block_launches=evals,
                               solver=elm.config.solver, tol=elm.config.tol, tol_mode=elm.config.tol_mode)
                    m = elm
                step_bytes = weight_bytes(m, evals) + kv_bytes_read(m, B, T + new / 2, evals)
                roof = B / (step_bytes / bw)
                rec.update(ms_per_token=per * 1e3, tokens_per_s=B / per, bytes_per_step=step_bytes,
                           roofline_tokens_per_s=roof, roofline_pct=100 * (B / per) / roof)
                emit(rec)
    del model, elm
    torch.cuda.empty_cache()


def report(res: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    by = {_key(r): r for r in rows}
    lines = [
        "# Decode speed: transformers eager vs elmkit's fast path (dense and ELM)", "",
        f"{data['env']['device']}, torch {data['env']['torch']} (CUDA {data['env']['cuda']}), "
        f"transformers {data['env']['transformers']}; bf16, random weights; "
        f"copy bandwidth measured {data['bandwidth_tb_s']:.2f} TB/s. "
        f"Command: `python benchmarks/decode_speed.py`.", "",
        "tokens/s = decode tokens per second summed over the batch (prompt excluded); "
        "roofline = batch / (weight + KV bytes a step reads / copy bandwidth); "
        "ELM: start 2, M = 8 of 28, one-step KV; evals = block evaluations run per step.", "",
        "| shape | batch | prompt | path | tokens/s | ms/token | % roofline | evals | vs hf-eager |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["shape"], r["batch"], r["prompt"], PATHS.index(r["path"]))):
        base = by.get((r["shape"], "hf-eager", r["batch"], r["prompt"]))
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else ""
        ev = f"{r['block_launches']:.2f}" if r.get("block_launches") is not None else ""
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prompt']} | {r['path']} | "
                     f"{r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {r['roofline_pct']:.1f} | "
                     f"{ev} | {speedup} |")
    # the must-show ratios, computed from the rows above
    lines += ["", "## Checks", ""]
    for shape in SHAPES:
        for T in sorted({r["prompt"] for r in rows}):
            f1 = by.get((shape, "fast", 1, T))
            e1 = by.get((shape, "elm-fixed", 1, T))
            h1 = by.get((shape, "hf-eager", 1, T))
            if f1 and h1:
                lines.append(f"- {shape}, prompt {T}, batch 1: fast / hf-eager = "
                             f"{f1['tokens_per_s'] / h1['tokens_per_s']:.1f}x; ELM fixed / hf-eager = "
                             + (f"{e1['tokens_per_s'] / h1['tokens_per_s']:.1f}x" if e1 else "n/a"))
            if f1 and e1:
                lines.append(f"- {shape}, prompt {T}, batch 1: ELM fixed (8 evals) latency / dense "
                             f"fast latency = {e1['ms_per_token'] / f1['ms_per_token']:.3f}")
    for path, kind in (("elm-fixed", "fixed"), ("elm-anderson", "anderson")):
        for B, (lo, hi) in OFFICIAL_ELM["decode_tokens_per_s"][kind].items():
            r = by.get(("qwen2.5-1.5b", path, B, 512))
            if r:
                lines.append(f"- qwen2.5-1.5b {path}, batch {B}, prompt 512: {r['tokens_per_s']:.0f} "
                             f"tokens/s = {r['tokens_per_s'] / hi:.1f}x to {r['tokens_per_s'] / lo:.1f}x "
                             f"the official ELM's {lo:.0f}-{hi:.0f} (cited, same settings)")
    (res / "report.md").write_text("\n".join(lines) + "\n")

    shapes = sorted({r["shape"] for r in rows})
    prompts = sorted({r["prompt"] for r in rows})
    fig, axes = plt.subplots(len(shapes), len(prompts), figsize=(5.5 * len(prompts), 4 * len(shapes)),
                             squeeze=False)
    for i, s in enumerate(shapes):
        for j, T in enumerate(prompts):
            ax = axes[i][j]
            batches = sorted({r["batch"] for r in rows if r["shape"] == s})
            w = 0.8 / len(PATHS)
            for k, path in enumerate(PATHS):
                ys = [by[(s, path, B, T)]["tokens_per_s"] if (s, path, B, T) in by else 0 for B in batches]
                ax.bar([x + k * w for x in range(len(batches))], ys, w, label=path)
            roof = [by[(s, "fast", B, T)]["roofline_tokens_per_s"] if (s, "fast", B, T) in by else 0
                    for B in batches]
            ax.plot([x + 0.3 for x in range(len(batches))], roof, "k_", markersize=30,
                    label="roofline (dense)")
            ax.set_xticks([x + 0.3 for x in range(len(batches))], [f"batch {b}" for b in batches])
            ax.set_yscale("log")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"{s}, prompt {T}")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, res / "decode_speed.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/decode_speed")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS))
    ap.add_argument("--report-only", action="store_true", help="rebuild report.md and the plot")
    args = ap.parse_args()
    res = Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    js = res / "results.json"
    data = read_json(js) if js.exists() else {"rows": []}
    if not args.report_only:
        if not torch.cuda.is_available():
            raise SystemExit("decode_speed.py measures a GPU; none is present")
        data["env"] = gpu_info()
        data["bandwidth_tb_s"] = copy_bandwidth() / 1e12
        done = {_key(r) for r in data["rows"]}

        def emit(rec):
            data["rows"] = [r for r in data["rows"] if _key(r) != _key(rec)] + [rec]
            write_json(js, data)
            print(f"{rec['shape']:13s} b{rec['batch']:<3d} p{rec['prompt']:<5d} {rec['path']:13s} "
                  f"{rec['tokens_per_s']:9.1f} tok/s {rec['ms_per_token']:7.2f} ms "
                  f"{rec['roofline_pct']:5.1f}% roofline", flush=True)

        for shape in args.shapes.split(","):
            measure(shape, [int(b) for b in args.batches.split(",")],
                    [int(t) for t in args.prompts.split(",")], args.new_tokens,
                    args.paths.split(","), done, data["bandwidth_tb_s"] * 1e12, emit)
    report(res, data)
    print((res / "report.md").read_text())


if __name__ == "__main__":
    main()
