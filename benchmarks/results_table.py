"""The results table: every method on the trained base testbed at the seeds' two ratios.

    python benchmarks/results_table.py --run runs/results_table --out benchmarks/results/results_table

On one GPU. The base testbed (24 layers) is trained (or loaded with --base), then compressed by
every method at two ratios, each measured before and after the same LoRA healing (``compare
--heal both``):

  m7    M = 7 of 24 layers (6 removed, 25%: the seeds' M = 8 of 28); width methods remove the
        same fraction of the non-embedding parameters
  m12   M = 12 of 24 (11 removed, 46%: the seeds' M = 14 of 28)

then, on the trained ELMs (GPPO start): one-step vs per-iteration KV (accuracy, KV MB at 4K); the
solvers (naive / Anderson / Broyden x relative tolerance: evaluations per token, accuracy); and an
ELM trained at every start of the M = 7 span with a smaller budget, against GPPO's theta there.
Generation stops after the longest test answer + 16 tokens (the testbed scorer's budget), so a
model that never ends its answer costs no more than a correct one.
Every stage and every method's row is saved as it finishes, so a run stopped by --budget-s (or
killed) resumes where it stopped: run the same command again. RESULTS.md (at the repository root)
is written from results.json by the last stage, or with --report-only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from md_sections import keep  # this script's folder is on sys.path

from elmkit.compare import CompareConfig, compare
from elmkit.data.calibration import CalibConfig
from elmkit.io import atomic_write_text, read_json, save_figure, write_json
from elmkit.methods.darwinlm import DarwinLMConfig
from elmkit.train.lora import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
# the methods: ELM twice (GPPO start, cosine start), 8 depth and 3 width baselines
METHODS = ("elm", "elm-cosine", "slm", "shortgpt", "shortened", "sleb", "laco", "streamline", "replaceme",
           "llm-pruner", "flap", "darwinlm")
RATIOS = {"m7": 6, "m12": 11}  # layers removed of 24: the block replaces removed + 1
LAYERS = {"n": 24}
SOLVER_TOLS = (0.1, 0.01)
ENUM_STEPS, N_TEST = 100, 128
ENUM_RATIO = "m7"  # GPPO vs enumeration where an ELM learns within a small budget
SEED = 0
SMOKE = {"on": False}
EVAL = {"max_new_tokens": 320}  # set from the base's test answers by stage_base


def compare_config(removed: int, layers: int, methods: tuple[str, ...]) -> CompareConfig:
    """The budgets every method gets (equal footing); sized so the whole table fits 30 GPU minutes."""
    if SMOKE["on"]:  # plumbing check on the tiny testbed (CPU): budgets of a few steps
        return CompareConfig(
            methods=methods, remove=removed / layers, heal="both", train_steps=2, train_batch_size=4,
            elm_start="auto", elm_max_iter=2, n_train=32, n_test=4, max_new_tokens=96, eval_batch_size=4,
            seed=SEED, calib=CalibConfig(samples=4, seq_len=128, seed=SEED),
            lora=FinetuneConfig(max_steps=2, batch_size=4),
            darwinlm=DarwinLMConfig(generations=1, offspring=2, train_tokens=(64, 64, 64, 64),
                                    train_batch_size=2, seed=SEED))
    return CompareConfig(
        methods=methods, remove=removed / layers, heal="both", train_steps=400, train_batch_size=32,
        elm_start="auto", elm_max_iter=4, elm_lr=1e-3, gppo_steps=100, n_train=8000, n_test=N_TEST,
        max_new_tokens=EVAL["max_new_tokens"], eval_batch_size=N_TEST, seed=SEED,
        calib=CalibConfig(samples=64, seq_len=256, seed=SEED),
        lora=FinetuneConfig(max_steps=100, lr=1e-3, batch_size=32),
        # DarwinLM: a short search (the paper runs 200 generations x 16 offspring); candidates are
        # fine-tuned 16 sequences per step (10x the paper's lr for 16x its batch) so that the
        # training-aware selection costs seconds per generation instead of minutes.
        darwinlm=DarwinLMConfig(generations=12, offspring=8, train_tokens=(4000, 8000, 16000, 32000),
                                train_batch_size=16, lr=1e-4, seed=SEED))


class Budget:
    """Stops the run cleanly between units of work once --budget-s seconds have passed."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self, need_s: float = 0.0) -> bool:
        """True while a unit expected to take ``need_s`` seconds still ends inside the budget."""
        return time.time() - self.t0 + need_s < self.seconds


