"""Top-level commands: ``info``, ``remove_layers``, ``compress_elm``, ``compress_recurrence`` and the
``demo`` main job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .io import RunDir, atomic_write_text, save_figure
from .methods.recurrence import RecurrenceConfig
from .train.elm import ElmTrainConfig
from .train.recurrence import RecurrenceTrainConfig


def info(model: str | Path) -> dict:
    """Describe a model: family, layer count, parameter count, attention layout."""
    from .models import count_parameters, family_of, load_model

    m = load_model(model, dtype="float32", device="cpu")
    c = m.config
    return {
        "model": str(model),
        "family": family_of(m).name,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "parameters": count_parameters(m),
    }


def _parse_layers(layers: str | list[int] | tuple[int, ...]) -> list[int]:
    if isinstance(layers, str):
        try:
            return [int(x) for x in layers.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise ValueError(f"--layers must be comma-separated integers, got {layers!r}") from e
    return [int(x) for x in layers]


def remove_layers(model: str | Path, layers: str | list[int], out: str | Path) -> dict:
    """Delete decoder layers by index and save the shorter model (stock HF format)."""
    from .models import count_parameters, load_model, load_tokenizer, remove_layers_

    drop = _parse_layers(layers)
    run = RunDir(out)
    run.write_config("remove-layers", model=str(model), layers=drop)
    tok = load_tokenizer(model)
    m = load_model(model, dtype="float32", device="cpu")
    n0, p0 = m.config.num_hidden_layers, count_parameters(m)
    remove_layers_(m, drop)
    m.save_pretrained(str(run / "model"), safe_serialization=True)
    tok.save_pretrained(str(run / "model"))
    metrics = {
        "removed": sorted(set(drop)), "layers_before": n0, "layers_after": m.config.num_hidden_layers,
        "params_before": p0, "params_after": count_parameters(m),
    }
    run.write_metrics(metrics)
    return metrics


@dataclass(frozen=True)
class ElmCompressConfig:
    """Where the ELM block goes, how it is solved, and how it is trained."""

    start: int | str | None = None
    """First replaced layer; "auto" searches it with GPPO; default: the middle of the network."""
    span: int | None = None
    """M, the number of layers the block replaces (default: ratio x N)."""
    ratio: float = 0.25
    """Fraction of layers the block replaces when span is unset."""
    max_iter: int = 4
    """Block evaluations per forward at inference."""
    tol: float = 0.0
    """Per-token stopping threshold on ||phi(z) - z|| (0: always max_iter)."""
    tol_mode: Literal["abs", "rel"] = "abs"
    """Residual absolute, or relative to ||phi(z)||."""
    solver: Literal["naive", "anderson", "broyden"] = "naive"
    """Fixed-point solver at inference."""
    kv_mode: Literal["one_step", "per_iter"] = "one_step"
    """One K/V slot per position for the block, or one per iteration (needs tol 0)."""
    format: str = "auto"
    """Format of --data (auto, alpaca, gsm8k, metamath, math, or text: plain-text JSONL, every token
    a target of the block's distillation and CE)."""
    limit: int | None = None
    """Train on the first N examples only."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    search_steps: int = 200
    """GPPO reward-model steps when --start auto."""
    train: ElmTrainConfig = field(default_factory=ElmTrainConfig)
    """SJFB training settings (--train.steps, --train.lr, ...)."""

    def __post_init__(self):
        if isinstance(self.start, str) and self.start != "auto":
            raise ValueError(f"--start must be a layer index or 'auto', got {self.start!r}")


def compress_elm(model: str | Path, data: str | Path, out: str | Path,
                 cfg: ElmCompressConfig = ElmCompressConfig()) -> dict:
    """Turn a (task-tuned) dense model into an ELM and train its block with SJFB.

    Writes the ELM to ``out/model`` (loadable with trust_remote_code where elmkit is absent),
    plus plan.json, the training log plot and metrics.json.
    """
    import copy

    from .data.formats import read_training
    from .io import write_json
    from .methods import elm as elm_method
    from .models import count_parameters, load_model, load_tokenizer
    from .train.elm import SpanTeacher, train_elm

    run = RunDir(out)
    run.write_config("elm", model=str(model), data=str(data), **asdict(cfg))
    tok = load_tokenizer(model)
    examples = read_training(data, cfg.format)  # instruction examples or plain texts
    examples = examples[: cfg.limit] if cfg.limit else examples
    dense = load_model(model, dtype="float32", device=cfg.device)
    n, p0 = dense.config.num_hidden_layers, count_parameters(dense)
    start = cfg.start
    if start == "auto":  # GPPO on a copy: it injects the candidates' adapters into the model
        from .methods import gppo

        thetas: list = []
        found = gppo.plan(copy.deepcopy(dense), tok, examples, gppo.GppoConfig(
            span=cfg.span, ratio=cfg.ratio, steps=cfg.search_steps, seed=cfg.train.seed),
            thetas=thetas, ckpt_dir=run / "gppo_checkpoints")
        write_json(run / "gppo.json", {"start": found.start, "theta": list(found.theta),
                                       "theta_history": thetas})
        start = found.start
    plan = elm_method.plan(dense, start=start, span=cfg.span, ratio=cfg.ratio,
                           max_iter=cfg.max_iter, tol=cfg.tol, tol_mode=cfg.tol_mode,
                           solver=cfg.solver, kv_mode=cfg.kv_mode)
    write_json(run / "plan.json", plan)
    # the span's layers, sharing the rest with the ELM: one model + M layers in memory, not two
    teacher = SpanTeacher(dense, plan.start, plan.span, own_lower=cfg.train.kept_lora_r > 0)
    elm = elm_method.apply_(dense, plan)
    fit = train_elm(elm, teacher, tok, examples, out, cfg.train)
    run.write_config("elm", model=str(model), data=str(data), **asdict(cfg))  # the whole command
    metrics = {**fit, "plan": plan, "dense_layers": n, "elm_layers": elm.config.num_hidden_layers,
               "params_dense": p0, "params_elm": count_parameters(elm),
               "kv_ratio": elm.config.num_hidden_layers / n}
    run.write_metrics(metrics)
    return metrics


@dataclass(frozen=True)
class RecurrenceCompressConfig(RecurrenceConfig):
    """The recurrent layout (given by its fields, or placed by a removal target) and its training.

    The layout fields are ``RecurrenceConfig``'s (--prelude, --core-start, --core-len, ...); a
    RecurrenceCompressConfig is a RecurrenceConfig, so ``recurrence.plan`` takes it as it is.
    """

    n_remove: int | None = None
    """Remove this many layers, deleted where ELM would place its span (recurrence.for_target): it sets
    --prelude and --core-start. Unset: the layout --prelude, --core-start and --core-len give."""
    budget: Literal["params", "compute"] = "params"
    """What --n-remove counts. params: n layers are deleted (N - n kept, as ELM at the same n); compute:
    n + (r_bar - 1) x core-len are deleted, so a token costs N - n layer evaluations at r_bar."""
    format: str = "auto"
    """Format of --data (auto, alpaca, gsm8k, metamath, math, or text: plain-text JSONL, every token
    a target)."""
    limit: int | None = None
    """Train on the first N examples (or texts) only."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    train: RecurrenceTrainConfig = field(default_factory=RecurrenceTrainConfig)
    """Random-depth truncated-BPTT training (--train.steps, --train.lr, ...)."""

    def __post_init__(self):
        super().__post_init__()
        if self.n_remove is not None:
            if self.n_remove < 0:
                raise ValueError(f"--n-remove must be >= 0, got {self.n_remove}")
            if self.core_start is not None or self.coda is not None:
                raise ValueError("--n-remove places the prelude and the core itself; drop --core-start "
                                 "and --coda, or drop --n-remove and give the layout")
        if self.budget not in ("params", "compute"):
            raise ValueError(f"--budget must be params or compute, got {self.budget!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def compress_recurrence(model: str | Path, data: str | Path, out: str | Path,
                        cfg: RecurrenceCompressConfig = RecurrenceCompressConfig()) -> dict:
    """Retrofit recurrence into a dense model (McLeish et al., arXiv 2511.07384) and train it.

    The source model's layers split into a prelude run once, deleted layers, a core of layers
    iterated r times with an adapter on [state; prelude output], and a coda (``methods.recurrence``);
    the model then trains at a random depth per step with truncated backpropagation
    (``train.recurrence``). With ``n_remove`` the layout is placed where ELM would remove as many
    layers. Writes the model to ``out/model`` (loadable with trust_remote_code where elmkit is absent),
    plus plan.json, history.json, loss.png and metrics.json. An interrupted run resumes from
    ``out/checkpoints``; a finished one is not trained again when repeated with the same settings.
    """
    import sys

    from .data.formats import read_training
    from .io import path_identity, read_json, write_json
    from .methods import recurrence
    from .models import count_parameters, load_model, load_tokenizer
    from .train.common import fingerprint
    from .train.recurrence import train_recurrent

    if not isinstance(cfg, RecurrenceCompressConfig):
        raise ValueError(f"compress_recurrence takes a RecurrenceCompressConfig, got {type(cfg).__name__}")
    run = RunDir(out)
    settings = {"model": str(model), "data": str(data), **asdict(cfg)}
    # what changes the result: the settings and the input files (how the run is computed may change)
    train = {k: v for k, v in asdict(cfg.train).items() if k not in ("save_every", "ce_chunk")}
    fp = fingerprint({**settings, "train": train, "files": [path_identity(model), path_identity(data)]},
                     ignore=("device",))
    if (run / "metrics.json").is_file() and (run / "model" / "config.json").is_file():
        done = read_json(run / "metrics.json")
        if done.get("fingerprint") == fp:
            print(f"{out} holds a finished run with these settings; not training it again (delete "
                  "its metrics.json to repeat it)", file=sys.stderr)
            return done
    run.write_config("recurrence", **settings)
    tok = load_tokenizer(model)
    examples = read_training(data, cfg.format)  # instruction examples or plain texts
    examples = examples[: cfg.limit] if cfg.limit else examples
    dense = load_model(model, dtype="float32", device=cfg.device)
    n, p0 = dense.config.num_hidden_layers, count_parameters(dense)
    layout = cfg if cfg.n_remove is None else recurrence.for_target(cfg, dense, cfg.n_remove, cfg.budget)
    plan = recurrence.plan(dense, layout)
    write_json(run / "plan.json", plan)
    rec = recurrence.apply_(dense, plan)  # dense's layers move into rec; the deleted ones are freed
    fit = train_recurrent(rec, tok, examples, out, cfg.train)
    run.write_config("recurrence", **settings)  # the whole command (the trainer wrote its own part)
    metrics = {**fit, "plan": asdict(plan), "dense_layers": n,
               "recurrent_layers": rec.config.num_hidden_layers,
               "params_dense": p0, "params_recurrent": count_parameters(rec),
               "layer_evals": plan.layer_evals, "dense_layer_evals": n, "fingerprint": fp}
    run.write_metrics(metrics)
    return metrics


def compress(model: str | Path, data: str | Path, out: str | Path, method: str = "elm", cfg=None,
             calib=None) -> dict:
    """Compress ``model`` with ``method``: ``elm`` (cfg: ElmCompressConfig), ``recurrence`` (cfg:
    RecurrenceCompressConfig) or a depth or width method of ``elmkit.methods.DEPTH`` / ``WIDTH``
    (cfg: its config; calib: a CalibConfig)."""
    from .compare import METHODS, compress_method
    from .data.calibration import CalibConfig

    if method == "elm":
        return compress_elm(model, data, out, cfg if cfg is not None else ElmCompressConfig())
    if method == "recurrence":
        return compress_recurrence(model, data, out, cfg if cfg is not None else RecurrenceCompressConfig())
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; known: {', '.join((*METHODS, 'recurrence'))}")
    return compress_method(model, data, out, method, cfg, calib if calib is not None else CalibConfig())


def search(model: str | Path, data: str | Path, out: str | Path, cfg=None) -> dict:
    """GPPO: learn which start layer the ELM block should replace (policy over candidates).

    Writes gppo.json (chosen start, theta and pi after every policy update, reward statistics per
    candidate, the step log), plan.json and report.md with a heatmap of pi over training.
    """
    import torch

    from .data.formats import read_examples
    from .io import write_json
    from .methods import gppo
    from .models import load_model, load_tokenizer

    cfg = cfg or gppo.GppoConfig()
    run = RunDir(out)
    run.write_config("search", model=str(model), data=str(data), **asdict(cfg))
    tok = load_tokenizer(model)
    examples = read_examples(data)
    dense = load_model(model, dtype="float32")
    history, thetas = [], []
    plan = gppo.plan(dense, tok, examples, cfg, history=history, thetas=thetas,
                     ckpt_dir=run / "checkpoints")
    stats = {}
    for a in range(len(plan.theta)):
        rs = [h["reward"] for h in history if h["action"] == a]
        stats[a] = {"samples": len(rs), "mean_reward": sum(rs) / len(rs) if rs else None,
                    "last_reward": rs[-1] if rs else None}
    pis = [torch.softmax(torch.tensor(t), -1).tolist() for t in thetas]
    result = {"start": plan.start, "span": plan.span, "theta": list(plan.theta),
              "pi": pis[-1] if pis else None, "theta_history": thetas, "pi_history": pis,
              "candidates": stats, "steps": history}
    write_json(run / "gppo.json", result)
    write_json(run / "plan.json", plan)
    _plot_pi(run / "pi.png", pis, plan.start)
    lines = ["# GPPO search", "", f"Chosen start layer: **{plan.start}** (M = {plan.span}).", "",
             "| start | samples | mean reward (-CE) | final theta | final pi |", "|---|---|---|---|---|"]
    for a, st in stats.items():
        mr = f"{st['mean_reward']:.4f}" if st["mean_reward"] is not None else "-"
        pi = f"{pis[-1][a]:.3f}" if pis else "-"
        lines.append(f"| {a} | {st['samples']} | {mr} | {plan.theta[a]:.3f} | {pi} |")
    lines += ["", "![pi over training](pi.png)", ""]
    atomic_write_text(run / "report.md", "\n".join(lines))
    metrics = {"start": plan.start, "span": plan.span, "theta": list(plan.theta)}
    run.write_metrics(metrics)
    return metrics


def _plot_pi(png: Path, pis: list[list[float]], chosen: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    if pis:
        im = ax.imshow(list(zip(*pis)), aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(im, ax=ax, label="pi(start)")
    ax.set(xlabel="policy update", ylabel="start layer", title=f"GPPO policy (chosen: {chosen})")
    fig.tight_layout()
    save_figure(fig, png)


def pretrain(out: str | Path, preset: str = "tiny", prune_to: str | None = None,
             init: str | Path | None = None, cfg=None, prune=None) -> dict:
    """Pretrain a testbed preset and measure it; with ``prune_to`` it is pruned while it trains
    (EfficientLLM, see elmkit.methods.efficientllm) down to a preset's size (``base``), a fraction
    of its parameters (``0.5``) or a parameter count, and saved cut to that size (slim, or stock
    when all layers end equal). ``init`` continues training a model folder instead of starting
    from random weights. Writes out/model (a testbed model: ``elmkit compare`` takes it),
    architecture.json and architecture.png when pruned, metrics.json.
    """
    from .methods.efficientllm import EfficientLLMConfig
    from .testbed import PRESETS
    from .testbed.accuracy import test_accuracy
    from .testbed.card import write_recipe
    from .testbed.pretrain import pretrain as run_pretrain
    from .testbed.problems import make_split

    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = cfg or PRESETS[preset]
    prune = prune if prune is not None else EfficientLLMConfig()
    run = RunDir(out)
    metrics = run_pretrain(out, cfg, preset, prune_to=prune_to, prune=prune if prune_to is not None else None,
                           init=init)
    model_dir = Path(out) / "model"
    write_recipe(model_dir, cfg, preset)
    from .models import load_model, load_tokenizer

    m, tok = load_model(model_dir, dtype="float32"), load_tokenizer(model_dir)
    test = make_split("test", cfg.test_examples, cfg.problems, cfg.seed)
    metrics["test_accuracy"] = test_accuracy(m, tok, test, 250 if next(m.parameters()).is_cuda else 64)
    if prune_to is not None:
        from .io import read_json
        from .methods.efficientllm import plot_architecture

        plot_architecture(read_json(Path(out) / "architecture.json"), Path(out) / "architecture.png")
    run.write_metrics(metrics)
    return metrics


def demo(out: str | Path | None = None, model: str = "testbed:tiny") -> dict:
    """The main job: compress a model into an ELM, train the block, and compare (``elmkit.demos``).

    On a testbed model (the default: the shipped tiny one): accuracy on 200 held-out problems of
    dense, an ELM whose block replaces 25% of the layers (trained with SJFB on 4,000 problems) and
    ShortGPT deleting as many layers without healing; about 3 minutes on a 2-core CPU. On any other
    model (e.g. ``smollm2-135m``): perplexity on a shipped WikiText-2 slice of dense, the ELM
    (trained by distillation on shipped C4 text) and ShortGPT at the same layer count; about 15
    minutes on a 2-core CPU for a 135M model. Writes report.md (table + plots), metrics.json and
    the ELM model into ``out`` (default: runs/demo for testbed:tiny, runs/demo-<model> otherwise).
    """
    from .demos import run

    return run(out, model)


def generate(model: str | Path, prompt: str, cfg=None, dtype: str = "auto", device: str = "auto",
             cuda_graphs: bool = True) -> dict:
    """Continue one prompt with the fast decoder (static KV cache; CUDA graphs on a GPU).

    Dense and ELM models of the supported families; the prompt goes through the tokenizer's chat
    template when it has one. Returns the text, the new tokens and the decode speed (for an ELM,
    the block evaluations per token). ``cfg`` is an ``elmkit.infer.DecodeConfig``.
    """
    import torch

    from .infer import DecodeConfig
    from .infer import generate as fast_generate
    from .models import load_model, load_tokenizer

    cfg = cfg if cfg is not None else DecodeConfig()
    tok = load_tokenizer(model)
    m = load_model(model, dtype=dtype, device=device)
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    x = torch.tensor([ids], device=next(m.parameters()).device)
    out, stats = fast_generate(m, x, None, cfg, cuda_graphs=cuda_graphs)
    new = [t for t in out[0].tolist() if t != tok.pad_token_id]
    return {"text": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new),
            "tokens_per_s": round(stats.tokens_per_s, 1), "prefill_s": round(stats.prefill_s, 4),
            "block_evaluations": stats.block_evaluations}
