"""SlimConfig: a base family's config (Llama, Qwen2, Qwen3, Mistral) with per-layer widths.

Stock transformers configs hold one head count and one MLP width for every layer; width pruning
(LLM-Pruner, FLAP, DarwinLM, EfficientLLM) leaves layers of different widths. The config carries the
base family's fields at top level (so caches, masks and generation treat it like the family) and,
per decoder layer, in ``slim_layers``:

    q_to_kv            kept query heads, each naming the kept KV head it reads (GQA groups survive
                       head removal); [] removes the attention branch
    num_key_value_heads  KV heads kept in the layer
    intermediate_size  MLP channels kept; 0 removes the MLP branch
    o_bias, down_bias  whether o_proj / down_proj carry an output bias (FLAP's compensation)
"""

from transformers import CONFIG_MAPPING, PretrainedConfig

SLIM_FIELDS = ("base_model_type", "slim_layers")


class SlimConfig(PretrainedConfig):
    model_type = "slim"

    def __init__(self, base_model_type: str = "qwen2", slim_layers: list | None = None, **kwargs):
        self.base_model_type = base_model_type  # family of every layer
        self.slim_layers = [dict(s) for s in (slim_layers or [])]  # one dict per decoder layer
        super().__init__(**kwargs)
        self.validate_slim()

    def validate_slim(self) -> None:
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown base_model_type {self.base_model_type!r}")
        n = getattr(self, "num_hidden_layers", None)
        if n is not None and self.slim_layers and len(self.slim_layers) != n:
            raise ValueError(f"slim_layers has {len(self.slim_layers)} entries for {n} layers")
        for i, s in enumerate(self.slim_layers):
            kv, q = int(s["num_key_value_heads"]), list(s["q_to_kv"])
            if any(not 0 <= g < kv for g in q):
                raise ValueError(f"layer {i}: q_to_kv {q} names KV heads outside 0..{kv - 1}")
            if (kv == 0) != (len(q) == 0):
                raise ValueError(f"layer {i}: a layer with query heads needs KV heads and vice versa")
            if int(s["intermediate_size"]) < 0:
                raise ValueError(f"layer {i}: intermediate_size must be >= 0")

    def base_config(self) -> PretrainedConfig:
        """The uniform family config the layers were cut from."""
        d = self.to_dict()
        for key in (*SLIM_FIELDS, "model_type", "auto_map", "architectures", "transformers_version"):
            d.pop(key, None)
        if d["hidden_size"] % d["num_attention_heads"]:
            # a pruned hidden size need not split into the top-level head count, which some families
            # check; the layers take their heads from slim_layers and head_dim is explicit
            d["num_attention_heads"] = d["num_key_value_heads"] = 1
        return CONFIG_MAPPING[self.base_model_type](**d)

    @classmethod
    def from_base(cls, base: PretrainedConfig, slim_layers: list[dict]) -> "SlimConfig":
        d = base.to_dict()
        for key in ("model_type", "auto_map", "architectures", "transformers_version"):
            d.pop(key, None)
        d.setdefault("head_dim", d.get("head_dim") or base.hidden_size // base.num_attention_heads)
        return cls(base_model_type=base.model_type, slim_layers=slim_layers, **d)
