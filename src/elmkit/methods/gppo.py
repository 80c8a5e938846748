"""GPPO: learn where the ELM block goes (Group Pruning Policy Optimisation, ELM paper).

A policy over candidate start layers a in {0 .. N - M}::

    pi_theta = softmax(theta),  theta in R^{N-M+1},  theta_0 = 0 (uniform)

Each step samples a ~ pi_theta and scores it with a *reward model*: a candidate ELM whose block is
dense layer a itself plus its own LoRA and projection W_a = [W_z | W_h] (W_h = I, W_z small),
iterated M times from z = 0, trained online on lambda_ce * CE + lambda_distill * MSE(z, dense
h_{a+M}). Reward R = -CE on the batch. Candidates share one frozen copy of the dense weights: only
their LoRA (a peft adapter living on layer a alone) and their projection are per candidate.

Every p steps the group of (a, R, log pi_old(a)) is turned into advantages
A = (R - mean R) / (std R + eps) and theta takes q PPO-clip steps on
-mean(min(r A, clip(r, 1 - eps_clip, 1 + eps_clip) A)), r = pi_theta(a) / pi_old(a).
The chosen start is argmax theta. (The reference code saved the policy under a key its loader did
not read; here the plan carries theta and the choice directly.)

On N processes (``accelerate launch`` / ``torchrun``) every step draws one candidate per rank, each
on its own data; the reward model's gradients of a candidate are averaged over the ranks that drew
it (a candidate no rank drew is not stepped, as with one process), and each rank's p samples join
one global group of N x p before the advantages are normalised, so every rank makes the same
policy update and theta stays identical. The reference code normalised per rank, which gives each
rank's samples advantages relative to its own few draws (p = 10 rewards per mean and std) and makes
the ranks' updates disagree; one group of N x p is the estimate the formula asks for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.adapters import get_layers, head_logits, layer_inputs, layer_type, run_layers
from ..train.common import (
    check_fingerprint,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


@dataclass(frozen=True)
class GppoConfig:
    """Policy search over the ELM block's start layer."""

    span: int | None = None
    """M, the number of layers the block replaces (default: ratio x N)."""
    ratio: float = 0.25
    """Fraction of layers the block replaces when span is unset."""
    steps: int = 200
    """Reward-model steps (one sampled candidate each)."""
    group_size: int = 10
    """p: samples per policy update."""
    ppo_iters: int = 2
    """q: PPO-clip iterations per group."""
    clip: float = 0.2
    """PPO clip range epsilon."""
    policy_lr: float = 0.05
    """Adam learning rate of theta."""
    lr: float = 1e-3
    """AdamW learning rate of the candidates' LoRA and projections."""
    lora_r: int = 8
    """LoRA rank of each candidate block."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale alpha / r)."""
    lambda_ce: float = 1.0
    """Weight of CE in the reward model's loss."""
    lambda_distill: float = 1.0
    """Weight of the MSE to the dense hidden state after the span."""
    batch_size: int = 8
    """Examples per reward-model step."""
    max_len: int = 512
    """Tokens per example."""
    seed: int = 0
    """Seed of sampling, data order and initialisation."""

    def __post_init__(self):
        if self.steps < 1 or self.group_size < 2 or self.ppo_iters < 1:
            raise ValueError("--steps >= 1, --group-size >= 2 and --ppo-iters >= 1 are required")
        if not 0 < self.clip < 1:
            raise ValueError("--clip must be in (0, 1)")
        if self.lora_r < 1 or self.batch_size < 1:
            raise ValueError("--lora-r and --batch-size must be >= 1")


@dataclass(frozen=True)
class GppoPlan:
    span: int
    """M."""
    start: int
    """argmax theta: the chosen first replaced layer."""
    theta: tuple[float, ...]
    """Final logits, one per candidate start 0 .. N - M."""


