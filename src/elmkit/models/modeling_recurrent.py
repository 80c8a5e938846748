"""Recurrent-depth causal LM retrofitted from a pretrained one (McLeish et al., arXiv 2511.07384).

    e   = P(embed(x))                       prelude: source layers [0, p), run once
    s_0 ~ TruncNormal(0, std^2, cut at +-3 std)
    s_i = R(A [s_{i-1}; e]),  i = 1..r      A: Linear(2d -> d, no bias); R: source layers [c0, c0 + k)
    y   = lm_head(norm(C(s_r)))             coda: source layers [c0 + k, N), then the final norm

Source layers [p, c0) are gone. ``model.layers`` holds the prelude, core and coda layers in that
order (the family's own modules and checkpoint names), so the adapter table and parameter counts
treat the backbone as the family's *Model; only this file's forward knows that the core repeats.
No norm is added: each layer keeps its source norms, and the state is not normalised between
iterations. RoPE positions are the same in every iteration.

r is ``config.mean_recurrence``, a live setting: change it to evaluate at another depth. The
forward always runs r iterations (the authors' eval mode); the random-depth draw of training lives
in ``elmkit.train.recurrence``, which runs the pieces itself: ``prelude_states``,
``initial_state``, ``core_step`` (n times under no_grad, then k times with gradient),
``coda_states``.

Initial state. s_0 is drawn afresh per forward, as in the authors' code. In eval mode with
``config.state_seed`` set (the default, 0) it comes from a CPU generator seeded with that seed,
drawn as (1, T, d) and broadcast over the batch, so an input gives the same logits on every call,
in any batch and on any device's RNG (a left-padded sequence still sees other noise, as its tokens
sit at other positions). In training mode, or with state_seed None (the authors' stochastic eval),
s_0 is drawn from the global torch RNG as (B, T, d); the training loop passes its own generator.

No KV cache: every forward recomputes the whole sequence. ``generate`` works, with or without
``use_cache``: it makes no cache, and each step passes the whole sequence, so a step's logits are
those of one full forward (at the cost of one: O(T) more work per token than a cached step).
Passing a cache object raises. The authors key a cache per iteration step; a fixed-r version could
follow ELM's ``kv_mode="per_iter"``.

This file, ``configuration_recurrent.py`` and ``hf_compat.py`` are saved next to the weights, so a
process without elmkit loads the model with ``trust_remote_code=True``.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_recurrent import RecurrentConfig
from .hf_compat import CACHE, pop_cache

NO_CACHE = ("RecurrentForCausalLM keeps no KV cache: pass the whole sequence without a cache "
            "(generate() does this by itself)")


@dataclass
class LayerArgs:
    """What every decoder layer needs besides the hidden state, built once per forward."""

    masks: dict
    """Attention mask per layer type (None: the sdpa is_causal fast path)."""
    position_ids: torch.Tensor
    """(B or 1, T)."""
    position_embeddings: tuple
    """RoPE (cos, sin), each (B or 1, T, head_dim); the same in every iteration."""


def truncated_normal(shape: tuple, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std^2) cut at +-3 std, float32 on the CPU, by inverting the normal CDF."""
    lo = 0.5 * (1 + math.erf(-3 / math.sqrt(2)))  # Phi(-3)
    u = torch.rand(shape, generator=generator, device="cpu") * (1 - 2 * lo) + lo  # U(Phi(-3), Phi(3))
    return (torch.erfinv(2 * u - 1) * (math.sqrt(2) * std)).clamp_(-3 * std, 3 * std)


class RecurrentPreTrainedModel(PreTrainedModel):
    config_class = RecurrentConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "MistralDecoderLayer"]


