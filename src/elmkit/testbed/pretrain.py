"""Train the testbed model from scratch: a Qwen2-architecture decoder on arithmetic word problems.

The model is a stock ``Qwen2ForCausalLM`` (GQA, RoPE, RMSNorm, SwiGLU: the code paths of a real
Qwen2.5) with the byte-level tokenizer. The loop is deliberately plain: sample a batch, take the
cross-entropy on answer tokens, AdamW with linear warm-up and cosine decay, clip, step. Batches are
a pure function of (seed, step) and checkpoints hold weights, optimizer and RNG state, so an
interrupted run resumes exactly.

Output (``out``)::

    config.json  metrics.json  train_log.jsonl  loss.png
    data/{train,validation,test}.json     the exact problems used (ELM/Alpaca JSON)
    checkpoints/step_XXXXXX/               (removed when the run finishes)
    model/                                 HF folder: weights, tokenizer, README.md card, card.json
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..data.chat import encode_many
from ..data.collate import pad_batch
from ..data.tokenizer import byte_tokenizer
from ..io import RunDir, atomic_write_text, write_json
from ..train.common import (
    check_fingerprint,
    cosine_lr,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    plot_curves,
    save_checkpoint,
)
from .problems import ProblemConfig, make_split, to_records


@dataclass(frozen=True)
class PretrainConfig:
    """Testbed model size, data and optimisation."""

    layers: int = 12
    """Decoder layers."""
    hidden: int = 64
    """Hidden size d."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (GQA when fewer than heads)."""
    intermediate: int = 192
    """MLP width."""
    problems: ProblemConfig = field(default_factory=ProblemConfig)
    """Difficulty of the training and test problems."""
    train_examples: int = 40_000
    """Distinct training problems."""
    val_examples: int = 200
    """Validation problems (accuracy logged during training)."""
    test_examples: int = 1_000
    """Held-out test problems (final accuracy)."""
    steps: int = 1_800
    """Optimizer steps."""
    batch_size: int = 32
    """Problems per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    clip: float = 1.0
    """Gradient-norm clip."""
    seed: int = 0
    """Seed of the model init, the data and the batch order."""
    eval_every: int = 250
    """Validation accuracy every N steps (0: only at the end)."""
    save_every: int = 100
    """Checkpoint every N steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on a GPU that has it, else fp32."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""

    def __post_init__(self):
        if self.layers < 2 or self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("need --layers >= 2, --hidden divisible by --heads, "
                             "--heads divisible by --kv-heads")
        if min(self.train_examples, self.test_examples, self.val_examples, self.steps,
               self.batch_size) < 1:
            raise ValueError("example counts, --steps and --batch-size must be positive")
        if self.save_every < 1 or self.eval_every < 0:
            raise ValueError("--save-every must be >= 1 and --eval-every >= 0")


PRESETS: dict[str, PretrainConfig] = {
    # CPU: about 17 minutes on 2 cores (0.56 s/step); shipped inside the package. Chosen by
    # benchmarks/testbed_sweep.py: narrower-but-longer beat d=96 at the same CPU time.
    "tiny": PretrainConfig(problems=ProblemConfig(min_steps=1, max_steps=3, digits=1, max_value=199)),
    # One H200, under 10 minutes all told: 24 layers, GQA 8:2, harder problems (3-5 steps,
    # 2-digit amounts, values up to 999).
    "base": PretrainConfig(
        layers=24, hidden=256, heads=8, kv_heads=2, intermediate=768,
        problems=ProblemConfig(min_steps=3, max_steps=5, digits=2, max_value=999),
        train_examples=150_000, steps=3_000, batch_size=128, lr=2e-3, min_lr=5e-5, warmup=200,
        eval_every=1_000, save_every=1_000,
    ),
    # `base`, 1.5x wider everywhere (hidden 384, 12 heads of 32, GQA 12:3, MLP 1152): the start
    # model that EfficientLLM prunes to `base`'s size while it trains.
    "base-wide": PretrainConfig(
        layers=24, hidden=384, heads=12, kv_heads=3, intermediate=1152,
        problems=ProblemConfig(min_steps=3, max_steps=5, digits=2, max_value=999),
        train_examples=150_000, steps=3_000, batch_size=128, lr=2e-3, min_lr=5e-5, warmup=200,
        eval_every=1_000, save_every=1_000,
    ),
}


