"""EfficientLLM: pruning-aware pretraining (Xing, Liu, Xiao et al., 2025, arXiv 2502.06663) — a
reconstruction: the paper's code is not public and it gives no formulas; what follows marks our
choices as such.

While the model trains, structured groups are removed from it, so a large model shrinks into a small
one whose per-layer widths are found, not designed. Minimal groups (paper, Figure 1a):

    head     (layer, h): q_proj rows of query head h (+ bias) and its o_proj columns; its KV head's
             k/v rows go with the last query head that reads them (GQA-aware)
    channel  (layer, j): gate_proj and up_proj row j, down_proj column j
    hidden   j:          embedding and LM-head column j, every norm's weight j, column j of every
                         q/k/v/gate/up projection, row j of every o/down projection (+ bias)

Saliency (ours: LLM-Pruner's second-order Taylor with the empirical Fisher as the Hessian diagonal,
the "global diagonal" of the paper's summary): removing a group sets its weights w to zero, so

    dL_g ~ sum_{w in g} ( -gbar_w * w + 1/2 * F_w * w^2 ),     S_g = |dL_g| / P_g

with gbar and F the mean gradient and mean squared gradient over the batches since the last pruning
step, and P_g the parameters the group removes (so scores of the three types are comparable).

Schedule (ours): every ``interval`` steps from ``start`` to ``end`` the parameter count must be at
most P(t) = P0 - (P0 - P*) (t - start) / (end - start); the lowest-S groups over all types and layers
go until it is. Each removal is followed by a local second-order update of the projections that
lose input columns (the paper's "local Hessian"): with H = 2 X X^T / n of their inputs on the
current batch, W <- W - W[:, S] ([H^-1]_SS)^-1 H^-1[S, :] (o_proj for heads, down_proj for
channels; q/k/v, gate/up and the LM head for hidden channels).

Training goes on with the removed weights held at zero (gradients masked, weights re-zeroed after
every step, RMSNorms averaging over the kept hidden channels only), which computes exactly what the
cut model computes; ``finish`` cuts it into a slim model, or a stock model when all layers end equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import get_embed, get_head, get_layers, get_norm
from ..models.slim import LayerKeep, to_slim
from .common import input_hessians
from .darwinlm import obs_remove

TYPES = ("head", "channel", "hidden")


@dataclass(frozen=True)
class EfficientLLMConfig:
    """When and how pruning-aware pretraining removes groups."""

    start: int = 200
    """Step of the first pruning step (gradients are gathered from here on)."""
    end: float = 0.6
    """Step by which the target size is reached: a step count, or a fraction (<= 1) of training."""
    interval: int = 20
    """Steps between pruning steps: the saliency window."""
    types: tuple[str, ...] = TYPES
    """Group types that may be removed: head, channel, hidden."""
    obs_update: bool = True
    """Compensate each removal with the local second-order weight update."""
    rel_damp: float = 1e-2
    """Damping of the local Hessians, relative to the mean of their diagonal."""
    min_hidden: int = 8
    """Hidden channels that are never removed."""

    def __post_init__(self):
        types = tuple(t for part in ([self.types] if isinstance(self.types, str) else self.types)
                      for t in str(part).split(",") if t)
        object.__setattr__(self, "types", types)
        if not types or any(t not in TYPES for t in types):
            raise ValueError(f"--prune.types must be a subset of {', '.join(TYPES)}")
        if self.start < 0 or self.interval < 1 or self.end <= 0 or self.min_hidden < 1:
            raise ValueError("--prune.start must be >= 0, --prune.interval >= 1, --prune.end > 0, "
                             "--prune.min-hidden >= 1")

    def end_step(self, total: int) -> int:
        return round(self.end * total) if self.end <= 1 else int(self.end)


@dataclass
class PruneState:
    """What the model keeps, in its original indices."""

    heads: list[list[int]]
    """Per layer: kept query heads."""
    kv: list[list[int]]
    """Per layer: kept KV heads."""
    channels: list[list[int]]
    """Per layer: kept MLP channels."""
    hidden: list[int]
    """Kept hidden channels."""

    @classmethod
    def full(cls, config) -> PruneState:
        n = config.num_hidden_layers
        return cls([list(range(config.num_attention_heads)) for _ in range(n)],
                   [list(range(config.num_key_value_heads)) for _ in range(n)],
                   [list(range(config.intermediate_size)) for _ in range(n)], list(range(config.hidden_size)))


def resolve_target(prune_to: str | float | int, model, tokenizer=None) -> int:
    """Target parameter count: a testbed preset's name (its architecture's size), a fraction (<= 1)
    of ``model``'s parameters, or a parameter count."""
    from ..models import count_parameters

    if isinstance(prune_to, str) and not prune_to.replace(".", "", 1).isdigit():
        from ..testbed.pretrain import PRESETS, model_config

        if prune_to not in PRESETS:
            raise ValueError(f"--prune-to {prune_to!r} is neither a number nor a preset "
                             f"({', '.join(PRESETS)})")
        from transformers import AutoModelForCausalLM

        from ..data.tokenizer import byte_tokenizer

        with torch.device("meta"):
            small_cfg = model_config(PRESETS[prune_to], tokenizer or byte_tokenizer())
            small = AutoModelForCausalLM.from_config(small_cfg)
        return count_parameters(small)
    v = float(prune_to)
    target = round(v * count_parameters(model)) if v <= 1 else int(v)
    if not 0 < target < count_parameters(model):
        raise ValueError(f"--prune-to {prune_to} must leave between 0 and "
                         f"{count_parameters(model):,} parameters")
    return target


