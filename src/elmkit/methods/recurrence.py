"""Retrofitted recurrence: a pretrained model's middle layers become a recurrent core, iterated with
input injection (McLeish et al., 2025, arXiv 2511.07384). ELM's closest relative.

The source model's N decoder layers are split into a prelude P = [0, p), deleted layers [p, c0),
a core R = [c0, c0 + k) of several pretrained layers kept in order, and a coda C = [c0 + k, N)::

    e   = P(embed(x))                        run once
    s_0 ~ TruncNormal(0, std^2, cut at +-3 std)   std = 0.0087039 (Huginn's sqrt(2 / (5 * 5280)))
    s_i = R(A [s_{i-1}; e]),  i = 1..r       A: Linear(2d -> d, no bias), R's k layers as one unit
    y   = lm_head(norm(C(s_r)))

At eval r is fixed (r_bar, ``model.config.mean_recurrence``: change it to test another depth).
Training (``elmkit.train.recurrence``) draws the depth per step and backpropagates through the last
k_bar iterations only:

    lambda ~ LogNormal(ln r_bar - sigma^2 / 2, sigma = 0.5),   d ~ Poisson(lambda) + 1
    n = max(d - k_bar, 0) iterations under no_grad, then min(k_bar, d) with gradient

Compared with ELM: A [s; e] = A_s s + A_e e is ELM's injection W_z z + W_h h, but the block is several
pretrained layers, there is no solver (a fixed number of iterations, random-depth truncated BPTT in
training), s_0 is random, and the layers between prelude and core are deleted.

``plan`` fixes the layout (which source layers go where) and predicts the parameter count;
``for_target`` picks a layout that removes n layers, placed as ELM places its span, so that the two
can be compared at one layer budget; ``apply_`` builds the ``RecurrentForCausalLM``, moving the
kept layers (no copies) and freeing the deleted ones.

Differences from the authors' code, on purpose:

* ``adapter_init="identity"`` (A = [0 | I], so A [s; e] = e) is elmkit's addition: with p == c0
  and r = 1 the model then reproduces the source model exactly, s_0 being ignored (the
  first-iteration equivalence test). The authors' init is ``"default"``: PyTorch's nn.Linear init,
  U(+-1/sqrt(2d)), with which the converted model does not reproduce the source at r = 1.
* The source's embedding tying is kept unless ``untie_embeddings`` (the authors untie).
* No KV cache (see ``models/modeling_recurrent.py``); s_0 is seeded in eval mode by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..models.adapters import (
    count_parameters,
    family_of,
    get_embed,
    get_head,
    get_layers,
    get_norm,
    get_rotary,
)
from ..models.configuration_recurrent import ADAPTER_INITS, HUGINN_STATE_STD, RecurrentConfig
from ..models.modeling_recurrent import RecurrentForCausalLM

Budget = Literal["params", "compute"]


@dataclass(frozen=True)
class RecurrenceConfig:
    """Which source layers form the prelude, the core and the coda, and how the core recurs."""

    prelude: int = 2
    """p: source layers [0, p) form the prelude, run once before the core."""
    core_start: int | None = None
    """c0: the core's first source layer; layers [p, c0) are deleted (None: c0 = p, none deleted)."""
    core_len: int = 4
    """k: source layers [c0, c0 + k) form the core, kept in order and iterated as one unit."""
    coda: int | None = None
    """Every layer after the core is kept as the coda; set this to have ``plan`` check their count
    (the paper's (prelude, core, coda) triple, e.g. (4, 8, 4) for a 22-layer model)."""
    mean_recurrence: int = 4
    """r_bar: core iterations at eval, and the mean depth drawn in training."""
    backprop_depth: int = 8
    """k_bar: most core iterations that carry gradient in a training step (capped at r_bar)."""
    state_std: float = HUGINN_STATE_STD
    """Standard deviation of the random initial state s_0 (truncated at +-3 std)."""
    state_seed: int | None = 0
    """Seed of s_0 in eval mode, for deterministic eval (None: the global RNG, as the authors)."""
    adapter_init: Literal["default", "identity"] = "default"
    """default: nn.Linear's init, as the authors; identity: A = [0 | I] (elmkit's addition)."""
    untie_embeddings: bool = False
    """Give the LM head its own copy of a tied input embedding, as the authors do."""
    seed: int = 0
    """Seed of the adapter's default init."""

    def __post_init__(self):
        if self.prelude < 0:
            raise ValueError(f"--prelude must be >= 0, got {self.prelude}")
        if self.core_start is not None and self.core_start < self.prelude:
            raise ValueError(f"--core-start {self.core_start} lies inside the prelude [0, "
                             f"{self.prelude}); it must be >= --prelude")
        if self.core_len < 1:
            raise ValueError(f"--core-len must be >= 1, got {self.core_len}")
        if self.coda is not None and self.coda < 0:
            raise ValueError(f"--coda must be >= 0, got {self.coda}")
        if self.mean_recurrence < 1:
            raise ValueError(f"--mean-recurrence (r_bar) must be >= 1, got {self.mean_recurrence}")
        if self.backprop_depth < 1:
            raise ValueError(f"--backprop-depth (k_bar) must be >= 1, got {self.backprop_depth}")
        if not self.state_std >= 0:
            raise ValueError(f"--state-std must be >= 0, got {self.state_std}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"--adapter-init must be one of {', '.join(ADAPTER_INITS)}, "
                             f"got {self.adapter_init!r}")


