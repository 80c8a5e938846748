"""Training loops: task fine-tuning, LoRA (merged at the end) or partial-layer."""

from .lora import ALL_PROJECTIONS, FinetuneConfig, finetune, set_partial_trainable_

__all__ = ["ALL_PROJECTIONS", "FinetuneConfig", "finetune", "set_partial_trainable_"]
