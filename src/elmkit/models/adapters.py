"""Where things live inside a Hugging Face decoder-only model, and surgery that keeps it exact.

Every method in elmkit reaches the embeddings, the decoder layers, the final norm, the LM head,
the rotary embedding and the attention masks through this one table, never through
``model.model.layers`` scattered in the code. Supported families: Llama, Qwen2, Qwen3, Mistral.

Surgery (``remove_layers_``, ``insert_layer_``, ``replace_span_``) keeps three things in step with
the module list, because transformers silently misbehaves when they drift (wrong KV-cache slot,
random re-initialisation on reload):

* ``config.num_hidden_layers``;
* every kept layer's ``self_attn.layer_idx`` (the KV cache is indexed by it);
* per-layer config lists such as ``config.layer_types`` (they select each layer's mask).

Differences between transformers releases (the name of the KV-cache argument, renamed in 5.24)
are decided in ``hf_compat`` and reach every call site through ``CACHE``; that module is separate
only because ELM and slim checkpoints carry it as remote code.

Example::

    ctx = layer_inputs(model, input_ids, attention_mask)
    h = run_layers(model, ctx.hidden, ctx, 0, 4)      # == hidden state after layer 3
    remove_layers_(model, [5, 6])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .hf_compat import CACHE, cache_kw, output_cache, pop_cache  # noqa: F401  (the adapter table's)


class UnsupportedModelError(ValueError):
    """The model's family has no entry in the adapter table."""


@dataclass(frozen=True)
class Family:
    """Attribute paths of one model family (dotted, relative to the *ForCausalLM module)."""

    name: str
    """The config's ``model_type``."""
    backbone: str = "model"
    """The decoder stack (``*Model``)."""
    embed: str = "model.embed_tokens"
    """Token embedding."""
    layers: str = "model.layers"
    """``nn.ModuleList`` of decoder layers."""
    norm: str = "model.norm"
    """Final RMSNorm, applied after the last layer."""
    head: str = "lm_head"
    """Output projection to the vocabulary."""
    rotary: str = "model.rotary_emb"
    """Rotary embedding module: ``rotary(h, position_ids) -> (cos, sin)``."""
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    """Config fields holding one entry per decoder layer; surgery filters them."""
    sequential: bool = True
    """Whether the model's forward runs ``layers`` once each, in order (False: a recurrent model,
    whose core repeats; ``layer_inputs`` and the fast decoder refuse it)."""


# The four families share the same layout in transformers 5.x; the table is explicit so that a
# family with another layout gets its own row rather than an if-branch somewhere else.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "mistral": Family("mistral"),
    # elmkit's ELM, slim and recurrent models keep their base family's layout (models/modeling_*.py)
    "elm": Family("elm"),
    "slim": Family("slim"),
    "recurrent": Family("recurrent", sequential=False),
}


def family_of(model_or_config: PreTrainedModel | PretrainedConfig) -> Family:
    """Return the adapter row for a model or config; unknown families fail with the known ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; elmkit supports "
            f"{', '.join(sorted(set(FAMILIES) - {'elm', 'slim', 'recurrent'}))} (Llama, Qwen2/2.5, Qwen3, "
            "Mistral families) and their ELM, slim and recurrent forms"
        )
    return FAMILIES[model_type]


def _get(model: nn.Module, path: str) -> nn.Module:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get_layers(model: PreTrainedModel) -> nn.ModuleList:
    return _get(model, family_of(model).layers)


def get_embed(model: PreTrainedModel) -> nn.Embedding:
    return _get(model, family_of(model).embed)


def get_norm(model: PreTrainedModel) -> nn.Module:
    return _get(model, family_of(model).norm)


def get_head(model: PreTrainedModel) -> nn.Linear:
    return _get(model, family_of(model).head)


def get_rotary(model: PreTrainedModel) -> nn.Module:
    return _get(model, family_of(model).rotary)


def num_layers(model: PreTrainedModel) -> int:
    return len(get_layers(model))


def layer_type(config: PretrainedConfig, i: int) -> str:
    """Mask type of layer i: ``full_attention`` or ``sliding_attention``."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[i]
    # Mistral has no layer_types; a set sliding_window applies to every layer.
    family = getattr(config, "base_model_type", config.model_type)
    if getattr(config, "sliding_window", None) is not None and family == "mistral":
        return "sliding_attention"
    return "full_attention"


# ---------------------------------------------------------------------------------------------
# Running layers by hand
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerContext:
    """Everything a decoder layer needs besides the hidden state, built once per batch."""

    hidden: torch.Tensor
    """Token embeddings, (B, T, d): the input of layer 0."""
    position_ids: torch.Tensor
    """(B or 1, T)."""
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    """RoPE (cos, sin), each (B or 1, T, head_dim)."""
    masks: dict[str, torch.Tensor | None]
    """Mask per layer type; None means the sdpa is_causal fast path."""
    cache: object | None = None
    """A transformers Cache, when running with one."""