@dataclass(frozen=True)
class RecurrencePlan:
    """Where every source layer goes, the recurrence settings, and the predicted size."""

    prelude: tuple[int, ...]
    """Source layers run once before the core."""
    deleted: tuple[int, ...]
    """Source layers removed (between prelude and core)."""
    core: tuple[int, ...]
    """Source layers of the recurrent core, in order."""
    coda: tuple[int, ...]
    """Source layers after the core."""
    mean_recurrence: int
    """r_bar (see RecurrenceConfig)."""
    backprop_depth: int
    """k_bar."""
    state_std: float
    """Standard deviation of s_0."""
    state_seed: int | None
    """Seed of s_0 in eval mode."""
    adapter_init: str
    """default or identity."""
    untie_embeddings: bool
    """Whether a tied LM head gets its own copy."""
    seed: int
    """Seed of the adapter's default init."""
    params_before: int
    """Parameters of the source model."""
    params_after: int
    """Parameters of the recurrent model: the deleted layers go, the adapter (2 d^2) comes."""
    layer_evals: int
    """Decoder-layer evaluations per token at r_bar: p + r_bar k + coda (the source's: N)."""


def plan(model, cfg: RecurrenceConfig) -> RecurrencePlan:
    """The layout of ``cfg`` on ``model`` (validated), with the parameter count it will have."""
    _check_source(model)
    layers = get_layers(model)
    n = len(layers)
    p, k = cfg.prelude, cfg.core_len
    c0 = p if cfg.core_start is None else cfg.core_start
    RecurrentConfig.from_base(model.config, p, c0, k)  # range checks, with clear messages
    if cfg.coda is not None and cfg.coda != n - c0 - k:
        raise ValueError(f"--coda {cfg.coda} does not match the layout: the core ends at layer "
                         f"{c0 + k} of {n}, which leaves {n - c0 - k} coda layers")
    deleted = range(p, c0)
    d = model.config.hidden_size
    head, embed = get_head(model), get_embed(model)
    untie = head.weight.numel() if cfg.untie_embeddings and head.weight is embed.weight else 0
    before = count_parameters(model)
    after = before - sum(count_parameters(layers[i]) for i in deleted) + 2 * d * d + untie
    return RecurrencePlan(
        prelude=tuple(range(p)), deleted=tuple(deleted), core=tuple(range(c0, c0 + k)),
        coda=tuple(range(c0 + k, n)), mean_recurrence=cfg.mean_recurrence,
        backprop_depth=cfg.backprop_depth, state_std=cfg.state_std, state_seed=cfg.state_seed,
        adapter_init=cfg.adapter_init, untie_embeddings=cfg.untie_embeddings, seed=cfg.seed,
        params_before=before, params_after=after,
        layer_evals=p + cfg.mean_recurrence * k + (n - c0 - k))


