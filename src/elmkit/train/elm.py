"""Train an ELM's fixed-point block with stochastic Jacobian-free backprop (SJFB).

Per step, with x the hidden state entering the block and M the replaced span::

    m ~ U{wo_grad_min .. wo_grad_max}      (default 0 .. floor(M/2))   iterations without gradient
    n ~ U{with_grad_min .. with_grad_max}  (default 1 .. max(1, floor(M/2))) iterations with gradient
    z = 0;  repeat m: z = phi(z, x);  z = z.detach();  repeat n: z = phi(z, x)
    loss = lambda_ce(t) * CE(logits(z)) + lambda_distill * MSE(z, h_teacher)

h_teacher is the task-tuned dense model's own hidden state after layer start + M - 1 on the same
input (padding excluded); CE is on answer tokens. ``ce_schedule="official"`` keeps lambda_ce = 0
for the first half of training, then ramps it to lambda_ce with sin(pi/2 * progress) (the
reference code's schedule); ``"constant"`` uses lambda_ce throughout.

By default only the block (f* and W = [W_z|W_h]) trains; with ``kept_lora_r > 0``, peft LoRA on
the kept layers' projections trains too (scale alpha / r) and is merged into them at the end. The
no-gradient phase runs under ``torch.no_grad`` (the reference code built and dropped that graph).
The (m, n) draws are a pure function of (seed, step), so resume is exact.

The step reads only the teacher's embeddings and layers [0, start + M). ``SpanTeacher`` is that
part of the dense model, built before ``elm.apply_``: it shares the embeddings and the layers
below the span with the ELM and holds only the M replaced layers, so training holds one model plus
M layers rather than two whole models.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..data.collate import pad_batch, training_features
from ..data.formats import Example
from ..io import RunDir, write_json
from ..models.adapters import (
    family_of,
    get_embed,
    get_layers,
    get_rotary,
    head_logits,
    layer_inputs,
    layer_type,
    run_layers,
)
from .common import (
    batch_indices,
    check_fingerprint,
    checkpoint_state,
    cosine_lr,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    plot_curves,
    save_checkpoint,
)


@dataclass(frozen=True)
class ElmTrainConfig:
    """SJFB training of the fixed-point block."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on the block's matrices."""
    clip: float = 1.0
    """Gradient-norm clip."""
    wo_grad_min: int = 0
    """Fewest iterations without gradient."""
    wo_grad_max: int | None = None
    """Most iterations without gradient (default floor(M/2))."""
    with_grad_min: int = 1
    """Fewest iterations with gradient."""
    with_grad_max: int | None = None
    """Most iterations with gradient (default max(1, floor(M/2)))."""
    lambda_ce: float = 1.0
    """Weight of the task cross-entropy."""
    lambda_distill: float = 1.0
    """Weight of the distillation loss to the teacher's hidden state after the span."""
    distill_loss: Literal["mse", "relative", "channel"] = "relative"
    """relative (default): per token, ||z - h||^2 / ||h||^2; mse: mean squared error (the paper);
    channel: each channel's squared error divided by the teacher's mean square of that channel in
    the batch (under several processes: in each process's share of it). The last two keep a real
    model's massive activations from dominating the loss; relative won on SmolLM2-135M
    (benchmarks/results/real_model/recipe)."""
    ce_schedule: Literal["official", "constant"] = "official"
    """official: lambda_ce is 0 for the first half, then a sine ramp; constant: always lambda_ce."""
    max_len: int = 512
    """Tokens per example."""
    seed: int = 0
    """Seed of data order and of the (m, n) draws."""
    save_every: int = 100
    """Checkpoint every N steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on a GPU that has it, else fp32."""
    kept_lora_r: int = 0
    """Also train LoRA (this rank) on the kept layers' seven projections; 0 = block only."""
    kept_lora_alpha: float = 16.0
    """LoRA alpha for the kept layers (scale alpha / r); merged into them at the end."""
    recompute_tail: bool = False
    """Recompute the kept layers after the block in the backward pass instead of storing their
    activations: less memory for one more forward of those layers."""
    ce_chunk: int = 1024
    """Tokens per chunk of the CE head (its logits are recomputed in the backward pass)."""
    compile: bool = False
    """torch.compile the block's evaluation and the kept layers after it (fewer kernel launches on
    a GPU; the first steps pay the compilation)."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("--steps, --batch-size and --save-every must be >= 1")
        if self.wo_grad_min < 0 or self.with_grad_min < 1:
            raise ValueError("--wo-grad-min must be >= 0 and --with-grad-min >= 1")
        if self.wo_grad_max is not None and self.wo_grad_max < self.wo_grad_min:
            raise ValueError("--wo-grad-max must be >= --wo-grad-min")
        if self.with_grad_max is not None and self.with_grad_max < self.with_grad_min:
            raise ValueError("--with-grad-max must be >= --with-grad-min")
        if self.lambda_ce < 0 or self.lambda_distill < 0 or self.lambda_ce + self.lambda_distill == 0:
            raise ValueError("the loss weights must be >= 0 and not both 0")
        if self.ce_chunk < 1:
            raise ValueError("--ce-chunk must be >= 1")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"--distill-loss must be one of {', '.join(DISTILL_LOSSES)}, "
                             f"got {self.distill_loss!r}")
        if self.kept_lora_r < 0 or self.kept_lora_alpha <= 0:
            raise ValueError("--kept-lora-r must be >= 0 and --kept-lora-alpha > 0")


def ce_weight(step: int, cfg: ElmTrainConfig) -> float:
    if cfg.ce_schedule == "constant":
        return cfg.lambda_ce
    half = cfg.steps / 2
    if step < half:
        return 0.0
    return cfg.lambda_ce * math.sin(math.pi / 2 * min(1.0, (step - half) / half))


def iteration_draws(step: int, span: int, cfg: ElmTrainConfig) -> tuple[int, int]:
    """(m, n) for a step: a pure function of (seed, step)."""
    half = span // 2
    wo_max = cfg.wo_grad_max if cfg.wo_grad_max is not None else half
    with_max = cfg.with_grad_max if cfg.with_grad_max is not None else max(1, half)
    rng = random.Random(cfg.seed * 1_000_003 + step)
    return rng.randint(cfg.wo_grad_min, max(cfg.wo_grad_min, wo_max)), \
        rng.randint(cfg.with_grad_min, max(cfg.with_grad_min, with_max))


@dataclass
class StepLoss:
    """One SJFB forward: the loss and what the caller logs or checks."""

    loss: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor
    z: torch.Tensor
    """(B, T, d) the block's output after m + n evaluations."""
    x: torch.Tensor
    """(B, T, d) the block's input."""
    kw: dict
    """Mask and RoPE arguments of the block's layer."""
    valid: torch.Tensor
    """(B, T) bool: non-padding positions."""


