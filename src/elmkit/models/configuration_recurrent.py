"""RecurrentConfig: a base family's config (Llama, Qwen2, Qwen3, Mistral) plus a recurrent core.

The source model's N layers are split into prelude [0, p), deleted [p, c0), core [c0, c0 + k)
and coda [c0 + k, N). The config carries every field of the base family at top level, with
``num_hidden_layers`` and ``layer_types`` describing the p + (N - c0) *kept* layers in the order
prelude, core, coda (how they sit in ``model.layers``); ``base_config()`` rebuilds the family config.
"""

from transformers import CONFIG_MAPPING, PretrainedConfig

RECURRENT_FIELDS = ("base_model_type", "prelude", "core_start", "core_len", "source_num_hidden_layers",
                    "mean_recurrence", "backprop_depth", "state_std", "state_seed", "adapter_init")
ADAPTER_INITS = ("default", "identity")
HUGINN_STATE_STD = 0.0087039  # sqrt(2 / (5 * 5280)): Huginn's value, which the authors inherit


class RecurrentConfig(PretrainedConfig):
    model_type = "recurrent"

    def __init__(
        self,
        base_model_type: str = "llama",
        prelude: int = 0,
        core_start: int = 0,
        core_len: int = 1,
        source_num_hidden_layers: int | None = None,
        mean_recurrence: int = 4,
        backprop_depth: int = 8,
        state_std: float = HUGINN_STATE_STD,
        state_seed: int | None = 0,
        adapter_init: str = "default",
        **kwargs,
    ):
        self.base_model_type = base_model_type  # family of every kept layer
        self.prelude = prelude  # p: source layers [0, p) run once
        self.core_start = core_start  # c0: first core layer in the source; layers [p, c0) are deleted
        self.core_len = core_len  # k: source layers [c0, c0 + k) form the core R, run r times
        self.source_num_hidden_layers = source_num_hidden_layers  # N of the source model
        self.mean_recurrence = mean_recurrence  # r: core iterations per forward (r-bar in training)
        self.backprop_depth = backprop_depth  # k-bar: most iterations with gradient in training
        self.state_std = state_std  # s_0 ~ truncated normal(0, std^2), cut at +-3 std
        self.state_seed = state_seed  # seed of s_0 in eval mode (None: the global RNG, stochastic)
        self.adapter_init = adapter_init  # how A was initialised: default (nn.Linear) | identity
        super().__init__(**kwargs)
        self.validate_recurrent()

    @property
    def coda_len(self) -> int | None:
        """Layers after the core (None while N is unknown)."""
        n = self.source_num_hidden_layers
        return None if n is None else n - self.core_start - self.core_len

    def validate_recurrent(self) -> None:
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown base_model_type {self.base_model_type!r}")
        if self.prelude < 0:
            raise ValueError(f"the prelude must have >= 0 layers, got {self.prelude}")
        if self.core_start < self.prelude:
            raise ValueError(f"the core starts at layer {self.core_start}, inside the prelude "
                             f"[0, {self.prelude}); core_start must be >= prelude")
        if self.core_len < 1:
            raise ValueError(f"the core must have >= 1 layer, got core_len = {self.core_len}")
        n = self.source_num_hidden_layers
        if n is not None and self.core_start + self.core_len > n:
            raise ValueError(f"the core [{self.core_start}, {self.core_start + self.core_len}) goes "
                             f"beyond the {n} layers of the source model")
        if self.mean_recurrence < 1:
            raise ValueError(f"mean_recurrence r must be >= 1, got {self.mean_recurrence}")
        if self.backprop_depth < 1:
            raise ValueError(f"backprop_depth must be >= 1, got {self.backprop_depth}")
        if not self.state_std >= 0:
            raise ValueError(f"state_std must be >= 0, got {self.state_std}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter_init {self.adapter_init!r}; choose one of "
                             f"{', '.join(ADAPTER_INITS)}")

    def base_config(self) -> PretrainedConfig:
        """The family config of the kept layers (num_hidden_layers = p + k + coda)."""
        d = self.to_dict()
        for key in (*RECURRENT_FIELDS, "model_type", "auto_map", "architectures", "transformers_version"):
            d.pop(key, None)
        return CONFIG_MAPPING[self.base_model_type](**d)

    @classmethod
    def from_base(cls, base: PretrainedConfig, prelude: int, core_start: int, core_len: int,
                  **recurrent) -> "RecurrentConfig":
        """RecurrentConfig for a ``base`` model: prelude [0, prelude), core [core_start, + core_len)."""
        n = base.num_hidden_layers
        cls(base_model_type=base.model_type, prelude=prelude, core_start=core_start, core_len=core_len,
            source_num_hidden_layers=n, **recurrent)  # clear errors before the family's validators run
        d = base.to_dict()
        for key in ("model_type", "auto_map", "architectures", "transformers_version"):
            d.pop(key, None)
        keep = [*range(prelude), *range(core_start, n)]  # prelude, core, coda
        if d.get("layer_types") is not None:
            d["layer_types"] = [d["layer_types"][i] for i in keep]
        d["num_hidden_layers"] = len(keep)
        return cls(base_model_type=base.model_type, prelude=prelude, core_start=core_start,
                   core_len=core_len, source_num_hidden_layers=n, **recurrent, **d)
