"""Equilibrium Language Model: a span of M decoder layers replaced by one fixed-point block.

    phi(z, h) = f*(W_z z + W_h h + b),    z^0 = 0,    output = phi(z*, h)  with z* = phi(z*, h)

f* is the base family's own decoder layer (Llama, Qwen2, Qwen3, Mistral), W = [W_z | W_h] one
Linear(2d -> d). The model holds the N - M kept layers plus the block, nothing else: layer list
``[0, start) + [block] + [start + M, N)``, renumbered, so the KV cache has N - M + 1 slots.

KV cache (``kv_mode``):
* ``one_step``: the block keeps one K/V slot per position; before each re-evaluation it crops the
  slot back by the new tokens (``DynamicLayer.crop(-T)``) so the last evaluation's K/V remains.
* ``per_iter``: iteration k writes its own slot (the first in the main cache, the others in a
  private cache hung on the cache object), matching training dynamics exactly; needs tol = 0.

Stopping: per token on ||phi(z) - z|| (abs or rel) at any batch size; converged tokens are frozen
while others iterate (see ``elm_solvers``). The block's last solve statistics are kept in
``block.last_info`` (per-token evaluation counts, residuals).

This file, ``configuration_elm.py``, ``elm_solvers.py`` and ``hf_compat.py`` are saved next to the
weights, so a process without elmkit loads the model with ``trust_remote_code=True``.
"""

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_elm import ElmConfig
from .elm_solvers import solve
from .hf_compat import CACHE, output_cache, pop_cache

_FIXED_POINT_CLASSES: dict = {}


def fixed_point_layer_class(base_cls: type) -> type:
    """A subclass of the family's decoder layer whose forward solves for the fixed point.

    Subclassing (rather than wrapping) keeps the checkpoint names of f* (``self_attn``, ``mlp``,
    norms) and makes transformers' hidden-state hooks count the block once, not per iteration.
    """
    if base_cls in _FIXED_POINT_CLASSES:
        return _FIXED_POINT_CLASSES[base_cls]

    def __init__(self, config, layer_idx: int, elm: ElmConfig):
        base_cls.__init__(self, config, layer_idx)
        d = config.hidden_size
        self.proj = nn.Linear(2 * d, d, bias=True)  # [W_z | W_h] acting on cat(z, h)
        self.elm = elm  # the live ElmConfig: solver settings can be changed after loading
        self.last_info = None

    def phi(self, z, h, **kw):
        """One evaluation phi(z, h): (B, T, d) x 2 -> (B, T, d)."""
        u = self.proj(torch.cat([z, h], dim=-1))
        return base_cls.forward(self, u, **kw)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kwargs):
        c = self.elm
        h = hidden_states  # (B, T, d): the input of the replaced span
        T = h.shape[1]
        idx = self.self_attn.layer_idx
        # the cache arrives as `cache` or `past_key_values` by transformers release (hf_compat);
        # it must leave kwargs, or the parent forward would take the uncropped one from there
        cache = pop_cache(kwargs)
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                  position_embeddings=position_embeddings, **kwargs)
        calls = [0]

        def f(z):
            k = calls[0]
            calls[0] += 1
            if cache is None or k == 0:
                return self.phi(z, h, **{CACHE: cache}, **kw)
            if c.kv_mode == "one_step":
                cache.layers[idx].crop(-T)  # overwrite this step's K/V instead of appending
                return self.phi(z, h, **{CACHE: cache}, **kw)
            slots = _iteration_slots(cache, idx)  # per_iter: iteration k -> private slot k - 1
            self.self_attn.layer_idx = k - 1
            try:
                return self.phi(z, h, **{CACHE: slots}, **kw)
            finally:
                self.self_attn.layer_idx = idx

        out, info = solve(f, torch.zeros_like(h), solver=c.solver, max_iter=c.max_iter, tol=c.tol,
                          tol_mode=c.tol_mode, **c.solver_options())
        self.last_info = info
        return out

    cls = type(f"FixedPoint{base_cls.__name__}", (base_cls,),
               {"__init__": __init__, "phi": phi, "forward": forward, "__module__": __name__})
    _FIXED_POINT_CLASSES[base_cls] = cls
    return cls


def _iteration_slots(cache, idx: int) -> DynamicCache:
    store = getattr(cache, "_elm_iteration_slots", None)
    if store is None:
        store = {}
        cache._elm_iteration_slots = store
    if idx not in store:
        store[idx] = DynamicCache()  # lazily grows one layer per extra iteration
    return store[idx]


class ElmPreTrainedModel(PreTrainedModel):
    config_class = ElmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "MistralDecoderLayer"]


class ElmForCausalLM(ElmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ElmConfig):
        super().__init__(config)
        config.validate_elm()
        base = config.base_config()
        if config._attn_implementation is not None:
            base._attn_implementation = config._attn_implementation
        self.model = AutoModel.from_config(base)  # the family's *Model with N - M + 1 layers
        layer_cls = type(self.model.layers[config.start])
        # the block shares the backbone's config object, hence its attention implementation
        self.model.layers[config.start] = fixed_point_layer_class(layer_cls)(
            self.model.config, config.start, config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def block(self):
        return self.model.layers[self.config.start]

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        # the cache, if any, travels in kwargs under the installed release's name (hf_compat)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state  # (B, T, d)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, T', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size,
                                      **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: output_cache(out)},
                                      hidden_states=out.hidden_states, attentions=out.attentions)


ElmConfig.register_for_auto_class()
ElmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
