"""Task fine-tuning with LoRA (Hu et al., 2021), merged into the weights at the end, or of the
model's top in full (partial-layer fine-tuning, Lu et al., ICLR 2026).

``mode="lora"`` (default)::

    W' = W + (alpha / r) * B @ A,    A: (r, d_in), B: (d_out, r), B initialised to 0

Adapters sit on all seven projections of every decoder layer (q, k, v, o, gate, up, down); the
scale is alpha / r as in the paper and peft. (ELM's official code used r / alpha and merged
without the scale, which is only right when r == alpha.)

``mode="partial"``: no adapters; the final norm, the LM head and every parameter of the last
``partial_layers`` decoder layers train, everything else (the embeddings included) stays frozen
(``set_partial_trainable_``). This is how Lu et al. heal a reverse-order-pruned model
(``elmkit.methods.reverse``); their setting is 3 layers, AdamW at lr 1e-5 with 100 warm-up steps,
2 epochs. Their schedule decays linearly after the warm-up and their AdamW betas are (0.9, 0.999);
this loop decays by the cosine and uses (0.9, 0.95) in both modes.
Where the LM head is tied to the input embedding (SmolLM2, Gemma; the paper leaves such models
out) the head cannot train without the embedding changing too, so ``tied_head`` must say what to
do: ``refuse`` (default: stop with an error), ``train`` (the shared matrix trains, so the input
embedding changes too) or ``freeze`` (it stays frozen; only the final norm and the last layers train).

Loss is cross-entropy on answer tokens only (see ``elmkit.data.chat``).

The loop is plain and resumable: the data order is a pure function of (seed, step), and a
checkpoint holds the trained tensors, the optimizer state and the RNG state, so a run killed after a
checkpoint and restarted with the same command ends with the same weights as an uninterrupted one.

Output folder::

    out/config.json  out/metrics.json  out/loss.png
    out/checkpoints/step_000100/   (weights.safetensors: the trained tensors, optimizer.pt, state.json)
    out/adapter/                   (lora mode: peft adapter, loadable with PeftModel.from_pretrained)
    out/model/                     (stock HF model + tokenizer, safetensors; lora: merged)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..data.chat import IGNORE_INDEX, encode
from ..data.collate import pad_batch, text_features
from ..data.formats import Example, read_training
from ..io import RunDir
from ..models.adapters import get_embed, get_head, get_layers, get_norm
from .common import (
    batch_indices,
    check_fingerprint,
    cosine_lr,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    plot_curves,
    save_checkpoint,
)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules")
PARTIAL_FIELDS = ("partial_layers", "tied_head")
TiedHead = Literal["refuse", "train", "freeze"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Task fine-tuning settings: LoRA (default) or partial-layer fine-tuning."""

    r: int = 16
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input (lora mode)."""
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    """Linear layers that get adapters (lora mode; default: all seven projections)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 2e-6
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay on the trained tensors (the LoRA matrices, or the partial mode's)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_len: int = 512
    """Tokens per example (prompt + answer); longer ones are cut."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs."""
    clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast where the GPU supports it, else fp32."""
    format: str = "auto"
    """Data format of --data (auto, alpaca, gsm8k, metamath, math, or text: plain-text JSONL, cut
    into --max-len windows, every token a target)."""
    limit: int | None = None
    """Train on the first N examples only."""
    system: str | None = None
    """Optional system message for the chat template."""
    device: str = "auto"
    """Device: auto, cpu, cuda, ..."""
    mode: Literal["lora", "partial"] = "lora"
    """lora: adapters on --target-modules, merged at the end; partial: the final norm, the LM head
    and the last --partial-layers decoder layers train in full, the rest (embeddings too) frozen
    (Lu et al.; they use --lr 1e-5 --warmup-steps 100)."""
    partial_layers: int = 3
    """Partial mode: how many of the last decoder layers train (0: only the head and final norm)."""
    tied_head: TiedHead = "refuse"
    """Partial mode, models whose LM head is the input embedding matrix: refuse (stop with an
    error), train (train the shared matrix, so the input embedding changes too) or freeze (train
    only the final norm and the last --partial-layers layers)."""

    def __post_init__(self):
        if self.mode not in ("lora", "partial"):
            raise ValueError("--mode must be lora or partial")
        if self.partial_layers < 0:
            raise ValueError("--partial-layers must be >= 0")
        if self.tied_head not in ("refuse", "train", "freeze"):
            raise ValueError("--tied-head must be refuse, train or freeze")
        if self.r < 1 or self.alpha <= 0:
            raise ValueError("--r must be >= 1 and --alpha > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_len < 2:
            raise ValueError("--batch-size, --grad-accum must be >= 1 and --max-len >= 2")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("--epochs must be > 0 (or set --max-steps)")
        if self.save_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("--save-every and --keep-checkpoints must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError("--precision must be auto, fp32 or bf16")
        unknown = set(self.target_modules) - set(ALL_PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown --target-modules {sorted(unknown)}; known: {ALL_PROJECTIONS}")


def finetune(
    model: str | Path,
    data: str | Path | list[Example],
    out: str | Path,
    cfg: FinetuneConfig = FinetuneConfig(),
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
    on_model: Callable[[int, torch.nn.Module], bool | None] | None = None,
) -> dict:
    """Fine-tune ``model`` on ``data``: LoRA, or partial-layer with ``--mode partial``.

    Resumes from ``out``'s last checkpoint if present.

    Args:
        model: model folder or hub id (Llama, Qwen2, Qwen3, Mistral families).
        data: instruction data file (alpaca, gsm8k, metamath, math), plain-text JSONL, or a list
            of examples or of texts.
        out: run folder; the fine-tuned model is written to ``out/model``.
        cfg: the training settings.
        on_step: called as ``on_step(step, loss)`` after every optimizer step.
        on_model: called as ``on_model(step, model)`` after every optimizer step, with the model
            being trained (LoRA unmerged), e.g. to score it at chosen steps; it is set back to
            training mode afterwards. Returning True ends the run after that step (early
            stopping): the model is saved as the callback leaves it, e.g. with the best weights
            it put back, and metrics.json says ``stopped_early``.

    Returns:
        The metrics written to ``out/metrics.json``.

    Raises:
        ValueError: bad settings for this model, e.g. ``--partial-layers`` above its layer count or
            a tied LM head with ``--tied-head refuse``.
    """
    from peft import LoraConfig, get_peft_model

    from ..models.loading import load_model, load_tokenizer, resolve_device
    from .dist import current

    d = current()
    if d.kind == "fsdp":
        raise ValueError("the fine-tune runs under DDP (configs/accelerate/ddp.yaml), not FSDP: "
                         "what it trains is small, and every rank holds the frozen model")
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global micro-batch) must be a multiple of "
                         f"the {d.world} processes")
    run = RunDir(out) if d.main else Path(out)
    data_desc = str(data) if isinstance(data, (str, Path)) else f"<{len(data)} examples>"
    config = {"model": str(model), "data": data_desc, **asdict(cfg)}
    # settings that cannot change the result stay out (and a LoRA run's fingerprint is what it was
    # before partial mode existed, so its older checkpoints still resume)
    unused = ("mode", *PARTIAL_FIELDS) if cfg.mode == "lora" else LORA_FIELDS
    fp = fingerprint(config, ignore=("save_every", "keep_checkpoints", "device", *unused))
    ckpt_dir = run / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:  # refuse a different config before touching the run's files
        check_fingerprint(last, fp)
    if d.main:
        run.write_config("finetune", **config)

    tokenizer = load_tokenizer(model)
    examples = read_training(data, cfg.format) if isinstance(data, (str, Path)) else list(data)
    examples = examples[: cfg.limit] if cfg.limit else examples
    if examples and isinstance(examples[0], str):  # plain text: every token is a target
        feats = text_features(tokenizer, examples, cfg.max_len)
    else:
        feats = [encode(tokenizer, ex, cfg.max_len, cfg.system) for ex in examples]
    feats = [f for f in feats if any(t != IGNORE_INDEX for t in f["labels"])]
    if not feats:
        raise ValueError("no example has an answer token within --max-len; raise --max-len")

    device = d.device or resolve_device(cfg.device)
    base = load_model(model, dtype="float32", device="cpu")
    torch.manual_seed(cfg.seed)
    if cfg.mode == "lora":
        net = get_peft_model(base, LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
        )).to(device)
    else:
        set_partial_trainable_(base, cfg.partial_layers, cfg.tied_head)
        net = base.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    inner = net  # the unwrapped model: checkpoints, saving and merging read it
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )

    micro_per_epoch = math.ceil(len(feats) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    step, history = 0, []
    if last is not None:
        step, history = _resume(last, net, opt)
        if d.main:
            print(f"resuming from {last} (step {step}/{total})")
    if d.world > 1:  # DDP through accelerate (after resume: the optimizer state is plain)
        net, opt = d.accelerator.prepare(net, opt)

    net.train()
    bar = tqdm(total=total, initial=step, desc="finetune", disable=not (progress and d.main))
    t0, tokens = time.time(), 0
    while step < total:
        lr = cosine_lr(step, total, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            micro = _micro_batch(feats, step * cfg.grad_accum + k, cfg, micro_per_epoch)
            mine = d.shard(micro)
            batch = pad_batch(mine or micro[:1], tokenizer.pad_token_id)  # an idle rank still steps
            batch = {n: t.to(device) for n, t in batch.items()}
            # weight by this rank's share of the micro-batch's answer tokens, so the averaged
            # gradient is the one-process gradient of the whole micro-batch
            local = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float() * bool(mine)
            w = d.world * local / d.sum(local).clamp(min=1.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = net(**batch).loss * w / cfg.grad_accum
            loss.backward()
            # the weighted losses sum over ranks to N x the micro-batch's loss (loss.item() for one)
            seen = batch["attention_mask"].sum().float() * bool(mine)
            sums = d.sum(torch.stack([loss.detach().float(), seen]))
            loss_sum += float(sums[0]) / d.world
            tokens += int(sums[1])
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss became {loss_sum} at step {step}; lower --lr")
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, "loss": loss_sum, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
        if (step % cfg.save_every == 0 or step == total) and d.main:  # DDP: the same on every rank
            save_checkpoint(ckpt_dir, step, _trainable_state(inner), opt,
                            {"fingerprint": fp, "history": history}, cfg.keep_checkpoints)
        d.barrier()
        if on_step is not None:
            on_step(step, loss_sum)
        if on_model is not None:
            stop = on_model(step, inner) is True
            net.train()
            if stop:
                break
    bar.close()
    stopped_early = step < total

    inner.eval()
    if not d.main:
        d.barrier()
        return {"steps": step, "final_loss": history[-1]["loss"]}
    if cfg.mode == "lora":
        inner.save_pretrained(str(run / "adapter"))
        inner = inner.merge_and_unload()
    inner.save_pretrained(str(run / "model"), safe_serialization=True)
    tokenizer.save_pretrained(str(run / "model"))
    plot_curves(run / "loss.png", [("train loss (answer tokens)", [h["step"] for h in history],
                                    [h["loss"] for h in history], {})])
    metrics = {
        "steps": step, "examples": len(feats),
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "loss_curve": [h["loss"] for h in history],
        "mode": cfg.mode, "trainable_params": sum(p.numel() for p in params),
        **({"stopped_early": step} if stopped_early else {}),
        **({"lora_scale": cfg.alpha / cfg.r} if cfg.mode == "lora" else
           {"trained": _trained_parts(inner, cfg.partial_layers, cfg.tied_head)}),
    }
    run.write_metrics(metrics)
    d.barrier()
    return metrics


def set_partial_trainable_(model, layers: int = 3, tied_head: TiedHead = "refuse") -> list[str]:
    """Partial-layer fine-tuning (Lu et al.): only the final norm, the LM head and every parameter of
    the last ``layers`` decoder layers require grad; the rest of ``model`` is frozen in place.

    Args:
        model: a supported causal LM.
        layers: how many of the last decoder layers train (0: the head and the final norm only).
        tied_head: where the LM head shares its matrix with the input embedding: ``refuse``,
            ``train`` (the shared matrix trains) or ``freeze`` (it stays frozen).

    Returns:
        The names of the trainable parameters (a tied matrix under its first name).

    Raises:
        ValueError: ``layers`` exceeds the model's decoder layers, or the head is tied and
            ``tied_head`` is ``refuse`` (or unknown).
    """
    blocks = get_layers(model)
    if not 0 <= layers <= len(blocks):
        raise ValueError(f"--partial-layers {layers} is outside 0..{len(blocks)}: the model has "
                         f"{len(blocks)} decoder layers")
    if tied_head not in ("refuse", "train", "freeze"):
        raise ValueError("--tied-head must be refuse, train or freeze")
    head, embed = get_head(model), get_embed(model)
    tied = head.weight is embed.weight
    if tied and tied_head == "refuse":
        raise ValueError(
            "this model ties its LM head to the input embedding (tie_word_embeddings), so training "
            "the head also changes the embeddings, which partial fine-tuning keeps frozen (Lu et al. "
            "leave tied models out); pass --tied-head train to train the shared matrix anyway, or "
            "--tied-head freeze to train only the final norm and the last --partial-layers layers")
    model.requires_grad_(False)
    get_norm(model).requires_grad_(True)
    for block in blocks[len(blocks) - layers:]:  # attention, MLP and both norms of each
        block.requires_grad_(True)
    if not tied or tied_head == "train":
        head.requires_grad_(True)  # tied: the embedding's matrix, the same Parameter
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _trained_parts(model, layers: int, tied_head: str) -> dict:
    """What partial mode trained, for metrics.json."""
    n, tied = len(get_layers(model)), get_head(model).weight is get_embed(model).weight
    return {"layers": list(range(n - layers, n)), "final_norm": True,
            "lm_head": not tied or tied_head == "train",
            "embedding": tied and tied_head == "train"}


def _micro_batch(feats, k: int, cfg: FinetuneConfig, micro_per_epoch: int):
    """Micro-batch k of the whole run (the last one of an epoch may be short)."""
    return [feats[i] for i in batch_indices(len(feats), cfg.batch_size, k, micro_per_epoch, cfg.seed)]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _resume(path, model, opt) -> tuple[int, list]:
    weights, state = load_checkpoint(path, opt)
    named = _trainable_state(model)
    missing = set(named) - set(weights)
    if missing:
        raise ValueError(f"{path} lacks trained tensors {sorted(missing)[:3]}...")
    with torch.no_grad():
        for n, t in weights.items():
            named[n].copy_(t)
    return state["step"], state["history"]