class SpanTeacher(nn.Module):
    """The dense model up to the end of the replaced span: embeddings, RoPE, layers [0, start + M).

    Build it from the dense model before ``elm.apply_`` turns that model into the ELM: it keeps the
    span's layers alive (the ELM drops them) and shares everything else with the ELM, so no weight
    is copied. ``own_lower`` copies the layers below the span instead of sharing them: needed when
    those layers are tuned (kept-layer LoRA), since the target must come from the dense model.
    """

    def __init__(self, dense, start: int, span: int, own_lower: bool = False):
        super().__init__()
        family = family_of(dense)
        if family.name in ("elm", "slim"):
            raise ValueError(f"the teacher must be the dense model, not an {family.name} model")
        layers = list(get_layers(dense))
        if not (0 <= start and span >= 1 and start + span <= len(layers)):
            raise ValueError(f"span [{start}, {start + span}) is outside the model's {len(layers)} layers")
        layers = layers[: start + span]
        if own_lower:
            layers[:start] = [copy.deepcopy(layer) for layer in layers[:start]]
        self.config = dense.config
        self.model = nn.Module()  # the family's attribute paths: model.embed_tokens, ...
        self.model.embed_tokens = get_embed(dense)
        self.model.rotary_emb = get_rotary(dense)
        self.model.layers = nn.ModuleList(layers)


