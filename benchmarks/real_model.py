"""The real-model benchmark: ELM against the baselines on SmolLM2-135M-Instruct at equal budgets.

    python benchmarks/real_model.py --model smollm2-135m --data ../shared/data \\
        --out benchmarks/results/real_model --run runs/real_model [--budget-s 540]

On one GPU. Every unit of work (one training run and its evaluations) is saved under --out as it
finishes, so a run stopped by --budget-s (or killed) continues where it stopped: run the same
command again, also on another machine, as long as --out travels with the repository.

Stages so far:

  recipe  General retention at M = 8 of 30 (the block replaces layers placed by the cosine
          criterion): the ELM's distillation loss (mse, the paper's; relative; channel) x peak
          learning rate. The block trains by SJFB on the shared C4 samples (sequences of 256
          tokens, 16 per step, constant learning rate after a short warm-up, so a checkpoint of a
          long run is what a shorter run would give) and is scored on held-out text only:
          perplexity on C4 validation documents after 4k, 8k, 16k and 32k training sequences,
          from one training run per recipe; the final block also at 1, 2, 4 and 8 evaluations
          per token. Dense and ShortGPT (7 layers deleted: the same layer count and KV cache)
          without training are the reference rows. Then the ablation: the winner with LoRA
          (r 16) on the kept layers, and with its start searched by GPPO; the screen's ELM takes
          the change that lowers the validation score most, if one does.
  screen  General retention at one budget (25.6k sequences, M = 8): every method of
          `compare --methods all` (reverse-order pruning included), retrofitted recurrence, and
          dense + LoRA as the ceiling. Each method compresses the model and then spends the
          budget as its authors do: ELM's block (the recipe stage's winner), LLM-Streamline's
          replacement layer, the recurrent model, partial-layer fine-tuning for reverse-order
          pruning, LoRA healing for the rest. Validation perplexity at 6.4k, 12.8k and 25.6k
          sequences of the same run; at the end WikiText-2 test perplexity and lm-eval ARC-Easy,
          BoolQ and PIQA (full test sets, from --data/commonsense). `original` is the model as
          shipped. --span 15 runs the second compression (folder screen_m15).
  teacher The task teacher: the model LoRA-tuned (r 8) on 20,000 problems of the `base` testbed,
          validation accuracy every 100 steps, stopped when 3 in a row bring no new best (the
          best kept). Its adapter (10 MB, under --run/teacher/adapter) is what later GPU runs
          need: the merged teacher is rebuilt from it and checked by its sha256.
  task    The screen's units under the paper's protocol: each method compresses the teacher and
          trains on the same problems; greedy exact match on 500 held-out test problems at each
          budget; dense = the teacher with the same budget of LoRA (the ceiling).
  curves  Budget curves of general retention to 102.4k sequences (checkpoints at 6.4k ... 102.4k
          of one run) for dense, ELM and the 3 best methods of the screen, over seeds 0, 1, 2
          (--seed for one): mean ± std in every cell.
  task-curves  The same under the task protocol, the 3 best of the task screen.

The claim section (claim/claim.md, first in RESULTS.md) answers the seeds' claim from the curves'
top budget: ELM's retention (score / dense + LoRA's, same seed), whether it keeps 99%, and its gap
to the best other method, a lead or trail only where the gap exceeds both standard deviations.

--jobs N runs the screen's (or task's) units as N processes side by side on the one GPU: a
training step of a 135M model is bound by kernel launches, so units in parallel finish several
times sooner; each unit's numbers are what it gives alone.

Each stage's report (<stage>.md, .json, .png under --out/<stage>) is rewritten after every unit,
and with --report-only from the saved units.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import fcntl
import json
import math
import platform
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from results_table import Budget  # this script's folder is on sys.path

from elmkit.io import atomic_write_text, read_json, save_figure, write_json
from elmkit.methods import WIDTH
from elmkit.methods.darwinlm import DarwinLMConfig

SPAN = 8  # M of 30: the seeds' 8 of 28
LOSSES = ("mse", "relative", "channel")
LRS = (1e-3, 3e-4)
BATCH, SEQ = 16, 256
EVAL_AT = (250, 500, 1000, 2000)  # steps: 4k, 8k, 16k, 32k sequences
EVALUATIONS = (1, 2, 4, 8)
VAL_WINDOW, VAL_WINDOWS = 512, 64
VAL_DOCS = 200
SMOKE = {"on": False}
# the recipe's ablation, each against the grid's winner, one change at a time: LoRA (r 16) on the
# kept layers, trained with the block; the block's start searched by GPPO instead of the cosine
# criterion (the GPPO search at GppoConfig's defaults, on the training text)
ABLATION = {"kept-lora": {"kept_lora_r": 16}, "gppo": {"start": "gppo"}}


def texts(data: Path) -> dict[str, list[str]]:
    """The shared C4 samples (1,000 documents each, about 0.5M tokens): the first VAL_DOCS of
    sample 2 are validation text, never trained on; the rest (4,461 windows of up to 256 tokens)
    trains and calibrates. Budgets beyond that repeat it: the reports give epochs."""
    from elmkit.data.formats import read_text

    second = read_text(data / "calibration" / "redpajama_c4_sample2.jsonl")
    train = read_text(data / "calibration" / "redpajama_c4_sample1.jsonl") + second[VAL_DOCS:]
    val = second[:VAL_DOCS]
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

    s = settings()
    folder = out / "recipe"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(loss, lr) for lr in LRS for loss in LOSSES if not (folder / unit_name(loss, lr)).is_file()]
    if not todo and (folder / "reference.json").is_file() and not ablation_todo(folder):
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
        need = expected_seconds(folder)
        if not budget.left(need):
            print(f"stopped at the time budget before {unit_name(loss, lr)}; run again to continue")
            return False
        t0 = time.time()
        unit = {"loss": loss, "lr": lr, **_recipe_unit(master, tok, t["train"], ref["start"], s, loss, lr, 0,
                                                       run / unit_name(loss, lr).removesuffix(".json"),
                                                       val_ppl, device)}
        unit.update(seconds=round(time.time() - t0, 1), device=_device_name())
        write_json(folder / unit_name(loss, lr), unit)
        print(f"{loss} lr {lr:g}: " + ", ".join(f"{c['sequences']}: {c['ppl']:.2f}" for c in unit["curve"])
              + f"  ({unit['seconds']:.0f} s)", flush=True)
        report(out)
    if not budget.left():
        return False
    return _recipe_ablation(master, tok, t["train"], ref, s, folder, out, run, val_ppl, device, budget)


def _recipe_unit(master, tok, train, start: int, s: dict, loss: str, lr: float, kept_lora_r: int,
                 work: Path, val_ppl, device: str) -> dict:
    """One ELM recipe: the block from ``start`` trained by SJFB on the recipe's budget, validation
    perplexity at its checkpoints and, at the end, at each number of evaluations."""
    from elmkit.methods import elm as elm_method
    from elmkit.train.elm import ElmTrainConfig, SpanTeacher, train_elm

    span = s["span"]
    dense = copy.deepcopy(master).to(device)
    plan = elm_method.plan(dense, start=start, span=span, max_iter=span)
    # kept-layer LoRA tunes the layers below the block, so the teacher keeps its own copy of them
    teacher = SpanTeacher(dense, plan.start, plan.span, own_lower=kept_lora_r > 0)
    elm = elm_method.apply_(dense, plan)
    curve: list[dict] = []
    cfg = ElmTrainConfig(steps=s["eval_at"][-1], batch_size=s["batch"], max_len=s["seq"], lr=lr, min_lr=lr,
                         lambda_ce=0.0, distill_loss=loss, kept_lora_r=kept_lora_r, save_every=10**9, seed=0)
    fit = train_elm(elm, teacher, tok, train, work, cfg, progress=False,
                    on_step=_checkpoint_evals(elm, curve, s, val_ppl))
    per_k = {}
    for k in EVALUATIONS if not SMOKE["on"] else (1, span):
        elm.config.max_iter = k
        per_k[str(k)] = val_ppl(elm)["ppl"]
    del elm, teacher, dense
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"curve": curve, "evaluations": per_k, "first_distill": fit["first_distill"],
            "final_distill": fit["final_distill"], "final_residual": fit["final_residual"],
            "train_s": fit["train_time_s"]}


def gppo_config(span: int, seq: int, seed: int):
    """The GPPO search of the ablation and of a screen ELM whose recipe starts by GPPO."""
    from elmkit.methods.gppo import GppoConfig

    small = {"steps": 4, "group_size": 2, "batch_size": 2} if SMOKE["on"] else {}
    return GppoConfig(span=span, max_len=seq, seed=seed, **small)


def _recipe_ablation(master, tok, train, ref: dict, s: dict, folder: Path, out: Path, run: Path,
                     val_ppl, device: str, budget: Budget) -> bool:
    """The grid's winner changed one way at a time (ABLATION), same budget and checkpoints. A GPPO
    search that lands on the cosine start changes nothing: the winner's numbers stand for it."""
    from elmkit.methods import gppo

    best = grid_winner(folder)
    for name in ablation_todo(folder):
        change, path = ABLATION[name], folder / f"unit_ablation_{name}.json"
        # the GPPO unit searches (200 reward-model steps) before it trains: count it as two units.
        # Expected from the grid's units, which ran one at a time: an ablation unit may have shared
        # the device with another stage's run, and its time says nothing about one alone
        alone = max(u["seconds"] for u in grid_units(folder))
        if not budget.left(alone * (2 if "start" in change else 1)):
            print(f"stopped at the time budget before {path.name}; run again to continue")
            return False
        t0 = time.time()
        unit = {"variant": name, "base": {"loss": best["loss"], "lr": best["lr"]}, "change": change,
                "start": ref["start"]}
        if change.get("start") == "gppo":
            cfg = gppo_config(s["span"], s["seq"], 0)
            found = gppo.plan(copy.deepcopy(master).to(device), tok, train, cfg, progress=False,
                              ckpt_dir=run / path.stem / "gppo")  # a search cut off resumes
            unit.update(start=found.start, theta=[round(x, 4) for x in found.theta],
                        search_s=round(time.time() - t0, 1))
        if unit["start"] == ref["start"] and "kept_lora_r" not in change:
            unit.update(same_as=unit_name(best["loss"], best["lr"]), curve=best["curve"],
                        evaluations=best["evaluations"])
        else:
            unit.update(_recipe_unit(master, tok, train, unit["start"], s, best["loss"], best["lr"],
                                     change.get("kept_lora_r", 0), run / path.stem, val_ppl, device))
        unit.update(seconds=round(time.time() - t0, 1), device=_device_name())
        write_json(path, unit)
        print(f"ablation {name}: " + ", ".join(f"{c['sequences']}: {c['ppl']:.2f}" for c in unit["curve"])
              + f"  ({unit['seconds']:.0f} s)", flush=True)
        report(out)
    report(out)
    return True


# ---------------------------------------------------------------------------------------------
# screen: every method at one budget
# ---------------------------------------------------------------------------------------------

