"""Train a retrofitted recurrent model (``methods.recurrence``) as its authors do: next-token
cross-entropy over every token, at a random depth per step, backpropagating through the last
iterations only (truncated BPTT).

Per step, with r_bar = ``model.config.mean_recurrence`` (or its curriculum value r_bar(t)) and
k_bar = min(``model.config.backprop_depth``, r_bar)::

    lambda ~ LogNormal(mu = ln r_bar - sigma^2 / 2, sigma)     (E[lambda] = r_bar; sigma = 0.5)
    d ~ Poisson(lambda) + 1;   n = max(d - k_bar, 0);   k = min(k_bar, d)
    e = P(embed(x));  s = s_0;  repeat n under no_grad: s = R(A [s; e]);  repeat k: s = R(A [s; e])
    loss = CE(lm_head(norm(C(s))), next tokens)

Optional r_bar curriculum (``curriculum``): r_bar(t) = max(1, ceil(R f(t / T_w))) for t < T_w, then
R, with f(u) = u (linear) or 1 - sqrt(1 - u) (1-sqrt); T_w = ``curriculum_frac`` x steps.

What trains: everything (the authors) or, with ``trainable="core"``, the adapter and the core only.
The optimizer is AdamW, betas (0.9, 0.95), eps 1e-8, one weight decay for every tensor (the
authors' AdamW-only variant; their main runs use Muon on the hidden matrices), gradient clip, and a
warm-up / stable / decay learning rate: linear warm-up, constant, then a cosine decay to ``min_lr``
over the last ``decay_frac`` of the steps (the decay shape of transformers' WSD schedule, the
authors' scheduler; they do not state its shape). Data are plain-text windows of ``max_len`` tokens
(``data.collate.training_features``; the authors pack 1024-token sequences instead), or
instruction examples (the CE is then on their answers).

The batch, the depth draw and s_0 are pure functions of (seed, step), so a run is deterministic and
resumes exactly from its checkpoints (written atomically, ``train.common``). One process only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.collate import pad_batch, training_features
from ..data.formats import Example
from ..io import RunDir, write_json
from .common import (
    batch_indices,
    check_fingerprint,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    plot_curves,
    save_checkpoint,
)
from .elm import answer_ce


@dataclass(frozen=True)
class RecurrenceTrainConfig:
    """Random-depth truncated-BPTT training of a recurrent model."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Windows (or examples) per step."""
    max_len: int = 1024
    """Tokens per window (the authors' sequence length)."""
    lr: float = 5e-5
    """Peak learning rate (the authors' AdamW-only variant)."""
    min_lr: float = 5e-8
    """Learning rate at the end of the decay (the authors: 0.001 x lr)."""
    warmup: int = 10
    """Linear warm-up steps."""
    decay_frac: float = 0.6
    """Fraction of the steps, at the end, over which the learning rate decays (the authors: 0.6)."""
    weight_decay: float = 1e-4
    """AdamW weight decay, on every trained tensor."""
    clip: float = 1.0
    """Gradient-norm clip."""
    depth_sigma: float = 0.5
    """sigma of the log-normal rate of the depth draw."""
    curriculum: Literal["none", "linear", "1-sqrt"] = "none"
    """Ramp r_bar up from 1 during the first curriculum_frac of the steps (the authors' main runs:
    1-sqrt over 0.75)."""
    curriculum_frac: float = 0.75
    """Fraction of the steps the curriculum lasts."""
    trainable: Literal["all", "core"] = "all"
    """all: every parameter (the authors); core: only the adapter and the core layers."""
    seed: int = 0
    """Seed of the data order, the depth draws and s_0."""
    save_every: int = 100
    """Checkpoint every N steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on a GPU that has it, else fp32 (the authors: bf16 autocast)."""
    ce_chunk: int = 1024
    """Tokens per chunk of the CE head (its logits are recomputed in the backward pass)."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("--steps, --batch-size and --save-every must be >= 1")
        if self.max_len < 2:
            raise ValueError("--max-len must be >= 2")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError("--lr must be > 0 and --min-lr in [0, --lr]")
        if self.warmup < 0 or not 0 <= self.decay_frac <= 1:
            raise ValueError("--warmup must be >= 0 and --decay-frac in [0, 1]")
        if self.weight_decay < 0 or not self.clip > 0:
            raise ValueError("--weight-decay must be >= 0 and --clip > 0")
        if not self.depth_sigma >= 0:
            raise ValueError("--depth-sigma must be >= 0")
        if self.curriculum not in ("none", "linear", "1-sqrt"):
            raise ValueError(f"--curriculum must be none, linear or 1-sqrt, got {self.curriculum!r}")
        if not 0 < self.curriculum_frac <= 1:
            raise ValueError("--curriculum-frac must be in (0, 1]")
        if self.trainable not in ("all", "core"):
            raise ValueError(f"--trainable must be all or core, got {self.trainable!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.ce_chunk < 1:
            raise ValueError("--ce-chunk must be >= 1")
        if self.seed < 0:
            raise ValueError("--seed must be >= 0")


def mean_depth(step: int, r_bar: int, cfg: RecurrenceTrainConfig) -> int:
    """r_bar(t): the curriculum's mean depth at ``step`` (r_bar itself without a curriculum)."""
    warm = cfg.curriculum_frac * cfg.steps
    if cfg.curriculum == "none" or step >= warm:
        return r_bar
    u = step / warm
    f = u if cfg.curriculum == "linear" else 1 - math.sqrt(1 - u)
    return max(1, math.ceil(r_bar * f))