@dataclass
class CompiledStep:
    """torch.compile'd forms of the step's differentiable part (same parameters as the model)."""

    phi: Callable
    """The block's evaluation phi(z, h, **kw)."""
    tail: list[Callable]
    """The kept layers after the block, in order."""


def compile_step(elm) -> CompiledStep:
    """Compile phi and the layers after the block; layers of one shape share one compiled graph."""
    layers = get_layers(elm)
    return CompiledStep(torch.compile(elm.block.phi),
                        [torch.compile(layer) for layer in layers[elm.config.start + 1:]])


def sjfb_loss(elm, teacher, ids, mask, labels, m: int, n: int, lambda_ce: float,
              lambda_distill: float, tune_kept: bool = False, recompute_tail: bool = False,
              ce_chunk: int = 1024, compiled: CompiledStep | None = None,
              distill_loss: str = "mse") -> StepLoss:
    """m evaluations without gradient, n with; CE (when weighted) + MSE to the teacher's state.

    The teacher's layers before the block give x (the ELM's kept layers are the same weights unless
    ``tune_kept``), its layers [start, start + M) the distillation target. The CE is taken on the
    labelled positions only, in chunks whose logits are recomputed in the backward pass, so the
    (tokens x vocabulary) logits are never all held at once. ``teacher`` is the dense model or its
    ``SpanTeacher``; ``compiled`` (from ``compile_step``) replaces phi and the tail layers.
    """
    c = elm.config
    start, span = c.start, c.span
    block = elm.block
    with torch.no_grad():
        tctx = layer_inputs(teacher, ids, mask)
        tx = run_layers(teacher, tctx.hidden, tctx, 0, start)  # (B, T, d)
        target = run_layers(teacher, tx, tctx, start, start + span)  # (B, T, d)
        ctx = layer_inputs(elm, ids, mask)
    x = run_layers(elm, ctx.hidden, ctx, 0, start) if tune_kept else tx
    kw = dict(attention_mask=ctx.masks[layer_type(c, start)], position_ids=ctx.position_ids,
              position_embeddings=ctx.position_embeddings)
    phi = compiled.phi if compiled is not None else block.phi
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(m):
            z = phi(z, x, **kw)
    for _ in range(n):
        z = phi(z, x, **kw)
    valid = mask.bool()
    distill = distillation(z, target, valid, distill_loss)
    if lambda_ce > 0:
        h = z
        layers = compiled.tail if compiled is not None else get_layers(elm)[start + 1:]
        for i, layer in enumerate(layers, start + 1):
            kwi = dict(attention_mask=ctx.masks[layer_type(c, i)], position_ids=ctx.position_ids,
                       position_embeddings=ctx.position_embeddings)
            if recompute_tail:  # one segment per layer: the backward rebuilds one layer at a time
                h = checkpoint(layer, h, use_reentrant=False, **kwi)
            else:
                h = layer(h, **kwi)
        ce = answer_ce(elm, h, labels, ce_chunk)
    else:
        ce = torch.zeros((), device=x.device)
    loss = lambda_ce * ce + lambda_distill * distill
    return StepLoss(loss, ce, distill, z, x, kw, valid)


DISTILL_LOSSES = ("mse", "relative", "channel")


def distillation(z: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "mse"
                 ) -> torch.Tensor:
    """Mean over the valid tokens of the block output's error to the teacher's state (see
    ``ElmTrainConfig.distill_loss``); z, target (B, T, d), valid (B, T) bool."""
    err = (z.float() - target.float())[valid] ** 2  # (n, d)
    t = target.float()[valid]  # (n, d)
    if kind == "mse":
        return err.mean()
    if kind == "relative":
        return (err.sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()
    if kind == "channel":
        return (err / t.pow(2).mean(0).clamp_min(1e-6)).mean()
    raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(DISTILL_LOSSES)}")