class RecurrentForCausalLM(RecurrentPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RecurrentConfig):
        super().__init__(config)
        config.validate_recurrent()
        base = config.base_config()
        if config._attn_implementation is not None:
            base._attn_implementation = config._attn_implementation
        self.model = AutoModel.from_config(base)  # the family's *Model: prelude + core + coda layers
        d = config.hidden_size
        self.adapter = nn.Linear(2 * d, d, bias=False)  # A = [A_s | A_e] acting on cat(s, e)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    # -- the three parts, as slices of model.layers ---------------------------------------------

    @property
    def prelude(self) -> nn.ModuleList:
        return self.model.layers[: self.config.prelude]

    @property
    def core(self) -> nn.ModuleList:
        p = self.config.prelude
        return self.model.layers[p: p + self.config.core_len]

    @property
    def coda(self) -> nn.ModuleList:
        return self.model.layers[self.config.prelude + self.config.core_len:]

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # -- the forward pass in pieces --------------------------------------------------------------

    def layer_args(self, x: torch.Tensor, attention_mask=None, position_ids=None) -> LayerArgs:
        """Masks and RoPE for input x (B, T, d), as the family's own forward builds them."""
        if position_ids is None:  # no cache: positions count from 0
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
        kw = dict(config=self.model.config, inputs_embeds=x, attention_mask=attention_mask,
                  position_ids=position_ids, **{CACHE: None})
        kinds = {self._kind(i) for i in range(len(self.model.layers))}
        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = create_causal_mask(**kw)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        return LayerArgs(masks, position_ids, self.model.rotary_emb(x, position_ids))

    def prelude_states(self, input_ids=None, attention_mask=None, position_ids=None,
                       inputs_embeds=None) -> tuple[torch.Tensor, LayerArgs]:
        """e = P(embed(x)), (B, T, d), and the layer arguments of this input."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        args = self.layer_args(x, attention_mask, position_ids)
        return self._run(0, self.config.prelude, x, args), args

    def initial_state(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """s_0 like e (B, T, d): from ``generator`` (a CPU one) if given, else as the module says."""
        c = self.config
        B, T, d = e.shape
        if generator is None and not self.training and c.state_seed is not None:
            generator, B = torch.Generator().manual_seed(c.state_seed), 1  # one draw for every row
        s = truncated_normal((B, T, d), c.state_std, generator)  # (B or 1, T, d)
        return s.to(device=e.device, dtype=e.dtype).expand_as(e)

    def core_step(self, s: torch.Tensor, e: torch.Tensor, args: LayerArgs) -> torch.Tensor:
        """One iteration s -> R(A [s; e]): (B, T, d) x 2 -> (B, T, d)."""
        u = self.adapter(torch.cat([s, e], dim=-1))  # (B, T, 2d) -> (B, T, d)
        p = self.config.prelude
        return self._run(p, p + self.config.core_len, u, args)

    def coda_states(self, s: torch.Tensor, args: LayerArgs) -> torch.Tensor:
        """C(s): (B, T, d) -> (B, T, d), before the final norm."""
        return self._run(self.config.prelude + self.config.core_len, len(self.model.layers), s, args)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if pop_cache(kwargs) is not None:
            raise ValueError(NO_CACHE)
        e, args = self.prelude_states(input_ids, attention_mask, position_ids, inputs_embeds)
        s = self.initial_state(e)  # (B, T, d)
        for _ in range(self.config.mean_recurrence):
            s = self.core_step(s, e, args)
        hidden = self.model.norm(self.coda_states(s, args))  # (B, T, d)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, T', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- generation without a cache --------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() makes no cache for this model

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """Every step gets the whole sequence (and its whole mask): there is no cache to extend."""
        if inputs_embeds is not None:
            raise ValueError("RecurrentForCausalLM generates from input_ids only (it keeps no cache "
                             "that could hold the prompt's embeddings)")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": 1}

    # -- helpers ---------------------------------------------------------------------------------

    def _kind(self, i: int) -> str:
        """Mask type of kept layer i: full_attention or sliding_attention."""
        c = self.config
        types = getattr(c, "layer_types", None)
        if types is not None:
            return types[i]
        if c.base_model_type == "mistral" and getattr(c, "sliding_window", None) is not None:
            return "sliding_attention"  # Mistral has no layer_types; a set window applies everywhere
        return "full_attention"

    def _run(self, start: int, end: int, h: torch.Tensor, args: LayerArgs) -> torch.Tensor:
        """Kept layers [start, end) on h (B, T, d)."""
        for i in range(start, end):
            h = self.model.layers[i](h, attention_mask=args.masks[self._kind(i)],
                                     position_ids=args.position_ids,
                                     position_embeddings=args.position_embeddings, use_cache=False)
        return h


RecurrentConfig.register_for_auto_class()
RecurrentForCausalLM.register_for_auto_class("AutoModelForCausalLM")