def for_target(cfg: RecurrenceConfig, model, n_remove: int, budget: Budget = "params") -> RecurrenceConfig:
    """``cfg`` with the prelude and core placed to remove ``n_remove`` layers, where ELM would.

    ELM removes n layers by replacing the span [s, s + n + 1) with one block, s = max(1, (N - n - 1)
    // 2) (``elm.plan``'s default start). Here the span's first n layers are deleted and its last
    layer, s + n, starts the core: prelude [0, s), deleted [s, s + n), core [s + n, s + n + k),
    coda the rest. The layout slides down (smaller s) when the core would run past layer N - 1.

    ``budget`` says what "removing n layers" counts:

    * ``params`` (default): n source layers are deleted, so the model keeps N - n decoder layers,
      as ELM with the same n does (plus a 2d x d adapter here, 2d x d + d for ELM's W). The core's
      extra cost is compute: (r_bar - 1) k more layer evaluations per token than the pruned stack
      (``RecurrencePlan.layer_evals``), where ELM pays max_iter - 1.
    * ``compute``: n + (r_bar - 1) k layers are deleted, so that a token costs N - n layer
      evaluations at r_bar, as a model with n layers pruned does.
    """
    _check_source(model)
    n_layers = len(get_layers(model))
    k, r = cfg.core_len, cfg.mean_recurrence
    if budget not in ("params", "compute"):
        raise ValueError(f"budget must be params or compute, got {budget!r}")
    if n_remove < 0:
        raise ValueError(f"--n-remove must be >= 0, got {n_remove}")
    gone = n_remove if budget == "params" else n_remove + (r - 1) * k
    s = min(max(1, (n_layers - gone - 1) // 2), n_layers - gone - k)
    if s < 0:
        raise ValueError(f"cannot delete {gone} of {n_layers} layers and keep a core of {k}: lower "
                         f"--n-remove{' or --mean-recurrence' if budget == 'compute' else ''} or "
                         "--core-len")
    return RecurrenceConfig(**{**_fields(cfg), "prelude": s, "core_start": s + gone, "coda": None})


def apply_(model, p: RecurrencePlan) -> RecurrentForCausalLM:
    """Build the recurrent model from the source; the source's layer list is emptied."""
    _check_source(model)
    layers = get_layers(model)
    n = len(p.prelude) + len(p.deleted) + len(p.core) + len(p.coda)
    if len(layers) != n or p.prelude + p.deleted + p.core + p.coda != tuple(range(n)):
        raise ValueError(f"the plan is for a model of {n} layers split in order into prelude, "
                         f"deleted, core and coda; this model has {len(layers)} layers")
    if not p.core:
        raise ValueError("the plan has an empty core")
    cfg = RecurrentConfig.from_base(
        model.config, len(p.prelude), p.core[0], len(p.core), mean_recurrence=p.mean_recurrence,
        backprop_depth=p.backprop_depth, state_std=p.state_std, state_seed=p.state_seed,
        adapter_init=p.adapter_init)
    attn = model.config._attn_implementation
    cfg._attn_implementation = attn
    embed, head = get_embed(model), get_head(model)
    untie = p.untie_embeddings and head.weight is embed.weight
    if untie:
        cfg.tie_word_embeddings = False
    ref = next(model.parameters())
    with torch.device("meta"):  # the skeleton costs no memory; every module is replaced below
        rec = RecurrentForCausalLM(cfg)
    rec.model.config._attn_implementation = attn
    kept = [layers[i] for i in (*p.prelude, *p.core, *p.coda)]
    rec.model.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    rec.model.embed_tokens, rec.model.norm = embed, get_norm(model)
    rec.model.rotary_emb = get_rotary(model)
    rec.lm_head = head
    if untie:
        rec.lm_head = nn.Linear(head.in_features, head.out_features, bias=False).to(ref.device, ref.dtype)
        with torch.no_grad():
            rec.lm_head.weight.copy_(head.weight)
    rec.adapter = _adapter(cfg.hidden_size, p.adapter_init, p.seed).to(ref.device, ref.dtype)
    left = [name for name, t in [*rec.named_parameters(), *rec.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"recurrent model assembly left tensors unset: {left[:4]}")
    del layers[:]  # the deleted layers are freed with the source's shell
    rec.generation_config = model.generation_config
    return rec.eval()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _check_source(model) -> None:
    family = family_of(model)
    if family.name in ("elm", "slim", "recurrent"):
        raise ValueError(f"retrofitted recurrence needs a plain Llama/Qwen2/Qwen3/Mistral model; "
                         f"this one is already of type {family.name!r}")


def _fields(cfg: RecurrenceConfig) -> dict:
    return {f: getattr(cfg, f) for f in RecurrenceConfig.__dataclass_fields__}


@torch.no_grad()
def _adapter(d: int, init: str, seed: int) -> nn.Linear:
    """A: Linear(2d -> d, no bias) acting on cat(s, e), in float32 on the CPU (device-independent)."""
    with torch.device("cpu"):
        a = nn.Linear(2 * d, d, bias=False)
    if init == "identity":
        a.weight.zero_()
        a.weight[:, d:].copy_(torch.eye(d))  # A = [0 | I]: A [s; e] = e
    else:
        # nn.Linear's default (kaiming-uniform, a = sqrt 5) is U(+-1/sqrt(fan_in)), here from a seed
        bound = 1 / math.sqrt(2 * d)
        a.weight.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
    return a