def answer_ce(model, h: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token CE of the labelled positions (labels -100 ignored), head applied in chunks."""
    y = labels[:, 1:]
    sel = y != -100
    hs, y = h[:, :-1][sel], y[sel]  # (n, d), (n,)
    if y.numel() == 0:
        return h.sum() * 0.0

    def part(hh, yy):
        return F.cross_entropy(head_logits(model, hh).float(), yy, reduction="sum")

    total = sum(checkpoint(part, hs[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                for i in range(0, len(y), chunk))
    return total / len(y)


def train_elm(elm, teacher, tokenizer, data: list[Example] | list[str], out: str | Path,
              cfg: ElmTrainConfig = ElmTrainConfig(), progress: bool = True,
              on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train ``elm``'s block in place against ``teacher`` (the dense model it came from, or that
    model's ``SpanTeacher``).

    ``data`` is instruction examples (the CE is on their answers) or plain texts (cut into windows
    of ``cfg.max_len`` tokens; every token is a CE target). Writes checkpoints, loss.png and
    metrics.json into ``out``; the trained model is saved to ``out/model`` with the tokenizer.
    Resumes from ``out/checkpoints`` when present.

    Under ``accelerate launch`` / ``torchrun`` with N processes (see ``train.dist``) each rank
    takes its share of every global batch of ``cfg.batch_size`` examples; the step is wrapped in
    DDP or FSDP2 as the launch says, rank 0 writes the files, and the checkpoints resume with any
    N. Under FSDP2 the in-memory ``elm`` is left sharded: the trained model is ``out/model``.
    """
    from . import dist as dist_

    d = dist_.current()
    run = RunDir(out) if d.main else Path(out)
    c = elm.config
    start, span = c.start, c.span
    text = bool(data) and isinstance(data[0], str)
    settings = {"start": start, "span": span, "examples": len(data), **asdict(cfg)}
    # settings added later enter the fingerprint only when used, so earlier checkpoints resume
    if text:
        settings["data"] = "text"
    if cfg.distill_loss == "mse":
        del settings["distill_loss"]
    # how the step is computed (memory, speed, processes) may change on resume; what it computes may not
    fp = fingerprint(settings, ignore=("save_every", "recompute_tail", "ce_chunk", "compile"))
    ckpt_dir = Path(out) / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        check_fingerprint(last, fp)
        if checkpoint_state(last).get("format") != CKPT_FORMAT:
            raise ValueError(f"{last} was written by an older elmkit; delete {ckpt_dir} to start over")
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                         f"{d.world} processes")
    if d.main:
        run.write_config("elm train", **settings)

    device = next(elm.parameters()).device
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    feats = training_features(tokenizer, data, cfg.max_len)
    for p in elm.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.kept_lora_r and any(a is b for a, b in zip(get_layers(teacher)[:start], get_layers(elm))):
        raise ValueError("kept-layer LoRA tunes the layers below the block, which this teacher shares "
                         "with the ELM; build it with SpanTeacher(dense, start, span, own_lower=True)")
    if cfg.kept_lora_r and d.kind == "fsdp":
        raise ValueError("kept-layer LoRA is not supported under FSDP; launch with DDP")
    lora = _add_kept_lora(elm, cfg) if cfg.kept_lora_r else {}
    params = list(elm.block.parameters()) + list(lora.values())
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    # the residual is measured after the step, in fp32; FSDP2 gathers the block only inside
    # forward, so there it is measured in the step's forward (before the update) instead
    stepper = SjfbStep(elm, teacher, cfg, tune_kept=bool(lora), residual_inside=d.kind == "fsdp",
                       compiled=compile_step(elm) if cfg.compile else None)
    if cfg.batch_size > len(feats) and d.world > 1:
        raise ValueError(f"{len(feats)} examples do not fill a global batch of {cfg.batch_size} on "
                         f"{d.world} processes; use more examples or a smaller --batch-size")
    if d.world > 1:
        from accelerate.utils import DistributedDataParallelKwargs

        # LoRA above the block idles while lambda_ce = 0: DDP must expect unused parameters
        d.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=bool(lora))
        stepper, opt = d.accelerator.prepare(stepper, opt)
        params = [p for g in opt.param_groups for p in g["params"]]  # FSDP2 swaps in sharded ones
    step, history = 0, []
    if last is not None:
        weights, state = load_checkpoint(last, None)
        dist_.load_full_state(stepper, {_FQN + k: v for k, v in weights.items()}, opt, state["optimizer"])
        step, history = state["step"], state["history"]

    stepper.train()
    teacher.eval()  # after train(): a SpanTeacher shares the ELM's lower layers
    bar = tqdm(total=cfg.steps, initial=step, desc="elm", disable=not (progress and d.main))
    t0, tokens = time.time(), 0
    while step < cfg.steps:
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = pad_batch(d.shard(_batch(feats, step, cfg)), tokenizer.pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        m, n = iteration_draws(step, span, cfg)
        lam_ce = ce_weight(step, cfg)
        # this rank's and the global batch's token counts: the loss is weighted so that the
        # averaged gradient is the gradient of the one-process loss on the global batch
        local = torch.stack([mask.sum(), (labels[:, 1:] != -100).sum()]).float()  # (2,)
        total = d.sum(local)
        w = d.world * local / total.clamp(min=1.0)  # (2,): distill, ce weights (1, 1 for one process)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, ce, distill, res_sum, z, x, kw, valid = stepper(ids, mask, labels, m, n, lam_ce, w[0], w[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if res_sum is None:
            res_sum = residual_sum(elm.block, z, x, kw, valid)
        # global means: (sum of local mean x local count) / global count; the loss terms are
        # weighted already, so their sum over ranks / N is the global loss (loss.item() for one)
        sums = d.sum(torch.stack([distill * local[0], ce * local[1], res_sum, loss.detach()]).float())
        distill_g, ce_g, residual = (float(v) for v in sums[:3] / torch.stack(
            [total[0], total[1].clamp(min=1.0), total[0]]))
        loss_g = float(sums[3]) / d.world
        if not math.isfinite(loss_g):
            raise FloatingPointError(f"ELM loss became {loss_g} at step {step}; lower --lr")
        tokens += int(total[0])
        rec = {"step": step, "loss": round(loss_g, 6), "ce": round(ce_g, 6),
               "distill": round(distill_g, 6), "lambda_ce": round(lam_ce, 4),
               "residual": round(residual, 6), "m": m, "n": n, "lr": lr}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(ce=f"{rec['ce']:.3f}", mse=f"{rec['distill']:.4f}", res=f"{residual:.3f}",
                        tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
        if step % cfg.save_every == 0 and step < cfg.steps:
            _save(ckpt_dir, step, stepper, opt, {"fingerprint": fp, "history": history}, d)
        if on_step is not None:
            on_step(step, loss_g)
    bar.close()
    train_time = time.time() - t0
    for p in params:
        p.requires_grad_(False)
    if lora:
        _merge_kept_lora(elm)
    elm.eval()
    _save_model(elm, stepper, tokenizer, Path(out) / "model", d)
    steps_ = [h["step"] for h in history]
    tail = history[-min(20, len(history)):]
    head = history[:min(3, len(history))]
    metrics = {"steps": step, "first_distill": sum(h["distill"] for h in head) / len(head),
               "final_distill": sum(h["distill"] for h in tail) / len(tail),
               "final_ce": sum(h["ce"] for h in tail) / len(tail),
               "final_residual": sum(h["residual"] for h in tail) / len(tail),
               "train_time_s": round(train_time, 1), "processes": d.world, "parallel": d.kind,
               "tokens_per_s": round(tokens / max(train_time, 1e-9), 1)}
    if d.main:
        plot_curves(run / "loss.png", [
            ("distillation MSE", steps_, [h["distill"] for h in history], {"yscale": "log"}),
            ("task CE (when weighted)", steps_, [h["ce"] for h in history], {}),
            ("residual ||phi(z) - z||", steps_, [h["residual"] for h in history], {"yscale": "log"}),
        ])
        run.write_metrics(metrics)
        write_json(run / "history.json", history)  # per step: loss, ce, distill, residual, m, n, lr
    d.barrier()
    return metrics


CKPT_FORMAT = 2  # trained tensors by name and the optimizer state by parameter name (any N processes)
_FQN = "elm."  # the trained tensors' names inside SjfbStep


class SjfbStep(nn.Module):
    """One SJFB step as a module, so that DDP / FSDP2 can wrap it: forward returns the loss to
    backpropagate (each term scaled by ``w``, this rank's share of the global token counts times
    N), the detached CE and MSE (local means), the summed residual ||phi(z) - z|| of the valid
    positions when ``residual_inside`` (FSDP2 gathers the block's weights only inside forward;
    else None: the caller measures it after the update), and z, x, the layer arguments, the mask."""

    def __init__(self, elm, teacher, cfg: ElmTrainConfig, tune_kept: bool = False,
                 residual_inside: bool = False, compiled: CompiledStep | None = None):
        super().__init__()
        self.elm, self.teacher, self.cfg, self.tune_kept = elm, teacher, cfg, tune_kept
        self.residual_inside, self.compiled = residual_inside, compiled

    def forward(self, ids, mask, labels, m: int, n: int, lam_ce: float, w_distill, w_ce):
        cfg = self.cfg
        r = sjfb_loss(self.elm, self.teacher, ids, mask, labels, m, n, lam_ce, cfg.lambda_distill,
                      tune_kept=self.tune_kept, recompute_tail=cfg.recompute_tail, ce_chunk=cfg.ce_chunk,
                      compiled=self.compiled, distill_loss=cfg.distill_loss)
        # with one process w = (1, 1) exactly, and this is r.loss to the bit
        loss = lam_ce * r.ce * w_ce + cfg.lambda_distill * r.distill * w_distill
        res = residual_sum(self.elm.block, r.z.detach(), r.x, r.kw, r.valid) if self.residual_inside \
            else None
        return loss, r.ce.detach(), r.distill.detach(), res, r.z.detach(), r.x, r.kw, r.valid


@torch.no_grad()
def residual_sum(block, z, x, kw: dict, valid) -> torch.Tensor:
    """How far z is from a fixed point: the sum of ||phi(z) - z|| over the valid positions."""
    return (block.phi(z, x, **kw) - z).float().norm(dim=-1)[valid].sum()


def _save(ckpt_dir: Path, step: int, stepper, opt, state: dict, d) -> None:
    """Gather the trained tensors and optimizer state to rank 0, which writes the checkpoint."""
    from .dist import full_state

    weights, optim = full_state(stepper, opt)
    if d.main:
        tensors = {k[len(_FQN):]: v for k, v in weights.items()}
        save_checkpoint(ckpt_dir, step, tensors, optim, {**state, "format": CKPT_FORMAT})
    d.barrier()


def _save_model(elm, stepper, tokenizer, folder: Path, d) -> None:
    """Rank 0 saves the trained ELM; under FSDP2 its weights are gathered into a fresh copy first."""
    if d.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(stepper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.main:
            clean = type(elm)(elm.config)
            clean.load_state_dict({k[len(_FQN):]: v for k, v in sd.items() if k.startswith(_FQN)})
            clean.save_pretrained(str(folder))
    elif d.main:
        elm.save_pretrained(str(folder))
    if d.main:
        tokenizer.save_pretrained(str(folder))
    d.barrier()


_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _add_kept_lora(elm, cfg: ElmTrainConfig) -> dict[str, torch.Tensor]:
    """peft LoRA on the kept layers' projections (not the block's); returns its parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    kept = [i for i in range(len(elm.model.layers)) if i != elm.config.start]
    torch.manual_seed(cfg.seed)  # LoRA A init
    inject_adapter_in_model(LoraConfig(
        r=cfg.kept_lora_r, lora_alpha=cfg.kept_lora_alpha, lora_dropout=0.0,
        target_modules=list(_LORA_TARGETS), layers_to_transform=kept, layers_pattern="layers"), elm)
    return {n: p for n, p in elm.named_parameters() if "lora_" in n}


def _merge_kept_lora(elm) -> None:
    """Fold every LoRA update into its base weight and put the plain Linear back."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(elm.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(elm.get_submodule(parent_name), child, mod.get_base_layer())


def _batch(feats, step: int, cfg: ElmTrainConfig):
    """Batch ``step``; full batches only (the remainder of each epoch is skipped)."""
    per_epoch = max(1, len(feats) // cfg.batch_size)
    return [feats[i] for i in batch_indices(len(feats), cfg.batch_size, step, per_epoch, cfg.seed)]