BUDGETS = (6_400, 12_800, 25_600, 51_200, 102_400)  # training sequences (windows of up to SEQ tokens)
SCREEN_TOP = 25_600
LONG_SPAN = 15  # the seeds' 14 of 28: the second compression
# --span: the screen at M = 8 (folder screen/) or another M (screen_m<M>/); --stages task: the same
# units under the task-retention protocol (task/, task_m<M>/)
SCREEN = {"span": SPAN, "protocol": "general", "seed": 0}
# units that compress nothing: their numbers do not depend on M, so other Ms copy the M = SPAN unit
SPAN_FREE = ("original", "dense")
CURVE_TOP = 102_400  # curves: the whole budget range, for the strongest methods, over SEEDS
SEEDS = (0, 1, 2)
CURVE_BEST = 3  # besides dense and ELM: this many of the screen's best (C4 at its top budget)
HEAL_LR = 2e-4  # LoRA healing (r 16, all seven projections): FinetuneConfig's default
PARTIAL = {"lr": 1e-5, "warmup": 100, "layers": 3}  # Lu et al.'s partial-layer fine-tuning
# retrofitted recurrence: 7 layers deleted (23 kept, as ELM), a core of 4 iterated 3 times: 31 layer
# evaluations per token (ELM: 30); AdamW at the authors' AdamW-only lr, everything trains
RECURRENCE = {"core": 4, "r": 3, "lr": 5e-5, "warmup": 20}
# general knowledge: lm-eval on the full test sets, zero-shot, from ../shared/data/commonsense
TASKS = ("elmkit_arc_easy", "elmkit_boolq", "elmkit_piqa")
TASK_LABELS = {"elmkit_arc_easy": "ARC-E", "elmkit_boolq": "BoolQ", "elmkit_piqa": "PIQA"}
# lm-eval's batch. It holds a batch's logits twice, the model's and their log-softmax, both fp32 as
# the units evaluate in fp32: 8 bytes x (B, T, V). At 64, BoolQ's longest request (1,296 tokens,
# V 49,152) asked for 15.18 GiB for the log-softmax on an H100, 30 GiB in all, more than a unit's
# share at --jobs 6 (12.5 GiB); at 8 it is 3.8 GiB
TASK_BATCH = 8
# task retention (the paper's protocol): SmolLM2 LoRA-tuned on the base testbed's problems, until
# validation accuracy stops improving, is the teacher; each method compresses the teacher and trains
# on the same problems; greedy exact match on held-out test problems
TASK = {"preset": "base", "train": 20_000, "val": 500, "test": 500}
TEACHER = {"r": 8, "lr": 2e-4, "batch": 32, "warmup": 20, "eval_every": 100, "patience": 3,
           "max_steps": 4_000}  # r 8: the adapter (10 MB) travels between GPU runs, not the model
GEN_BATCH = 250  # greedy decoding batch on the GPU
TOLS = (1e-3, 1e-2, 3e-2)  # ELM's per-token adaptive stopping: relative residual tolerances
DARWINLM = DarwinLMConfig(generations=12, offspring=8, train_tokens=(4000, 8000, 16000, 32000),
                          train_batch_size=16, lr=1e-4, seed=0)  # RESULTS.md's testbed search budget


def screen_methods() -> list[str]:
    from elmkit.compare import GROUPS

    search = ("darwinlm", "ziplm", "uniform")  # the OBS database and search: the longest units, last
    rest = [m for m in GROUPS["all"] if m not in search]
    return ["original", "dense", "elm", "recurrence", *[m for m in rest if m != "elm"], *search]


def screen_settings() -> dict:
    small = SMOKE["on"]
    top = (16 if small else CURVE_TOP) if is_curve() else (8 if small else SCREEN_TOP)
    return {"span": min(3, SCREEN["span"]) if small else SCREEN["span"], "batch": 2 if small else BATCH,
            "seq": 32 if small and not is_task() else SEQ,  # a problem fits 256 tokens
            "budgets": [b for b in ((2, 4, 8, 16) if small else BUDGETS) if b <= top],
            "heal_lr": HEAL_LR, "partial": PARTIAL, "recurrence": RECURRENCE,
            **({"val_window": 64 if small else VAL_WINDOW, "val_windows": 2 if small else VAL_WINDOWS,
                "tasks": list(TASKS), "tasks_limit": 4 if small else None, "task_batch": TASK_BATCH}
               if not is_task() else {"task": task_sizes()}),
            **({"seed": SCREEN["seed"]} if is_curve() else {}),
            "seeded_units": True,  # each unit seeds torch itself (units saved before did not)
            "smoke": small}


def screen_spans(out: Path, protocol: str | None = None) -> list[int]:
    """The M of every screen of ``protocol`` (default: the current one) saved under ``out``."""
    base = PREFIX[protocol or SCREEN["protocol"]]
    spans = []
    for d in out.glob(f"{base}*"):
        if d.is_dir() and (d.name == base or d.name.removeprefix(f"{base}_m").isdigit()):
            spans.append(SPAN if d.name == base else int(d.name.removeprefix(f"{base}_m")))
    return sorted(spans)


# protocol -> folder prefix; the curves are the general protocol over seeds, task_curves the task one
PREFIX = {"general": "screen", "task": "task", "curves": "curves", "task_curves": "task_curves"}
STAGES = ("recipe", "screen", "teacher", "task", "curves", "task-curves")
STAGE_PROTOCOL = {"screen": "general", "task": "task", "curves": "curves", "task-curves": "task_curves"}


def is_task() -> bool:
    """Whether the current protocol scores task retention (the teacher, the testbed's problems)."""
    return SCREEN["protocol"] in ("task", "task_curves")


def is_curve() -> bool:
    """Whether the current protocol runs budget curves over seeds (to CURVE_TOP, a file per seed)."""
    return SCREEN["protocol"] in ("curves", "task_curves")


def unit_path(folder: Path, name: str) -> Path:
    """A unit's file: unit_<method>.json, or unit_<method>_s<seed>.json for the curves' seeds."""
    seed = f"_s{SCREEN['seed']}" if is_curve() else ""
    return folder / f"unit_{name}{seed}.json"


def seeds() -> tuple[int, ...]:
    return SEEDS[:2] if SMOKE["on"] else SEEDS


def curve_methods(out: Path) -> list[str]:
    """dense, ELM and the CURVE_BEST methods that score best at the top budget of the screen of the
    same protocol and M (general: the lowest C4 perplexity; task: the highest accuracy): the methods
    worth a budget curve and seeds."""
    task = is_task()
    folder = out / screen_name(protocol="task" if task else "general")
    done = [read_json(p) for p in folder.glob("unit_*.json")]
    ranked = sorted((u for u in done if "error" not in u and u["method"] not in ("original", "dense", "elm")
                     and u["curve"]), key=lambda u: -u["curve"][-1]["acc"] if task else u["curve"][-1]["ppl"])
    chosen = ["dense", "elm", *[u["method"] for u in ranked[:CURVE_BEST]]]
    # what the choice was made from: a screen still missing methods may rank them otherwise later
    missing = [m for m in screen_methods() if m not in {u["method"] for u in done}]
    write_json(out / screen_name() / "chosen.json",
               {"methods": chosen, "from": folder.name, "missing": missing})
    return chosen


def screen_name(span: int | None = None, protocol: str | None = None) -> str:
    """The screen's folder under --out and --run: screen (general retention) or task (task
    retention) for M = 8, screen_m<M> / task_m<M> otherwise."""
    span = SCREEN["span"] if span is None else span
    base = PREFIX[protocol or SCREEN["protocol"]]
    return base if span == SPAN else f"{base}_m{span}"


def grid_units(folder: Path) -> list[dict]:
    """The recipe stage's loss x lr units."""
    return [read_json(p) for p in folder.glob("unit_*.json") if not p.name.startswith("unit_ablation_")]


def grid_winner(folder: Path) -> dict | None:
    """The grid's unit with the lowest validation score (``recipe_score``); None before any."""
    return min(grid_units(folder), key=recipe_score, default=None)


def ablation_units(folder: Path) -> dict[str, dict]:
    """The recipe stage's ablation units measured against the grid's current winner, by variant."""
    best = grid_winner(folder)
    if best is None:
        return {}
    units = {name: read_json(folder / f"unit_ablation_{name}.json") for name in ABLATION
             if (folder / f"unit_ablation_{name}.json").is_file()}
    return {k: u for k, u in units.items() if u["base"] == {"loss": best["loss"], "lr": best["lr"]}}


def ablation_todo(folder: Path) -> list[str]:
    """The ablation's variants not yet measured against the grid's winner (all of them until the
    grid is complete)."""
    if len(grid_units(folder)) < len(LOSSES) * len(LRS):
        return list(ABLATION)
    done = ablation_units(folder)
    return [name for name in ABLATION if name not in done]


def elm_recipe(out: Path) -> dict:
    """The recipe stage's winner: the grid's loss and lr, and the ablation's change (kept-layer LoRA
    or the GPPO start) that lowers the grid winner's validation score most, if one does. Only one:
    the two together were never measured. Until the stage has results: the relative loss at lr
    3e-4, block only, cosine start."""
    folder = out / "recipe"
    best = grid_winner(folder)
    if best is None:
        return {"loss": "relative", "lr": 3e-4, "kept_lora_r": 0, "start": "cosine",
                "chosen_by": "default (no recipe results yet)"}
    abl = ablation_units(folder)
    wins = sorted((k for k, u in abl.items() if recipe_score(u) < recipe_score(best)),
                  key=lambda k: recipe_score(abl[k]))
    take = wins[0] if wins else None
    return {"loss": best["loss"], "lr": best["lr"],
            "kept_lora_r": ABLATION["kept-lora"]["kept_lora_r"] if take == "kept-lora" else 0,
            "start": "gppo" if take == "gppo" else "cosine",
            # the ablation's search at M = SPAN, on the general protocol's text and seed 0
            "gppo_start": abl["gppo"]["start"] if take == "gppo" else None,
            "chosen_by": "recipe stage (validation)" + ("" if not ablation_todo(folder) else
                                                        "; its ablation not measured yet")}


def model_label(model: str) -> str:
    """A named model as itself, a folder by its last part (the GPU run converts the GGUF into a
    scratch folder)."""
    return Path(model).name if "/" in model else model


def recipe_score(unit: dict) -> float:
    """Geometric mean of the validation perplexity at the last two checkpoints: a recipe that
    spikes between checkpoints (an unstable learning rate) does not win on one lucky point."""
    last = [c["ppl"] for c in unit["curve"][-2:]]
    return math.exp(sum(math.log(x) for x in last) / len(last))