# ---------------------------------------------------------------------------------------------
# policy (pure functions, unit-tested on bandits)
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(R - mean R) / (std R + eps), std unbiased; all-equal rewards give zero advantage."""
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + eps)


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                  clip: float) -> torch.Tensor:
    """-mean(min(r A, clip(r, 1 - clip, 1 + clip) A)) with r = exp(logp - logp_old)."""
    ratio = torch.exp(logp - logp_old)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


class Policy:
    """theta, its optimizer and the sampling generator."""

    def __init__(self, n_actions: int, lr: float, seed: int):
        self.theta = torch.zeros(n_actions, requires_grad=True)
        self.opt = torch.optim.Adam([self.theta], lr=lr)
        self.gen = torch.Generator().manual_seed(seed)

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.theta.detach(), -1)

    def sample(self) -> tuple[int, float]:
        p = self.probs()
        a = int(torch.multinomial(p, 1, generator=self.gen))
        return a, float(torch.log(p[a]))

    def update(self, actions: list[int], rewards: list[float], logp_old: list[float],
               iters: int, clip: float) -> None:
        a = torch.tensor(actions)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float32))
        old = torch.tensor(logp_old, dtype=torch.float32)
        for _ in range(iters):
            logp = torch.log_softmax(self.theta, -1)[a]
            loss = ppo_clip_loss(logp, old, adv, clip)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


def run_bandit(reward_fn: Callable[[int], float], n_actions: int, cfg: GppoConfig,
               on_update: Callable[[Policy, int], None] | None = None,
               policy: Policy | None = None, start_step: int = 0, dist=None) -> Policy:
    """GPPO's policy loop on any reward function (used by the search and by the tests).

    ``on_update(policy, step)`` runs after every policy update; a run resumed from such a point
    passes its restored ``policy`` and ``start_step``. With ``dist`` (a ``train.dist.Dist`` of N
    processes) each rank samples with its own generator and the groups of all ranks are pooled.
    """
    pol = policy or Policy(n_actions, cfg.policy_lr, cfg.seed + 7919 * (dist.rank if dist else 0))
    group: list[tuple[int, float, float]] = []
    for step in range(start_step, cfg.steps):
        a, lp = pol.sample()
        group.append((a, reward_fn(a), lp))
        if len(group) == cfg.group_size:
            if dist is not None and dist.world > 1:  # one global group, in rank order
                group = [x for part in dist.gather(group) for x in part]
            acts, rews, lps = zip(*group)
            pol.update(list(acts), list(rews), list(lps), cfg.ppo_iters, cfg.clip)
            group = []
            if on_update is not None:
                on_update(pol, step + 1)
    return pol


# ---------------------------------------------------------------------------------------------
# reward model: candidates sharing one frozen dense model
# ---------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """Per-candidate LoRA (peft adapter on layer a only) and projection over one frozen model."""

    def __init__(self, dense, span: int, cfg: GppoConfig):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.dense, self.span = dense, span
        n = len(get_layers(dense))
        self.candidates = list(range(n - span + 1))
        d = dense.config.hidden_size
        for p in dense.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        with warnings.catch_warnings():  # one adapter per candidate is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for a in self.candidates:
                inject_adapter_in_model(LoraConfig(
                    r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                    target_modules=targets, layers_to_transform=[a], layers_pattern="layers"),
                    dense, adapter_name=f"cand{a}")
        self.proj = nn.ModuleList(nn.Linear(2 * d, d) for _ in self.candidates)
        with torch.no_grad():
            for lin in self.proj:
                lin.weight[:, :d].mul_(0.1)  # W_z small, as the ELM block's init
                lin.weight[:, d:].copy_(torch.eye(d))  # W_h = I
                lin.bias.zero_()
        self.proj.to(next(dense.parameters()).device)

    def _activate(self, a: int | None) -> None:
        from peft.tuners.lora import LoraLayer

        for mod in self.dense.modules():
            if isinstance(mod, LoraLayer):
                mod.set_adapter(f"cand{a}" if a is not None else [])

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if "lora_" in n or n.startswith("proj.")]

    def loss(self, a: int, ids, mask, labels, cfg: GppoConfig) -> tuple[torch.Tensor, float]:
        """Train loss of candidate a on a batch, and its reward -CE."""
        model, M = self.dense, self.span
        self._activate(None)
        with torch.no_grad():
            ctx = layer_inputs(model, ids, mask)
            x = run_layers(model, ctx.hidden, ctx, 0, a)  # (B, T, d) no adapters before a
            target = run_layers(model, x, ctx, a, a + M)
        self._activate(a)
        layer = get_layers(model)[a]
        kw = dict(attention_mask=ctx.masks[layer_type(model.config, a)],
                  position_ids=ctx.position_ids, position_embeddings=ctx.position_embeddings)
        z = torch.zeros_like(x)
        for _ in range(M):  # full backprop through M iterations, as the reference reward model
            z = layer(self.proj[a](torch.cat([z, x], -1)), **kw)
        # adapter a lives on layer a only, so the layers after the span run as the dense model
        h = run_layers(model, z, ctx, a + M, len(get_layers(model)))
        logits = head_logits(model, h).float()
        ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                         labels[:, 1:].reshape(-1), ignore_index=-100)
        valid = mask.bool()
        mse = ((z.float() - target.float()) ** 2).mean(-1)[valid].mean()
        return cfg.lambda_ce * ce + cfg.lambda_distill * mse, -float(ce.detach())


def plan(dense, tokenizer, data, cfg: GppoConfig = GppoConfig(), progress: bool = True,
         history: list | None = None, thetas: list | None = None,
         ckpt_dir: Path | None = None) -> GppoPlan:
    """Search the start layer with GPPO on ``data`` (instruction examples, or plain texts whose
    every token is a CE target).

    ``history`` collects {step, action, reward} per reward-model step; ``thetas`` collects theta
    after every policy update. With ``ckpt_dir`` the search checkpoints after every policy update
    and resumes from the last one (the result equals an uninterrupted run's).
    Note: the candidates' LoRA adapters are injected into ``dense``; pass a copy to keep it.
    """
    from tqdm.auto import tqdm

    from ..data.collate import pad_batch, training_features
    from ..train.dist import current

    d = current()
    n = len(get_layers(dense))
    span = cfg.span if cfg.span is not None else max(1, round(cfg.ratio * n))
    if not 1 <= span < n:
        raise ValueError(f"span M = {span} must be in 1..{n - 1}")
    rm = RewardModel(dense, span, cfg)
    opt = torch.optim.AdamW(rm.trainable(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    feats = training_features(tokenizer, data, cfg.max_len)
    device = next(dense.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * d.rank)  # each rank its own batches
    step = [0]

    def reward(a: int) -> float:
        idx = torch.randint(len(feats), (cfg.batch_size,), generator=gen).tolist()
        b = pad_batch([feats[i] for i in idx], tokenizer.pad_token_id)
        loss, r = rm.loss(a, b["input_ids"].to(device), b["attention_mask"].to(device),
                          b["labels"].to(device), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if d.world > 1:
            _pool_candidate_grads(rm, a, d)
        else:
            torch.nn.utils.clip_grad_norm_(rm.trainable(), 1.0)
        opt.step()
        step[0] += 1
        if history is not None:
            history.append({"step": step[0], "action": a, "reward": r})
        bar.update(1)
        return r if math.isfinite(r) else -1e4

    history = history if history is not None else []
    thetas = thetas if thetas is not None else []
    pol = Policy(n - span + 1, cfg.policy_lr, cfg.seed + 7919 * d.rank)
    ids = {id(p) for p in rm.trainable()}
    trained = {n_: p for n_, p in rm.named_parameters() if id(p) in ids}
    fp = fingerprint(asdict(cfg) | {"examples": len(data)})
    start_step = 0
    last = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if last is not None:
        check_fingerprint(last, fp)
        weights, state = load_checkpoint(last, opt)
        with torch.no_grad():
            for k, v in trained.items():
                v.copy_(weights[k])
            pol.theta.copy_(weights["policy.theta"])
        pol.opt.load_state_dict(_unpack(state["policy_opt"]))
        if state.get("processes", 1) != d.world:
            raise ValueError(f"{last} was written by {state.get('processes', 1)} processes; resume it "
                             f"with as many (this run has {d.world})")
        pick = (lambda g: g[d.rank]) if d.world > 1 else (lambda g: g)  # per-rank generator states
        pol.gen.set_state(torch.tensor(pick(state["policy_gen"]), dtype=torch.uint8))
        gen.set_state(torch.tensor(pick(state["data_gen"]), dtype=torch.uint8))
        start_step = step[0] = state["step"]
        history[:] = state["history"]
        thetas[:] = state["thetas"]

    def on_update(p: Policy, at: int) -> None:
        thetas.append(p.theta.detach().tolist())
        if ckpt_dir is not None:  # weights and theta are the same on every rank; generators are not
            gens = d.gather((p.gen.get_state().tolist(), gen.get_state().tolist()))
            pg, dg = ([g[0] for g in gens], [g[1] for g in gens]) if d.world > 1 else gens[0]
            if d.main:
                save_checkpoint(ckpt_dir, at, {**trained, "policy.theta": p.theta.detach()}, opt, {
                    "fingerprint": fp, "step": at, "history": history, "thetas": thetas,
                    "policy_opt": _pack(p.opt.state_dict()), "processes": d.world,
                    "policy_gen": pg, "data_gen": dg})
            d.barrier()

    bar = tqdm(total=cfg.steps, initial=start_step, desc="gppo", disable=not (progress and d.main))
    pol = run_bandit(reward, n - span + 1, cfg, on_update=on_update, policy=pol,
                     start_step=start_step, dist=d)
    bar.close()
    theta = pol.theta.detach()
    return GppoPlan(span=span, start=int(theta.argmax()), theta=tuple(theta.tolist()))


def _pool_candidate_grads(rm: RewardModel, a: int, d) -> None:
    """Every rank drew one candidate: each drawn candidate's gradient becomes its mean over the
    ranks that drew it (clipped to norm 1 per candidate, as one process clips its one), on every
    rank, so the reward model stays identical everywhere."""
    drawn = d.gather(a)
    for c in sorted(set(drawn)):
        # by name: peft leaves only the active candidate's adapter requires_grad
        ps = [p for n_, p in rm.named_parameters()
              if ("lora_" in n_ and f".cand{c}." in n_) or n_.startswith(f"proj.{c}.")]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps])
        if c == a:
            flat = flat * min(1.0, 1.0 / (float(flat.norm()) + 1e-6))
        flat = d.sum(flat) / drawn.count(c)
        for p in ps:
            p.grad = flat[:p.numel()].view_as(p).clone()
            flat = flat[p.numel():]


def _pack(state: dict) -> dict:
    """A small Adam state as JSON (theta is one vector)."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for k, v in state["state"].items():
        out["state"][str(k)] = {n: (t.tolist() if torch.is_tensor(t) else t) for n, t in v.items()}
    return out


def _unpack(state: dict) -> dict:
    return {"param_groups": state["param_groups"],
            "state": {int(k): {n: torch.tensor(t) for n, t in v.items()}
                      for k, v in state["state"].items()}}
