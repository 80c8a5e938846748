"""ElmConfig: a base family's config (Llama, Qwen2, Qwen3, Mistral) plus the fixed-point block.

The config carries every field of the base family at top level, with ``num_hidden_layers`` and
``layer_types`` describing the *kept* layers (N - M + 1: the block takes one slot), so caches,
masks and generation treat it like the base family. ``base_config()`` rebuilds the family config.
"""

from transformers import CONFIG_MAPPING, PretrainedConfig

ELM_FIELDS = ("base_model_type", "start", "span", "dense_num_hidden_layers", "max_iter", "tol",
              "tol_mode", "solver", "kv_mode", "anderson_m", "anderson_beta", "anderson_lam",
              "wz_init_scale")
KV_MODES = ("one_step", "per_iter")
SOLVER_NAMES = ("naive", "anderson", "broyden")


class ElmConfig(PretrainedConfig):
    model_type = "elm"

    def __init__(
        self,
        base_model_type: str = "qwen2",
        start: int = 0,
        span: int = 1,
        dense_num_hidden_layers: int | None = None,
        max_iter: int = 4,
        tol: float = 0.0,
        tol_mode: str = "abs",
        solver: str = "naive",
        kv_mode: str = "one_step",
        anderson_m: int = 5,
        anderson_beta: float = 1.0,
        anderson_lam: float = 1e-4,
        wz_init_scale: float = 0.1,
        **kwargs,
    ):
        self.base_model_type = base_model_type  # family of the kept layers and of f*
        self.start = start  # first replaced layer (0-based, in the dense model)
        self.span = span  # M: dense layers [start, start + M) became the block
        self.dense_num_hidden_layers = dense_num_hidden_layers  # N of the dense model
        self.max_iter = max_iter  # evaluations of the block per forward
        self.tol = tol  # per-token stopping threshold on ||phi(z) - z|| (0: never stop early)
        self.tol_mode = tol_mode  # abs | rel (divided by ||phi(z)||)
        self.solver = solver  # naive | anderson | broyden
        self.kv_mode = kv_mode  # one_step (one K/V slot, overwritten) | per_iter (one per iteration)
        self.anderson_m = anderson_m  # Anderson memory
        self.anderson_beta = anderson_beta  # Anderson mixing
        self.anderson_lam = anderson_lam  # Anderson regularisation (relative)
        self.wz_init_scale = wz_init_scale  # W_z = scale * default Linear init
        super().__init__(**kwargs)
        self.validate_elm()

    def validate_elm(self) -> None:
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown base_model_type {self.base_model_type!r}")
        n = self.dense_num_hidden_layers
        if self.span < 1:
            raise ValueError(f"span M must be >= 1, got {self.span}")
        if n is not None and self.span >= n:
            raise ValueError(f"M = {self.span} must be smaller than the {n} dense layers")
        if n is not None and not (0 <= self.start and self.start + self.span <= n):
            raise ValueError(f"start + M = {self.start} + {self.span} exceeds the {n} layers of the "
                             "dense model")
        if self.max_iter < 1:
            raise ValueError("max_iter must be >= 1")
        if self.solver not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVER_NAMES)}")
        if self.kv_mode not in KV_MODES:
            raise ValueError(f"unknown kv_mode {self.kv_mode!r}; choose one of {', '.join(KV_MODES)}")
        if self.tol_mode not in ("abs", "rel"):
            raise ValueError(f"tol_mode must be abs or rel, got {self.tol_mode!r}")
        if self.kv_mode == "per_iter" and self.tol > 0:
            raise ValueError("kv_mode='per_iter' keeps one K/V slot per iteration and needs a fixed "
                             "number of iterations: set tol=0")

    def solver_options(self) -> dict:
        """The chosen solver's own keyword options for ``elm_solvers.solve``."""
        if self.solver == "anderson":
            return dict(m=self.anderson_m, beta=self.anderson_beta, lam=self.anderson_lam)
        return {}

    def base_config(self) -> PretrainedConfig:
        """The family config of the kept layers (num_hidden_layers = N - M + 1)."""
        d = self.to_dict()
        for key in (*ELM_FIELDS, "model_type", "auto_map", "architectures", "transformers_version"):
            d.pop(key, None)
        return CONFIG_MAPPING[self.base_model_type](**d)

    @classmethod
    def from_base(cls, base: PretrainedConfig, start: int, span: int, **elm) -> "ElmConfig":
        """ElmConfig for replacing dense layers [start, start + span) of a ``base`` model."""
        n = base.num_hidden_layers
        cls(base_model_type=base.model_type, start=start, span=span, dense_num_hidden_layers=n,
            **elm).validate_elm()  # clear errors before the family's own validators run
        d = base.to_dict()
        for key in ("model_type", "auto_map", "architectures", "transformers_version"):
            d.pop(key, None)
        keep = [i for i in range(n) if not start < i < start + span]  # `start` holds the block
        if d.get("layer_types") is not None and start + span <= n:
            d["layer_types"] = [d["layer_types"][i] for i in keep]
        d["num_hidden_layers"] = len(keep)
        return cls(base_model_type=base.model_type, start=start, span=span,
                   dense_num_hidden_layers=n, **elm, **d)