def stage_screen(model: str, data: Path, out: Path, run: Path, budget: Budget,
                 methods: list[str] | None = None, jobs: int = 1) -> bool:
    """Every method of ``methods`` (default: all) not yet saved; False when the budget stopped it.
    Under SCREEN["protocol"]: general retention (the instruct model, C4) or task retention (the
    teacher, the testbed's problems). With ``jobs`` > 1 the units run as that many processes
    sharing the device (``_screen_jobs``)."""
    from elmkit.compare import CompareConfig, compress_copy, save_model
    from elmkit.data.calibration import CalibConfig
    from elmkit.methods.common import non_embedding_parameters
    from elmkit.models import count_parameters

    s = screen_settings()
    task = is_task()
    folder = out / screen_name()
    folder.mkdir(parents=True, exist_ok=True)
    methods = methods or screen_methods()
    unknown = [m for m in methods if m not in screen_methods()]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {', '.join(screen_methods())}")
    recipe = elm_recipe(out)
    if task:
        s["teacher"] = _teacher_ready(model, out, run)
    if SCREEN["span"] != SPAN:
        _reuse_span_free(out, folder, methods, s, recipe)
    todo = [m for m in methods if not _unit_current(folder, m, unit_settings(m, s, recipe))]
    if "elm" in todo and grid_units(out / "recipe") and ablation_todo(out / "recipe"):
        # the grid is done but its ablation is not: ELM measured now would be measured again
        print("elm waits for the recipe stage's ablation: run --stages recipe first")
        todo.remove("elm")
    if not todo:
        report_screen(out)
        return True
    tasks_dir = None if task else _check_tasks(data)
    if tasks_dir is not None:
        task_floors(tasks_dir, out)
    if jobs > 1 and len(todo) > 1:
        return _screen_jobs(model, data, out, run, todo, jobs, budget)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = s.get("seed", 0)
    bench = (_task_bench(run, s, device) if task else _general_bench(model, data, s, tasks_dir, device))
    master, tok, calib = bench["master"], bench["tok"], bench["calib"]
    n = master.config.num_hidden_layers
    k = s["span"] - 1
    top = s["budgets"][-1]
    steps = top // s["batch"]
    e0, p0 = non_embedding_parameters(master), count_parameters(master)
    clock = {"eval": 0.0}  # seconds spent scoring, apart from compressing and training

    def at(sequences: int, m) -> dict:
        t1 = time.time()
        point = {"sequences": sequences, **bench["score"](m)}
        clock["eval"] += time.time() - t1
        return point

    def scorer(curve: list):
        """``(step, model)`` callback: the protocol's score at every budget (in sequences)."""
        def score(step: int, m) -> None:
            if step * s["batch"] in s["budgets"]:
                curve.append(at(step * s["batch"], m))
        return score

    for name in todo:
        need = expected_seconds(folder)
        if not budget.left(need):
            print(f"stopped at the time budget before {name}; run again to continue")
            return False
        print(f"== {screen_name()} {name}", flush=True)
        t0, clock["eval"] = time.time(), 0.0
        work = run / screen_name() / unit_path(folder, name).stem
        shutil.rmtree(work, ignore_errors=True)  # a unit is all or nothing: no stale checkpoint resumes
        dense = copy.deepcopy(master).to(device)
        # every random draw of the unit (ELM's projections, LoRA, data order) from its own seed, so a
        # unit gives the same numbers alone, resumed, or after other units in one process
        torch.manual_seed(seed)
        # Streamline's layer trains on the same windows, batch and steps as everyone; DarwinLM's search
        # fine-tunes its candidates on its own (RESULTS.md's testbed budget), not counted in the budget
        ccfg = CompareConfig(methods=("elm",), remove=k / n, train_steps=steps, train_batch_size=s["batch"],
                             elm_max_iter=s["span"], elm_lr=recipe["lr"], device=device, seed=seed,
                             calib=CalibConfig(samples=len(calib), seq_len=calib.input_ids.shape[1]),
                             darwinlm=dataclasses.replace(DARWINLM, seed=seed))
        curve: list[dict] = []
        unit = {"method": name, "settings": unit_settings(name, s, recipe),
                "removed_layers": None if name in WIDTH else 0 if name in ("original", "dense") else k}
        train = bench["train"]
        try:
            if name == "original":  # the model as it comes (the teacher, for task retention)
                m, trainer = dense, "none"
                curve.append(at(0, m))
            elif name == "dense":
                m, trainer = dense, "lora"
            elif name in ("elm", "elm-cosine"):
                m, trainer = _screen_elm(dense, tok, calib, train, s, recipe, work, scorer(curve)), "elm"
                unit["recipe"] = recipe
            elif name == "recurrence":
                m, trainer = _screen_recurrence(dense, tok, train, s, k, work, scorer(curve)), "own"
            else:
                m, plan, stats = compress_copy(name, dense, tok, calib, train, k, work, ccfg,
                                               train_len=s["seq"])
                unit["plan"] = plan  # write_json stores a plan dataclass, as compare's plan.json
                trainer = {"streamline": "own", "reverse": "partial"}.get(name, "lora")
            del dense
            compress_s = time.time() - t0  # ELM, recurrence and Streamline: their training included
            if trainer in ("lora", "partial"):
                save_model(m, tok, work / "model")
                del m  # the healed copy is loaded from disk: one model on the device at a time
                m = _heal(tok, train, s, trainer, steps, work, scorer(curve), device)
            elif not curve:  # Streamline's layer trained on the whole budget; one point
                curve.append(at(top, m))
        except (ValueError, FloatingPointError) as e:  # cannot reach the target here, or diverged
            unit.update(error=f"{type(e).__name__}: {e}", seconds=round(time.time() - t0, 1))
            write_json(unit_path(folder, name), unit)
            print(f"== {name} failed: {e}")
            continue
        ne = non_embedding_parameters(m)
        t1 = time.time()
        final = bench["final"](m)
        if trainer == "elm":  # the block at fewer evaluations, and stopping per token
            final["inference"] = _elm_inference(m, bench["score"], s["span"])
        clock["eval"] += time.time() - t1
        unit.update(trainer=trainer, curve=curve, **final, params=count_parameters(m) / p0,
                    removed_non_embedding=round(1 - ne / e0, 4), layers=m.config.num_hidden_layers,
                    compress_s=round(compress_s, 1), eval_s=round(clock["eval"], 1),
                    seconds=round(time.time() - t0, 1), device=_device_name())
        write_json(unit_path(folder, name), unit)
        key = "acc" if task else "ppl"
        print(f"{name}: " + ", ".join(f"{c['sequences']}: {c[key]:.4g}" for c in curve)
              + (f"  wikitext2 {unit['wikitext2']['ppl']:.2f}  " if "wikitext2" in unit else "  ")
              + "  ".join(f"{TASK_LABELS.get(t, t)} {v['acc']:.3f}" for t, v in unit.get("tasks", {}).items())
              + f"  ({unit['seconds']:.0f} s)", flush=True)
        report_screen(out)
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
    report_screen(out)
    return True


def _elm_inference(m, score, span: int) -> dict:
    """ELM at inference, scored as the protocol scores: at 1, 2, 4, ... M evaluations of the block per
    token, and with per-token adaptive stopping (relative residual below each of TOLS, at most M
    evaluations), with the mean evaluations per token that used (padding tokens included)."""
    from elmkit.demos import IterationMeter

    c = m.config
    keep = (c.max_iter, c.tol, c.tol_mode)
    out: dict = {"fixed": {}, "adaptive": {}}
    try:
        for k in sorted({*(2 ** i for i in range(span.bit_length()) if 2 ** i < span), span}):
            c.max_iter, c.tol = k, 0.0
            out["fixed"][str(k)] = score(m)
        for tol in TOLS:
            c.max_iter, c.tol, c.tol_mode = span, tol, "rel"
            meter = IterationMeter(m)
            try:
                out["adaptive"][f"{tol:g}"] = {**score(m), "evaluations": round(meter.mean(), 3)}
            finally:
                meter.close()
    finally:
        c.max_iter, c.tol, c.tol_mode = keep
    return out


def _inference_lines(units: list[dict], key: str, fmt) -> list[str]:
    """The ELM unit's inference table for a report, or nothing."""
    u = next((u for u in units if "inference" in u), None)
    if u is None:
        return []
    inf = u["inference"]
    fixed = "; ".join(f"{k}: {fmt(v[key])}" for k, v in inf["fixed"].items())
    adaptive = "; ".join(f"tol {t}: {fmt(v[key])} at {v['evaluations']:.2f} evaluations"
                         for t, v in inf["adaptive"].items())
    return ["", f"ELM at inference (the final block). Evaluations per token -> score: {fixed}. Adaptive "
            f"stopping per token (relative residual, at most M): {adaptive}."]


def _general_bench(model: str, data: Path, s: dict, tasks_dir: Path, device: str) -> dict:
    """General retention: the instruct model, C4 windows to train on, validation perplexity at the
    budgets, WikiText-2 and lm-eval's commonsense tasks at the end."""
    from elmkit.data.calibration import CalibConfig
    from elmkit.eval.harness import run_lm_eval
    from elmkit.eval.perplexity import perplexity, read_wikitext2
    from elmkit.models import load_model, load_tokenizer

    tok = load_tokenizer(model)
    t = texts(data)
    val = "\n\n".join(t["val"])
    wiki = read_wikitext2(data / "wikitext2" / "wiki.test.raw")
    calib = CalibConfig(samples=64 if not SMOKE["on"] else 4, seq_len=256 if not SMOKE["on"] else 32,
                        seed=s.get("seed", 0)).build(tok, t["train"])

    def score(m) -> dict:
        return {"ppl": round(perplexity(m, tok, val, window=s["val_window"], max_windows=s["val_windows"],
                                        progress=False)["ppl"], 4)}

    def final(m) -> dict:
        r = perplexity(m, tok, wiki, window=s["val_window"], max_windows=None if not SMOKE["on"] else 2,
                       progress=False)
        lm = run_lm_eval(m, tok, tasks=s["tasks"], data_dir=tasks_dir, limit=s["tasks_limit"],
                         batch_size=TASK_BATCH, device=device)
        tasks = {t: {k: round(v, 4) if isinstance(v, float) else v for k, v in lm["tasks"][t].items()}
                 for t in s["tasks"]}
        return {"wikitext2": {"ppl": round(r["ppl"], 4), "tokens": r["tokens"]},
                "lm_eval": lm["lm_eval_version"], "tasks": tasks}

    return {"master": load_model(model, dtype="float32", device="cpu"), "tok": tok, "train": t["train"],
            "calib": calib, "score": score, "final": final}


def _task_bench(run: Path, s: dict, device: str) -> dict:
    """Task retention: the teacher, the testbed's training problems, greedy exact match on the
    held-out test problems at the budgets (the curve's last point is the final score)."""
    from elmkit.data.calibration import Calibration
    from elmkit.models import load_model, load_tokenizer
    from elmkit.testbed.accuracy import test_accuracy

    teacher = run / "teacher" / "model"
    tok = load_tokenizer(teacher)
    d = task_data()

    def score(m) -> dict:
        return {"acc": round(test_accuracy(m, tok, d["test"], GEN_BATCH), 4)}

    # calibration: 64 training problems, prompt and answer, as the pruning methods see task text
    return {"master": load_model(teacher, dtype="float32", device="cpu"), "tok": tok, "train": d["train"],
            "calib": Calibration.from_examples(tok, d["train"][:64], s["seq"]), "score": score,
            "final": lambda m: {}}


def task_data() -> dict[str, list]:
    """The base testbed's problems: train (the teacher's and every method's training data),
    validation (the teacher's early stopping) and test (every reported accuracy). The splits are
    disjoint by construction (by a hash of the question)."""
    from elmkit.testbed.pretrain import PRESETS
    from elmkit.testbed.problems import make_split

    cfg = PRESETS[TASK["preset"]]
    n = task_sizes()
    return {"train": make_split("train", n["train"], cfg.problems, cfg.seed),
            "val": make_split("validation", n["val"], cfg.problems, cfg.seed),
            "test": make_split("test", n["test"], cfg.problems, cfg.seed)}


def task_sizes() -> dict:
    return {**TASK, **({"train": 64, "val": 6, "test": 6} if SMOKE["on"] else {})}


def teacher_settings() -> dict:
    small = {"batch": 4, "eval_every": 2, "patience": 1, "max_steps": 6} if SMOKE["on"] else {}
    return {**TEACHER, **small, "task": task_sizes(), "smoke": SMOKE["on"]}