def stage_base(run: Path, data: dict, args) -> Path:
    """The trained base testbed: --base, or trained into RUN/base (its card has what we report)."""
    model = Path(args.base) if args.base else run / "base" / "model"
    if not (model / "testbed.json").is_file():
        if args.base:
            raise SystemExit(f"--base {args.base} is not a testbed model folder (no testbed.json)")
        from elmkit import testbed

        t0 = time.time()
        testbed.train(model.parent, "base")
        data["gpu_s"]["base"] = time.time() - t0
    if not SMOKE["on"]:
        EVAL["max_new_tokens"] = answer_budget(model, N_TEST)
    data["max_new_tokens"] = EVAL["max_new_tokens"]
    card = read_json(model / "card.json")
    data["base_metrics"] = {**card["training"], **card["evaluation"], "preset": card["preset"],
                            "config": card["config"]}
    return model


def stage_compare(name: str, base: Path, run: Path, data: dict, budget: Budget) -> bool:
    """One method at a time into one compare folder (finished rows are reused); True when done."""
    layers = LAYERS["n"]
    removed = RATIOS[name]
    done = data.setdefault("compare_done", {}).setdefault(name, [])
    for method in METHODS:
        if method in done:
            continue
        # expected cost: the same method at the other ratio if it ran, else 90 s
        need = max([v for k, v in data["gpu_s"].items() if k.endswith(f":{method}")], default=90.0)
        if not budget.left(need):
            return False
        t0 = time.time()
        compare(base, run / name, cfg=compare_config(removed, layers, (method,)))
        done.append(method)
        data["gpu_s"][f"{name}:{method}"] = time.time() - t0
        save(data)
    res = compare(base, run / name, cfg=compare_config(removed, layers, METHODS))  # all cached: the table
    data[name] = res
    for extra in ("gppo.json", "cosine.json"):
        for method in ("elm", "elm-cosine"):
            f = run / name / method / extra
            if f.is_file():
                data.setdefault("placement", {}).setdefault(name, {})[method] = read_json(f)
    return True


def answer_budget(base: Path, n: int) -> int:
    """New tokens that fit every one of the first ``n`` test answers, + 16 (the testbed scorer's)."""
    from elmkit.models import load_tokenizer

    tok = load_tokenizer(base)
    return max(len(tok(ex.output)["input_ids"]) for ex in _test_split(base, n)) + 16


def _test_split(base: Path, n: int):
    from elmkit.testbed.card import read_recipe
    from elmkit.testbed.problems import make_split

    r = read_recipe(base)
    return make_split("test", n, r["problems"], r["seed"])


def stage_kv(base: Path, run: Path, data: dict) -> None:
    """The GPPO-start ELMs with one-step and per-iteration KV: accuracy and KV MB at 4K."""
    from elmkit.eval import EvalConfig, evaluate
    from elmkit.eval.footprint import kv_bytes_at
    from elmkit.models import load_model, load_tokenizer

    tok = load_tokenizer(base)
    test = _test_split(base, N_TEST)
    rows = []
    for name in RATIOS:
        elm = load_model(run / name / "elm" / "model", dtype="float32")
        for mode in ("one_step", "per_iter"):
            elm.config.kv_mode = mode
            acc = evaluate(elm, test, run / "kv" / f"{name}_{mode}",
                           EvalConfig(task="gsm8k", batch_size=N_TEST,
                                      max_new_tokens=EVAL["max_new_tokens"]), tok,
                           progress=False)["accuracy"]
            rows.append({"ratio": name, "span": elm.config.span, "max_iter": elm.config.max_iter,
                         "kv_mode": mode, "accuracy": acc, "kv_mb_4k": kv_bytes_at(elm, 4096) / 1e6})
    dense = load_model(base, dtype="float32")
    data["kv"] = {"dense_kv_mb_4k": kv_bytes_at(dense, 4096) / 1e6, "rows": rows}


