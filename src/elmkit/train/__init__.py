"""Training loops: LoRA task fine-tuning (merged at the end)."""

from .lora import ALL_PROJECTIONS, FinetuneConfig, finetune

__all__ = ["ALL_PROJECTIONS", "FinetuneConfig", "finetune"]
