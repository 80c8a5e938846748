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
from .loading import load_model, load_tokenizer
from .modeling_elm import ElmForCausalLM


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("elm", ElmConfig)
        AutoModelForCausalLM.register(ElmConfig, ElmForCausalLM)
    except ValueError:  # already registered (re-import)
        pass


_register()

__all__ = [
    "ElmConfig",
    "ElmForCausalLM",
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
