"""The main job, ``elmkit demo``: dense vs ELM vs ShortGPT at one layer budget, with report and plots.

Which demo runs depends on the model:

- **task demo** (a testbed model: ``testbed:tiny`` or any folder with ``testbed.json``): greedy
  exact match on 200 held-out arithmetic problems; the ELM block (25% of the layers) trains with
  SJFB on 4,000 testbed problems; ShortGPT deletes as many layers without healing.
- **text demo** (any other model: ``smollm2-135m``, a folder, a GGUF file): perplexity on a fixed
  WikiText-2 slice shipped in the package (``data/corpora``); the block replaces M = 25% of the
  layers (placed by the cosine criterion) and trains by distillation on shipped C4 text; ShortGPT
  deletes M - 1 layers, so both keep the same number of layers and the same KV cache.

Both write report.md, metrics.json and plots into the run folder. The text demo is resumable: rows
are saved as they finish, and the ELM's training resumes from its last checkpoint (a finished ELM
is reloaded, not retrained).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .io import RunDir, atomic_write_text, read_json, save_figure, write_json


@dataclass(frozen=True)
class TextDemoConfig:
    """The text demo's settings (the defaults fit a 135M model in about 15 min on 2 CPU cores)."""

    window: int = 512
    """Tokens per perplexity window (disjoint windows)."""
    windows: int = 32
    """Windows scored: the first ones of the shipped WikiText-2 slice."""
    ratio: float = 0.25
    """M = round(ratio x layers), at least 2: the layers the ELM block replaces."""
    calib_samples: int = 64
    """Calibration sequences (C4 slice) for the block's placement and ShortGPT's scores."""
    calib_len: int = 256
    """Tokens per calibration sequence."""
    steps: int = 300
    """SJFB steps of the block's training."""
    batch_size: int = 8
    """Sequences per step."""
    max_len: int = 256
    """Tokens per training sequence."""
    lr: float = 2e-3
    """Peak learning rate."""
    distill_loss: str = "relative"
    """Distillation loss (``ElmTrainConfig.distill_loss``); relative: the real model's massive
    activations would dominate a plain MSE."""
    evaluations: tuple[int, ...] = (1, 2, 4)
    """Block evaluations measured besides M (the perplexity-vs-evaluations curve)."""
    adaptive_tol: float = 0.05
    """Adaptive row: a token stops once ||phi(z) - z|| < tol x ||phi(z)|| (at most M evaluations)."""

    def __post_init__(self):
        if self.window < 2 or self.windows < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("window >= 2, windows, steps and batch_size >= 1 are needed")
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if any(k < 1 for k in self.evaluations) or self.adaptive_tol <= 0:
            raise ValueError("evaluations must be >= 1 and adaptive_tol > 0")

    def train(self):
        from .train.elm import ElmTrainConfig

        return ElmTrainConfig(steps=self.steps, batch_size=self.batch_size, max_len=self.max_len,
                              lr=self.lr, lambda_ce=0.0, distill_loss=self.distill_loss,
                              save_every=25, warmup=min(20, self.steps // 10))


def run(out: str | Path | None = None, model: str = "testbed:tiny") -> dict:
    from .models.sources import resolve

    out = out if out is not None else default_out(model)
    path = resolve(model)
    if (Path(path) / "testbed.json").is_file():
        return task_demo(out, model, path)
    return text_demo(out, model, path, TextDemoConfig())


def default_out(model: str) -> Path:
    """runs/demo for the shipped testbed model, runs/demo-<name> for any other: one model's run
    never lands in (and is never refused by) another's folder."""
    if model == "testbed:tiny":
        return Path("runs/demo")
    name = Path(model.rstrip("/\\")).name.removesuffix(".gguf") if not model.startswith("testbed:") else model
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
    return Path("runs") / f"demo-{slug}"


def _check_folder(out: str | Path, config: dict) -> None:
    """A run folder is reused only by the same demo with the same settings (its trained ELM and
    measured rows are picked up), never by another model's or another demo's run."""
    saved = Path(out) / "config.json"
    if saved.is_file() and read_json(saved) != json.loads(json.dumps(config)):  # tuples -> lists
        raise ValueError(f"{out} holds another demo run (model or settings differ); use a new --out "
                         "or delete that folder")


# ---------------------------------------------------------------------------------------------
# task demo: a testbed model, accuracy on held-out problems
# ---------------------------------------------------------------------------------------------


def task_demo(out: str | Path, model: str, path: Path) -> dict:
    from .data.calibration import Calibration
    from .data.chat import encode_prompt
    from .eval import EvalConfig, evaluate
    from .eval.footprint import kv_cache_bytes
    from .methods import elm as elm_method
    from .methods import shortgpt
    from .models import count_parameters, load_model, load_tokenizer
    from .testbed.card import read_recipe
    from .testbed.problems import make_split
    from .train.elm import ElmTrainConfig, train_elm

    _check_folder(out, {"command": "demo", "model": model})
    run = RunDir(out)
    run.write_config("demo", model=model)
    recipe = read_recipe(Path(path))
    problems, seed = recipe["problems"], recipe["seed"]
    test = make_split("test", 200, problems, seed)
    train = make_split("train", 4_000, problems, seed)
    calib_ex = make_split("validation", 64, problems, seed)
    tok = load_tokenizer(path)
    ecfg = EvalConfig(task="gsm8k", batch_size=64, max_new_tokens=160)
    dense = load_model(path, dtype="float32")
    prompts = [encode_prompt(tok, ex) for ex in test[:16]]

    rows = []

    def measure(name, m, tag):
        iters = IterationMeter(m)
        metrics = evaluate(m, test, run / f"eval_{tag}", ecfg, tok, progress=False)
        rows.append({"model": name, "layers": m.config.num_hidden_layers,
                     "params": count_parameters(m), "accuracy": metrics["accuracy"],
                     "kv_bytes": kv_cache_bytes(m, tok, prompts), "iterations_per_token": iters.mean()})
        iters.close()

    measure("dense", dense, "dense")
    n = dense.config.num_hidden_layers

    # ELM: M = 25% of the layers become one block, trained against the dense model
    teacher = copy.deepcopy(dense)
    elm_plan = elm_method.plan(dense, ratio=0.25, max_iter=4)
    write_json(run / "elm" / "plan.json", elm_plan)
    elm = elm_method.apply_(dense, elm_plan)  # dense is not needed again: teacher is its copy
    fit = train_elm(elm, teacher, tok, train, run / "elm", ElmTrainConfig(steps=800, lr=2e-3))
    measure(f"ELM: layers {elm_plan.start}-{elm_plan.start + elm_plan.span - 1} -> 1 block "
            f"(x{elm_plan.max_iter})", elm, "elm")
    # the same block with per-token adaptive stopping: each token stops once ||phi(z)-z|| < 1e-2
    elm.config.max_iter, elm.config.tol = 8, 1e-2
    measure("ELM, adaptive stop (tol 1e-2, at most 8)", elm, "elm_adaptive")
    elm.config.max_iter, elm.config.tol = elm_plan.max_iter, elm_plan.tol

    # ShortGPT: delete as many layers as the ELM replaced, no healing
    calib = Calibration.from_examples(tok, calib_ex)
    sg_plan = shortgpt.plan(teacher, calib, shortgpt.ShortGPTConfig(n_remove=elm_plan.span))
    short = shortgpt.apply_(copy.deepcopy(teacher), sg_plan)
    measure(f"ShortGPT: layers {list(sg_plan.drop)} deleted, no healing", short, "shortgpt")

    # Residual vs iteration for the trained block: naive vs Anderson, same inputs
    traces = residual_traces(elm, tok, [encode_prompt(tok, ex) for ex in test[:16]])

    dense_acc = rows[0]["accuracy"]
    for r in rows:
        r["retained"] = r["accuracy"] / dense_acc if dense_acc else None
        r["kv_ratio"] = r["kv_bytes"] / rows[0]["kv_bytes"]
    _plot_bars(run / "accuracy.png", rows, "accuracy", "test accuracy", (0, 1.1), log=False)
    plot_residuals(run / "residuals.png", traces)
    table = ["| model | layers | params | accuracy | retained | KV bytes (16 prompts) | iterations / token |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = f"{r['retained']:.1%}" if r["retained"] is not None else "n/a"
        table.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['accuracy']:.3f} | {kept} "
                     f"| {r['kv_bytes']:,} ({r['kv_ratio']:.3f}) | {r['iterations_per_token']:.2f} |")
    report = "\n".join([
        "# elmkit demo",
        "",
        f"Model: `{model}` ({n} layers). Accuracy: greedy exact match on 200 held-out arithmetic word",
        f"problems. The ELM block replaces {elm_plan.span} of {n} layers and was trained with SJFB for",
        f"{fit['steps']} steps ({fit['train_time_s']:.0f} s); ShortGPT deletes {elm_plan.span} layers",
        "by block influence without healing.",
        "",
        *table,
        "",
        "![accuracy](accuracy.png)",
        "",
        "Residual ||phi(z) - z|| per iteration of the trained block (max over 16 prompts' tokens):",
        "",
        "![residuals](residuals.png)",
        "",
    ])
    atomic_write_text(run / "report.md", report)
    metrics = {"model": model, "rows": rows, "elm_plan": elm_plan, "shortgpt_removed": list(sg_plan.drop),
               "elm_training": fit, "residual_traces": traces}
    run.write_metrics(metrics)
    print(report)
    return metrics


# ---------------------------------------------------------------------------------------------
# text demo: any pretrained model, perplexity on shipped WikiText-2
# ---------------------------------------------------------------------------------------------


def text_demo(out: str | Path, model: str, path: Path, cfg: TextDemoConfig = TextDemoConfig()) -> dict:
    import time

    from .data.calibration import CalibConfig
    from .data.corpora import c4_head, wikitext2_head
    from .eval.footprint import kv_bytes_at
    from .eval.perplexity import perplexity
    from .methods import elm as elm_method
    from .methods import shortgpt
    from .models import count_parameters, family_of, load_model, load_tokenizer
    from .train.elm import SpanTeacher, train_elm

    settings = {"model": model, **asdict(cfg)}
    _check_folder(out, {"command": "demo", **settings})
    run = RunDir(out)
    done = _resume_rows(run)
    run.write_config("demo", **settings)
    t0 = time.time()
    tok = load_tokenizer(path)
    dense = load_model(path, dtype="float32")
    family_of(dense)  # an unsupported family stops here, before any measurement
    n = dense.config.num_hidden_layers
    m_span = max(2, round(cfg.ratio * n))
    if m_span >= n:
        raise ValueError(f"a {n}-layer model is too shallow for the demo (the block replaces {m_span})")
    text, docs = wikitext2_head(), c4_head()

    def measure(tag, name, m, **extra):
        if tag in done:
            print(f"{name}: measured in an earlier run")
            return done[tag]
        t = time.time()
        iters = IterationMeter(m)
        ppl = perplexity(m, tok, text, window=cfg.window, max_windows=cfg.windows)
        iters.close()
        row = {"tag": tag, "model": name, "layers": m.config.num_hidden_layers,
               "params": count_parameters(m), "ppl": ppl["ppl"], "tokens": ppl["tokens"],
               "windows": ppl["windows"], "kv_bytes_4k": kv_bytes_at(m, 4096, 2),
               "iterations_per_token": iters.mean(), "eval_s": round(time.time() - t, 1), **extra}
        done[tag] = row
        write_json(run / "rows.json", {"rows": done})
        print(f"{name}: perplexity {row['ppl']:.2f} ({row['eval_s']:.0f} s)")
        return row

    measure("dense", "dense", dense)

    # where the block goes (cosine criterion) and what ShortGPT deletes, on the same calibration
    calib = CalibConfig(samples=cfg.calib_samples, seq_len=cfg.calib_len, seed=0).build(tok, docs)
    start, _ = elm_method.cosine_start(dense, calib, m_span)
    sg_plan = shortgpt.plan(dense, calib, shortgpt.ShortGPTConfig(n_remove=m_span - 1))
    short = shortgpt.apply_(copy.deepcopy(dense), sg_plan) if "shortgpt" not in done else None
    measure("shortgpt", f"ShortGPT: {m_span - 1} layers deleted, no healing", short)
    del short

    # ELM: layers [start, start + M) -> one block, M evaluations (the paper's default)
    elm_plan = elm_method.plan(dense, start=start, span=m_span, max_iter=m_span)
    write_json(run / "elm" / "plan.json", elm_plan)
    if (run / "elm" / "metrics.json").is_file() and (run / "elm" / "model" / "config.json").is_file():
        fit = read_json(run / "elm" / "metrics.json")
        del dense
        elm = load_model(run / "elm" / "model", dtype="float32")
        print(f"ELM: trained in an earlier run ({fit['steps']} steps)")
    else:
        teacher = SpanTeacher(dense, elm_plan.start, elm_plan.span)
        elm = elm_method.apply_(dense, elm_plan)
        fit = train_elm(elm, teacher, tok, docs, run / "elm", cfg.train())
        del teacher, dense
    span_txt = f"layers {elm_plan.start}-{elm_plan.start + m_span - 1} -> 1 block"
    measure("elm", f"ELM: {span_txt} (x{m_span})", elm, evaluations=m_span)
    for k in sorted(set(cfg.evaluations) - {m_span}):
        elm.config.max_iter = k
        measure(f"elm_x{k}", f"ELM: {span_txt} (x{k})", elm, evaluations=k)
    elm.config.tol, elm.config.tol_mode, elm.config.max_iter = cfg.adaptive_tol, "rel", m_span
    measure("elm_adaptive", f"ELM, adaptive stop (relative tol {cfg.adaptive_tol}, at most {m_span})", elm)
    elm.config.tol, elm.config.tol_mode = 0.0, "abs"

    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    traces = residual_traces(elm, tok, [ids[i * 256:(i + 1) * 256] for i in range(4)],
                             iterations=2 * m_span)

    rows = [done[t] for t in ("dense", "elm", "elm_adaptive", "shortgpt")]
    curve = sorted([done[f"elm_x{k}"] for k in set(cfg.evaluations) - {m_span}] + [done["elm"]],
                   key=lambda r: r["evaluations"])
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / rows[0]["ppl"]
        r["params_ratio"] = r["params"] / rows[0]["params"]
        r["kv_ratio"] = r["kv_bytes_4k"] / rows[0]["kv_bytes_4k"]
    _plot_bars(run / "perplexity.png", rows, "ppl", "WikiText-2 perplexity", None, log=True)
    _plot_curve(run / "evaluations.png", curve, rows[0]["ppl"], done["shortgpt"]["ppl"])
    plot_residuals(run / "residuals.png", traces)
    wall = round(time.time() - t0, 1)
    report = _text_report(model, cfg, n, len(docs), elm_plan, sg_plan, fit, rows, curve, wall)
    atomic_write_text(run / "report.md", report)
    metrics = {"model": model, "settings": settings, "rows": rows, "evaluations_curve": curve,
               "elm_plan": elm_plan, "shortgpt_removed": list(sg_plan.drop), "elm_training": fit,
               "residual_traces": traces, "demo_s": wall}
    run.write_metrics(metrics)
    print(report)
    return metrics


def _resume_rows(run: RunDir) -> dict:
    """Rows an earlier run in this folder measured (``_check_folder`` vouched for its settings)."""
    saved = run / "rows.json"
    return dict(read_json(saved)["rows"]) if saved.is_file() else {}


def _text_report(model, cfg: TextDemoConfig, n, n_docs, elm_plan, sg_plan, fit, rows, curve, wall) -> str:
    m_span = elm_plan.span
    table = ["| model | layers | params | perplexity | × dense | KV bytes, 4K tokens (16-bit) | "
             "block evaluations / token |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['layers']} | {r['params']:,} ({r['params_ratio']:.3f}) | "
                     f"{r['ppl']:.2f} | {r['ppl_ratio']:.2f} | {r['kv_bytes_4k']:,} ({r['kv_ratio']:.3f}) | "
                     f"{r['iterations_per_token']:.2f} |")
    evals = ["| block evaluations | " + " | ".join(str(r["evaluations"]) for r in curve) + " |",
             "|---|" + "---|" * len(curve),
             "| perplexity | " + " | ".join(f"{r['ppl']:.2f}" for r in curve) + " |"]
    return "\n".join([
        "# elmkit demo on a real model",
        "",
        f"Model: `{model}` ({n} layers). Perplexity: {rows[0]['tokens']:,} predicted tokens of the",
        f"WikiText-2 raw test split ({rows[0]['windows']} disjoint windows of {cfg.window} tokens from its",
        "start; the slice ships with elmkit, sources and licences in `elmkit/data/assets/NOTICE.md`).",
        "",
        f"Same layer budget: the ELM block replaces layers {elm_plan.start}-{elm_plan.start + m_span - 1} "
        f"({m_span} of {n}, placed by the",
        f"cosine criterion) and ShortGPT deletes {m_span - 1} layers ({', '.join(map(str, sg_plan.drop))}) "
        "by block influence,",
        f"so both keep {n - m_span + 1} layers and the same KV cache. Calibration: {cfg.calib_samples} "
        f"sequences of {cfg.calib_len} tokens",
        f"from the shipped C4 slice ({n_docs} documents). The block trained with SJFB on that slice "
        f"for {fit['steps']} steps",
        f"of {cfg.batch_size} × {cfg.max_len} tokens ({fit['train_time_s']:.0f} s), distillation only "
        f"({cfg.distill_loss} loss, lr {cfg.lr});",
        "ShortGPT is not healed.",
        "",
        *table,
        "",
        "![perplexity](perplexity.png)",
        "",
        "The trained block at other numbers of evaluations:",
        "",
        *evals,
        "",
        "![evaluations](evaluations.png)",
        "",
        "Residual ||phi(z) - z|| per evaluation of the trained block (max over 4 × 256 tokens):",
        "",
        "![residuals](residuals.png)",
        "",
        f"Wall time of this run: {wall:.0f} s.",
        "",
    ])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class IterationMeter:
    """Mean block evaluations per token over every forward pass of an ELM (1 for other models)."""

    def __init__(self, model):
        self.total, self.count, self.handle = 0.0, 0, None
        block = getattr(model, "block", None) if model.config.model_type == "elm" else None
        if block is not None:
            self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        it = module.last_info.iterations
        self.total += float(it.float().sum())
        self.count += it.numel()

    def mean(self) -> float:
        return self.total / self.count if self.count else 1.0

    def close(self):
        if self.handle is not None:
            self.handle.remove()


def residual_traces(elm, tok, prompts: list[list[int]], iterations: int = 20) -> dict:
    """Max residual ||phi(z) - z|| per evaluation of the block on ``prompts`` (token ids), naive
    and Anderson from the same inputs."""
    import torch

    from .data.collate import pad_batch
    from .models.adapters import layer_inputs, layer_type, run_layers
    from .solvers import solve

    b = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id)
    c = elm.config
    block = elm.block
    out = {}
    with torch.no_grad():
        ctx = layer_inputs(elm, b["input_ids"], b["attention_mask"])
        x = run_layers(elm, ctx.hidden, ctx, 0, c.start)
        kw = dict(attention_mask=ctx.masks[layer_type(c, c.start)], position_ids=ctx.position_ids,
                  position_embeddings=ctx.position_embeddings)
        for name in ("naive", "anderson"):
            _, info = solve(lambda z: block.phi(z, x, **kw), torch.zeros_like(x), solver=name,
                            max_iter=iterations, tol=0.0)
            out[name] = info.trace
    return out


def _plot_bars(png: Path, rows: list[dict], key: str, ylabel: str, ylim, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3))
    names = ["dense", "ELM", "ELM adaptive", "ShortGPT"][:len(rows)]
    vals = [r[key] for r in rows]
    ax.bar(names, vals, color=["#4c72b0", "#55a868", "#8fbc8f", "#c44e52"][:len(rows)])
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
    ax.set(ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.margins(y=0.15)
    fig.tight_layout()
    save_figure(fig, png)


def _plot_curve(png: Path, curve: list[dict], dense_ppl: float, short_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["evaluations"] for r in curve], [r["ppl"] for r in curve], marker="o", label="ELM")
    ax.axhline(dense_ppl, color="#4c72b0", ls="--", label="dense")
    ax.axhline(short_ppl, color="#c44e52", ls=":", label="ShortGPT (same layers)")
    ax.set(xlabel="block evaluations per token", ylabel="perplexity", yscale="log")
    ax.set_xticks([r["evaluations"] for r in curve])
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)


def plot_residuals(png: Path, traces: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for name, trace in traces.items():
        ax.plot(range(1, len(trace) + 1), trace, marker="o", ms=3, label=name)
    ax.set(xlabel="block evaluation", ylabel="max residual ||phi(z) - z||", yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
