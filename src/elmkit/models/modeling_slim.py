"""Slim models: the base family's decoder stack with physically smaller layers of different widths.

Each layer keeps the family's own modules and checkpoint names (``self_attn.q_proj``, ``mlp.down_proj``,
norms, Qwen3's q_norm/k_norm), cut to its ``slim_layers`` entry (see configuration_slim.py):

    q_proj (d -> n_q * hd)   k_proj, v_proj (d -> n_kv * hd)   o_proj (n_q * hd -> d [+ b])
    gate_proj, up_proj (d -> m)   down_proj (m -> d [+ b])

Attention reads K/V through the layer's query->KV map, ``k[:, q_to_kv]``: (B, n_kv, S, hd) ->
(B, n_q, S, hd), so any subset of query heads can go without breaking grouping. A branch pruned to
zero width is a no-op (the residual passes through); a layer without attention still records one
zero K/V head so that the cache length stays right. No weight is zero-masked: tensors are smaller.

This file, configuration_slim.py and hf_compat.py are saved next to the weights, so a process without elmkit
loads the model with ``trust_remote_code=True``.
"""

import copy
import sys

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_slim import SlimConfig
from .hf_compat import CACHE, output_cache, pop_cache

_SLIM_ATTENTION: dict = {}


def slim_attention_class(base_cls: type) -> type:
    """A subclass of the family's attention that reads K/V through a query->KV head map."""
    if base_cls in _SLIM_ATTENTION:
        return _SLIM_ATTENTION[base_cls]
    family = sys.modules[base_cls.__module__]

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        cache = pop_cache(kwargs)  # `cache` or `past_key_values` by transformers release
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):  # Qwen3 normalises q and k per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, n_q, T, hd), (B, n_kv, T, hd)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = family.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv, S, hd)
        idx = self._kv_index.get(k.device)
        if idx is None:  # a plain list in the module (loading leaves no uninitialised buffer)
            idx = self._kv_index[k.device] = torch.tensor(self.q_to_kv, dtype=torch.long, device=k.device)
        k, v = k[:, idx], v[:, idx]  # (B, n_q, S, hd): one K/V per query head
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                       family.eager_attention_forward)
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                              sliding_window=getattr(self, "sliding_window", None), **kwargs)
        return self.o_proj(out.reshape(B, T, -1).contiguous()), weights

    cls = type(f"Slim{base_cls.__name__}", (base_cls,), {"forward": forward, "__module__": __name__})
    _SLIM_ATTENTION[base_cls] = cls
    return cls


class NoAttention(nn.Module):
    """A pruned-away attention branch: adds nothing (or a constant output bias, FLAP's
    compensation), keeps the cache length in step."""

    def __init__(self, layer_idx: int, head_dim: int, hidden_size: int = 0, bias: bool = False):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = pop_cache(kwargs)
        B, T, _ = hidden_states.shape
        if cache is not None:
            # one zero KV head, not zero heads: caches report an empty layer's length as 0, and
            # get_seq_length() reads layer 0 (head_dim values per token: the price of a right length)
            stub = hidden_states.new_zeros(B, 1, T, self.head_dim)  # (B, 1, T, hd)
            cache.update(stub, stub, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        return (out + self.bias if self.bias is not None else out), None


class NoMLP(nn.Module):
    """A pruned-away MLP branch: adds nothing (or a constant output bias)."""

    def __init__(self, hidden_size: int = 0, bias: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x):
        out = torch.zeros_like(x)
        return out + self.bias if self.bias is not None else out


def slim_layer_(layer: nn.Module, config, layer_idx: int, spec: dict) -> nn.Module:
    """Rebuild ``layer``'s attention and MLP at the widths of ``spec`` (fresh weights)."""
    hd = config.head_dim
    n_q, n_kv, m = len(spec["q_to_kv"]), int(spec["num_key_value_heads"]), int(spec["intermediate_size"])
    if n_q == 0:
        layer.self_attn = NoAttention(layer_idx, hd, config.hidden_size, bool(spec.get("o_bias")))
    else:
        c = copy.copy(config)
        c.num_attention_heads, c.num_key_value_heads = n_q, n_kv
        attn = slim_attention_class(type(layer.self_attn))(c, layer_idx)
        attn.config = config  # the backbone's: attention implementation set at load time
        attn.num_key_value_groups = 1  # K/V are expanded by q_to_kv, not by repeat_kv
        attn.q_to_kv, attn._kv_index = [int(g) for g in spec["q_to_kv"]], {}
        if spec.get("o_bias"):
            attn.o_proj = nn.Linear(n_q * hd, config.hidden_size, bias=True)
        layer.self_attn = attn
    if m == 0:
        layer.mlp = NoMLP(config.hidden_size, bool(spec.get("down_bias")))
    else:
        c = copy.copy(config)
        c.intermediate_size = m
        mlp = type(layer.mlp)(c)
        if spec.get("down_bias"):
            mlp.down_proj = nn.Linear(m, config.hidden_size, bias=True)
        layer.mlp = mlp
    return layer


class SlimPreTrainedModel(PreTrainedModel):
    config_class = SlimConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = False  # per-layer head maps are applied before the attention call
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "MistralDecoderLayer"]


class SlimForCausalLM(SlimPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SlimConfig):
        super().__init__(config)
        config.validate_slim()
        base = config.base_config()
        if config._attn_implementation is not None:
            base._attn_implementation = config._attn_implementation
        self.model = AutoModel.from_config(base)  # the family's *Model, then cut layer by layer
        for i, spec in enumerate(config.slim_layers):
            slim_layer_(self.model.layers[i], self.model.config, i, spec)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: output_cache(out)},
                                      hidden_states=out.hidden_states, attentions=out.attentions)


SlimConfig.register_for_auto_class()
SlimForCausalLM.register_for_auto_class("AutoModelForCausalLM")
