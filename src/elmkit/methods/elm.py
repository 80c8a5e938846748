"""ELM: replace dense layers [start, start + M) by one weight-shared fixed-point block.

Equilibrium Language Models (ICLR 2026, openreview lqJT6xmuH3)::

    phi(z, h) = f*(W_z z + W_h h + b),  z^0 = 0,  f* = copy of dense layer `start`,
    W_h = I, W_z = wz_init_scale * default Linear init, b = 0

so the block's first iteration at init reproduces dense layer `start` exactly. ``plan`` fixes
(start, M) and the solver settings; ``apply_`` builds an ``ElmForCausalLM`` from the dense model,
moving the kept layers over (no copies) and freeing the replaced ones. Training the block is
``elmkit.train.elm``; placing it is GPPO (a later method).

The official code kept all N layers in memory at inference; here the removed layers are gone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import family_of, get_layers
from ..models.configuration_elm import ElmConfig
from ..models.modeling_elm import ElmForCausalLM, fixed_point_layer_class


@dataclass(frozen=True)
class ElmPlan:
    """Where the block goes and how it is solved."""

    start: int
    """First replaced dense layer (0-based)."""
    span: int
    """M: number of dense layers the block replaces."""
    max_iter: int = 4
    """Block evaluations per forward at inference."""
    tol: float = 0.0
    """Per-token stopping threshold on the residual (0: always max_iter)."""
    tol_mode: str = "abs"
    """abs or rel (residual divided by the output norm)."""
    solver: str = "naive"
    """naive, anderson or broyden."""
    kv_mode: str = "one_step"
    """one_step (one K/V slot per position) or per_iter (one per iteration; needs tol 0)."""
    wz_init_scale: float = 0.1
    """W_z = scale x the default Linear init (small, random)."""


def plan(model, start: int | None = None, span: int | None = None, ratio: float = 0.25,
         **settings) -> ElmPlan:
    """A plan for ``model``: M = span (or round(ratio x N)), start given (or a middle default).

    The default start (until GPPO chooses it) is the middle of the network minus M/2, kept clear of
    the first layer, where hidden-state changes are largest in trained models.
    """
    family_of(model)
    n = len(get_layers(model))
    m = span if span is not None else max(1, round(ratio * n))
    if start is None:
        start = max(1, (n - m) // 2)
    p = ElmPlan(start=start, span=m, **settings)
    ElmConfig.from_base(model.config, p.start, p.span, **_solver_fields(p))  # validates
    return p


def apply_(model, p: ElmPlan) -> ElmForCausalLM:
    """Build the ELM model from a dense one; the dense model's layer list is emptied."""
    family_of(model)
    if model.config.model_type == "elm":
        raise ValueError("the model is already an ELM")
    cfg = ElmConfig.from_base(model.config, p.start, p.span, **_solver_fields(p))
    cfg._attn_implementation = model.config._attn_implementation
    dense_layers = get_layers(model)
    ref = next(model.parameters())
    with torch.device("meta"):  # the skeleton costs no memory; every module is replaced below
        elm = ElmForCausalLM(cfg)
    base = elm.model.config  # shared with the block: same attention implementation as the dense
    base._attn_implementation = model.config._attn_implementation
    block = fixed_point_layer_class(type(dense_layers[p.start]))(base, p.start, cfg)
    block.load_state_dict(dense_layers[p.start].state_dict(), strict=False)  # f* = layer start
    _init_proj(block.proj, cfg.hidden_size, p.wz_init_scale)
    block.to(device=ref.device, dtype=ref.dtype)
    keep = list(dense_layers[: p.start]) + [block] + list(dense_layers[p.start + p.span:])
    elm.model.layers = nn.ModuleList(keep)
    for i, layer in enumerate(elm.model.layers):
        layer.self_attn.layer_idx = i
    elm.model.embed_tokens = model.model.embed_tokens
    elm.model.norm = model.model.norm
    elm.model.rotary_emb = model.model.rotary_emb
    elm.lm_head = model.lm_head
    left = [n for n, t in [*elm.named_parameters(), *elm.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"ELM assembly left tensors unset: {left[:4]}")
    model.model.layers = nn.ModuleList()  # the replaced layers are freed with the dense shell
    elm.generation_config = model.generation_config
    return elm.eval()


@torch.no_grad()
def cosine_start(model, calib, span: int) -> tuple[int, list[float]]:
    """The start whose span changes the hidden state least (LLM-Streamline's criterion): the a
    maximising the mean cosine similarity of the states entering layer a and layer a + M over the
    calibration tokens. Returns (start, similarity per start); a cheap alternative to GPPO."""
    from ..models.adapters import capture_hidden_states

    n = len(get_layers(model))
    if not 1 <= span < n:
        raise ValueError(f"span M = {span} must be in 1..{n - 1} for a model of {n} layers")
    sums = torch.zeros(n - span + 1, dtype=torch.float64)
    count = 0
    for ids, mask in calib.batches(16, next(model.parameters()).device):
        hs = capture_hidden_states(model, ids, mask)  # {i: (B, T, d)}
        valid = mask.bool()
        for a in range(n - span + 1):
            cos = F.cosine_similarity(hs[a].float(), hs[a + span].float(), dim=-1)  # (B, T)
            sums[a] += float(cos[valid].sum())
        count += int(valid.sum())
    sims = (sums / count).tolist()
    return max(range(len(sims)), key=lambda a: sims[a]), sims


def _solver_fields(p: ElmPlan) -> dict:
    d = asdict(p)
    d.pop("start"), d.pop("span")
    return d


@torch.no_grad()
def _init_proj(proj: nn.Linear, d: int, scale: float) -> None:
    bound = 1 / math.sqrt(2 * d)  # nn.Linear's default: kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(fan_in))
    proj.weight[:, :d].uniform_(-bound, bound).mul_(scale)  # W_z: small, random
    proj.weight[:, d:].copy_(torch.eye(d))  # W_h = I
    proj.bias.zero_()
