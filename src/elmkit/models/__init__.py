"""Model access (adapters), surgery and elmkit's own model formats."""

from .adapters import (
    FAMILIES,
    Family,
    LayerContext,
    UnsupportedModelError,
    capture_hidden_states,
    count_parameters,
    family_of,
    get_embed,
    get_head,
    get_layers,
    get_norm,
    get_rotary,
    head_logits,
    insert_layer_,
    layer_inputs,
    remove_layers_,
    renumber_,
    replace_span_,
    run_layers,
)
from .configuration_elm import ElmConfig
from .configuration_recurrent import RecurrentConfig
from .configuration_slim import SlimConfig
from .loading import load_model, load_tokenizer
from .modeling_elm import ElmForCausalLM
from .modeling_recurrent import RecurrentForCausalLM
from .modeling_slim import SlimForCausalLM
from .slim import LayerKeep, full_keep, to_slim


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, config, model in (("elm", ElmConfig, ElmForCausalLM), ("slim", SlimConfig, SlimForCausalLM),
                                ("recurrent", RecurrentConfig, RecurrentForCausalLM)):
        try:
            AutoConfig.register(name, config)
            AutoModelForCausalLM.register(config, model)
        except ValueError:  # already registered (re-import)
            pass


_register()

__all__ = [
    "ElmConfig",
    "ElmForCausalLM",
    "LayerKeep",
    "RecurrentConfig",
    "RecurrentForCausalLM",
    "SlimConfig",
    "SlimForCausalLM",
    "full_keep",
    "to_slim",
    "FAMILIES",
    "Family",
    "LayerContext",
    "UnsupportedModelError",
    "capture_hidden_states",
    "count_parameters",
    "family_of",
    "get_embed",
    "get_head",
    "get_layers",
    "get_norm",
    "get_rotary",
    "head_logits",
    "insert_layer_",
    "layer_inputs",
    "load_model",
    "load_tokenizer",
    "remove_layers_",
    "renumber_",
    "replace_span_",
    "run_layers",
]