def stage_teacher(model: str, out: Path, run: Path, budget: Budget) -> bool:
    """The task teacher: the instruct model LoRA-tuned on the training problems, scored on the
    validation problems every ``eval_every`` steps and stopped when ``patience`` scores in a row do
    not beat the best, whose weights it keeps. Saved: the curve and test accuracy under
    --out/teacher, the merged model and its adapter under --run/teacher (the adapter is what a later
    GPU run needs: bring it back with the results)."""
    from elmkit.models import load_model, load_tokenizer
    from elmkit.testbed.accuracy import test_accuracy
    from elmkit.train.lora import FinetuneConfig, finetune

    t = teacher_settings()
    folder = out / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "teacher.json"
    if meta.is_file() and read_json(meta)["settings"] == t:
        return True
    if not budget.left(300.0):
        print("stopped at the time budget before the teacher; run again to continue")
        return False
    print("== teacher", flush=True)
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = run / "teacher"
    shutil.rmtree(work, ignore_errors=True)
    tok, d = load_tokenizer(model), task_data()
    base = load_model(model, dtype="float32", device=device)
    original = {"val_acc": round(test_accuracy(base, tok, d["val"], GEN_BATCH), 4),
                "test_acc": round(test_accuracy(base, tok, d["test"], GEN_BATCH), 4)}
    del base
    curve, best = [{"step": 0, "sequences": 0, "val_acc": original["val_acc"]}], {"acc": -1.0, "step": 0}

    def on_model(step: int, m) -> bool | None:
        if step % t["eval_every"] and step < t["max_steps"]:
            return None
        acc = test_accuracy(m, tok, d["val"], GEN_BATCH)
        curve.append({"step": step, "sequences": step * t["batch"], "val_acc": round(acc, 4)})
        print(f"teacher step {step}: validation accuracy {acc:.4f}", flush=True)
        lora = {n: p for n, p in m.named_parameters() if p.requires_grad}
        if acc > best["acc"]:
            best.update(acc=acc, step=step, state={n: p.detach().clone() for n, p in lora.items()})
        if step - best["step"] < t["patience"] * t["eval_every"] and step < t["max_steps"]:
            return None
        with torch.no_grad():  # stop with the best weights back in place: they are what is saved
            for n, p in lora.items():
                p.copy_(best["state"][n])
        return True

    cfg = FinetuneConfig(r=t["r"], alpha=2 * t["r"], lr=t["lr"], min_lr=t["lr"], warmup_steps=t["warmup"],
                         batch_size=t["batch"], max_steps=t["max_steps"], save_every=10**9, device=device,
                         seed=0)
    metrics = finetune(model, d["train"], work, cfg, progress=False, on_model=on_model)
    sha = _sha256(work / "adapter" / "adapter_model.safetensors")
    atomic_write_text(work / "model" / "adapter.sha256", sha)
    merged = load_model(work / "model", dtype="float32", device=device)
    test_acc = test_accuracy(merged, tok, d["test"], GEN_BATCH)
    unit = {"settings": t, "model": model, "original": original, "curve": curve, "best_step": best["step"],
            "val_acc": round(best["acc"], 4), "test_acc": round(test_acc, 4),
            "steps": metrics["steps"], "adapter_sha256": sha, "seconds": round(time.time() - t0, 1),
            "device": _device_name()}
    write_json(meta, unit)
    report_teacher(out)
    print(f"teacher: best validation {unit['val_acc']:.4f} at step {unit['best_step']}, test "
          f"{unit['test_acc']:.4f} ({unit['seconds']:.0f} s)", flush=True)
    return True


def _teacher_ready(model: str, out: Path, run: Path) -> str:
    """The teacher merged under --run/teacher/model (rebuilt from its adapter when a GPU run brought
    only that); returns the adapter's sha256, which every task unit records."""
    meta = out / "teacher" / "teacher.json"
    if not meta.is_file():
        raise SystemExit("task retention needs the teacher: run --stages teacher first")
    sha = read_json(meta)["adapter_sha256"]
    merged, adapter = run / "teacher" / "model", run / "teacher" / "adapter"
    if (merged / "adapter.sha256").is_file() and (merged / "adapter.sha256").read_text() == sha:
        return sha
    if not (adapter / "adapter_model.safetensors").is_file():
        raise SystemExit(f"the teacher of {meta} (adapter sha256 {sha[:12]}...) is not under {adapter}: "
                         "put the adapter its GPU run brought back there, or delete that file to train "
                         "a new teacher (every task unit is then measured again)")
    if _sha256(adapter / "adapter_model.safetensors") != sha:
        raise SystemExit(f"{adapter} is not the adapter {meta} was measured with (sha256 differs)")
    from peft import PeftModel

    from elmkit.compare import save_model
    from elmkit.models import load_model, load_tokenizer

    tok = load_tokenizer(model)
    teacher = PeftModel.from_pretrained(load_model(model, dtype="float32", device="cpu"), str(adapter))
    save_model(teacher.merge_and_unload(), tok, merged)
    atomic_write_text(merged / "adapter.sha256", sha)
    return sha


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_tasks(data: Path) -> Path:
    """The commonsense folder, checked before any training: the files, and lm-eval importable."""
    from elmkit.eval.harness import task_config

    folder = data / "commonsense"
    try:
        for t in TASKS:
            task_config(t, folder)
    except FileNotFoundError as e:  # names the file and its format
        raise SystemExit(f"{e} (pass --data with the commonsense folder)") from None
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the screen scores {', '.join(TASKS)} with lm-eval, which does not import "
                         f"here ({e}); install elmkit's locked set (make setup)") from None
    return folder


def task_file(folder: Path, task: str) -> Path:
    """The MosaicML file of a TASKS entry in the commonsense folder (elmkit_<stem> -> <stem>.jsonl)."""
    return folder / f"{task.removeprefix('elmkit_')}.jsonl"


def task_records(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in task_file(folder, task).read_text().splitlines() if line.strip()]


def task_floors(folder: Path, out: Path) -> dict:
    """What no skill scores on each task file of ``folder``, saved as out/floors.json: a uniform
    random choice, and the best constant answer (always the same option position; on BoolQ, whose
    options are always no / yes, always the more frequent answer). A row at its floor has lost the
    task, whatever the other columns say."""
    floors = {}
    for t in TASKS:
        rows = task_records(folder, t)
        by_position = collections.Counter(r["gold"] for r in rows)
        floors[t] = {"n": len(rows), "random": statistics.fmean(1 / len(r["choices"]) for r in rows),
                     "constant": max(by_position.values()) / len(rows)}
    write_json(out / "floors.json", floors)
    return floors


def task_logits_bytes(model: str, tasks_dir: Path, batch: int = TASK_BATCH) -> int:
    """The bytes lm-eval's logits take for a batch of the longest request of TASKS: the units'
    fp32 logits and their fp32 log-softmax, 8 bytes x (batch, T, V). T: the query, its answer cue,
    a space and its longest choice, in the model's tokens (lm-eval pads a batch to its longest);
    V: the tokenizer's vocabulary (the head's rows, bar padding)."""
    from elmkit.eval.harness import ANSWER_CUE
    from elmkit.models import load_tokenizer

    tok = load_tokenizer(model)
    longest = 0
    for t in TASKS:
        cue = ANSWER_CUE.get(t.removeprefix("elmkit_"), "")
        for r in task_records(tasks_dir, t):
            text = r["query"].strip() + cue + " " + max(r["choices"], key=len)
            longest = max(longest, len(tok(text)["input_ids"]))
    return batch * longest * len(tok) * 8


def check_task_share(share: float, need: int, jobs: int) -> None:
    """Refuse a --jobs whose memory share per unit cannot hold lm-eval's logits twice over (the other
    half is the model's and the activations'): the units would train and then fail at the end."""
    if need > share / 2:
        fits = max(1, int(jobs * share / (2 * need)))
        raise SystemExit(f"--jobs {jobs} leaves each unit {share / 2**30:.1f} GiB of the GPU; lm-eval's "
                         f"batch of {TASK_BATCH} needs {need / 2**30:.1f} GiB for its logits alone, and a "
                         f"unit keeps half its share for the rest: use --jobs {fits} or fewer")


def _screen_jobs(model: str, data: Path, out: Path, run: Path, todo: list[str], jobs: int,
                 budget: Budget) -> bool:
    """The screen's units as up to ``jobs`` processes of this script, one method each, sharing the
    device. A LoRA step on a 135M model is bound by kernel launches, not by the GPU, so units side by
    side finish several times sooner than in a row; each unit's numbers are what it would give alone
    (its own seed and data order), only its wall time grows. Each process writes its own unit file;
    the reports are rewritten at the end. A unit is started only while its expected time fits the
    budget; logs go to RUN/<screen>/unit_<method>.log (unit_<method>_s<seed>.log for curves). Each
    process may hold 0.95 / jobs of the GPU's memory (``--device-share``), so that the cache one unit
    keeps cannot starve another."""
    import os
    import subprocess

    folder, logs = out / screen_name(), run / screen_name()
    if not is_task() and torch.cuda.is_available():
        check_task_share(0.95 / jobs * torch.cuda.get_device_properties(0).total_memory,
                         task_logits_bytes(model, data / "commonsense"), jobs)
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 2) // jobs))
    # expandable segments: memory a unit frees goes back to the device sooner (less fragmentation)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    base = [sys.executable, str(Path(__file__).resolve()), "--model", model, "--data", str(data),
            "--out", str(out), "--run", str(run), "--budget-s", "1e9",
            "--stages", {p: st for st, p in STAGE_PROTOCOL.items()}[SCREEN["protocol"]],
            "--seed", str(SCREEN["seed"]),
            "--span", str(SCREEN["span"]), "--device-share", f"{0.95 / jobs:.4f}", "--unit",
            *(["--smoke"] if SMOKE["on"] else [])]
    queue, running, stopped, failed, expected = list(todo), {}, False, [], {}
    ratios = []  # wall / saved time of the units finished in this run: the side-by-side slowdown
    while queue or running:
        while queue and len(running) < jobs and not stopped:
            need = expected_seconds(folder, unit_path(folder, queue[0])) * slowdown(ratios)
            if not budget.left(need):
                print(f"stopped at the time budget before {queue[0]} (expected {need:.0f} s side by "
                      f"side); run again to continue")
                stopped = True
                break
            name = queue.pop(0)
            own = unit_path(folder, name)  # a ratio means something only against the unit's own time
            old = read_json(own) if own.is_file() else {}
            saved = old.get("seconds") if "error" not in old else None
            expected[name] = (saved, old.get("device"), time.time())
            log = open(logs / f"{unit_path(logs, name).stem}.log", "w")  # noqa: SIM115 (closed when the process ends)
            # a datasets cache of its own: lm-eval's task files are prepared once per process
            cache = {"HF_DATASETS_CACHE": str(run / "hf_datasets" / unit_path(logs, name).stem)}
            running[name] = (subprocess.Popen([*base, "--methods", name], stdout=log,
                                              stderr=subprocess.STDOUT, env={**env, **cache}), log)
            print(f"== screen {name} started ({len(running)} running)", flush=True)
        if stopped and not running:
            break
        time.sleep(1.0 if SMOKE["on"] else 5.0)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            saved, device, t0 = expected[name]
            new = read_json(unit_path(folder, name)) if unit_path(folder, name).is_file() else {}
            # on the same device, both complete: the ratio is the side-by-side slowdown, not a change
            # of GPU or a unit that failed early
            if not proc.returncode and saved and "error" not in new and new.get("device") == device:
                ratios.append((time.time() - t0) / saved)
            tail = (logs / f"{unit_path(logs, name).stem}.log").read_text().strip().splitlines()[-1:] or [""]
            print(f"== screen {name} exited {proc.returncode}: {tail[0]}", flush=True)
            if proc.returncode:
                failed.append(name)
        if stopped:
            queue.clear()
    report_screen(out)
    if failed:
        raise SystemExit(f"the units of {', '.join(failed)} ended without a result; see "
                         f"{logs}/unit_<method>.log")
    return not stopped


def elm_settings(recipe: dict) -> dict:
    """The recipe keys an ELM unit's numbers depend on: loss and lr, and the ablation's changes only
    where taken (a unit saved before the ablation existed ran without them, and stays current)."""
    own = {k: recipe[k] for k in ("loss", "lr")}
    if recipe.get("kept_lora_r"):
        own["kept_lora_r"] = recipe["kept_lora_r"]
    if recipe.get("start", "cosine") != "cosine":
        own["start"] = recipe["start"]
    return own


def unit_settings(name: str, s: dict, recipe: dict) -> dict:
    """What a screen unit's numbers depend on: the shared settings and the method's own."""
    own = {"original": {}, "dense": {"heal_lr": s["heal_lr"]},
           "elm": {"recipe": elm_settings(recipe)},
           "reverse": {"partial": s["partial"]}, "recurrence": {"recurrence": s["recurrence"]},
           "streamline": {}}.get(name, {"heal_lr": s["heal_lr"]})
    if name == "darwinlm" or name in ("ziplm", "uniform"):
        own["darwinlm"] = json.loads(json.dumps(dataclasses.asdict(DARWINLM)))
    # the untrained model draws nothing at random: seeding the unit cannot change its numbers
    drop = ("heal_lr", "partial", "recurrence", *(("seeded_units",) if name == "original" else ()))
    shared = {k: v for k, v in s.items() if k not in drop}
    return {**shared, **own}