def stage_solvers(base: Path, run: Path, data: dict) -> None:
    """The larger-ratio GPPO-start ELM: each solver x tolerance, and fixed iterations (reference path)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from solver_savings import evaluate as solver_eval

    from elmkit.models import load_model, load_tokenizer

    tok = load_tokenizer(base)
    test = _test_split(base, N_TEST)
    elm = load_model(run / "m12" / "elm" / "model", dtype="float32")
    max_iter = 8  # room to converge: the table's ELM was trained with 4 evaluations
    rows = []
    for solver, tol in [("naive", 0.0)] + [(s, t) for s in ("naive", "anderson", "broyden")
                                           for t in SOLVER_TOLS]:
        r = solver_eval(elm, tok, test, {"solver": solver, "tol": tol, "tol_mode": "rel",
                                         "max_iter": max_iter if tol else elm.config.max_iter})
        rows.append({"solver": solver, "tol": tol, **{k: r[k] for k in ("accuracy", "evals_per_token")}})
    data["solvers"] = {"span": elm.config.span, "max_iter": max_iter, "rows": rows}


def stage_enumerate(base: Path, run: Path, data: dict, budget: Budget) -> bool:
    """An ELM at every start of the ENUM_RATIO span, each with the same smaller training budget."""
    import copy

    from elmkit.eval import EvalConfig, evaluate
    from elmkit.methods import elm as elm_method
    from elmkit.models import load_model, load_tokenizer
    from elmkit.testbed.card import read_recipe
    from elmkit.testbed.problems import make_split
    from elmkit.train.elm import ElmTrainConfig, SpanTeacher, train_elm

    span = RATIOS[ENUM_RATIO] + 1
    steps = 2 if SMOKE["on"] else ENUM_STEPS
    acc = data.setdefault("enumeration", {"ratio": ENUM_RATIO, "span": span, "steps": steps,
                                          "n_test": N_TEST, "accuracy": {}})["accuracy"]
    starts = range(LAYERS["n"] - span + 1)
    tok = load_tokenizer(base)
    r = read_recipe(base)
    train = make_split("train", 8000, r["problems"], r["seed"])
    test = _test_split(base, N_TEST)
    dense = load_model(base, dtype="float32")
    need = 30.0  # seconds per start until one has been timed
    for start in starts:
        if str(start) in acc:
            continue
        if not budget.left(need):
            return False
        t0 = time.time()
        d = copy.deepcopy(dense)
        plan = elm_method.plan(d, start=start, span=span, max_iter=4)
        teacher = SpanTeacher(d, start, span)
        elm = elm_method.apply_(d, plan)
        out = run / "enumerate" / f"start{start}"
        train_elm(elm, teacher, tok, train, out,
                  ElmTrainConfig(steps=steps, batch_size=32, lr=1e-3, seed=SEED),
                  progress=False)
        ecfg = EvalConfig(task="gsm8k", batch_size=N_TEST, max_new_tokens=EVAL["max_new_tokens"])
        acc[str(start)] = evaluate(elm, test, out / "eval", ecfg, tok, progress=False)["accuracy"]
        need = 1.5 * (time.time() - t0)
        save(data)
    return True


def enumerated(data: dict) -> bool:
    """Every start of the ENUM_RATIO span has its accuracy."""
    acc = data.get("enumeration", {}).get("accuracy", {})
    return all(str(s) in acc for s in range(LAYERS["n"] - RATIOS[ENUM_RATIO]))


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

_SAVE = {}


def save(data: dict) -> None:
    write_json(_SAVE["path"], data)


def plot_retention(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = [*plt.get_cmap("tab10").colors, "black", "gold"]  # one colour per method (12)
    for ax, key, title in ((axes[0], "retained", "before healing"), (axes[1], "healed_retained",
                                                                       "after equal LoRA healing")):
        for color, method in zip(colors, METHODS):
            pts = []
            for name in RATIOS:
                row = next((r for r in data[name]["rows"]
                            if r["method"] == method and "error" not in r), None)
                if row and row.get(key) is not None:
                    pts.append((row["removed"], row[key]))
            if pts:
                style = "-o" if method.startswith("elm") else "--s"
                ax.plot(*zip(*pts), style, color=color, lw=2 if method == "elm" else 1,
                        label=next(r["title"] for r in data["m7"]["rows"] if r["method"] == method))
        ax.set(xlabel="non-embedding parameters removed", title=title, ylim=(-0.02, 1.05))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy retained (vs dense)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, png)


def plot_gppo(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    en = data["enumeration"]
    g = data["placement"][en["ratio"]]["elm"]
    starts = sorted(int(s) for s in en["accuracy"])
    theta = torch.tensor(g["theta"])
    prob = torch.softmax(theta, 0).tolist()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([s - 0.2 for s in starts], [en["accuracy"][str(s)] for s in starts], 0.4, color="#55a868",
           label=f"enumerated accuracy ({en['steps']} SJFB steps each)")
    ax.set(xlabel=f"start layer of the M = {en['span']} block", ylabel="test accuracy", ylim=(0, 1.05),
           xticks=range(len(prob)))
    ax2 = ax.twinx()
    ax2.bar([s + 0.2 for s in range(len(prob))], prob, 0.4, color="#4c72b0", label="GPPO softmax(theta)")
    ax2.set_ylabel("GPPO policy probability")
    cos = data["placement"][en["ratio"]].get("elm-cosine")
    if cos:
        ax.axvline(cos["start"], color="#c44e52", ls=":", label="cosine criterion's start")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    ax.set_title("GPPO's theta vs an ELM trained at each start")
    fig.tight_layout()
    save_figure(fig, png)


def _pct(x) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def results_md(res: Path) -> Path:
    return res / "RESULTS.md" if SMOKE["on"] else ROOT / "RESULTS.md"  # a smoke run leaves the real one


def write_results_md(data: dict, res: Path) -> None:
    env = data["env"]
    bm = data["base_metrics"]
    bc, n = bm["config"], bm["config"]["layers"]
    m7, m12 = data["m7"]["removed"] + 1, data["m12"]["removed"] + 1
    lines = [
        "# Results: every method on the base testbed",
        "",
        "Generated by `python benchmarks/results_table.py` from "
        "[benchmarks/results/results_table/results.json](benchmarks/results/results_table/results.json); "
        "do not edit by hand.",
        "",
        f"Machine: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}. Seed {SEED} everywhere (testbed, calibration, training, healing). "
        f"GPU wall time of this regeneration: {sum(data['gpu_s'].values()) / 60:.1f} minutes "
        f"({', '.join(f'{k} {v / 60:.1f}' for k, v in _stage_minutes(data).items())}).",
        "",
        f"Model: the `{bm['preset']}` testbed (elmkit's own arithmetic word-problem model: {n} layers, "
        f"hidden {bc['hidden']}, GQA {bc['heads']}:{bc['kv_heads']}, {bm['parameters']:,} parameters, "
        f"trained {bm['steps']} steps), dense test accuracy {bm['dense_accuracy']:.3f} on its "
        f"{bm['test_examples']:,} held-out problems (its card). Each method compresses it at two ratios, "
        f"the seeds' M = 8 of 28 (28.6%) and 14 of 28 (50%) mapped to {n} layers: the ELM block replaces "
        f"M = {m7} ({m7 - 1} layers removed) or M = {m12} ({m12 - 1} removed); deleting and merging "
        "methods remove as many layers; width methods remove the same fraction of the non-embedding "
        f"parameters. Accuracy: greedy exact match on {N_TEST} held-out test "
        f"problems, at most {data.get('max_new_tokens', 320)} new tokens (the longest answer + 16); "
        "retention = accuracy / dense accuracy. Healing: the same LoRA budget for every "
        "method. KV: one sequence of 4,096 tokens in 16-bit. Perplexity on text is not reported: the "
        "base testbed is trained on arithmetic problems only.",
        "",
        "Variance: training the base on a GPU is not bit-reproducible (same seed, another machine "
        "gives another base of the same dense accuracy), and at these small budgets the compressed "
        "models' accuracies move between such bases by more than the gaps between close methods; "
        "read one regeneration as one draw.",
        "",
    ]
    cfgs = {name: compare_config(removed, 24, METHODS) for name, removed in RATIOS.items()}
    c = cfgs["m7"]
    lines += [f"Budgets (equal for all): calibration {c.calib.samples} sequences of <= {c.calib.seq_len} "
              f"tokens; methods that train (ELM's block, LLM-Streamline's layer) {c.train_steps} steps x "
              f"{c.train_batch_size} problems; ELM {c.elm_max_iter} block evaluations; GPPO "
              f"{c.gppo_steps} steps; DarwinLM {c.darwinlm.generations} generations x "
              f"{c.darwinlm.offspring} offspring (the paper: 200 x 16), candidates fine-tuned on "
              f"{'/'.join(str(t) for t in c.darwinlm.train_tokens)} tokens per selection stage, "
              f"{c.darwinlm.train_batch_size} sequences per step, lr {c.darwinlm.lr:g}; "
              f"LoRA healing r {c.lora.r}, {c.lora.max_steps} steps x "
              f"{c.lora.batch_size}, lr {c.lora.lr:g}.", ""]
    for name, title in (("m7", f"M = {m7} of {n} (the seeds' 8 of 28)"),
                        ("m12", f"M = {m12} of {n} (the seeds' 14 of 28)")):
        lines += [f"## Main table: {title}", "",
                  "| method | layers | non-embedding params kept | accuracy | retained | healed accuracy "
                  "| healed retained | KV MB at 4K | compress s | heal s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data[name]["rows"]:
            if "error" in r:
                lines.append(f"| {r['title']} | could not run: {r['error']} |||||||||")
                continue
            lines.append(
                f"| {r['title']} | {r['layers']} | {r['non_embedding']:,} ({1 - r['removed']:.1%}) | "
                f"{r['accuracy']:.3f} | {_pct(r['retained'])} | "
                f"{r['healed_accuracy']:.3f} | {_pct(r.get('healed_retained'))} | "
                if "healed_accuracy" in r else
                f"| {r['title']} | {r['layers']} | {r['non_embedding']:,} ({1 - r['removed']:.1%}) | "
                f"{r['accuracy']:.3f} | {_pct(r['retained'])} | - | - | ")
            lines[-1] += f"{r['kv_bytes_4k'] / 1e6:.2f} | {r['compress_s']:.1f} | {r['heal_s']:.1f} |"
        lines.append("")
    if data.get("skipped"):
        lines += [f"Left out of this regeneration (--skip, to fit the GPU budget): "
                  f"{', '.join(data['skipped'])}.", ""]
    lines += ["![retention](benchmarks/results/results_table/retention.png)", ""]
    kv = data.get("kv")
    if kv:
        lines += ["## One-step KV ablation (GPPO-start ELM, before healing)", "",
                  f"Dense: {kv['dense_kv_mb_4k']:.2f} MB at 4K.", "",
                  "| M | evaluations | KV cache | KV MB at 4K | accuracy |", "|---:|---:|---|---:|---:|"]
        for r in kv["rows"]:
            cache = "one-step" if r["kv_mode"] == "one_step" else "per-iteration"
            lines.append(f"| {r['span']} | {r['max_iter']} | {cache} "
                         f"| {r['kv_mb_4k']:.2f} | {r['accuracy']:.3f} |")
        lines.append("")
    sv = data.get("solvers")
    if sv:
        lines += [f"## Solvers (M = {sv['span']} GPPO-start ELM, before healing)", "",
                  f"Relative tolerance ||phi(z) - z|| / ||phi(z)|| per token, at most {sv['max_iter']} "
                  "evaluations; tolerance 0 = fixed evaluations as trained. Reference path "
                  f"(`model.generate`), {N_TEST} test problems.", "",
                  "| solver | tolerance | evaluations / token | accuracy |", "|---|---:|---:|---:|"]
        for r in sv["rows"]:
            lines.append(f"| {r['solver']} | {r['tol']:g} | {r['evals_per_token']:.2f} | "
                         f"{r['accuracy']:.3f} |")
        lines.append("")
    en = data.get("enumeration")
    if en and data.get("placement", {}).get(en["ratio"], {}).get("elm"):
        g = data["placement"][en["ratio"]]["elm"]
        starts = sorted(int(s) for s in en["accuracy"])
        accs = [en["accuracy"][str(s)] for s in starts]
        theta = [g["theta"][s] for s in starts]
        from gppo_vs_enumeration import _spearman  # benchmarks/ is on the path of a script run
        best = max(starts, key=lambda s: en["accuracy"][str(s)])
        total = data["base_metrics"]["config"]["layers"] - en["span"] + 1
        lines += [f"## GPPO's placement vs enumeration (M = {en['span']})", "",
                  f"An ELM trained at each start ({en['steps']} SJFB steps each, {en['n_test']} test "
                  f"problems; {len(starts)} of the {total} starts enumerated within the budget): best start "
                  f"{best} ({en['accuracy'][str(best)]:.3f}); GPPO chose "
                  f"{g['start']} ({en['accuracy'].get(str(g['start']), float('nan')):.3f} there); Spearman "
                  f"correlation of theta with the enumerated accuracies {_spearman(theta, accs):.2f}.", "",
                  "![gppo](benchmarks/results/results_table/gppo_theta.png)", ""]
    lines += ["## The seeds' headline claims, checked here", "", *claims(data), ""]
    skip = f" --skip {','.join(data['skipped'])}" if data.get("skipped") else ""
    lines += ["## Commands", "", "```",
              "python benchmarks/results_table.py --run runs/results_table \\",
              f"    --out benchmarks/results/results_table{skip}",
              "# stops cleanly after --budget-s seconds (default 540); run it again to continue",
              "python benchmarks/results_table.py --report-only   # RESULTS.md from results.json", "```", ""]
    md = results_md(res)
    # the sections other scripts own (real_model.py's) stay
    atomic_write_text(md, keep("\n".join(lines), md.read_text() if md.is_file() else ""))


def _stage_minutes(data: dict) -> dict:
    out: dict[str, float] = {}
    for k, v in data["gpu_s"].items():
        stage = k.split(":")[0]
        out[stage] = out.get(stage, 0.0) + v
    return out


def claims(data: dict) -> list[str]:
    out = []
    n = data["base_metrics"]["config"]["layers"]
    for name, seed_m in (("m7", 8), ("m12", 14)):
        label = f"M = {data[name]['removed'] + 1} of {n} (the seeds' {seed_m} of 28)"
        rows = [r for r in data[name]["rows"] if "error" not in r and r["method"] != "dense"]
        elm = next(r for r in rows if r["method"] == "elm")
        for key, when in (("retained", "before healing"), ("healed_retained", "after healing")):
            base = [r for r in rows if not r["method"].startswith("elm") and r.get(key) is not None]
            best = max(base, key=lambda r: r[key])
            keep = elm.get(key)
            verdict = "yes" if keep is not None and keep >= 0.99 else "no"
            depth = max((r for r in base if r["layers"] < n), key=lambda r: r[key])  # as few layers as ELM
            out.append(f"- {label}, {when}: does ELM (GPPO start) keep >= 99%? **{verdict}** "
                       f"({_pct(keep)}). Best baseline: {best['title']} {_pct(best[key])}; ELM "
                       f"{'beats it by' if keep >= best[key] else 'trails it by'} "
                       f"{abs(keep - best[key]) * 100:.1f} points. Best depth baseline (the same layers "
                       f"and KV cache as ELM): {depth['title']} {_pct(depth[key])}; ELM "
                       f"{'beats it by' if keep >= depth[key] else 'trails it by'} "
                       f"{abs(keep - depth[key]) * 100:.1f} points.")
    kv = data.get("kv")
    if kv:
        for name in RATIOS:
            one = next(r for r in kv["rows"] if r["ratio"] == name and r["kv_mode"] == "one_step")
            per = next(r for r in kv["rows"] if r["ratio"] == name and r["kv_mode"] == "per_iter")
            out.append(f"- Does one-step KV lose accuracy (M = {one['span']})? "
                       f"accuracy {one['accuracy']:.3f} "
                       f"one-step vs {per['accuracy']:.3f} per-iteration "
                       f"({(one['accuracy'] - per['accuracy']) * 100:+.1f} points) with "
                       f"{one['kv_mb_4k']:.2f} vs {per['kv_mb_4k']:.2f} MB of KV at 4K.")
    sv = data.get("solvers")
    if sv:
        for tol in SOLVER_TOLS:
            by = {r["solver"]: r for r in sv["rows"] if r["tol"] == tol}
            if {"naive", "anderson"} <= set(by):
                n, a = by["naive"], by["anderson"]
                out.append(f"- Does Anderson save compute (tolerance {tol:g})? {a['evals_per_token']:.2f} vs "
                           f"{n['evals_per_token']:.2f} evaluations per token for naive "
                           f"({100 * (1 - a['evals_per_token'] / n['evals_per_token']):+.1f}% saved), "
                           f"accuracy {a['accuracy']:.3f} vs {n['accuracy']:.3f}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/results_table", help="working folder (models, checkpoints)")
    ap.add_argument("--out", default="benchmarks/results/results_table", help="results.json and plots")
    ap.add_argument("--base", default=None, help="a trained base testbed folder (default: train one)")
    ap.add_argument("--budget-s", type=float, default=540, help="stop cleanly after this many seconds")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--skip", default="", help="methods left out (comma-separated), named in RESULTS.md")
    ap.add_argument("--smoke", action="store_true",
                    help="check the plumbing on the tiny testbed with budgets of a few steps (CPU)")
    args = ap.parse_args()
    global METHODS
    skipped = [m for m in args.skip.split(",") if m]
    METHODS = tuple(m for m in METHODS if m not in skipped)
    if args.smoke:
        global N_TEST
        from elmkit.testbed import TINY_PATH

        SMOKE["on"], N_TEST, EVAL["max_new_tokens"] = True, 4, 96
        RATIOS.update(m7=3, m12=6)
        LAYERS["n"] = 12
        args.base = args.base or str(TINY_PATH)
    run, res = Path(args.run), Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    js = res / "results.json"
    _SAVE["path"] = js
    data = read_json(js) if js.exists() else {}
    data.setdefault("gpu_s", {})
    data["skipped"] = skipped
    if not args.report_only:
        if not torch.cuda.is_available() and not args.smoke:
            raise SystemExit("results_table.py runs on a GPU; none is present")
        import transformers

        gpu = torch.cuda.is_available()
        data["env"] = {"device": torch.cuda.get_device_name(0) if gpu else platform.processor(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version()}
        budget = Budget(args.budget_s)
        base = stage_base(run, data, args)
        save(data)
        finished = True
        for name in RATIOS:
            if name not in data:
                if not stage_compare(name, base, run, data, budget):
                    finished = False
                    break
                save(data)
        for stage, fn in (("kv", stage_kv), ("solvers", stage_solvers)):
            if finished and stage not in data:
                if not budget.left(60.0):
                    finished = False
                    break
                t0 = time.time()
                fn(base, run, data)
                data["gpu_s"][stage] = time.time() - t0
                save(data)
        if finished and not enumerated(data):
            t0 = time.time()
            finished = stage_enumerate(base, run, data, budget)
            data["gpu_s"]["enumerate"] = data["gpu_s"].get("enumerate", 0.0) + time.time() - t0
            save(data)
        if not finished:
            print("stopped at the time budget; run the same command again to continue", flush=True)
            return
    plot_retention(data, res / "retention.png")
    plot_gppo(data, res / "gppo_theta.png")
    write_results_md(data, res)
    print(results_md(res).read_text())


if __name__ == "__main__":
    main()
