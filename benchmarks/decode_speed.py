"""Decode speed on one GPU: transformers' eager generate vs elmkit's fast path, dense and ELM.

    python benchmarks/decode_speed.py --out benchmarks/results/decode_speed

For each shape (Qwen2.5-1.5B and 7B, random bf16 weights; with --real, the real SmolLM2-135M-Instruct
and its ELM), batch size and prompt length, the decode rate after the prompt (tokens/s summed over
the batch) and the per-token latency of:

  hf-eager       model.generate, transformers' dynamic cache, eager (per step: the time of N new
                 tokens minus that of 1, over N - 1, so the prompt cancels out)
  fast-unfused   elmkit.infer.Decoder: static cache, the whole step in one CUDA graph, eager
                 kernels in it, SDPA attention (not run unless named in --paths)
  fast-ops       the same with RMSNorm, RoPE and SiLU x up compiled one kernel each (the fast path
                 before the compiled step)
  fast-sdpa      q/k/v and gate/up packed into one GEMM each, the whole step through
                 torch.compile, then one CUDA graph; SDPA attention (the default step before "auto")
  fast           the default Decoder: the same step with attention="auto", which on a GPU of
                 compute capability 8.0+ is elmkit.decode_attention (two Triton kernels, split along
                 the keys, the query heads of a KV head together); each row records what it ran
  fast-math      the same with the one-token attention as matmul, softmax, matmul
  fast-flex      the same with flex attention (inductor's decoding kernel, split along the keys)
  fast-tuned     the default step with StepConfig(autotune=True): inductor times Triton GEMM
                 templates against cuBLAS for each matmul (compiling takes minutes; not run unless
                 named in --paths)
  elm-fixed      the ELM (start 2, M = 8, one-step KV) with 8 evaluations per token, --elm-step path
  elm-anderson   the same ELM with Anderson and a per-token tolerance (adaptive stop)

Every fast row also records whether its greedy tokens equal model.generate's (the first 32 new
tokens, same prompt) and, at batch 1, the kernels the GPU runs per decoded token and how busy it is
(kernel time over wall time, from torch.profiler).

Each rate is set against the HBM roofline: batch / (bytes a step must read / copy bandwidth),
where the bytes are every weight the step multiplies by (the block's once per evaluation) plus the
KV cache up to the mean context, and the bandwidth is a device-to-device copy measured in the same
run. The ELM starts from random weights (W_z small, W_h = I), so its adaptive stop converges in the
evaluations shown; on a trained model, see solver_savings.py. Results accumulate in results.json
(finished rows are skipped, so a re-run resumes; --again measures the named ones anew);
report.md and decode_speed.png are rebuilt from it.
Rows saved by the first version of this script are measured again (version 2's are renamed to
this version's names: the same steps); each row names its run, and the report says which rows came
from which run when there are several.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
from pathlib import Path

import torch
from gpu_shapes import OFFICIAL_ELM, SHAPES, copy_bandwidth, gpu_info, random_model

from elmkit.infer import DecodeConfig, Decoder, StepConfig
from elmkit.io import read_json, save_figure, write_json
from elmkit.methods import elm as elm_method

PATHS = ("hf-eager", "fast-unfused", "fast-ops", "fast-sdpa", "fast", "fast-math", "fast-flex",
         "fast-tuned", "elm-fixed", "elm-anderson")
DEFAULT_PATHS = ("hf-eager", "fast-ops", "fast-sdpa", "fast", "fast-math", "fast-flex", "elm-fixed",
                 "elm-anderson")
STEPS = {"fast-unfused": StepConfig(compile="none", pack=False, attention="sdpa"),
         "fast-ops": StepConfig(compile="ops", pack=False, attention="sdpa"),
         "fast-sdpa": StepConfig(attention="sdpa"), "fast": StepConfig(),
         "fast-math": StepConfig(attention="math"), "fast-flex": StepConfig(attention="flex"),
         "fast-tuned": StepConfig(autotune=True)}
# version 2 named the steps by the default of its day: its "fast" ran SDPA (v3's fast-sdpa) and its
# "fast-triton" the Triton kernels that v3's default step runs on such a GPU; load() renames them
V2_NAMES = {"fast": "fast-sdpa", "fast-triton": "fast"}
ELM = dict(start=2, span=8, max_iter=8)
ADAPTIVE = dict(solver="anderson", tol=1e-2, tol_mode="rel")
REAL = "smollm2-135m"  # the real model's rows (--real)
VERSION = 3  # rows of results.json measured by this version of the script
CHECK_TOKENS = 32  # greedy tokens compared with model.generate


def _key(r: dict) -> tuple:
    return r["shape"], r["path"], r["batch"], r["prompt"], r.get("step")


def _label(r: dict) -> str:
    """The row's path, with the decode step when an ELM row ran another than the default."""
    return r["path"] if r.get("step") in (None, "fast") else f"{r['path']} ({r['step']})"


