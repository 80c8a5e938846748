"""Compression on equal footing: ``compress_method`` runs one method, ``compare`` runs many on one
model, one calibration set, one target and one test set, with optional equal LoRA healing.

Depth methods end with N - k decoder layers, k = round(remove x N): deleting methods delete k,
merging methods merge until k are gone, ELM and LLM-Streamline replace a span of k + 1 layers by
one. Width methods remove ``remove`` of the non-embedding parameters (as near as their granularity
allows; the table shows what each removed) and leave slim models. Output of ``compare``::

    out/report.md  out/results.json  out/accuracy.png
    out/<method>/plan.json  out/<method>/model/  (out/<method>/heal/model/ when healed)
    out/<method>/row.json   (a finished method; a re-run with the same settings skips it)

``--heal both`` measures every compressed model before and after the same LoRA healing, so one
run gives both columns without compressing twice.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .data.calibration import CalibConfig, Calibration
from .io import RunDir, atomic_write_text, path_identity, read_json, save_figure, write_json
from .methods import DEPTH, WIDTH, darwinlm
from .methods.darwinlm import DarwinLMConfig
from .train.lora import FinetuneConfig

# elm-cosine: the ELM block placed by the cosine criterion instead of --elm-start (not in a group)
METHODS = ("elm", "elm-cosine", *DEPTH, *WIDTH)
GROUPS = {"depth": ("elm", *DEPTH), "width": tuple(WIDTH), "all": ("elm", *DEPTH, *WIDTH)}
ELM_METHODS = ("elm", "elm-cosine")


def compress_method(model: str | Path, data: str | Path, out: str | Path, method: str, cfg=None,
                    calib: CalibConfig = CalibConfig()) -> dict:
    """Compress ``model`` with one depth or width method of the registries and save a HF folder
    (a stock model for depth methods, a slim model for width methods).

    ``data`` supplies the calibration sequences (unless ``calib.source`` is set) and, for methods
    that train (a replacement layer, DarwinLM's candidates), the training sequences. Writes
    plan.json, model/ and metrics.json; DarwinLM keeps its database and search state in search/,
    so an interrupted run resumes.
    """
    from .data.formats import detect_format, read_examples
    from .methods.common import non_embedding_parameters
    from .models import count_parameters, load_model, load_tokenizer

    if method not in DEPTH and method not in WIDTH:
        raise ValueError(f"unknown method {method!r}; known: {', '.join((*DEPTH, *WIDTH))}")
    width = method in WIDTH
    spec = _spec(method)
    cfg = cfg if cfg is not None else spec.base
    if not isinstance(cfg, type(spec.base)):
        raise ValueError(f"{method} takes a {type(spec.base).__name__}, got {type(cfg).__name__}")
    if getattr(cfg, "n_remove", None) == 0 or getattr(cfg, "ratio", None) == 0:
        what = "--n-remove 0" if getattr(cfg, "n_remove", None) == 0 else "--ratio 0"
        raise ValueError(f"{what} removes nothing: the output would be the unchanged model; set a "
                         "positive --n-remove or --ratio")
    run = RunDir(out)
    run.write_config(f"compress {method}", model=str(model), data=str(data), cfg=asdict(cfg),
                     calib=asdict(calib))
    tok = load_tokenizer(model)
    cal = calib.build(tok, default=data)
    train = None
    if spec.trains:
        fmt = detect_format(data)
        if fmt == "text":
            n_seq = cfg.steps * cfg.train_batch_size if not width else 4 * calib.samples
            train = CalibConfig(source=str(data), samples=n_seq, seq_len=512, seed=calib.seed).build(tok)
        else:
            train = Calibration.from_examples(tok, read_examples(data, fmt), 512)
    m = load_model(model, dtype="float32")
    n0, p0, e0 = m.config.num_hidden_layers, count_parameters(m), non_embedding_parameters(m)
    if not width and getattr(cfg, "n_remove", 1) is None and round(cfg.ratio * n0) == 0:
        raise ValueError(f"--ratio {cfg.ratio} of {n0} layers rounds to 0 layers: nothing would be removed; "
                         f"use --ratio >= {0.5 / n0:.3g} or --n-remove")
    t0 = time.time()
    if width:
        m, plan, stats = spec.module.compress_(m, cal, cfg, train, progress=True, folder=run / "search")
    else:
        plan, stats = spec.module.compress_(m, cal, cfg, train, progress=True)
    wall = time.time() - t0
    write_json(run / "plan.json", plan)
    save_model(m, tok, run / "model")
    metrics = {"method": method, "plan": plan, "stats": _short(stats), "layers_before": n0,
               "layers_after": m.config.num_hidden_layers, "params_before": p0,
               "params_after": count_parameters(m),
               "removed_non_embedding": 1 - non_embedding_parameters(m) / e0, "wall_time_s": wall}
    run.write_metrics(metrics)
    return metrics


@dataclass(frozen=True)
class CompareConfig:
    """What is compared, how much is removed, and the equal budgets every method gets."""

    methods: tuple[str, ...] = GROUPS["depth"]
    """Methods to run (comma- or space-separated): elm, depth and width methods' names, or the
    groups depth, width, all."""
    remove: float = 0.25
    """Fraction removed: of the decoder layers (depth, k = round(remove x N)) or of the
    non-embedding parameters (width)."""
    heal: Literal["none", "lora", "both"] = "none"
    """none; lora: LoRA healing of every compressed model with the same budget (--lora.*); both:
    measure each model before and after that healing."""
    train_steps: int = 400
    """Steps of the methods that train a replacement (ELM's block, LLM-Streamline's layer)."""
    train_batch_size: int = 16
    """Sequences per step for those methods."""
    elm_start: int | str | None = None
    """First layer the ELM block replaces ("auto": GPPO search; default: the middle)."""
    elm_max_iter: int = 4
    """Block evaluations per forward of the ELM."""
    elm_lr: float = 1e-3
    """Peak learning rate of the ELM block."""
    gppo_steps: int = 200
    """GPPO policy steps when --elm-start is auto."""
    n_train: int = 4000
    """Training examples: the testbed's train split, or the first n of --data."""
    n_test: int = 200
    """Test examples: the testbed's test split, or the first n of --test."""
    max_new_tokens: int = 256
    """Generation budget per test answer."""
    eval_batch_size: int = 64
    """Generation batch size."""
    seed: int = 0
    """Seed for training, healing and calibration draws."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """The calibration spec every method uses (--calib.samples, --calib.seq-len, ...)."""
    lora: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(max_steps=200, lr=1e-3))
    """The healing budget, the same for every method (--lora.max-steps, --lora.r, ...)."""
    darwinlm: DarwinLMConfig = field(default_factory=DarwinLMConfig)
    """DarwinLM's database and search budget, also used by ziplm and uniform (--darwinlm.generations,
    ...); ratio and mode are set per row."""

    def __post_init__(self):
        parts = [m for part in ([self.methods] if isinstance(self.methods, str) else self.methods)
                 for m in str(part).split(",") if m]
        names = tuple(dict.fromkeys(n for m in parts for n in GROUPS.get(m, (m,))))
        if len(names) != len([n for m in parts for n in GROUPS.get(m, (m,))]):
            raise ValueError("--methods lists a method twice")
        object.__setattr__(self, "methods", names)
        unknown = [m for m in names if m not in METHODS]
        if unknown or not names:
            raise ValueError(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
        if not 0 < self.remove < 1:
            raise ValueError("--remove must be in (0, 1)")
        if self.heal not in ("none", "lora", "both"):
            raise ValueError("--heal must be none, lora or both")
        if min(self.train_steps, self.train_batch_size, self.n_train, self.n_test, self.max_new_tokens,
               self.eval_batch_size, self.elm_max_iter, self.gppo_steps) < 1:
            raise ValueError("--train-steps, --train-batch-size, --n-train, --n-test, --max-new-tokens, "
                             "--eval-batch-size, --elm-max-iter and --gppo-steps must be >= 1")
        if isinstance(self.elm_start, str) and self.elm_start != "auto":
            raise ValueError(f"--elm-start must be a layer index or 'auto', got {self.elm_start!r}")


def compare(model: str | Path, out: str | Path, data: str | Path | None = None,
            test: str | Path | None = None, cfg: CompareConfig = CompareConfig()) -> dict:
    """Run every method on one model at one removal ratio and tabulate accuracy, size and cost.

    For a testbed model (``testbed:tiny`` or a folder with testbed.json) the data default to its
    own splits: train for training and healing, validation for calibration, test for accuracy.
    Otherwise pass ``data`` (instruction data with answers) and ``test``.
    Writes report.md, results.json and accuracy.png; finished methods are skipped on a re-run.
    """
    from .data.chat import encode_prompt
    from .eval import EvalConfig, evaluate
    from .eval.footprint import kv_bytes_at, kv_cache_bytes
    from .methods.common import non_embedding_parameters
    from .models import count_parameters, load_model, load_tokenizer
    from .models.sources import resolve
    from .train.common import fingerprint

    path = resolve(model)
    train_ex, calib_default, test_ex = _data(path, data, test, cfg)
    run = RunDir(out)
    settings = {"model": str(model), "data": str(data), "test": str(test), **asdict(cfg)}
    run.write_config("compare", **settings)
    fps = {name: fingerprint(_row_settings(name, path, data, test, cfg)) for name in ("dense", *cfg.methods)}
    tok = load_tokenizer(path)
    dense = load_model(path, dtype="float32", device=cfg.device)
    n = dense.config.num_hidden_layers
    k = round(cfg.remove * n)
    if not 1 <= k <= n - 2:
        raise ValueError(f"--remove {cfg.remove} of {n} layers is {k}; it must leave 2..{n - 1} layers")
    calib = cfg.calib.build(tok, default=calib_default)
    ecfg = EvalConfig(task="gsm8k", batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                      device=cfg.device)
    prompts = [encode_prompt(tok, ex) for ex in test_ex[:16]]

    e0 = non_embedding_parameters(dense)

    def measure(m, tag: str) -> dict:
        acc = evaluate(m, test_ex, run / tag / "eval", ecfg, tok, progress=False)["accuracy"]
        ne = non_embedding_parameters(m)
        return {"layers": m.config.num_hidden_layers, "params": count_parameters(m), "accuracy": acc,
                "kv_bytes": kv_cache_bytes(m, tok, prompts), "kv_bytes_4k": kv_bytes_at(m, 4096),
                "non_embedding": ne, "removed": 1 - ne / e0}

    rows = [_cached(run / "dense", fps["dense"]) or _finish(
        run / "dense", fps["dense"], {"method": "dense", "title": "dense", **measure(dense, "dense"),
                                      "compress_s": 0.0, "heal_s": 0.0})]
    for name in cfg.methods:
        row = _cached(run / name, fps[name])
        title = _title(name, cfg)
        if row is None:
            what = f"{cfg.remove:.0%} of the non-embedding parameters" if name in WIDTH \
                else f"{k} of {n} layers"
            print(f"== {name}: removing {what}")
            _claim(run / name, fps[name])
            t0 = time.time()
            try:
                m, plan, stats = compress_copy(name, dense, tok, calib, train_ex, k, run / name, cfg)
            except ValueError as e:  # the method cannot reach k here (e.g. its protected layers)
                print(f"== {name} failed: {e}")
                rows.append(_finish(run / name, fps[name], {"method": name, "title": title, "error": str(e)}))
                continue
            compress_s = time.time() - t0
            write_json(run / name / "plan.json", plan)
            heal_s, before = 0.0, {}
            if cfg.heal != "none":
                if name not in ELM_METHODS:  # the ELM trainer has saved its model already
                    save_model(m, tok, run / name / "model")
                if cfg.heal == "both":
                    before = measure(m, name)
                del m
                t0 = time.time()
                from .train.lora import finetune

                finetune(run / name / "model", train_ex, run / name / "heal",
                         dataclasses.replace(cfg.lora, device=cfg.device, seed=cfg.seed), progress=True)
                heal_s = time.time() - t0
                m = load_model(run / name / "heal" / "model", dtype="float32", device=cfg.device)
            elif name not in ELM_METHODS:
                save_model(m, tok, run / name / "model")
            after = measure(m, f"{name}/healed" if before else name)
            measured = {**before, "healed_accuracy": after["accuracy"]} if before else after
            row = _finish(run / name, fps[name], {
                "method": name, "title": title, **measured, "compress_s": compress_s,
                "heal_s": heal_s, "stats": _short(stats)})
            del m
        rows.append(row)

    dense_acc = rows[0]["accuracy"]
    for r in rows:
        if "error" in r:
            continue
        r["retained"] = r["accuracy"] / dense_acc if dense_acc else None
        if "healed_accuracy" in r:
            r["healed_retained"] = r["healed_accuracy"] / dense_acc if dense_acc else None
        r["kv_ratio"] = r["kv_bytes_4k"] / rows[0]["kv_bytes_4k"]
    result = {"model": str(model), "layers": n, "removed": k, "heal": cfg.heal, "rows": rows}
    write_json(run / "results.json", result)
    _plot(run / "accuracy.png", [r for r in rows if "error" not in r],
          f"{model}: {k} of {n} layers removed, heal: {cfg.heal}")
    report = _report(result, cfg, len(test_ex), len(calib))
    atomic_write_text(run / "report.md", report)
    run.write_metrics(result)
    print(report)
    return result


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _data(path: str, data, test, cfg: CompareConfig):
    """(training examples, default calibration source, test examples)."""
    from .data.formats import read_examples

    if data is None:
        if not (Path(path) / "testbed.json").is_file():
            raise ValueError("--data (and --test) are required unless the model is a testbed model")
        from .testbed.card import read_recipe
        from .testbed.problems import make_split

        r = read_recipe(Path(path))
        train = make_split("train", cfg.n_train, r["problems"], r["seed"])
        calib = make_split("validation", cfg.calib.samples, r["problems"], r["seed"])
        tests = make_split("test", cfg.n_test, r["problems"], r["seed"])
        return train, calib, tests
    if test is None:
        raise ValueError("--test is required with --data")
    return read_examples(data)[:cfg.n_train], str(data), read_examples(test)[:cfg.n_test]


def compress_copy(name: str, dense, tok, calib: Calibration, train_ex, k: int, out: Path,
                  cfg: CompareConfig, train_len: int = 512) -> tuple:
    """A compressed copy of ``dense`` by method ``name`` -> (model, plan, stats).

    ``k``: layers a depth method removes (ELM and LLM-Streamline replace k + 1 by one); width
    methods remove ``cfg.remove`` of the non-embedding parameters. ``train_ex`` (instruction
    examples or plain texts, cut to ``train_len`` tokens) is what the training methods train on;
    ``out`` holds their work.
    """
    if name in ELM_METHODS:
        from .methods import elm as elm_method
        from .train.elm import ElmTrainConfig, train_elm

        start = cfg.elm_start
        if name == "elm-cosine":
            start, sims = elm_method.cosine_start(dense, calib, k + 1)
            write_json(out / "cosine.json", {"start": start, "similarity": sims})
        elif start == "auto":
            from .methods import gppo

            thetas: list = []
            gcfg = gppo.GppoConfig(span=k + 1, steps=cfg.gppo_steps, seed=cfg.seed)
            found = gppo.plan(copy.deepcopy(dense), tok, train_ex, gcfg, thetas=thetas,
                              ckpt_dir=out / "gppo_checkpoints")
            start = found.start
            write_json(out / "gppo.json", {"start": start, "theta": list(found.theta),
                                           "theta_history": thetas})
        plan = elm_method.plan(dense, start=start, span=k + 1, max_iter=cfg.elm_max_iter)
        elm = elm_method.apply_(copy.deepcopy(dense), plan)
        stats = train_elm(elm, dense, tok, train_ex, out, ElmTrainConfig(
            steps=cfg.train_steps, batch_size=cfg.train_batch_size, lr=cfg.elm_lr, seed=cfg.seed))
        return elm, plan, stats
    if name in WIDTH:
        spec = WIDTH[name]
        base = _width_base(name, cfg)
        train = Calibration.from_training(tok, train_ex, train_len) if spec.trains else None
        mcfg = spec.module.for_target(base, dense, cfg.remove)
        return spec.module.compress_(copy.deepcopy(dense), calib, mcfg, train, progress=True,
                                     folder=out / "search")
    spec = DEPTH[name]
    mcfg = dataclasses.replace(spec.base, n_remove=k)
    train = None
    if spec.trains:
        mcfg = dataclasses.replace(mcfg, steps=cfg.train_steps, train_batch_size=cfg.train_batch_size,
                                   seed=cfg.seed)
        train = Calibration.from_training(tok, train_ex, train_len)
    m = copy.deepcopy(dense)
    plan, stats = spec.module.compress_(m, calib, mcfg, train, progress=True)
    return m, plan, stats


def _spec(name: str):
    """The registry entry of a depth or width method."""
    return WIDTH[name] if name in WIDTH else DEPTH[name]


def _title(name: str, cfg: CompareConfig) -> str:
    if name == "elm-cosine":
        return "ELM (cosine start)"
    if name == "elm":
        return "ELM (GPPO start)" if cfg.elm_start == "auto" else "ELM"
    return _spec(name).title


def _width_base(name: str, cfg: CompareConfig):
    """A width method's config before its target is set: DarwinLM and its two contrasts take the
    comparison's --darwinlm.* budget in their own mode."""
    spec = WIDTH[name]
    return dataclasses.replace(cfg.darwinlm, mode=spec.base.mode) if spec.module is darwinlm else spec.base