def _unit_current(folder: Path, name: str, want: dict) -> bool:
    """Whether ``name``'s saved unit was measured with ``want`` (a unit saved before units held
    their settings was not: it is measured again)."""
    path = unit_path(folder, name)
    if not path.is_file():
        return False
    if read_json(path).get("settings") != want:
        print(f"{path.name} was measured with other settings; measuring it again")
        return False
    return True


def _reuse_span_free(out: Path, folder: Path, methods: list[str], s: dict, recipe: dict) -> list[str]:
    """At an M other than SPAN (the caller checks): the SPAN_FREE units of ``methods`` that the
    screen of the same protocol (and seed) at M = SPAN measured with the same settings but M,
    copied here with ``reused_from`` instead of measured again. Returns the methods copied."""
    home, copied = out / screen_name(span=SPAN), []
    for name in (m for m in methods if m in SPAN_FREE):
        want, src = unit_settings(name, s, recipe), unit_path(home, name)
        path = unit_path(folder, name)
        if (path.is_file() and read_json(path).get("settings") == want) or not src.is_file():
            continue
        unit = read_json(src)
        if "error" in unit or _but_span(unit.get("settings") or {}) != _but_span(want):
            continue
        # no GPU time spent here: a copy's seconds would inflate expected_seconds and the projection
        write_json(path, {**unit, "settings": want, "reused_from": home.name, "seconds": 0.0,
                          "measured_s": unit.get("seconds")})
        print(f"{name}: the unit of {home.name} (M = {SPAN}) stands for M = {s['span']}: "
              "it compresses nothing")
        copied.append(name)
    return copied


def _unit_s(u: dict) -> str:
    """A report's s cell: the unit's wall time, or where a copy came from."""
    return f"copy of {u['reused_from']}" if "reused_from" in u else f"{u['seconds']:.0f}"


def _but_span(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "span"}


def _screen_elm(dense, tok, calib, train, s, recipe, work, score):
    """The ELM block placed as the recipe says (cosine criterion, or a GPPO search on the training
    data), trained on the whole budget with the recipe (kept-layer LoRA where it won)."""
    from elmkit.methods import elm as elm_method
    from elmkit.methods import gppo
    from elmkit.train.elm import ElmTrainConfig, SpanTeacher, train_elm

    if recipe.get("start") == "gppo" and recipe.get("gppo_start") is not None and s["span"] == SPAN \
            and not is_task() and s.get("seed", 0) == 0:  # the ablation's own search: same text and seed
        start = recipe["gppo_start"]
    elif recipe.get("start") == "gppo":
        cfg = gppo_config(s["span"], s["seq"], s.get("seed", 0))
        start = gppo.plan(copy.deepcopy(dense), tok, train, cfg, progress=False).start
    else:
        start, _ = elm_method.cosine_start(dense, calib, s["span"])
    kept = recipe.get("kept_lora_r", 0)
    plan = elm_method.plan(dense, start=start, span=s["span"], max_iter=s["span"])
    teacher = SpanTeacher(dense, plan.start, plan.span, own_lower=kept > 0)
    elm = elm_method.apply_(dense, plan)
    cfg = ElmTrainConfig(steps=s["budgets"][-1] // s["batch"], batch_size=s["batch"], max_len=s["seq"],
                         lr=recipe["lr"], min_lr=recipe["lr"], lambda_ce=0.0, distill_loss=recipe["loss"],
                         kept_lora_r=kept, save_every=10**9, seed=s.get("seed", 0))
    train_elm(elm, teacher, tok, train, work, cfg, progress=False, on_step=lambda step, _: score(step, elm))
    return elm


def _screen_recurrence(dense, tok, train, s, k, work, score):
    """Retrofitted recurrence at ELM's layer budget: k layers deleted where ELM's span lies, the
    next RECURRENCE["core"] layers iterated, trained on the whole budget by the authors' objective."""
    from elmkit.methods import recurrence
    from elmkit.train.recurrence import RecurrenceTrainConfig, train_recurrent

    r = RECURRENCE
    core = 1 if SMOKE["on"] else r["core"]
    cfg = recurrence.for_target(recurrence.RecurrenceConfig(core_len=core, mean_recurrence=r["r"],
                                                            backprop_depth=r["r"], seed=s.get("seed", 0)),
                               dense, n_remove=k)
    rec = recurrence.apply_(dense, recurrence.plan(dense, cfg))
    tcfg = RecurrenceTrainConfig(steps=s["budgets"][-1] // s["batch"], batch_size=s["batch"],
                                 max_len=s["seq"], lr=r["lr"], min_lr=r["lr"], warmup=r["warmup"],
                                 decay_frac=0.0, save_every=10**9, seed=s.get("seed", 0))
    train_recurrent(rec, tok, train, work, tcfg, progress=False, on_step=lambda step, _: score(step, rec))
    return rec


def _heal(tok, train, s, trainer, steps, work, score, device):
    """LoRA healing (or Lu et al.'s partial-layer fine-tuning) of the model saved in ``work/model``
    for ``steps``, scored at the budgets."""
    from elmkit.models import load_model
    from elmkit.train.lora import FinetuneConfig, finetune

    if trainer == "partial":
        cfg = FinetuneConfig(mode="partial", partial_layers=PARTIAL["layers"], tied_head="train",
                             lr=PARTIAL["lr"], min_lr=PARTIAL["lr"], warmup_steps=PARTIAL["warmup"])
    else:
        cfg = FinetuneConfig(lr=HEAL_LR, min_lr=HEAL_LR, warmup_steps=20)
    cfg = dataclasses.replace(cfg, batch_size=s["batch"], max_len=s["seq"], max_steps=steps,
                              format="text" if isinstance(train[0], str) else "auto", save_every=10**9,
                              device=device, seed=s.get("seed", 0))
    finetune(work / "model", train, work / "heal", cfg, progress=False, on_model=score)
    return load_model(work / "heal" / "model", dtype="float32", device=device)


def _checkpoint_evals(elm, curve: list, s: dict, val_ppl):
    """An ``on_step`` callback: the validation perplexity at each step of ``s["eval_at"]``."""
    def on_step(step: int, _loss: float) -> None:
        if step in s["eval_at"]:
            curve.append({"step": step, "sequences": step * s["batch"], **val_ppl(elm)})
    return on_step


def expected_seconds(folder: Path, own: Path | None = None) -> float:
    """How long a unit of ``folder`` should take, for the time budget: ``own``'s saved time when it
    was measured before, else the longest saved unit's, else 300 s."""
    if own is not None and own.is_file() and read_json(own).get("seconds"):
        return read_json(own)["seconds"]
    return max([read_json(p)["seconds"] for p in folder.glob("unit_*.json")] or [300.0])


def slowdown(ratios: list[float]) -> float:
    """How much longer a unit takes beside the others than it took before: the median of wall / saved
    time over the units finished so far in this run that had a saved time (1 before any has, and
    never below 1). A unit starts only while its expected time times this ends inside the budget:
    a unit cut off by the end of a GPU run loses all its work."""
    return max(1.0, statistics.median(ratios)) if ratios else 1.0