def model_config(cfg: PretrainConfig, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=1024, rope_theta=10_000.0,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )


def pretrain(out: str | Path, cfg: PretrainConfig = PRESETS["tiny"], preset: str | None = None,
             progress: bool = True, on_step: Callable[[int, float], None] | None = None,
             prune_to: str | float | None = None, prune=None, init: str | Path | None = None) -> dict:
    """Train a testbed model from scratch; resumes from ``out/checkpoints`` when present.

    ``on_step(step, loss)`` is called after every optimizer step (and after its checkpoint).
    With ``prune_to`` (a preset name, a fraction or a parameter count) the model is pruned while it
    trains (EfficientLLM, ``prune``: an EfficientLLMConfig) and saved cut to that size. ``init``
    starts from a model folder's weights (continued training) instead of a random init.
    Returns the metrics written to ``out/metrics.json``.
    """
    from transformers import Qwen2ForCausalLM

    from ..models.loading import resolve_device
    from .accuracy import test_accuracy

    run = RunDir(out)
    # settings that change the weights; logging, devices and threads do not
    from ..methods.efficientllm import EfficientLLMConfig, Pruner, resolve_target

    if prune_to is not None and prune is None:
        prune = EfficientLLMConfig()
    settings = {**asdict(cfg), "prune_to": prune_to, "prune": asdict(prune) if prune_to is not None else None,
                "init": str(init) if init is not None else None}
    fp = fingerprint(settings, ignore=("eval_every", "save_every", "device", "threads"))
    ckpt_dir = run / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:  # refuse other settings before touching the run's files
        check_fingerprint(last, fp)
    run.write_config("testbed train", preset=preset, **settings)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    tok = byte_tokenizer()

    splits = {
        "train": make_split("train", cfg.train_examples, cfg.problems, cfg.seed),
        "validation": make_split("validation", cfg.val_examples, cfg.problems, cfg.seed),
        "test": make_split("test", cfg.test_examples, cfg.problems, cfg.seed),
    }
    for name, exs in splits.items():
        # the training set is written only when small; any size regenerates from the seed
        if len(exs) <= 100_000:
            atomic_write_text(run / "data" / f"{name}.json", json.dumps(to_records(exs), indent=1))
    feats = encode_many(tok, splits["train"], 1024)

    torch.manual_seed(cfg.seed)
    if init is not None:
        from ..models.loading import load_model

        model = load_model(init, dtype="float32", device=device)
    else:
        model = Qwen2ForCausalLM(model_config(cfg, tok)).to(device)
    pruner = Pruner(model, prune, resolve_target(prune_to, model, tok), cfg.steps) if prune_to is not None \
        else None
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    step, t_train, tokens = 0, 0.0, 0
    if last is not None:
        weights, state = load_checkpoint(last, opt)
        model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("pruner.")})
        step, t_train, tokens = state["step"], state["train_time_s"], state["tokens"]
        if pruner is not None:
            pruner.load_state_dict(weights, state["pruner"])
        print(f"resuming from {last} (step {step}/{cfg.steps})")
    log_path = run / "train_log.jsonl"
    _truncate_log(log_path, step)  # rows after the checkpoint are redone

    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", disable=not progress)
    t_start = time.time()
    model.train()
    while step < cfg.steps:
        t0 = time.time()
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = pad_batch(_batch(feats, step, cfg), tok.pad_token_id)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # (B, T)
        # Right padding + causal attention: no real token ever sees a pad, and pads carry label
        # -100, so the loss is the same without the padding mask, and sdpa keeps its fast
        # causal kernel instead of materialising a (B, H, T, T) mask.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if pruner is not None:
            pruner.after_backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        pruned = None
        if pruner is not None:
            pruner.after_step()
            pruned = pruner.step(step, ids, batch["attention_mask"].to(device))
        loss_v = loss.item()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"loss became {loss_v} at step {step}; lower --lr")
        tokens += int(batch["attention_mask"].sum())
        t_train += time.time() - t0
        rec = {"step": step, "loss": round(loss_v, 5), "lr": lr, "grad_norm": round(float(gnorm), 4)}
        if pruned is not None:
            rec["pruned"] = pruned
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            rec["val_accuracy"] = test_accuracy(model, tok, splits["validation"], batch_size=200)
            model.train()
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{tokens / max(t_train, 1e-9):.0f}",
                        **({"val": f"{rec['val_accuracy']:.3f}"} if "val_accuracy" in rec else {}))
        if step % cfg.save_every == 0 and step < cfg.steps:
            tensors, extra = dict(model.state_dict()), {}
            if pruner is not None:
                p_tensors, extra["pruner"] = pruner.state_dict()
                tensors.update(p_tensors)
            save_checkpoint(ckpt_dir, step, tensors, opt,
                            {"fingerprint": fp, "train_time_s": t_train, "tokens": tokens, **extra})
        if on_step is not None:
            on_step(step, loss_v)
    bar.close()
    train_time = time.time() - t_start

    model.eval()
    if pruner is not None:
        model = pruner.finish()
        write_json(run / "architecture.json", {"history": pruner.history, "final": pruner.state.__dict__})
    model_dir = run / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    val_acc = test_accuracy(model, tok, splits["validation"], batch_size=200)
    metrics = {
        "steps": step, "train_time_s": round(t_train, 1), "wall_time_train_s": round(train_time, 1),
        "train_tokens_per_s": round(tokens / max(t_train, 1e-9), 1),
        "final_loss": _tail_loss(log_path), "val_accuracy": val_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
        **({"pruned_to": prune_to, "target_parameters": pruner.target, "start_parameters": pruner.p0}
           if pruner is not None else {}),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    _plot(log_path, run / "loss.png")
    run.write_metrics(metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


_BUCKET = 8  # batches drawn together and sorted by length, so a batch pads little


def _batch(feats, step: int, cfg: PretrainConfig):
    """Batch ``step``, a pure function of (seed, step): the epoch's permutation is cut into
    groups of _BUCKET batches; each group is sorted by length, cut, and its batches shuffled."""
    group = cfg.batch_size * _BUCKET
    per_epoch = len(feats) // group
    if per_epoch == 0:
        raise ValueError(f"--train-examples must be at least {group} (--batch-size x {_BUCKET})")
    epoch, rest = divmod(step, per_epoch * _BUCKET)
    g_idx, b_idx = divmod(rest, _BUCKET)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(len(feats), generator=g)[g_idx * group:(g_idx + 1) * group].tolist()
    perm.sort(key=lambda i: len(feats[i]["input_ids"]))
    g_order = torch.Generator().manual_seed(cfg.seed * 7919 + step // _BUCKET)
    order = torch.randperm(_BUCKET, generator=g_order).tolist()
    pos = order[b_idx]
    return [feats[i] for i in perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]


def _truncate_log(log_path: Path, step: int) -> None:
    rows = log_path.read_text().splitlines() if log_path.is_file() else []
    keep = [r for r in rows if json.loads(r)["step"] <= step]
    atomic_write_text(log_path, "".join(r + "\n" for r in keep))


def _tail_loss(log_path: Path, n: int = 20) -> float:
    rows = [json.loads(l) for l in log_path.read_text().splitlines()[-n:]]
    return round(sum(r["loss"] for r in rows) / len(rows), 5)


def _plot(log_path: Path, png: Path) -> None:
    rows = [json.loads(l) for l in log_path.read_text().splitlines()]
    val = [r for r in rows if "val_accuracy" in r]
    plot_curves(png, [
        ("train loss (answer tokens)", [r["step"] for r in rows], [r["loss"] for r in rows],
         {"yscale": "log"}),
        ("validation accuracy", [r["step"] for r in val], [r["val_accuracy"] for r in val],
         {"ylim": (0, 1)}),
    ])