def depth_draw(step: int, r_bar: int, k_bar: int, cfg: RecurrenceTrainConfig) -> tuple[int, int]:
    """(n, k): iterations without and with gradient at ``step``; a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    r = mean_depth(step, r_bar, cfg)
    lam = rng.lognormal(math.log(r) - cfg.depth_sigma ** 2 / 2, cfg.depth_sigma)
    d = int(rng.poisson(lam)) + 1
    k_bar = min(k_bar, r_bar)  # the authors: if r_bar < k_bar, k_bar := r_bar
    return max(d - k_bar, 0), min(k_bar, d)


def wsd_lr(step: int, cfg: RecurrenceTrainConfig) -> float:
    """Warm-up, stable, then cosine decay to min_lr over the last decay_frac of the steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay = cfg.decay_frac * cfg.steps
    start = cfg.steps - decay
    if step < start or decay == 0:
        return cfg.lr
    frac = min(1.0, (step - start) / decay)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def state_generator(step: int, cfg: RecurrenceTrainConfig) -> torch.Generator:
    """The CPU generator of step's s_0."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def recurrent_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, n: int, k: int,
                   generator: torch.Generator | None = None, ce_chunk: int = 1024) -> torch.Tensor:
    """Mean next-token CE of the labelled positions after n iterations without gradient and k with.

    ids, mask, labels: (B, T); labels -100 are ignored.
    """
    e, args = model.prelude_states(ids, mask)  # (B, T, d)
    s = model.initial_state(e, generator)  # (B, T, d)
    with torch.no_grad():
        for _ in range(n):
            s = model.core_step(s, e, args)
    for _ in range(k):
        s = model.core_step(s, e, args)
    h = model.coda_states(s, args)  # (B, T, d), before the final norm
    return answer_ce(model, h, labels, ce_chunk)


def trainable_parameters(model, which: str) -> dict[str, torch.nn.Parameter]:
    """The tensors a run trains, by name: every parameter, or the adapter's and the core's."""
    if which == "all":
        return dict(model.named_parameters())
    core = {id(p) for p in [*model.adapter.parameters(), *model.core.parameters()]}
    return {name: p for name, p in model.named_parameters() if id(p) in core}


def train_recurrent(model, tokenizer, data: list[Example] | list[str], out: str | Path,
                    cfg: RecurrenceTrainConfig = RecurrenceTrainConfig(), progress: bool = True,
                    on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` (a ``RecurrentForCausalLM``) in place on ``data``.

    Args:
        model: the recurrent model, from ``methods.recurrence.apply_``.
        tokenizer: its tokenizer (needs a pad token).
        data: plain texts (cut into windows of ``cfg.max_len`` tokens, every token a target) or
            instruction examples (the CE is on their answers).
        out: run folder: config.json, checkpoints/, history.json, loss.png, metrics.json and the
            trained model with the tokenizer in ``out/model``. Resumes from ``out/checkpoints``.
        cfg: training settings.
        progress: show a progress bar.
        on_step: called as ``on_step(step, loss)`` after every optimizer step.

    Returns:
        The metrics written to ``out/metrics.json``.

    Raises:
        ValueError: the model is not recurrent, the launch has several processes, ``out``
            holds checkpoints of other settings, or no example has a target within max_len.
    """
    from .dist import launched

    if getattr(model.config, "model_type", None) != "recurrent":
        raise ValueError("train_recurrent trains a RecurrentForCausalLM (methods.recurrence.apply_)")
    if launched():
        raise ValueError("train_recurrent runs in one process; launch it without accelerate/torchrun")
    c = model.config
    r_bar, k_bar = c.mean_recurrence, c.backprop_depth
    run = RunDir(out)
    settings = {"prelude": c.prelude, "core_start": c.core_start, "core_len": c.core_len,
                "mean_recurrence": r_bar, "backprop_depth": k_bar, "state_std": c.state_std,
                "examples": len(data), **asdict(cfg)}
    fp = fingerprint(settings, ignore=("save_every", "ce_chunk"))
    ckpt_dir = run / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        check_fingerprint(last, fp)
    run.write_config("recurrence train", **settings)

    device = next(model.parameters()).device
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    feats = training_features(tokenizer, data, cfg.max_len)
    if not any(label != -100 for f in feats for label in f["labels"][1:]):
        raise ValueError(f"no training example has a target token within --max-len {cfg.max_len} "
                         "(instruction data: its answers start later); raise --max-len")
    model.requires_grad_(False)
    named = trainable_parameters(model, cfg.trainable)
    params = list(named.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    step, history = 0, []
    if last is not None:
        weights, state = load_checkpoint(last, opt)
        with torch.no_grad():
            for name, t in weights.items():
                named[name].copy_(t)
        step, history = state["step"], state["history"]

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="recurrence", disable=not progress)
    t0, tokens = time.time(), 0
    while step < cfg.steps:
        lr = wsd_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = pad_batch(_batch(feats, step, cfg), tokenizer.pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        n, k = depth_draw(step, r_bar, k_bar, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = recurrent_loss(model, ids, mask, labels, n, k, state_generator(step, cfg), cfg.ce_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"recurrence loss became {value} at step {step}; lower --lr")
        tokens += int(mask.sum())
        history.append({"step": step, "loss": round(value, 6), "n": n, "k": k, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", depth=n + k)
        if step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt_dir, step, {name: p for name, p in named.items()}, opt,
                            {"fingerprint": fp, "history": history})
        if on_step is not None:
            on_step(step, value)
    bar.close()
    train_time = time.time() - t0
    model.requires_grad_(False)
    model.eval()
    model.save_pretrained(str(run / "model"))
    tokenizer.save_pretrained(str(run / "model"))
    head, tail = history[:min(3, len(history))], history[-min(20, len(history)):]
    metrics = {"steps": step, "first_loss": sum(h["loss"] for h in head) / len(head),
               "final_loss": sum(h["loss"] for h in tail) / len(tail),
               "mean_depth": sum(h["n"] + h["k"] for h in history) / len(history),
               "trainable_params": sum(p.numel() for p in params),
               "train_time_s": round(train_time, 1),
               "tokens_per_s": round(tokens / max(train_time, 1e-9), 1)}
    steps_ = [h["step"] for h in history]
    plot_curves(run / "loss.png", [
        ("next-token CE", steps_, [h["loss"] for h in history], {}),
        ("depth n + k", steps_, [h["n"] + h["k"] for h in history], {}),
    ])
    write_json(run / "history.json", history)  # per step: loss, n, k, lr
    run.write_metrics(metrics)
    return metrics


def _batch(feats, step: int, cfg: RecurrenceTrainConfig):
    """Batch ``step``; full batches only (the remainder of each epoch is skipped)."""
    per_epoch = max(1, len(feats) // cfg.batch_size)
    return [feats[i] for i in batch_indices(len(feats), cfg.batch_size, step, per_epoch, cfg.seed)]