def unit_name(loss: str, lr: float) -> str:
    return f"unit_{loss}_lr{lr:g}.json"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def report(out: Path) -> None:
    """recipe.md / recipe.json / recipe.png from the saved units."""
    folder = out / "recipe"
    ref = read_json(folder / "reference.json")
    units = sorted(grid_units(folder), key=lambda u: (u["loss"], -u["lr"]))
    if not units:
        return
    abl, chosen = ablation_units(folder), elm_recipe(out)
    write_json(folder / "recipe.json", {"reference": ref, "units": units, "ablation": abl, "chosen": chosen})
    _plot(folder / "recipe.png", ref, units)
    seqs = [c["sequences"] for c in units[0]["curve"]]
    best = min(units, key=recipe_score)
    lines = [
        "## ELM recipe on the real model: distillation loss x learning rate (validation only)",
        "",
        f"`{model_label(ref['model'])}`: the block replaces layers {ref['start']}-"
        f"{ref['start'] + ref['settings']['span'] - 1} ({ref['settings']['span']} of {ref['layers']}, "
        "cosine criterion); SJFB on C4 (constant lr after 20 warm-up steps), "
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
    lines += ["", f"Chosen (geometric mean of the last two checkpoints, {seqs[-2]:,} and {seqs[-1]:,} "
              f"sequences, so that a spike between checkpoints does not win on one point): "
              f"{best['loss']}, lr {best['lr']:g} ({recipe_score(best):.2f}). Columns xk: the final block "
              "at k evaluations per token.", *_ablation_lines(abl, chosen, best, ref, seqs),
              "", "![recipe](recipe.png)", ""]
    atomic_write_text(folder / "recipe.md", "\n".join(lines))


def _ablation_lines(abl: dict[str, dict], chosen: dict, best: dict, ref: dict, seqs: list[int]) -> list[str]:
    """The recipe report's ablation: the grid's winner changed one way at a time (``abl``), and what
    the screen's ELM takes from it (``chosen``, elm_recipe)."""
    if not abl:
        return []
    rows = [("winner: cosine start, block only", ref["start"], best)]
    for name, u in abl.items():
        same = " (= the cosine start: the winner's run)" if "same_as" in u else ""
        what = {"kept-lora": f"+ kept-layer LoRA r {u['change'].get('kept_lora_r')}",
                "gppo": f"start by GPPO{same}"}
        rows.append((what.get(name, name), u["start"], u))
    lines = ["", f"Ablation on the winner ({best['loss']}, lr {best['lr']:g}), one change at a time, same "
             "budget and validation windows, one seed:", "",
             "| variant | start | " + " | ".join(f"{n:,} seq" for n in seqs) + " | "
             + " | ".join(f"x{k}" for k in best["evaluations"]) + " | score | s |",
             "|---|---|" + "---|" * (len(seqs) + len(best["evaluations"]) + 2)]
    for what, start, u in rows:
        lines.append(f"| {what} | {start} | " + " | ".join(f"{c['ppl']:.2f}" for c in u["curve"]) + " | "
                     + " | ".join(f"{v:.2f}" for v in u["evaluations"].values())
                     + f" | {recipe_score(u):.2f} | {u['seconds']:.0f} |")
    take = (f"kept-layer LoRA r {chosen['kept_lora_r']}" if chosen["kept_lora_r"] else "the block only")
    label = {"kept-lora": "kept-layer LoRA", "gppo": "the GPPO start"}
    todo = [label.get(n, n) for n in ABLATION if n not in abl]
    lines += ["", f"The screen's ELM takes {take}, {chosen['start']} start: of the changes measured, the one "
              "whose score is lowest, if lower than the winner's; one change only, as the two were not "
              "measured together."
              + (f" Not measured yet: {', '.join(todo)}; the choice may change when it is." if todo else "")]
    return lines


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


def _saved_units(out: Path) -> tuple[str, Path, list[dict]]:
    """The current screen's name, folder and saved units in method order; <name>.json rewritten."""
    name = screen_name()
    folder = out / name
    units = [read_json(p) for p in folder.glob("unit_*.json")]
    order = {m: i for i, m in enumerate(screen_methods())}
    units.sort(key=lambda u: (order.get(u["method"], len(order)), u.get("settings", {}).get("seed", 0)))
    if units:
        write_json(folder / f"{name}.json", {"settings": screen_settings(), "units": units})
    return name, folder, units


def report_screen(out: Path) -> None:
    """<screen>.md / .json / .png from the saved units of the current --span (screen_name)."""
    if SCREEN["protocol"] == "task":
        return report_task(out)
    if is_curve():
        return report_curves(out)
    name, folder, units = _saved_units(out)
    if not units:
        return
    ok = [u for u in units if "error" not in u]
    if ok:
        _plot_screen(folder / f"{name}.png", ok)
    budgets, span = screen_settings()["budgets"], screen_settings()["span"]
    ref = next((u for u in ok if u["method"] == "dense"), None)
    n_layers = ref["layers"] if ref else max(u["layers"] for u in ok) if ok else 0
    lines = [
        f"## General retention at one budget: every method, M = {span} of {n_layers} (screening)",
        "",
        f"Depth methods keep {n_layers - span + 1} of {n_layers} layers (ELM: a block replaces {span}, "
        f"evaluated {span} times; deleting and merging methods remove {span - 1}; retrofitted "
        f"recurrence deletes {span - 1} and iterates a core of {RECURRENCE['core']} layers "
        f"{RECURRENCE['r']} times); width methods remove the same fraction of the non-embedding "
        "parameters. After compression each method spends the same budget, "
        f"{budgets[-1]:,} training windows of up to {SEQ} tokens of C4, {BATCH} per step, as its "
        "authors do: ELM's block (distillation, the recipe stage's winner, constant lr), "
        "LLM-Streamline's replacement layer (its own cosine schedule), retrofitted recurrence (CE, "
        f"constant lr {RECURRENCE['lr']:g}), partial-layer fine-tuning for reverse-order pruning (last "
        f"{PARTIAL['layers']} layers, final norm and the head, which SmolLM2 ties to the input "
        f"embedding, so that trains too; lr {PARTIAL['lr']:g}), LoRA healing (r 16, constant lr "
        f"{HEAL_LR:g}) for the rest; dense + LoRA is the ceiling. DarwinLM's search fine-tunes its "
        "candidates on its own (12 generations x 8 offspring, RESULTS.md's testbed budget), outside "
        "the budget. Validation: perplexity on held-out C4 "
        f"({VAL_WINDOWS} windows of {VAL_WINDOW} tokens) at each budget of the same run; the ELM "
        "recipe was chosen on these same windows, so WikiText-2 (the whole test set in windows of "
        f"{VAL_WINDOW}) is the column no method was selected on. {_tasks_note(ok, out)}`original` is "
        "the model as shipped, untrained (its one validation point stands in each budget column). "
        "s: wall time of the unit (compression, training, evaluation); units may share the GPU "
        "(--jobs), so it is not a speed comparison. One seed.",
        "",
        "| method | layers | params | removed non-emb. | " + " | ".join(f"C4 @ {b:,}" for b in budgets)
        + " | WikiText-2 | " + " | ".join(TASK_LABELS[t] for t in TASKS) + " | mean acc | s |",
        "|---|---|---|---|" + "---|" * (len(budgets) + len(TASKS) + 3),
    ]
    for u in units:
        if "error" in u:
            lines.append(f"| {u['method']} | failed: {u['error'][:120]} |"
                         + " |" * (len(budgets) + len(TASKS) + 6))
            continue
        pts = {c["sequences"]: c["ppl"] for c in u["curve"]}
        if u["method"] == "original":  # untrained: its one validation point stands in every column
            pts = {b: pts[0] for b in budgets}
        acc = [u["tasks"][t]["acc"] for t in TASKS] if "tasks" in u else []
        task_cells = ([f"{100 * a:.1f}" for a in acc] + [f"{100 * sum(acc) / len(acc):.1f}"] if acc
                      else ["–"] * (len(TASKS) + 1))
        lines.append(f"| {u['method']} | {u['layers']} | {u['params']:.3f} | "
                     f"{u['removed_non_embedding']:.3f} | "
                     + " | ".join(f"{pts[b]:.2f}" if b in pts else "" for b in budgets)
                     + f" | {u['wikitext2']['ppl']:.2f} | " + " | ".join(task_cells)
                     + f" | {_unit_s(u)} |")
    stale = _stale_units(out, units)
    if stale:
        lines += ["", "Measured under earlier settings, so the next run measures them again: "
                  + "; ".join(f"{m} ({', '.join(keys)})" for m, keys in stale.items()) + "."]
    lines += _inference_lines(ok, "ppl", lambda v: f"{v:.2f}")
    untrained = out / "recipe" / "reference.json"
    if untrained.is_file():
        r = read_json(untrained)
        lines += ["", f"Without training (the recipe stage's reference, same validation windows): dense "
                  f"{r['dense']['ppl']:.2f}, ShortGPT deleting {len(r['shortgpt']['removed'])} layers "
                  f"{r['shortgpt']['ppl']:.2f}."]
    if ref is not None:
        lines += ["", f"Dense + LoRA reaches {ref['curve'][-1]['ppl']:.2f} on C4 validation and "
                  f"{ref['wikitext2']['ppl']:.2f} on WikiText-2 at {budgets[-1]:,} sequences."]
    lines += ["", f"![{name}]({name}.png)", ""]
    atomic_write_text(folder / f"{name}.md", "\n".join(lines))


def _stale_units(out: Path, units: list[dict]) -> dict[str, list[str]]:
    """The general screen's units whose saved settings differ from what a run would measure them
    with now, each with the settings that differ (all of them for a unit saved before units held
    their settings)."""
    s, recipe = screen_settings(), elm_recipe(out)
    stale = {}
    for u in units:
        want, have = unit_settings(u["method"], s, recipe), u.get("settings")
        if have != want:
            stale[u["method"]] = (sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
                                  if have is not None else ["all"])
    return stale


def _tasks_note(units: list[dict], out: Path) -> str:
    """How the task columns were measured, from a unit that has them, and the tasks' floors."""
    u = next((u for u in units if "tasks" in u), None)
    if u is None:
        return ""
    sizes = " / ".join(f"{u['tasks'][t]['n']:,}" for t in TASKS)
    floors = read_json(out / "floors.json") if (out / "floors.json").is_file() else {}
    floor = ""
    if all(t in floors for t in TASKS):
        floor = (" No skill scores " + ", ".join(
            f"{TASK_LABELS[t]} {100 * floors[t]['random']:.1f} at random / {100 * floors[t]['constant']:.1f} "
            "with one constant answer" for t in TASKS)
            + " (floors.json): a score near these has lost the task, whatever the others say.")
    return (f"{', '.join(TASK_LABELS[t] for t in TASKS)}: lm-eval {u['lm_eval']} zero-shot accuracy "
            f"(acc, %) on {sizes} questions (the full test sets, from ../shared/data/commonsense; "
            "elmkit's task files); mean acc is their plain mean; – where a unit was measured before "
            f"these columns existed.{floor} ")


def _plot_screen(png: Path, units: list[dict], key: str = "ppl",
                 ylabel: str = "validation perplexity (C4)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for u in units:
        if u["method"] == "original":  # no training: a level, not a curve
            ax.axhline(u["curve"][0][key], color="grey", ls="--", lw=1, label="original (untrained)")
            continue
        xs, ys = [c["sequences"] for c in u["curve"]], [c[key] for c in u["curve"]]
        style = {"ls": ":", "color": "k"} if u["method"] == "dense" else {}
        ax.plot(xs, ys, marker="o", label=u["method"], **style)
    ax.set(xscale="log", yscale="log" if key == "ppl" else "linear",
           xlabel="training sequences after compression", ylabel=ylabel)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    save_figure(fig, png)


def report_task(out: Path) -> None:
    """task.md / .json / .png (or task_m<M>.*): task retention from the saved units."""
    name, folder, units = _saved_units(out)
    if not units:
        return
    ok = [u for u in units if "error" not in u]
    s = screen_settings()
    if ok:
        _plot_screen(folder / f"{name}.png", ok, "acc", "test accuracy (greedy exact match)")
    if not (out / "teacher" / "teacher.json").is_file():
        print(f"{folder}: no teacher.json beside these units (deleted for a new teacher?); not reported")
        return
    teacher = read_json(out / "teacher" / "teacher.json")
    budgets, span, n = s["budgets"], s["span"], task_sizes()
    ceiling = next((u for u in ok if u["method"] == "dense"), None)
    ref = teacher["test_acc"]
    lines = [
        f"## Task retention: every method, M = {span} (screening)",
        "",
        f"The paper's protocol. Teacher: the model LoRA-tuned on {n['train']:,} problems of the "
        f"`{n['preset']}` testbed until validation accuracy stopped improving (its curve: the teacher "
        f"section), {100 * ref:.1f}% on {n['test']} held-out test problems. Every method compresses the "
        "teacher as in the general screen and trains on the same problems, as its authors do, with the "
        "same budget (16 problems per step); accuracy is greedy exact match of the final answer on the "
        f"same {n['test']} test problems, at each budget of one run. Retention: accuracy / the teacher's. "
        "dense is the teacher trained on with LoRA for the same budget (the ceiling). One seed.",
        "",
        "| method | layers | params | " + " | ".join(f"acc @ {b:,}" for b in budgets)
        + f" | retention @ {budgets[-1]:,} | s |",
        "|---|---|---|" + "---|" * (len(budgets) + 2),
    ]
    for u in units:
        if "error" in u:
            lines.append(f"| {u['method']} | failed: {u['error'][:120]} |" + " |" * (len(budgets) + 3))
            continue
        pts = {c["sequences"]: c["acc"] for c in u["curve"]}
        if u["method"] == "original":
            pts = {b: pts[0] for b in budgets}
        last = pts.get(budgets[-1])
        lines.append(f"| {u['method']} | {u['layers']} | {u['params']:.3f} | "
                     + " | ".join(f"{100 * pts[b]:.1f}" if b in pts else "" for b in budgets)
                     + f" | {'' if last is None or not ref else f'{100 * last / ref:.1f}%'} | "
                     f"{_unit_s(u)} |")
    if ceiling is not None:
        lines += ["", f"Dense + LoRA for the same budget: {100 * ceiling['curve'][-1]['acc']:.1f}%."]
    lines += _inference_lines(ok, "acc", lambda v: f"{100 * v:.1f}%")
    lines += ["", f"![{name}]({name}.png)", ""]
    atomic_write_text(folder / f"{name}.md", "\n".join(lines))


def _stat(xs: list[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    """mean ± sample std of ``xs`` (the value alone for one, empty for none)."""
    if not xs:
        return ""
    if len(xs) == 1:
        return f"{scale * xs[0]:{fmt}}"
    return f"{scale * statistics.mean(xs):{fmt}} ± {scale * statistics.stdev(xs):{fmt}}"


def _top_score(u: dict, task: bool) -> float | None:
    """A curve unit's score at its top budget: test accuracy (task) or the mean lm-eval accuracy
    (general; None where the unit has no task scores)."""
    if task:
        return u["curve"][-1]["acc"]
    return statistics.mean(v["acc"] for v in u["tasks"].values()) if u.get("tasks") else None


def retention(units: list[dict], task: bool) -> dict[str, list[float]]:
    """Per method, the retention of each seed at the top budget: its score / dense + LoRA's score of
    the same seed (the ceiling, same budget). Seeds without a dense unit are left out."""
    top = {(u["method"], u["settings"]["seed"]): _top_score(u, task) for u in units if "error" not in u}
    out: dict[str, list[float]] = {}
    for (method, seed), score in sorted(top.items(), key=lambda kv: kv[0][1]):
        ceiling = top.get(("dense", seed))
        if method != "dense" and score is not None and ceiling:
            out.setdefault(method, []).append(score / ceiling)
    return out


def report_curves(out: Path) -> None:
    """curves.md / .json / .png (or curves_m<M>.*, task_curves*): retention against the budget,
    mean ± std over the seeds measured so far; general (C4 perplexity at each budget, WikiText-2
    and lm-eval at the end) or task (test accuracy at each budget)."""
    name, folder, units = _saved_units(out)
    ok = [u for u in units if "error" not in u]
    if not ok:
        return
    s, task = screen_settings(), is_task()
    budgets = s["budgets"]
    by: dict[str, list[dict]] = {}
    for u in ok:
        by.setdefault(u["method"], []).append(u)
    kept = retention(ok, task)
    key = "acc" if task else "ppl"
    if task:
        head = (f"## Task retention against the budget, M = {s['span']}: mean ± std over seeds",
                f"The methods of the task screen worth a curve (dense, ELM and the {CURVE_BEST} highest "
                "accuracies of the task screen at its top budget), each compressing the teacher and "
                f"trained on its problems for {budgets[-1]:,} sequences, scored by greedy exact match on "
                f"the same {task_sizes()['test']} held-out test problems at each budget of the same run. "
                "Retention: accuracy / dense + LoRA's accuracy of the same seed at the top budget (the "
                "ceiling). Each seed sets the initialisation, LoRA and data order; the teacher is the "
                "same. ± is the sample standard deviation over the seeds (n given).")
        cols = [f"acc @ {b:,}" for b in budgets] + [f"retention @ {budgets[-1]:,}"]
    else:
        head = (f"## General retention against the budget, M = {s['span']}: mean ± std over seeds",
                f"The methods of the screen worth a curve (dense, ELM and the {CURVE_BEST} lowest C4 "
                f"perplexities of the screen at its top budget), each trained for {budgets[-1]:,} "
                "sequences as in the screen, scored on the same validation windows at each budget of the "
                "same run, WikiText-2 and lm-eval (mean acc of ARC-E, BoolQ, PIQA) at the end. Each seed "
                "sets the calibration sample, initialisation and data order. Retention: mean acc / dense "
                "+ LoRA's of the same seed. ± is the sample standard deviation over the seeds (n given).")
        cols = [f"C4 @ {b:,}" for b in budgets] + ["WikiText-2", "mean acc", "retention"]
    lines = [*head[:1], "", head[1], "", "| method | seeds | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for method, us in by.items():
        pts = [[c[key] for u in us for c in u["curve"] if c["sequences"] == b] for b in budgets]
        if task:
            cells = [_stat(p, ".1f", 100) for p in pts]
        else:
            accs = [_top_score(u, False) for u in us]
            cells = [_stat(p) for p in pts] + [_stat([u["wikitext2"]["ppl"] for u in us]),
                                                _stat([a for a in accs if a is not None], ".1f", 100)]
        cells.append(_stat(kept[method], ".1f", 100) + "%" if kept.get(method) else "")
        lines.append(f"| {method} | {len(us)} | " + " | ".join(cells) + " |")
    failed = sorted({u["method"] for u in units if "error" in u})
    if failed:
        lines += ["", "Failed (see their unit files): " + ", ".join(failed) + "."]
    if (folder / "chosen.json").is_file():
        c = read_json(folder / "chosen.json")
        lines += ["", f"Methods chosen from `{c['from']}`" + (
            f" while it still missed {', '.join(c['missing'])}: the choice may change once they are "
            "measured." if c["missing"] else ", complete.")]
    lines += ["", f"![{name}]({name}.png)", ""]
    atomic_write_text(folder / f"{name}.md", "\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for method, us in by.items():
        pts = [[c[key] for u in us for c in u["curve"] if c["sequences"] == b] for b in budgets]
        xs = [b for b, p in zip(budgets, pts) if p]
        mean = [statistics.mean(p) for p in pts if p]
        err = [statistics.stdev(p) if len(p) > 1 else 0.0 for p in pts if p]
        ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=f"{method} (n={len(us)})",
                    **({"ls": ":", "color": "k"} if method == "dense" else {}))
    ax.set(xscale="log", yscale="linear" if task else "log", xlabel="training sequences after compression",
           ylabel="test accuracy (greedy exact match)" if task else "validation perplexity (C4)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, folder / f"{name}.png")


CLAIM = 0.99  # the seeds' headline: ELM keeps 99% of the accuracy


def verdict(kept: dict[str, list[float]]) -> dict | None:
    """The seeds' claim on one protocol and M from per-seed retentions (``retention``): whether ELM
    keeps CLAIM ("yes" when mean - std clears it, "no" when mean + std stays below, else "within the
    spread"; one seed has no spread, so its mean decides and n says so), and how far it leads or
    trails the best other method: a lead or trail only where the gap of the means exceeds both
    standard deviations. None until ELM has a retention."""
    if not kept.get("elm"):
        return None

    def ms(xs):
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)

    m, sd, n = ms(kept["elm"])
    holds = "yes" if m - sd >= CLAIM else "no" if m + sd < CLAIM else "within the spread"
    v = {"elm": {"mean": m, "std": sd, "n": n}, "holds": holds, "claim": CLAIM}
    others = {k: ms(x) for k, x in kept.items() if k not in ("elm", "original") and x}
    if others:
        best = max(others, key=lambda k: others[k][0])
        bm, bsd, bn = others[best]
        gap = m - bm
        v["best"] = {"method": best, "mean": bm, "std": bsd, "n": bn}
        v["gap"] = gap
        v["outcome"] = ("ELM leads" if gap > max(sd, bsd) else "ELM trails" if -gap > max(sd, bsd)
                        else "no winner within the spreads")
    return v


def report_claim(out: Path) -> None:
    """claim/claim.md and claim.json: the seeds' claim answered from the curves' top budget, per
    protocol and M, in plain words where it does not hold."""
    keep = dict(SCREEN)
    rows, found = [], {}
    try:
        for protocol, what in (("task_curves", "task"), ("curves", "general")):
            SCREEN["protocol"] = protocol
            for span in sorted({SPAN, LONG_SPAN, *screen_spans(out, protocol)}):
                SCREEN["span"] = span
                folder = out / screen_name()
                units = [read_json(p) for p in folder.glob("unit_*.json")]
                v = verdict(retention(units, is_task())) if units else None
                found[f"{what}_m{span}"] = v
                elm = any(u["method"] == "elm" and "error" not in u for u in units)
                rows.append(_claim_line(what, span, v) if v or not elm else
                            f"| {what} | {span} | undefined: no seed has both ELM and a dense + LoRA "
                            "score above 0 | | | | | |")
    finally:
        SCREEN.update(keep)
    if not any(u for u in rows if "not measured yet" not in u):
        return
    lines = ["## The seeds' claim: does ELM keep 99%, and how does it stand against the best other "
             "method?", "",
             "At the largest equal budget of the curves: retention = score / dense + LoRA's score of the "
             "same seed (task: test accuracy; general: mean lm-eval accuracy), mean ± std over the seeds "
             f"measured. ELM keeps {100 * CLAIM:.0f}% when mean - std clears it; a method leads or trails "
             "another only where the gap of the means exceeds both standard deviations.", "",
             "| protocol | M | ELM retention | keeps 99%? | best other method | its retention | ELM's gap "
             "| verdict |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    (out / "claim").mkdir(parents=True, exist_ok=True)
    write_json(out / "claim" / "claim.json", found)
    atomic_write_text(out / "claim" / "claim.md", "\n".join(lines))


def _claim_line(what: str, span: int, v: dict | None) -> str:
    if v is None:
        return f"| {what} | {span} | not measured yet | | | | | |"

    def pct(d):
        spread = f" ± {100 * d['std']:.1f}" if d["n"] > 1 else ""
        return f"{100 * d['mean']:.1f}{spread}% (n={d['n']})"

    one = " (one seed: no spread)" if v["elm"]["n"] < 2 else ""
    if "best" not in v:
        return f"| {what} | {span} | {pct(v['elm'])} | {v['holds']}{one} | none measured | | | |"
    b = v["best"]
    return (f"| {what} | {span} | {pct(v['elm'])} | {v['holds']}{one} | {b['method']} | {pct(b)} | "
            f"{100 * v['gap']:+.1f} points | {v['outcome']} |")


def report_teacher(out: Path) -> None:
    """teacher.md / .png: the teacher's validation curve, where it stopped, its test accuracy."""
    folder = out / "teacher"
    if not (folder / "teacher.json").is_file():
        return
    t = read_json(folder / "teacher.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([c["sequences"] for c in t["curve"]], [100 * c["val_acc"] for c in t["curve"]], marker="o")
    ax.axvline(t["best_step"] * t["settings"]["batch"], color="grey", ls=":", label="kept")
    ax.set(xlabel="training problems seen", ylabel="validation accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, folder / "teacher.png")
    c, n = t["settings"], t["settings"]["task"]
    lines = [
        "## The task teacher",
        "",
        f"`{model_label(t['model'])}` LoRA-tuned (r {c['r']}, constant lr {c['lr']:g}, {c['batch']} "
        f"problems per step) on {n['train']:,} `{n['preset']}` testbed problems; validation accuracy "
        f"(greedy exact match, {n['val']} problems) every {c['eval_every']} steps, stopped after "
        f"{c['patience']} scores without a new best, and the best kept: step {t['best_step']} of "
        f"{t['steps']}, validation {100 * t['val_acc']:.1f}%, test {100 * t['test_acc']:.1f}% on "
        f"{n['test']} problems (before tuning: {100 * t['original']['test_acc']:.1f}%). "
        f"{t['seconds']:.0f} s on {t['device']}. Adapter sha256 {t['adapter_sha256'][:16]}...",
        "",
        "![teacher](teacher.png)",
        "",
    ]
    atomic_write_text(folder / "teacher.md", "\n".join(lines))


class StageClock:
    """The wall time a stage's run holds the device, kept in <folder>/gpu_time.json as one entry per
    run: started, seconds, device, the unit files it wrote. Rewritten every TICK_S by a thread, so a
    run killed with its GPU lease loses at most that much of its record; a run that wrote no unit
    and took under a minute (everything was saved already) leaves no entry."""

    TICK_S = 30.0
    _LOCK = threading.Lock()  # the runs of one process; flock orders the processes

    def __init__(self, folder: Path, jobs: int):
        import datetime
        import os
        import uuid

        self.path, self.t0 = folder / "gpu_time.json", time.time()
        self.before = {p.name: p.stat().st_mtime for p in self._written(folder)}
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        # the id finds this run's entry again: another run may write the same file meanwhile
        self.entry = {"id": f"{platform.node()}/{os.getpid()}/{uuid.uuid4().hex[:8]}", "started": started,
                      "seconds": 0.0, "device": _device_name(), "jobs": jobs, "units": []}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _written(folder: Path) -> list[Path]:
        """The files that hold a stage's results: its units (the teacher's is teacher.json)."""
        return [*folder.glob("unit_*.json"), *folder.glob("teacher.json")]

    def _run(self) -> None:
        while not self.done.wait(self.TICK_S):
            self._write()

    def _write(self) -> None:
        """Rewrite this run's entry; a failure to write is reported, and the stage goes on."""
        try:
            folder = self.path.parent
            self.entry.update(seconds=round(time.time() - self.t0, 1),
                              units=sorted(p.stem.removeprefix("unit_") for p in self._written(folder)
                                           if self.before.get(p.name) != p.stat().st_mtime))
            if self.entry["units"] or self.entry["seconds"] >= 60:
                with self._LOCK, open(self.path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # read, change, write: one run at a time
                    runs = read_json(self.path)["runs"] if self.path.is_file() else []
                    runs = [r for r in runs if r.get("id") != self.entry["id"]]
                    write_json(self.path, {"runs": [*runs, self.entry]})
        except (OSError, ValueError) as e:  # a unit file replaced mid-scan, a full disk, a torn file
            print(f"gpu_time.json not updated: {e}", flush=True)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self._write()


def gpu_time_lines(out: Path, folders: list[str], left: dict[str, int] | None = None) -> list[str]:
    """The GPU time of each stage folder from its gpu_time.json, and the total against the 4-hour
    budget of the whole section (GPU runs only: a CPU smoke run is counted apart). Units on disk
    that no recorded run wrote were measured before the record: their own wall times stand in."""
    rows, total, unrecorded, recorded_runs = [], 0.0, False, {}
    for name in folders:
        path = out / name / "gpu_time.json"
        runs = recorded_runs[name] = read_json(path)["runs"] if path.is_file() else []
        recorded = {u for r in runs for u in r["units"]}
        earlier = [read_json(p) for p in StageClock._written(out / name)
                   if p.stem.removeprefix("unit_") not in recorded]
        if not runs and not earlier:
            continue
        gpu = [r for r in runs if not r["device"].startswith("CPU")]
        seconds = sum(r["seconds"] for r in gpu)
        total += seconds
        minutes = f"{seconds / 60:.1f}" if runs else "–"
        if earlier:  # their times overlap where units ran side by side: not added to the total
            unrecorded = True
            own = sum(u.get("seconds", 0) for u in earlier)
            minutes += (f" (+ {len(earlier)} unit{'s' * (len(earlier) != 1)} from before this record, "
                        f"own times {own / 60:.1f})")
        devices = sorted({r["device"] for r in runs} | {u.get("device", "?") for u in earlier})
        rows.append(f"| {name} | {len(runs) or '–'} | {minutes} | "
                    f"{sum(len(r['units']) for r in runs) + len(earlier)} | {', '.join(devices)} |")
    if not rows:
        return []
    return ["### GPU time", "",
            "Wall time each stage held the GPU, summed over its runs (units side by side share it; a run "
            "cut off by the end of its lease counts to its last 30-second record). The whole section's "
            f"budget is 4 GPU hours; recorded so far: {total / 60:.1f} minutes"
            + (", besides the units measured before this record (their own wall times, which "
               "overlap where units ran side by side)." if unrecorded else "."), "",
            "| stage | runs | GPU minutes | units written | device |", "|---|---|---|---|---|", *rows,
            *_projection(out, recorded_runs, left or {})]


def _projection(out: Path, recorded_runs: dict[str, list[dict]], left: dict[str, int]) -> list[str]:
    """What the units not measured yet would take at the rate of the recorded screen runs (GPU
    minutes per unit written, units side by side as they ran): ``left`` holds the screen units and
    the curve units still to run. A curve unit trains CURVE_TOP / SCREEN_TOP times as long as a
    screen unit and is evaluated about as long: its weight in screen units comes from the eval
    share of the recorded units that trained. ``recorded_runs``: each stage folder's runs."""
    runs, done = [], []
    for f, stage_runs in recorded_runs.items():
        if f.split("_m")[0] not in ("screen", "task"):
            continue
        for r in stage_runs:
            if not r["device"].startswith("CPU"):
                runs.append(r)
                done += [read_json(out / f / f"unit_{u}.json") for u in r["units"]
                         if (out / f / f"unit_{u}.json").is_file()]
    units = sum(len(r["units"]) for r in runs) - sum("reused_from" in u for u in done)
    if units <= 0 or not any(left.values()):
        return []
    rate = sum(r["seconds"] for r in runs) / units / 60
    trained = [u for u in done if u.get("trainer", "none") != "none" and u.get("seconds") and "eval_s" in u
               and "reused_from" not in u]
    share = statistics.fmean(u["eval_s"] / u["seconds"] for u in trained) if trained else 0.0
    weight = (1 - share) * CURVE_TOP / SCREEN_TOP + share
    screen, curve = left.get("screen", 0), left.get("curves", 0) * weight
    plural = "s" * (units != 1)
    return ["", f"At the recorded screens' rate, {rate:.1f} GPU minutes per unit ({units} unit{plural}), "
            f"what is left needs about {(screen + curve) * rate / 60:.1f} GPU hours: {screen} screen units "
            f"({screen * rate / 60:.1f} h) and {left.get('curves', 0)} curve units "
            f"({curve * rate / 60:.1f} h), each counted as {weight:.1f} screen units (training "
            f"{CURVE_TOP // SCREEN_TOP}x as long; evaluation, {100 * share:.0f}% of a trained screen "
            "unit's time, about the same); units measured under earlier settings and the teacher come "
            "on top."]


ROOT = Path(__file__).resolve().parents[1]


def write_results_section(out: Path) -> None:
    """The real-model section of RESULTS.md (the repository's; out/RESULTS.md for a smoke run or
    another --out) from the stage reports, with what is not measured yet said plainly."""
    from md_sections import put

    report_claim(out)
    parts = []
    folders = ["claim", "recipe", *(screen_name(span, "general") for span in screen_spans(out, "general")),
               *(screen_name(span, "curves") for span in screen_spans(out, "curves")),
               "teacher", *(screen_name(span, "task") for span in screen_spans(out, "task")),
               *(screen_name(span, "task_curves") for span in screen_spans(out, "task_curves"))]
    for stage in folders:
        md = out / stage / f"{stage}.md"
        if md.is_file():
            rel = f"{out.as_posix()}/{stage}/"
            body = md.read_text().replace(f"]({stage}.png)", f"]({rel}{stage}.png)")
            parts.append(body.replace("## ", "### ", 1).strip())
    if not parts:
        return
    todo, left = [], {"screen": 0, "curves": 0}
    for protocol, what in (("general", "general retention"), ("task", "task retention")):
        for span in sorted({SPAN, LONG_SPAN, *screen_spans(out, protocol)}):
            folder = out / screen_name(span, protocol)
            screened = {p.stem.removeprefix("unit_") for p in folder.glob("unit_*.json")}
            missing = [m for m in screen_methods() if m not in screened]
            # at another M the SPAN_FREE units are copies of M = SPAN's, counted there
            left["screen"] += len([m for m in missing if span == SPAN or m not in SPAN_FREE])
            todo.append(f"- The screen of {what} at M = {span}: "
                        + (", ".join(missing) if missing else "all screened") + ".")
    if not (out / "teacher" / "teacher.json").is_file():
        todo.append("- The task teacher (--stages teacher).")
    for protocol, what in (("curves", "general"), ("task_curves", "task")):
        for span in sorted({SPAN, LONG_SPAN, *screen_spans(out, protocol)}):
            folder = out / screen_name(span, protocol)
            have = {p.stem.removeprefix("unit_") for p in folder.glob("unit_*.json")}
            seeds_done = {int(x.rsplit("_s", 1)[1]) for x in have}
            # dense, ELM and the CURVE_BEST best of the screen, for each seed; dense at another M is
            # a copy of M = SPAN's, counted there
            copies = 0 if span == SPAN else sum(f"dense_s{x}" not in have for x in SEEDS)
            left["curves"] += max(0, (2 + CURVE_BEST) * len(SEEDS) - len(have) - copies)
            todo.append(f"- Budget curves of {what} retention to {CURVE_TOP:,} sequences at M = {span} "
                        f"(--stages {'curves' if protocol == 'curves' else 'task-curves'}): seeds "
                        + (", ".join(str(x) for x in SEEDS if x not in seeds_done) or "none") + " to run"
                        + (" (some methods of the measured seeds may be missing too)." if have else "."))
    section = "\n\n".join([
        "## A real pretrained model: SmolLM2-135M-Instruct (work in progress)",
        "Generated by `python benchmarks/real_model.py` (stages saved as they finish under "
        f"[{out.as_posix()}]({out.as_posix()}), resumable across GPU runs); do not edit by hand. "
        "General retention: perplexity on held-out C4 and on WikiText-2, lm-eval ARC-Easy / BoolQ / "
        "PIQA; training text is the shared C4 samples (1,800 documents, 0.9M tokens in 4,461 windows "
        "of up to 256 tokens with the SmolLM2 tokenizer, so a budget of 25.6k sequences is about 6 "
        "passes over it). Task retention: the paper's protocol on testbed problems, against a "
        "LoRA-tuned teacher.",
        *parts,
        *(["\n".join(spent)] if (spent := gpu_time_lines(out, folders, left)) else []),
        "### Not measured yet",
        "\n".join(todo),
        "```\npython benchmarks/real_model.py --model smollm2-135m --data ../shared/data \\\n"
        f"    --out {out.as_posix()} --run runs/real_model   # run again to continue\n"
        f"python benchmarks/real_model.py --out {out.as_posix()} --report-only\n```",
    ])
    target = ROOT / "RESULTS.md" if out.resolve() == (ROOT / "benchmarks/results/real_model").resolve() \
        else out / "RESULTS.md"
    old = target.read_text() if target.is_file() else ""
    atomic_write_text(target, put(old, "real-model", section))


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
    ap.add_argument("--stages", default="recipe,screen",
                    help=f"stages to run, in order: {', '.join(STAGES)} (task and task-curves need "
                         "teacher; curves and task-curves take the best methods of their screen)")
    ap.add_argument("--methods", default=None,
                    help="screen, task and the curves: only these methods (comma-separated)")
    ap.add_argument("--span", type=int, default=SPAN,
                    help=f"screen: M, the layers ELM's block replaces (the others remove M - 1); "
                         f"{SPAN} (default) and {LONG_SPAN} are the two compressions reported")
    ap.add_argument("--seed", type=int, default=None,
                    help="curves, task-curves: only this seed (default: each of "
                         f"{', '.join(map(str, SEEDS))} in turn)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="screen, task and the curves: units run side by side as this many processes on "
                         "the one device")
    ap.add_argument("--unit", action="store_true", help=argparse.SUPPRESS)  # a process of --jobs
    ap.add_argument("--device-share", type=float, default=None,
                    help="fraction of the GPU's memory this process may hold (--jobs gives each of its "
                         "processes 0.95 / jobs, so that no unit keeps a cache the others need)")
    args = ap.parse_args()
    if args.device_share is not None:
        if not 0 < args.device_share <= 1:
            raise SystemExit("--device-share must be in (0, 1]")
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(args.device_share)
    SMOKE["on"] = args.smoke
    out = Path(args.out)
    stages = [x for x in args.stages.split(",") if x]
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    if args.span < 2:
        raise SystemExit("--span must be at least 2: the block replaces M layers, the others remove M - 1")
    SCREEN["span"] = args.span
    if set(stages) - set(STAGES):
        raise SystemExit(f"unknown --stages {args.stages}; choose from {', '.join(STAGES)}")
    if args.report_only:
        if all(task_file(Path(args.data) / "commonsense", t).is_file() for t in TASKS):
            # the floors need only the task files, no model
            task_floors(Path(args.data) / "commonsense", out)
        if (out / "recipe" / "reference.json").is_file():
            report(out)
        report_teacher(out)
        for protocol in PREFIX:
            SCREEN["protocol"] = protocol
            for span in screen_spans(out):
                SCREEN["span"] = span
                report_screen(out)
        write_results_section(out)
        return
    data = Path(args.data)
    if not (data / "calibration").is_dir():
        raise SystemExit(f"{data}/calibration not found: pass --data with the C4 samples")
    budget, state = Budget(args.budget_s), {}
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    for stage in stages:
        if stage in STAGE_PROTOCOL:
            SCREEN["protocol"] = STAGE_PROTOCOL[stage]
        folder = out / (stage if stage in ("recipe", "teacher") else screen_name())
        folder.mkdir(parents=True, exist_ok=True)
        # the processes of --jobs are units of this run: only the run itself keeps the GPU time
        clock = None if args.unit else StageClock(folder, args.jobs)
        try:
            if stage == "recipe":
                done = stage_recipe(args.model, data, out, Path(args.run), budget)
            elif stage == "teacher":
                done = stage_teacher(args.model, out, Path(args.run), budget)
            elif is_curve():
                for seed in [args.seed] if args.seed is not None else seeds():
                    SCREEN["seed"] = seed
                    done = stage_screen(args.model, data, out, Path(args.run), budget,
                                        methods or curve_methods(out), args.jobs)
                    if not done:
                        break
            else:
                done = stage_screen(args.model, data, out, Path(args.run), budget, methods, args.jobs)
        finally:
            if clock is not None:
                clock.close()
        state[stage if stage in ("recipe", "teacher") else screen_name()] = (
            "done" if done else "stopped at the budget")
        if not done:
            break
    write_results_section(out)
    print(json.dumps(state))
    sys.exit(0)


if __name__ == "__main__":
    main()