def save_model(model, tok, folder: Path) -> None:
    """``model`` and ``tok`` as a HF folder (safetensors), written atomically."""
    from .io import atomic_replace_dir

    tmp = folder.with_name(f".{folder.name}.tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    atomic_replace_dir(tmp, folder)


def _short(stats: dict) -> dict:
    """Stats without per-step curves (they are in each method's own files)."""
    return {k: v for k, v in (stats or {}).items() if not k.endswith("_curve") and k != "history"}


def _row_settings(name: str, model_path: str, data, test, cfg: CompareConfig) -> dict:
    """Everything a row's numbers depend on: a row is reused only while all of it is unchanged."""
    # row_format: bumped when a row gains fields or a default changes what a row computes (3: ELM's
    # distillation loss became relative), so rows written before are measured again
    ident = {"row_format": 3, "model": path_identity(model_path), "test": path_identity(test),
             "n_test": cfg.n_test, "max_new_tokens": cfg.max_new_tokens}
    if name == "dense":
        return ident
    ident["data"] = path_identity(data)
    if name in ELM_METHODS:
        own: dict = {"elm_max_iter": cfg.elm_max_iter, "elm_lr": cfg.elm_lr,
                     **({"elm_start": cfg.elm_start} if name == "elm" else {}),
                     **({"gppo_steps": cfg.gppo_steps} if name == "elm" and cfg.elm_start == "auto" else {})}
    elif name in WIDTH:
        own = {"base": asdict(_width_base(name, cfg))}
    else:
        own = {"base": asdict(DEPTH[name].base)}
    if name in ELM_METHODS or _spec(name).trains:
        own.update(train_steps=cfg.train_steps, train_batch_size=cfg.train_batch_size, n_train=cfg.n_train)
    return {**ident, "method": name, **own, "remove": cfg.remove, "calib": asdict(cfg.calib),
            "heal": cfg.heal, "seed": cfg.seed,
            **({"lora": _heal_settings(cfg.lora), "n_train": cfg.n_train} if cfg.heal != "none" else {})}


def _heal_settings(lora: FinetuneConfig) -> dict:
    """The healing config without the partial mode's fields in LoRA mode, so rows healed before
    those fields existed are still reused."""
    from .train.lora import PARTIAL_FIELDS

    d = asdict(lora)
    if lora.mode == "lora":
        for f in ("mode", *PARTIAL_FIELDS):
            d.pop(f)
    return d


def _cached(folder: Path, fp: str) -> dict | None:
    """The finished row of ``folder``; a row of other settings is deleted with its folder."""
    path = folder / "row.json"
    if not path.is_file():
        return None
    row = read_json(path)
    if row.get("fingerprint") == fp:
        return row
    print(f"== {folder.name}: settings changed since its last run; running it again")
    shutil.rmtree(folder)
    return None


def _claim(folder: Path, fp: str) -> None:
    """Mark ``folder`` as holding a run of ``fp``; a half-finished run of other settings is cleared
    (one of the same settings is resumed: the ELM trainer and LoRA healing keep checkpoints)."""
    marker = folder / "settings.fingerprint"
    if marker.is_file() and marker.read_text().strip() != fp:
        shutil.rmtree(folder)
    atomic_write_text(marker, fp)


def _finish(folder: Path, fp: str, row: dict) -> dict:
    write_json(folder / "row.json", {**row, "fingerprint": fp})
    return {**row, "fingerprint": fp}


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def _report(result: dict, cfg: CompareConfig, n_test: int, n_calib: int) -> str:
    both = cfg.heal == "both"
    lines = [
        "# Compression compared",
        "",
        f"Model `{result['model']}`: depth methods remove {result['removed']} of {result['layers']} decoder "
        f"layers (ELM and LLM-Streamline replace {result['removed'] + 1} layers by one); width methods "
        f"remove {cfg.remove:.0%} of the non-embedding parameters as near as their head/channel granularity "
        "allows (column *removed*: the fraction each removed). Accuracy: "
        f"greedy exact match on {n_test} test problems. Calibration: {n_calib} sequences of at most "
        f"{cfg.calib.seq_len} tokens (seed {cfg.calib.seed}), the same for every method. Training methods: "
        f"{cfg.train_steps} steps x {cfg.train_batch_size} sequences. Healing: "
        + ("none." if cfg.heal == "none" else
           f"LoRA r={cfg.lora.r}, {cfg.lora.max_steps} steps, lr {cfg.lora.lr:g}, the same for every "
           "method" + (" (columns *healed*; the others before healing)." if both else ".")),
        "",
        "| method | layers | non-embedding params | removed | accuracy | retained | "
        + ("healed accuracy | healed retained | " if both else "")
        + "KV MB at 4K (16-bit) | compress s | heal s |",
        "|---|---|---|---|---|---|" + ("---|---|" if both else "") + "---|---|---|",
    ]
    failed = [r for r in result["rows"] if "error" in r]
    for r in result["rows"]:
        if "error" in r:
            continue
        healed = (f"{r['healed_accuracy']:.3f} | {_pct(r.get('healed_retained'))} | "
                  if "healed_accuracy" in r else "- | - | " if both else "")
        lines.append(f"| {r['title']} | {r['layers']} | {r.get('non_embedding', 0):,} | "
                     f"{r['removed']:.1%} | {r['accuracy']:.3f} | {_pct(r['retained'])} | {healed}"
                     f"{r.get('kv_bytes_4k', 0) / 1e6:.2f} ({r['kv_ratio']:.2f}) | {r['compress_s']:.1f} | "
                     f"{r['heal_s']:.1f} |")
    lines += [f"\n{r['title']} could not run: {r['error']}" for r in failed]
    lines += ["", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)


def _plot(png: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 3.4))
    colors = ["#4c72b0" if r["method"] == "dense" else "#55a868" if r["method"] in ELM_METHODS
              else "#8172b2" if r["method"] in WIDTH else "#c44e52" for r in rows]
    ax.bar(range(len(rows)), [r["accuracy"] for r in rows], color=colors)
    healed = [(i, r["healed_accuracy"]) for i, r in enumerate(rows) if "healed_accuracy" in r]
    if healed:  # healed accuracy as an outlined bar over the unhealed one
        ax.bar([i for i, _ in healed], [a for _, a in healed], fill=False, edgecolor="black",
               linestyle="--", label="after LoRA healing")
        ax.legend(fontsize=8, loc="upper right")
    for i, r in enumerate(rows):
        top = max(r["accuracy"], r.get("healed_accuracy", 0.0))
        ax.text(i, top + 0.02, f"{r['accuracy']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["title"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="test accuracy", ylim=(0, 1.1), title=title)
    fig.tight_layout()
    save_figure(fig, png)