def param_count(model, s: PruneState) -> int:
    """Parameters of the cut model that ``s`` describes (what ``finish`` will return)."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d = len(s.hidden)
    tied = get_head(model).weight is get_embed(model).weight
    total = c.vocab_size * d * (1 if tied else 2) + d
    for i, layer in enumerate(get_layers(model)):
        a, m = layer.self_attn, layer.mlp
        nq, nkv, ch = len(s.heads[i]), len(s.kv[i]), len(s.channels[i])
        total += 2 * d
        if nq:
            total += (nq * hd * (2 * d + (a.q_proj.bias is not None))
                      + 2 * nkv * hd * (d + (a.k_proj.bias is not None)))
            total += d * (a.o_proj.bias is not None) + (2 * hd if hasattr(a, "q_norm") else 0)
        if ch:
            total += 3 * ch * d + d * (m.down_proj.bias is not None)
    return total


class Pruner:
    """Pruning-aware training around a dense model: call ``after_backward`` after each backward,
    ``after_step`` after each optimizer step and ``step`` at the end of each training step."""

    def __init__(self, model, cfg: EfficientLLMConfig, target: int, total_steps: int):
        c = model.config
        if getattr(c, "model_type", None) == "slim":
            raise ValueError("pruning-aware training starts from a dense model")
        self.model, self.cfg, self.target, self.total = model, cfg, target, total_steps
        self.end = cfg.end_step(total_steps)
        if not cfg.start < self.end <= total_steps:
            raise ValueError(f"pruning runs from step {cfg.start} to {self.end}; it must end after it starts "
                             f"and by the last step ({total_steps})")
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.group = c.num_attention_heads // c.num_key_value_heads
        self.state = PruneState.full(c)
        self.p0 = param_count(model, self.state)
        if not target < self.p0:
            raise ValueError(f"the target ({target:,}) is not smaller than the model ({self.p0:,})")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.acc_g = [torch.zeros_like(p) for p in self.params]
        self.acc_g2 = [torch.zeros_like(p) for p in self.params]
        self.acc_n = 0
        self.history: list[dict] = []
        self._zero: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self._norm_hooks = [norm.register_forward_hook(_kept_rms(self)) for norm in self._hidden_norms()] \
            if "hidden" in cfg.types else []

    # ---- the training-loop hooks -----------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self) -> None:
        """Gather gradient statistics, then hold removed weights' gradients at zero."""
        for p, g, g2 in zip(self.params, self.acc_g, self.acc_g2):
            if p.grad is not None:
                g.add_(p.grad)
                g2.addcmul_(p.grad, p.grad)
        self.acc_n += 1
        for p, dim, idx in self._zero:
            if p.grad is not None:
                p.grad.index_fill_(dim, idx, 0.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Removed weights back to zero (AdamW's momentum would move them)."""
        for p, dim, idx in self._zero:
            p.index_fill_(dim, idx, 0.0)

    def budget(self, step: int) -> int:
        """P(step): the most parameters the model may have after the pruning step at ``step``."""
        if step < self.cfg.start:
            return self.p0
        frac = min(1.0, (step - self.cfg.start) / (self.end - self.cfg.start))
        return math.floor(self.p0 - (self.p0 - self.target) * frac)

    def is_pruning_step(self, step: int) -> bool:
        return step == self.end or (self.cfg.start < step < self.end
                                    and (step - self.cfg.start) % self.cfg.interval == 0)

    def step(self, step: int, input_ids: torch.Tensor, token_mask: torch.Tensor) -> dict | None:
        """At a pruning step: score, remove, compensate, and return what went; else None."""
        if step == self.cfg.start:
            self._reset()
        if not self.is_pruning_step(step) or self.acc_n == 0:
            return None
        budget = self.budget(step)
        scores = self.saliency()
        removed = self._choose(scores, budget)
        if self.cfg.obs_update and any(removed.values()):
            self._compensate(removed, input_ids, token_mask)
        self._rebuild_zero()
        self.after_step()
        self._reset()
        rec = {"step": step, "params": param_count(self.model, self.state), "budget": budget,
               **{f"removed_{t}": len(v) for t, v in removed.items()},
               "heads": [len(h) for h in self.state.heads], "channels": [len(c) for c in self.state.channels],
               "hidden": len(self.state.hidden)}
        self.history.append(rec)
        return rec

    # ---- saliency ----------------------------------------------------------------------------------

    @torch.no_grad()
    def saliency(self) -> list[tuple[float, str, tuple]]:
        """(S_g, type, key) for every kept group of the allowed types."""
        n = max(self.acc_n, 1)
        t = {id(p): (-(g / n) * p + 0.5 * (g2 / n) * p * p).double()  # elementwise dL of zeroing w
             for p, g, g2 in zip(self.params, self.acc_g, self.acc_g2)}

        def T(p):
            return t[id(p)] if p is not None else None

        s, out = self.state, []
        hd, d = self.hd, len(self.state.hidden)
        layers = get_layers(self.model)
        hidden_sum = torch.zeros(self.model.config.hidden_size, dtype=torch.double,
                                 device=self.params[0].device)
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            if "head" in self.cfg.types and s.heads[i]:
                nq, nkv = self.model.config.num_attention_heads, self.model.config.num_key_value_heads
                q = T(a.q_proj.weight).view(nq, hd, -1).sum((1, 2)) + _bias(T(a.q_proj.bias), nq)
                o = T(a.o_proj.weight).view(-1, nq, hd).sum((0, 2))
                kv = T(a.k_proj.weight).view(nkv, hd, -1).sum((1, 2)) \
                    + T(a.v_proj.weight).view(nkv, hd, -1).sum((1, 2)) \
                    + _bias(T(a.k_proj.bias), nkv) + _bias(T(a.v_proj.bias), nkv)
                readers = {g: sum(1 for h in s.heads[i] if h // self.group == g) for g in s.kv[i]}
                qo, kv = (q + o).tolist(), kv.tolist()  # one device sync per layer
                for h in s.heads[i]:
                    g = h // self.group
                    dl = qo[h] + kv[g] / readers[g]  # the head's own weights + its KV head's share
                    cost = hd * (2 * d + (a.q_proj.bias is not None))
                    if readers[g] == 1:
                        cost += 2 * hd * (d + (a.k_proj.bias is not None))
                    out.append((abs(dl) / cost, "head", (i, h)))
            if "channel" in self.cfg.types and s.channels[i]:
                ch = (T(m.gate_proj.weight).sum(1) + T(m.up_proj.weight).sum(1)
                      + T(m.down_proj.weight).sum(0)).tolist()
                out += [(abs(ch[j]) / (3 * d), "channel", (i, j)) for j in s.channels[i]]
            if "hidden" in self.cfg.types:
                for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                    hidden_sum += T(lin.weight).sum(0)
                for lin in (a.o_proj, m.down_proj):
                    hidden_sum += T(lin.weight).sum(1) + (T(lin.bias) if lin.bias is not None else 0)
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    hidden_sum += T(norm.weight)
        if "hidden" in self.cfg.types and len(s.hidden) > self.cfg.min_hidden:
            emb, head = get_embed(self.model), get_head(self.model)
            hidden_sum += T(emb.weight).sum(0) + T(get_norm(self.model).weight)
            if head.weight is not emb.weight:
                hidden_sum += T(head.weight).sum(0)
            per = param_count(self.model, s) - param_count(self.model, _without(s, "hidden", s.hidden[0], 1))
            hs = hidden_sum.tolist()
            out += [(abs(hs[j]) / per, "hidden", (j,)) for j in s.hidden]
        return out

    def _choose(self, scores, budget: int) -> dict[str, list]:
        """Lowest-S groups first until the model fits ``budget``."""
        removed: dict[str, list] = {t: [] for t in TYPES}
        now = param_count(self.model, self.state)
        for _, kind, key in sorted(scores, key=lambda x: (x[0], x[1], x[2])):
            if now <= budget:
                break
            if kind == "hidden" and len(self.state.hidden) <= self.cfg.min_hidden:
                continue
            _remove_(self.state, kind, key[-1] if kind == "hidden" else key, self.group)
            removed[kind].append(key)
            now = param_count(self.model, self.state)
        return removed

    # ---- compensation --------------------------------------------------------------------------------

    @torch.no_grad()
    def _compensate(self, removed: dict[str, list], input_ids: torch.Tensor,
                    token_mask: torch.Tensor) -> None:
        """Local OBS: the projections that lose input columns absorb them, with H from this batch."""
        layers = get_layers(self.model)
        hd = self.hd
        cols: dict[nn.Linear, list[int]] = {}
        for i, h in removed["head"]:
            cols.setdefault(layers[i].self_attn.o_proj, []).extend(range(h * hd, (h + 1) * hd))
        for i, j in removed["channel"]:
            cols.setdefault(layers[i].mlp.down_proj, []).append(j)
        if removed["hidden"]:
            gone = [j for (j,) in removed["hidden"]]
            for layer in layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                            layer.mlp.gate_proj, layer.mlp.up_proj):
                    cols.setdefault(lin, []).extend(gone)
            cols.setdefault(get_head(self.model), []).extend(gone)
        was = self.model.training
        self.model.eval()
        hs = input_hessians(self.model, {lin: lin for lin in cols}, [(input_ids, token_mask)])
        self.model.train(was)
        for lin, c in cols.items():
            if lin in hs:
                lin.weight.copy_(obs_remove(lin.weight, hs[lin], sorted(set(c)), self.cfg.rel_damp))

    # ---- bookkeeping ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        for g, g2 in zip(self.acc_g, self.acc_g2):
            g.zero_()
            g2.zero_()
        self.acc_n = 0

    def _hidden_norms(self) -> list[nn.Module]:
        return [get_norm(self.model)] + [n for layer in get_layers(self.model)
                                         for n in (layer.input_layernorm, layer.post_attention_layernorm)]

    def _rebuild_zero(self) -> None:
        """(parameter, dim, removed indices) for every removed slice."""
        c, s, hd = self.model.config, self.state, self.hd
        dev = self.params[0].device
        z = []

        def add(p, dim, idx):
            if p is not None and len(idx):
                z.append((p, dim, torch.as_tensor(sorted(idx), dtype=torch.long, device=dev)))

        gone_h = sorted(set(range(c.hidden_size)) - set(s.hidden))
        for i, layer in enumerate(get_layers(self.model)):
            a, m = layer.self_attn, layer.mlp
            q_rows = [r for h in range(c.num_attention_heads) if h not in s.heads[i]
                      for r in range(h * hd, (h + 1) * hd)]
            kv_rows = [r for g in range(c.num_key_value_heads) if g not in s.kv[i]
                       for r in range(g * hd, (g + 1) * hd)]
            gone_ch = sorted(set(range(c.intermediate_size)) - set(s.channels[i]))
            for lin, rows in ((a.q_proj, q_rows), (a.k_proj, kv_rows), (a.v_proj, kv_rows)):
                add(lin.weight, 0, rows)
                add(lin.bias, 0, rows)
                add(lin.weight, 1, gone_h)
            add(a.o_proj.weight, 1, q_rows)
            for lin in (m.gate_proj, m.up_proj):
                add(lin.weight, 0, gone_ch)
                add(lin.weight, 1, gone_h)
            add(m.down_proj.weight, 1, gone_ch)
            for lin in (a.o_proj, m.down_proj):
                add(lin.weight, 0, gone_h)
                add(lin.bias, 0, gone_h)
            if not s.heads[i] and a.o_proj.bias is not None:  # the branch is gone with its bias
                add(a.o_proj.bias, 0, range(c.hidden_size))
            if not s.channels[i] and m.down_proj.bias is not None:
                add(m.down_proj.bias, 0, range(c.hidden_size))
        for norm in self._hidden_norms():
            add(norm.weight, 0, gone_h)
        add(get_embed(self.model).weight, 1, gone_h)
        add(get_head(self.model).weight, 1, gone_h)
        self._zero = z

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able state) for a checkpoint."""
        tensors = {f"pruner.g.{k}": g for k, g in enumerate(self.acc_g)}
        tensors.update({f"pruner.g2.{k}": g for k, g in enumerate(self.acc_g2)})
        return tensors, {"state": self.state.__dict__, "acc_n": self.acc_n, "history": self.history}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        for k, (g, g2) in enumerate(zip(self.acc_g, self.acc_g2)):
            g.copy_(tensors[f"pruner.g.{k}"])
            g2.copy_(tensors[f"pruner.g2.{k}"])
        self.state = PruneState(**state["state"])
        self.acc_n, self.history = state["acc_n"], state["history"]
        self._rebuild_zero()
        self.after_step()

    @torch.no_grad()
    def finish(self):
        """The cut model: slim, or the family's stock model when every layer ends the same."""
        s = self.state
        keep = [LayerKeep(s.heads[i], s.kv[i], s.channels[i]) for i in range(len(s.heads))]
        slim = to_slim(self.model, keep)
        slice_hidden_(slim, s.hidden)
        return to_stock_if_uniform(slim)


def _bias(t, n):
    return t.view(n, -1).sum(1) if t is not None else 0


def _without(s: PruneState, kind: str, key, group: int) -> PruneState:
    """A copy of ``s`` less one group."""
    t = PruneState([list(h) for h in s.heads], [list(k) for k in s.kv], [list(c) for c in s.channels],
                   list(s.hidden))
    _remove_(t, kind, key, group)
    return t


def _remove_(s: PruneState, kind: str, key, group: int) -> None:
    """Remove one group from ``s``; a KV head whose query heads (h // group) are all gone goes too."""
    if kind == "head":
        i, h = key
        s.heads[i].remove(h)
        s.kv[i] = [g for g in s.kv[i] if any(q // group == g for q in s.heads[i])]
    elif kind == "channel":
        s.channels[key[0]].remove(key[1])
    else:
        s.hidden.remove(key)


def _kept_rms(pruner: Pruner):
    """A forward hook giving RMSNorm over the kept hidden channels (the removed ones are zero): the
    cut model's norm. A hook, not a replaced ``forward``: transformers re-kernelizes a loaded
    model's forwards on ``train()`` / ``eval()``, which would silently undo the replacement."""
    def hook(norm, args, output):
        x = args[0]
        h = x.float()
        var = h.pow(2).sum(-1, keepdim=True) / len(pruner.state.hidden)
        return norm.weight * (h * torch.rsqrt(var + norm.variance_epsilon)).to(x.dtype)
    return hook


@torch.no_grad()
def slice_hidden_(model, hidden: list[int]) -> None:
    """Keep hidden channels ``hidden`` of a slim model: embedding, norms, every projection, head."""
    idx = torch.as_tensor(sorted(hidden), dtype=torch.long, device=get_embed(model).weight.device)
    if len(idx) == model.config.hidden_size:
        return

    def cut(mod, name, dim):
        p = getattr(mod, name, None)
        if p is not None:
            setattr(mod, name, nn.Parameter(p.index_select(dim, idx).clone(), requires_grad=p.requires_grad))

    emb, head = get_embed(model), get_head(model)
    tied = head.weight is emb.weight
    cut(emb, "weight", 1)
    emb.embedding_dim = len(idx)
    if not tied:
        cut(head, "weight", 1)
    head.in_features = len(idx)
    cut(get_norm(model), "weight", 0)
    for layer in get_layers(model):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            cut(norm, "weight", 0)
        a, m = layer.self_attn, layer.mlp
        for lin in (getattr(a, "q_proj", None), getattr(a, "k_proj", None), getattr(a, "v_proj", None),
                    getattr(m, "gate_proj", None), getattr(m, "up_proj", None)):
            if lin is not None:
                cut(lin, "weight", 1)
                lin.in_features = len(idx)
        for lin in (getattr(a, "o_proj", None), getattr(m, "down_proj", None)):
            if lin is not None:
                cut(lin, "weight", 0)
                cut(lin, "bias", 0)
                lin.out_features = len(idx)
        for branch in (a, m):
            if getattr(branch, "bias", None) is not None and not hasattr(branch, "o_proj") \
                    and not hasattr(branch, "down_proj"):
                cut(branch, "bias", 0)
    model.config.hidden_size = len(idx)
    model.model.config.hidden_size = len(idx)
    if tied:
        model.tie_weights()


def to_stock_if_uniform(slim):
    """The family's own model when every layer has the same widths and the standard GQA map."""
    from transformers import AutoModelForCausalLM

    c = slim.config
    specs = c.slim_layers
    first = specs[0]
    nq, nkv, m = len(first["q_to_kv"]), first["num_key_value_heads"], first["intermediate_size"]
    uniform = nq > 0 and m > 0 and nq % nkv == 0 and all(
        s["q_to_kv"] == [h // (nq // nkv) for h in range(nq)] and s["num_key_value_heads"] == nkv
        and s["intermediate_size"] == m and not s.get("o_bias") and not s.get("down_bias") for s in specs)
    if not uniform or c.hidden_size % nq:  # some families insist that the hidden size splits into heads
        return slim
    base = c.base_config()
    base.num_attention_heads, base.num_key_value_heads, base.intermediate_size = nq, nkv, m
    base.head_dim = c.head_dim
    stock = AutoModelForCausalLM.from_config(base).to(next(slim.parameters()).dtype)
    stock.load_state_dict(slim.state_dict())
    stock.generation_config = slim.generation_config
    return stock.eval()


def plot_architecture(arch: dict, png) -> None:
    """The found architecture: kept heads and MLP channels per layer, and the sizes over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    final, hist = arch["final"], arch["history"]
    n = len(final["heads"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].bar(range(n), [len(h) for h in final["heads"]], color="#4c72b0")
    axes[0].set(xlabel="layer", ylabel="query heads kept", title="attention")
    axes[1].bar(range(n), [len(c) for c in final["channels"]], color="#c44e52")
    axes[1].set(xlabel="layer", ylabel="MLP channels kept", title=f"MLP (hidden size {len(final['hidden'])})")
    if hist:
        steps = [h["step"] for h in hist]
        axes[2].plot(steps, [h["params"] for h in hist], label="parameters")
        axes[2].plot(steps, [h["budget"] for h in hist], "--", label="schedule")
        axes[2].set(xlabel="step", ylabel="parameters", title="size during training")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)