def by_label(rows: list[dict]) -> dict:
    """(shape, label, batch, prompt) -> row: ELM rows of the default step under their plain path."""
    return {(r["shape"], _label(r), r["batch"], r["prompt"]): r for r in rows}


def load(js: Path) -> dict:
    """results.json with older rows under this version's keys: the first version's "fast" is the
    step now called fast-ops, and its ELM rows ran that step; version 2's steps are renamed by
    V2_NAMES (the same configurations, so its rows become this version's); rows saved before rows
    named their machine were measured on the machine of data["env"] (every run rewrote it)."""
    data = read_json(js) if js.exists() else {"rows": []}
    for r in data["rows"]:
        if r.get("version") == 2:
            ran = r.get("step") or r["path"]  # the attention a v2 fast row ran, from its step's name
            if ran in STEPS or ran in V2_NAMES:
                r.setdefault("attention", {"fast-triton": "triton", "fast-math": "math",
                                           "fast-flex": "flex"}.get(ran, "sdpa"))
            r["path"] = V2_NAMES.get(r["path"], r["path"])
            if r.get("step") is not None:
                r["step"] = V2_NAMES.get(r["step"], r["step"])
            r["version"] = 3
        if r.get("version") is None:
            if r["path"] == "fast":
                r["path"] = "fast-ops"
            if r["path"].startswith("elm-") and r.get("step") is None:
                r["step"] = "fast-ops"
        elif "device" not in r and "env" in data:
            r["device"] = data["env"]["device"]
    return data


def current_rows(data: dict) -> list[dict]:
    """The rows of this script's version when it has measured any (this code, and one machine:
    a run on another measures them again), else the older ones: an older row waits in results.json
    until it is measured again."""
    rows = data["rows"]
    if any(r.get("version") == VERSION for r in rows):
        rows = [r for r in rows if r.get("version") == VERSION]
    return rows


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


def fast(model, ids: torch.Tensor, new: int, step: StepConfig, ref: torch.Tensor, repeats: int = 3,
         profile: bool = False):
    """(seconds per decode step, stats, extra) of a fast path: the median of ``repeats`` after a
    warm-up; extra holds the greedy check against ``ref`` (generate's first tokens) and, with
    ``profile``, kernels per token and GPU busy %."""
    dec = Decoder(model, ids.shape[0], ids.shape[1] + new, step=step)
    try:  # closed also when the step fails to build, so the next row finds the memory free
        cfg = DecodeConfig(max_new_tokens=new, stop_at_eos=False)
        out, _ = dec.generate(ids, cfg=cfg)  # captures the graphs (and compiles the step)
        n = min(ref.shape[1], out.shape[1])
        same = (out[:, :n] == ref[:, :n]).all(0)  # (n,) every row agrees at this position
        first = None if same.all() else int((~same).nonzero()[0])
        extra = {"greedy_equal": first is None, "greedy_first_diff": first, "attention": dec.attention}
        runs = [dec.generate(ids, cfg=cfg)[1] for _ in range(repeats)]
        per = statistics.median(s.decode_s / (s.new_tokens - 1) for s in runs)
        if profile:
            extra.update(kernel_profile(dec, ids, new))
    finally:
        dec.close()
        del dec
        gc.collect()  # the compiled step's frames refer back to the decoder: free its cache now
        torch.cuda.empty_cache()
    return per, runs[-1], extra