def layer_inputs(
    model: PreTrainedModel,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache=None,
    inputs_embeds: torch.Tensor | None = None,
) -> LayerContext:
    """Build embeddings, RoPE and masks exactly as the model's own forward does."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if not family_of(model).sequential:
        raise UnsupportedModelError(f"a {model.config.model_type} model does not run its layers one "
                                    "after another (its core repeats); use the model's own forward")
    config = model.config
    if inputs_embeds is None:
        inputs_embeds = get_embed(model)(input_ids)  # (B, T, d)
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
        position_ids = position_ids.unsqueeze(0)
    kw = dict(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **cache_kw(cache),
    )
    types = {layer_type(config, i) for i in range(config.num_hidden_layers)} or {"full_attention"}
    masks: dict[str, torch.Tensor | None] = {}
    if "full_attention" in types:
        masks["full_attention"] = create_causal_mask(**kw)
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    pos_emb = get_rotary(model)(inputs_embeds, position_ids)
    return LayerContext(inputs_embeds, position_ids, pos_emb, masks, cache)


def run_layers(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    ctx: LayerContext,
    start: int,
    end: int,
    use_cache: bool = False,
) -> torch.Tensor:
    """Run decoder layers [start, end) on ``hidden`` (B, T, d); equals the model's own pass."""
    layers = get_layers(model)
    if not 0 <= start <= end <= len(layers):
        raise ValueError(f"layer range [{start}, {end}) is outside 0..{len(layers)}")
    for i in range(start, end):
        hidden = layers[i](
            hidden,
            attention_mask=ctx.masks[layer_type(model.config, i)],
            position_ids=ctx.position_ids,
            use_cache=use_cache,
            **cache_kw(ctx.cache),
            position_embeddings=ctx.position_embeddings,
        )
    return hidden


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head on the last layer's output: (B, T, d) -> (B, T, V)."""
    return get_head(model)(get_norm(model)(hidden))


@torch.no_grad()
def capture_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Hidden states *entering* each requested layer index (0..N; N = after the last layer).

    Index i is the input of layer i, so index N is the last layer's output before the final
    norm. Returns {i: (B, T, d)}; all N+1 states when ``layers`` is None.
    """
    n = num_layers(model)
    wanted = set(range(n + 1)) if layers is None else set(layers)
    bad = [i for i in wanted if not 0 <= i <= n]
    if bad:
        raise ValueError(f"hidden-state indices {sorted(bad)} are outside 0..{n}")
    ctx = layer_inputs(model, input_ids, attention_mask)
    h = ctx.hidden
    out = {0: h} if 0 in wanted else {}
    last = max(wanted)
    for i in range(last):
        h = run_layers(model, h, ctx, i, i + 1)
        if i + 1 in wanted:
            out[i + 1] = h
    return out


# ---------------------------------------------------------------------------------------------
# Surgery
# ---------------------------------------------------------------------------------------------


def renumber_(model: PreTrainedModel) -> PreTrainedModel:
    """Make config and every layer's ``layer_idx`` agree with the module list."""
    layers = get_layers(model)
    model.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    return model


def _filter_per_layer_lists(model: PreTrainedModel, keep: Sequence[int], n_old: int) -> None:
    config = model.config
    for key in family_of(model).per_layer_keys:
        values = getattr(config, key, None)
        if values is None:
            continue
        if len(values) != n_old:
            raise ValueError(f"config.{key} has {len(values)} entries for {n_old} layers")
        setattr(config, key, [values[i] for i in keep])


def remove_layers_(model: PreTrainedModel, drop: Iterable[int]) -> PreTrainedModel:
    """Delete decoder layers (indices into the current list); frees their weights."""
    layers = get_layers(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in drop))
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ValueError(f"cannot remove layers {bad}: the model has layers 0..{n - 1}")
    if len(drop) >= n:
        raise ValueError(f"cannot remove all {n} layers")
    keep = [i for i in range(n) if i not in set(drop)]
    _filter_per_layer_lists(model, keep, n)
    _set_layers(model, [layers[i] for i in keep])
    return renumber_(model)


def insert_layer_(
    model: PreTrainedModel, module: nn.Module, at: int, layer_type_: str = "full_attention"
) -> PreTrainedModel:
    """Insert ``module`` so that it becomes layer ``at`` (0..N); later layers shift by one."""
    layers = get_layers(model)
    n = len(layers)
    if not 0 <= at <= n:
        raise ValueError(f"insert position {at} is outside 0..{n}")
    _check_new(layers, module)
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None and layer_type_ not in set(types):
        # the backbone builds only the mask kinds it had at construction time
        raise ValueError(f"cannot insert a {layer_type_!r} layer into a model whose layers are "
                         f"{sorted(set(types))}")
    for key in family_of(model).per_layer_keys:
        values = getattr(config, key, None)
        if values is not None:
            values = list(values)
            values.insert(at, layer_type_ if key == "layer_types" else values[min(at, n - 1)])
            setattr(config, key, values)
    new = list(layers)
    new.insert(at, module)
    _set_layers(model, new)
    return renumber_(model)


def replace_span_(model: PreTrainedModel, start: int, end: int, module: nn.Module) -> PreTrainedModel:
    """Replace layers [start, end) by one module at position ``start``; frees the old layers."""
    layers = get_layers(model)
    n = len(layers)
    if not 0 <= start < end <= n:
        raise ValueError(f"span [{start}, {end}) is not a non-empty range inside 0..{n}")
    if any(module is layers[i] for i in range(n) if not start <= i < end):
        raise ValueError("the replacement module is one of the kept layers; pass a copy")
    keep = [i for i in range(n) if not start < i < end]  # layer `start` stays as the slot
    _filter_per_layer_lists(model, keep, n)
    new = [layers[i] for i in keep]
    new[start] = module
    _set_layers(model, new)
    return renumber_(model)


def _check_new(layers: nn.ModuleList, module: nn.Module) -> None:
    # One object in two slots would share a layer_idx: the cache would fill one slot twice.
    if any(module is layer for layer in layers):
        raise ValueError("the module is already a layer of this model; insert a copy "
                         "(copy.deepcopy) instead")


def _set_layers(model: PreTrainedModel, modules: list[nn.Module]) -> None:
    parent_path, _, name = family_of(model).layers.rpartition(".")
    setattr(_get(model, parent_path), name, nn.ModuleList(modules))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
