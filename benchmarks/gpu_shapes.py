"""Model shapes and GPU measuring helpers shared by the GPU benchmarks.

The shapes are those of the public Qwen2.5 configs (hidden size, MLP width, layers, heads, KV
heads, vocabulary, tied embeddings); weights are random, since speed and memory do not depend on
their values.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
}

# The official ELM code's decode and training step on one H200, as measured by the issue that
# asked for these benchmarks (prompt 512, 128 new tokens, one-step KV, start 2, M = 8, 8
# iterations); cited for comparison, not measured here.
OFFICIAL_ELM = {
    "decode_tokens_per_s": {"fixed": {1: (42.0, 57.0), 8: (365.0, 398.0)},
                            "anderson": {1: (42.0, 45.0), 8: (305.0, 357.0)}},
    "train_step_ms": (73.0, 75.0),
    "train_peak_gb": (15.0, 16.6),
    "train_tokens": 2048,
}


def random_model(shape: str, dtype=torch.bfloat16, device="cuda"):
    """A randomly initialised Qwen2 model of a published shape, built directly on ``device``."""
    cfg = AutoConfig.for_model("qwen2", **SHAPES[shape], max_position_embeddings=32768,
                               rope_theta=1e6, use_sliding_window=False, pad_token_id=0,
                               eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def copy_bandwidth(gb: float = 4.0) -> float:
    """Device-to-device copy rate in bytes/s (bytes read + written), median of 10 copies."""
    n = int(gb * 2**30) // 2
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    times = []
    for i in range(13):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    del x, y
    torch.cuda.empty_cache()
    return 2 * n * 2 / times[len(times) // 2]


def gpu_info() -> dict:
    import platform

    import transformers

    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "memory_gb": round(p.total_memory / 1e9, 1),
            "multiprocessors": p.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version()}