def kernel_profile(dec: Decoder, ids: torch.Tensor, new: int) -> dict:
    """Kernels per decoded token and GPU busy % over the decode steps: a run of ``new`` tokens
    minus a run of 1 (the prompt and first token), both under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(n: int):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _, stats = dec.generate(ids, cfg=DecodeConfig(max_new_tokens=n, stop_at_eos=False,
                                                          check_every=10**6))
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.name.startswith(("Memcpy", "Memset"))]  # kernels only: the token copies out
        return len(ev), sum(e.device_time for e in ev) / 1e6, stats  # count, seconds, stats

    n1, t1, _ = kernels(1)
    nn, tn, stats = kernels(new)
    steps = stats.new_tokens - 1
    return {"kernels_per_step": (nn - n1) / steps, "gpu_busy_pct": 100 * (tn - t1) / stats.decode_s}


def reference_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """model.generate's first CHECK_TOKENS greedy tokens (B, n) after the prompt."""
    out = model.generate(ids, max_new_tokens=CHECK_TOKENS, min_new_tokens=CHECK_TOKENS,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def load_models(shape: str, real: str | None, real_elm: str | None):
    """(dense, build_elm): the model of ``shape`` on the GPU and a function giving its ELM (the
    trained one from --real-elm for the real model, else ELM's construction from the dense weights,
    which consumes them)."""
    if shape != REAL:
        model = random_model(shape)
        return model, lambda m: elm_method.apply_(m, elm_method.plan(m, **ELM))
    from elmkit.models.loading import load_model

    if real is None:
        raise SystemExit(f"the {REAL} rows need --real, the converted model's folder")

    def build(m):
        if real_elm is not None:
            return load_model(real_elm, dtype="bfloat16", device="cuda").eval()
        return elm_method.apply_(m, elm_method.plan(m, **ELM))

    model = load_model(real, dtype="bfloat16", device="cuda").eval()
    for m in (model.generation_config,):
        m.eos_token_id, m.pad_token_id = None, 0
    return model, build


def measure(shape: str, batches, prompts, new: int, paths, done: set, bw: float, emit,
            failed: list, real: str | None = None, real_elm: str | None = None,
            elm_step: str = "fast") -> None:
    """Every row of ``shape`` not in ``done``, each passed to ``emit``; a fast path (dense or ELM)
    that cannot run here is added to ``failed``, with its traceback printed, and skipped."""
    model, build_elm = load_models(shape, real, real_elm)
    elm, refs = None, {}
    for path in sorted(paths, key=PATHS.index):  # dense first: building the ELM consumes the model
        if path.startswith("elm") and elm is None:
            elm = build_elm(model)
            elm.generation_config.eos_token_id, elm.generation_config.pad_token_id = None, 0
            model, refs = None, {}
        for B in batches:
            for T in prompts:
                step = elm_step if path.startswith("elm") else None
                if (shape, path, B, T, step) in done:
                    continue
                torch.manual_seed(B * 7919 + T)
                ids = torch.randint(1, 1000, (B, T), device="cuda")
                rec = {"shape": shape, "path": path, "batch": B, "prompt": T, "new_tokens": new}
                m = model if elm is None else elm
                if elm is not None:  # the solver of this row, before generate's reference tokens
                    for k, v in {"tol": 0.0, "solver": "naive", "tol_mode": "abs",
                                 **(ADAPTIVE if path == "elm-anderson" else {})}.items():
                        setattr(elm.config, k, v)
                key = ("dense" if elm is None else path, B, T)
                if key not in refs:
                    refs[key] = reference_tokens(m, ids)
                evals = None
                if path == "hf-eager":
                    per = hf_eager(model, ids, min(new, 32))
                    rec["new_tokens"] = min(new, 32)
                    emit(_rate(rec, per, m, B, T, new, None, bw))
                    continue
                try:
                    per, stats, extra = fast(m, ids, new, STEPS[path if elm is None else elm_step], refs[key],
                                             profile=B == 1)
                except Exception as e:  # a step that cannot build here (a compiler error) is reported
                    # at the end, its traceback now; the other rows are still measured
                    traceback.print_exc()
                    text = str(e).strip().splitlines()
                    failed.append(f"{shape} {_label({'path': path, 'step': step})} b{B} p{T}: "
                                  f"{type(e).__name__}: {text[0][:300] if text else ''}")
                    print(f"failed: {failed[-1]}", flush=True)
                    continue
                if elm is None:
                    rec.update(extra)
                else:
                    evals = stats.block_launches
                    rec.update(extra, block_evaluations=stats.block_evaluations, block_launches=evals,
                               solver=elm.config.solver, tol=elm.config.tol, tol_mode=elm.config.tol_mode,
                               step=step, trained=shape == REAL and real_elm is not None,
                               elm_start=elm.config.start, elm_span=elm.config.span)
                emit(_rate(rec, per, m, B, T, new, evals, bw))
    del model, elm
    torch.cuda.empty_cache()


def _rate(rec: dict, per: float, m, B: int, T: int, new: int, evals, bw: float) -> dict:
    """``rec`` with its rate, latency and place against the roofline (``per`` s per step)."""
    step_bytes = weight_bytes(m, evals) + kv_bytes_read(m, B, T + new / 2, evals)
    roof = B / (step_bytes / bw)
    rec.update(ms_per_token=per * 1e3, tokens_per_s=B / per, bytes_per_step=step_bytes,
               roofline_tokens_per_s=roof, roofline_pct=100 * (B / per) / roof, version=VERSION)
    return rec


def _runs_text(rows: list[dict]) -> list[str]:
    """Which rows came from which run, when the table holds more than one (--again, or a run that
    stopped early): only rows of one run compare cleanly."""
    runs: dict = {}
    for r in rows:
        runs.setdefault(r.get("run") or "", []).append(r)
    if len(runs) <= 1:
        return []
    parts = [f"{run or 'an earlier run (rows saved before runs were stamped)'}: "
             + ", ".join(sorted({f"{r['shape']} {_label(r)}" for r in rs}))
             for run, rs in sorted(runs.items())]
    return ["Rows of more than one run (ratios in Checks compare rows of one run only where both are in "
            "it): " + "; ".join(parts) + ".", ""]


def _older_text(all_rows: list[dict], rows: list[dict]) -> list[str]:
    """A paragraph naming the rows of an earlier version that the table leaves out."""
    older = [r for r in all_rows if r not in rows]
    if not older:
        return []
    what = "; ".join((", ".join(sorted({r["shape"] for r in older})),
                      "batch " + ", ".join(str(b) for b in sorted({r["batch"] for r in older})),
                      "prompt " + ", ".join(str(t) for t in sorted({r["prompt"] for r in older}))))
    return [f"{len(older)} rows measured earlier ({what}; by an older version of this script or on "
            "another machine; their report is in this file's history) stay in results.json until "
            "they are measured again; they are not in this table.", ""]


def _greedy_line(shape: str, rows: list[dict]) -> str | None:
    """How many of a shape's fast rows give generate's greedy tokens, and where the others leave."""
    checked = [r for r in rows if r["shape"] == shape and r.get("greedy_equal") is not None]
    if not checked:
        return None
    off = [r for r in checked if not r["greedy_equal"]]
    line = (f"- {shape}: {len(checked) - len(off)} of {len(checked)} fast rows give model.generate's "
            f"first {CHECK_TOKENS} greedy tokens")
    if off:
        where = ", ".join(str(r["greedy_first_diff"]) for r in off)
        line += f"; the others leave them at positions {where} ({', '.join(_label(r) for r in off)})"
        if shape != REAL:
            line += ("; random weights, on which bf16 kernels that sum in another order can flip a near "
                     "tie (the logit margin there is not measured)")
    return line


def elm_pair(rows: list[dict], shape: str, path: str, batch: int = 1, prompt: int = 512):
    """(dense row, ELM row) of ``path`` that ran the same decode step: the default step's where
    both were measured, else another step's; (None, None) where no such pair exists."""
    by = by_label(rows)
    for r in elm_rows(rows, shape, path, batch, prompt):
        dense = by.get((shape, r.get("step") or "fast", batch, prompt))
        # one step name can mean another attention on another machine ("auto")
        a, b = (dense or {}).get("attention"), r.get("attention")
        if dense and (a is None or b is None or a == b):
            return dense, r
    return None, None


def elm_rows(rows: list[dict], shape: str, path: str, batch: int, prompt: int) -> list[dict]:
    """The rows of an ELM ``path``, the default step's first."""
    elms = [r for r in rows
            if (r["shape"], r["path"], r["batch"], r["prompt"]) == (shape, path, batch, prompt)]
    return sorted(elms, key=lambda r: r.get("step") not in (None, "fast"))


def _on_step(r: dict) -> str:
    return "" if r.get("step") in (None, "fast") else f" (both on the {r['step']} step)"


def step_targets(rows: list[dict], noise: float = 0.02) -> list[tuple[str, bool]]:
    """The faster step's targets at batch 1, prompt 512, per shape: (statement, met). One run per
    row, so a latency ratio within ``noise`` of 1 says so, and "faster than dense" is met only
    beyond it (on SmolLM2 the fixed ELM, which reads more bytes, timed 0.985x dense)."""
    by = by_label(rows)
    out = []
    for shape in sorted({r["shape"] for r in rows}):
        f = by.get((shape, "fast", 1, 512))
        if f:
            out.append((f"Dense fast path >= 50% of the HBM roofline, {shape}, batch 1, prompt 512: "
                        f"{f['roofline_pct']:.1f}%", f["roofline_pct"] >= 50))
        for path, what, bound in (("elm-fixed", "fixed", 1.03), ("elm-anderson", "adaptive", 1.0)):
            d, r = elm_pair(rows, shape, path)
            if not r:
                continue
            lat = r["ms_per_token"] / d["ms_per_token"]
            trained = "trained" if r.get("trained") else "untrained"
            ev = (f"{r['block_launches']:.2f} evaluations per token" if what == "adaptive"
                  else f"{r['block_launches']:.0f} evaluations")
            claim = "within 1.03x of" if what == "fixed" else "faster than"
            # rows of two runs (--again of one path) differ by the run-to-run spread as well
            apart = (f" (dense and ELM timed in different runs, {d.get('run') or 'unstamped'} and "
                     f"{r.get('run') or 'unstamped'}: rerun both together)" if d.get("run") != r.get("run")
                     else "")
            out.append((f"ELM ({what}, {ev}, {trained} block) per-token latency {claim} the dense fast "
                        f"path, {shape}{_on_step(r)}: {lat:.3f}x"
                        + (f" (within {noise:.0%} of 1: one run each, no spread measured)"
                           if abs(lat - 1) < noise else "") + apart,
                        # "faster" must clear the noise; "within 1.03x" is itself a tolerance
                        lat <= bound if what == "fixed" else lat < 1 - noise))
    return out


def report(res: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = current_rows(data)
    if not rows or "env" not in data:
        raise SystemExit(f"no measured rows in {res / 'results.json'}; run this script on a GPU first")
    by = by_label(rows)
    elms = sorted({(r["shape"], r["elm_start"], r["elm_span"]) for r in rows if "elm_start" in r})
    elm_text = ("; ".join(f"{s}: start {a}, M = {m}" for s, a, m in elms) if elms
                else f"start {ELM['start']}, M = {ELM['span']}")
    devices = sorted({r["device"] for r in rows if r.get("device")})
    machine = (data["env"]["device"] if len(devices) <= 1 else "rows from "
               + ", ".join(f"{d} ({sum(r.get('device') == d for r in rows)})" for d in devices)
               + f"; the last run on {data['env']['device']}")
    lines = [
        "# Decode speed: transformers eager vs elmkit's fast path (dense and ELM)", "",
        f"{machine}, torch {data['env']['torch']} (CUDA {data['env']['cuda']}), "
        f"transformers {data['env']['transformers']}; bf16, random weights; "
        f"copy bandwidth measured {data['bandwidth_tb_s']:.2f} TB/s. "
        f"Command: `python benchmarks/decode_speed.py`.", "",
        "tokens/s = decode tokens per second summed over the batch (prompt excluded); "
        "roofline = batch / (weight + KV bytes a step reads / copy bandwidth); "
        f"ELM ({elm_text}), one-step KV, fixed rows M evaluations; evals = block evaluations run per step. "
        f"greedy: the first {CHECK_TOKENS} greedy tokens of every row equal model.generate's (yes), or "
        "the first position where some row differs; kernels and busy: GPU kernels per decode step and "
        "kernel time / wall time over the decode steps (torch.profiler, batch 1). "
        + (f"{REAL}: the real SmolLM2-135M-Instruct (30 layers, d = 576) and its ELM "
           + ("(trained)." if any(r.get("trained") for r in rows if r["shape"] == REAL) else
              "(built from its weights, untrained: its adaptive stop is not a trained model's).")
           if any(r["shape"] == REAL for r in rows) else ""), "",
        *_older_text(data["rows"], rows),
        *_runs_text(rows),
        "| shape | batch | prompt | path | tokens/s | ms/token | % roofline | evals | vs hf-eager | greedy "
        "| kernels | busy % |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["shape"], r["batch"], r["prompt"], PATHS.index(r["path"]))):
        base = by.get((r["shape"], "hf-eager", r["batch"], r["prompt"]))
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else ""
        ev = f"{r['block_launches']:.2f}" if r.get("block_launches") is not None else ""
        greedy = {True: "yes", False: f"from {r.get('greedy_first_diff')}", None: ""}[r.get("greedy_equal")]
        kern = f"{r['kernels_per_step']:.0f}" if "kernels_per_step" in r else ""
        busy = f"{r['gpu_busy_pct']:.0f}" if "gpu_busy_pct" in r else ""
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prompt']} | {_label(r)} | "
                     f"{r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {r['roofline_pct']:.1f} | "
                     f"{ev} | {speedup} | {greedy} | {kern} | {busy} |")
    # the must-show ratios, computed from the rows above
    lines += ["", "## Checks", ""]
    for shape in [*SHAPES, REAL]:
        for T in sorted({r["prompt"] for r in rows}):
            f1, o1 = by.get((shape, "fast", 1, T)), by.get((shape, "fast-ops", 1, T))
            fa, a1 = elm_pair(rows, shape, "elm-anderson", 1, T)
            fe, e1 = elm_pair(rows, shape, "elm-fixed", 1, T)
            if f1 and o1:
                lines.append(f"- {shape}, prompt {T}, batch 1: fast at {f1['roofline_pct']:.1f}% of the "
                             f"roofline, {f1['tokens_per_s'] / o1['tokens_per_s']:.2f}x fast-ops "
                             f"({o1['roofline_pct']:.1f}%)")
            if a1:
                lines.append(f"- {shape}, prompt {T}, batch 1: ELM adaptive ({a1['block_launches']:.2f} "
                             f"evaluations) latency / dense fast latency{_on_step(a1)} = "
                             f"{a1['ms_per_token'] / fa['ms_per_token']:.3f}")
            h1 = by.get((shape, "hf-eager", 1, T))
            if f1 and h1:
                lines.append(f"- {shape}, prompt {T}, batch 1: fast / hf-eager = "
                             f"{f1['tokens_per_s'] / h1['tokens_per_s']:.1f}x; ELM fixed / hf-eager = "
                             + (f"{e1['tokens_per_s'] / h1['tokens_per_s']:.1f}x" if e1 else "n/a")
                             + (f" (the ELM on the {e1['step']} step)" if e1 and _on_step(e1) else ""))
            if e1:
                lines.append(f"- {shape}, prompt {T}, batch 1: ELM fixed ({e1['block_launches']:.0f} evals) "
                             f"latency / dense fast latency{_on_step(e1)} = "
                             f"{e1['ms_per_token'] / fe['ms_per_token']:.3f}")
    for path, kind in (("elm-fixed", "fixed"), ("elm-anderson", "anderson")):
        for B, (lo, hi) in OFFICIAL_ELM["decode_tokens_per_s"][kind].items():
            r = next(iter(elm_rows(rows, "qwen2.5-1.5b", path, B, 512)), None)
            if r:
                lines.append(f"- qwen2.5-1.5b {_label(r)}, batch {B}, prompt 512: {r['tokens_per_s']:.0f} "
                             f"tokens/s = {r['tokens_per_s'] / hi:.1f}x to {r['tokens_per_s'] / lo:.1f}x "
                             f"the official ELM's {lo:.0f}-{hi:.0f} (cited, same settings)")
    lines += [g for shape in sorted({r["shape"] for r in rows}) if (g := _greedy_line(shape, rows))]
    (res / "report.md").write_text("\n".join(lines) + "\n")

    shapes = sorted({r["shape"] for r in rows})
    prompts = sorted({r["prompt"] for r in rows})
    fig, axes = plt.subplots(len(shapes), len(prompts), figsize=(5.5 * len(prompts), 4 * len(shapes)),
                             squeeze=False)
    for i, s in enumerate(shapes):
        for j, T in enumerate(prompts):
            ax = axes[i][j]
            batches = sorted({r["batch"] for r in rows if r["shape"] == s})
            shown = [p for p in PATHS if any((s, p, B, T) in by for B in batches)]
            w = 0.8 / len(shown)
            for k, path in enumerate(shown):  # bars centred on the batch's tick
                ys = [by[(s, path, B, T)]["tokens_per_s"] if (s, path, B, T) in by else 0 for B in batches]
                ax.bar([x + (k - (len(shown) - 1) / 2) * w for x in range(len(batches))], ys, w, label=path)
            roof = [by[(s, "fast", B, T)]["roofline_tokens_per_s"] if (s, "fast", B, T) in by else 0
                    for B in batches]
            ax.plot(range(len(batches)), roof, "k_", markersize=30, label="roofline (dense)")
            ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
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
    ap.add_argument("--real", default=None,
                    help=f"folder of the real SmolLM2-135M-Instruct (elmkit fetch / convert): adds the "
                         f"{REAL} rows")
    ap.add_argument("--real-elm", default=None,
                    help="folder of its trained ELM (else the ELM is built from its weights, untrained)")
    ap.add_argument("--elm-step", default="fast", choices=sorted(STEPS),
                    help="the decode step the ELM rows run")
    ap.add_argument("--again", action="store_true",
                    help="measure the chosen rows again even where this machine has them (a comparison "
                         "within one run)")
    ap.add_argument("--report-only", action="store_true", help="rebuild report.md and the plot")
    args = ap.parse_args()
    res = Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    js = res / "results.json"
    data = load(js)
    shapes = args.shapes.split(",") + ([REAL] if args.real and REAL not in args.shapes else [])
    failed: list[str] = []  # rows that could not run here
    if not args.report_only:
        if not torch.cuda.is_available():
            raise SystemExit("decode_speed.py measures a GPU; none is present")
        data["env"] = gpu_info()
        data["bandwidth_tb_s"] = copy_bandwidth() / 1e12
        # a row of another machine is measured again, so that the table stays one machine's
        done = set() if args.again else {_key(r) for r in data["rows"] if r.get("version") == VERSION
                                         and r.get("device") == data["env"]["device"]}

        run = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # which rows were measured together

        def emit(rec):
            rec["device"], rec["run"] = data["env"]["device"], run
            data["rows"] = [r for r in data["rows"] if _key(r) != _key(rec)] + [rec]
            write_json(js, data)
            print(f"{rec['shape']:13s} b{rec['batch']:<3d} p{rec['prompt']:<5d} {_label(rec):13s} "
                  f"{rec['tokens_per_s']:9.1f} tok/s {rec['ms_per_token']:7.2f} ms "
                  f"{rec['roofline_pct']:5.1f}% roofline", flush=True)

        for shape in shapes:
            measure(shape, [int(b) for b in args.batches.split(",")],
                    [int(t) for t in args.prompts.split(",")], args.new_tokens,
                    args.paths.split(","), done, data["bandwidth_tb_s"] * 1e12, emit, failed,
                    real=args.real, real_elm=args.real_elm, elm_step=args.elm_step)
    report(res, data)
    print((res / "report.md").read_text())
    if failed:
        raise SystemExit("these rows could not run (the others were measured):\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
