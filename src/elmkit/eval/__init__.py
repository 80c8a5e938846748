"""Evaluation: math answer scoring with batched greedy generation.

``evaluate(model, data, out, cfg)`` generates an answer for every example, scores it with the
task's scorer, and writes ``metrics.json`` plus ``samples.jsonl`` (prompt, output, extracted,
gold, correct) into ``out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..data.chat import encode_prompt, render
from ..data.formats import Example, read_examples
from ..io import RunDir, atomic_write_text
from .generate import generate_greedy
from .math import SCORERS, extract_gsm8k, extract_math, gsm8k_equal, math_equal

__all__ = [
    "EvalConfig",
    "evaluate",
    "extract_gsm8k",
    "extract_math",
    "generate_greedy",
    "gsm8k_equal",
    "math_equal",
]


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate a model on a math task."""

    task: Literal["gsm8k", "math"] = "gsm8k"
    """Scorer: gsm8k (numeric final answer) or math (LaTeX final answer, boxed)."""
    format: str = "auto"
    """Data format of --data: auto, alpaca, gsm8k, metamath or math."""
    limit: int | None = None
    """Evaluate only the first N examples."""
    batch_size: int = 8
    """Prompts generated together (left-padded)."""
    max_new_tokens: int = 256
    """Generation budget per answer."""
    system: str | None = None
    """Optional system message for the chat template."""
    dtype: str = "auto"
    """Model dtype: auto (bf16 on a GPU that has it, else float32), float32, bfloat16."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:1 ..."""

    def __post_init__(self):
        if self.task not in SCORERS:
            raise ValueError(f"--task must be one of {', '.join(SCORERS)}, got {self.task!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be positive")


def evaluate(
    model,
    data: str | Path | list[Example],
    out: str | Path,
    cfg: EvalConfig = EvalConfig(),
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """Generate and score answers; returns the metrics written to ``out/metrics.json``.

    Args:
        model: a model folder / hub id, or an already loaded causal LM.
        data: a data file (any instruction format with a gold answer) or a list of examples.
        out: run folder to write config.json, metrics.json and samples.jsonl into.
        cfg: task, limits and generation settings.
        tokenizer: needed when ``model`` is an object; loaded from the folder otherwise.
    """
    from ..models.loading import load_model, load_tokenizer

    run = RunDir(out)
    run.write_config(
        "eval", model=str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        data=str(data) if isinstance(data, (str, Path)) else f"<{len(data)} examples>", **vars(cfg)
    )
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, cfg.dtype, cfg.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer when the model is an object")
    examples = read_examples(data, cfg.format) if isinstance(data, (str, Path)) else list(data)
    examples = examples[: cfg.limit] if cfg.limit else examples
    if not examples:
        raise ValueError("no examples to evaluate")
    missing = [i for i, ex in enumerate(examples) if ex.answer is None]
    if missing:
        raise ValueError(f"examples {missing[:5]} have no gold answer; math evaluation needs one")

    model.eval()
    prompts = [encode_prompt(tokenizer, ex, cfg.system) for ex in examples]
    outs = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, progress)
    score = SCORERS[cfg.task]
    lines, correct = [], 0
    for ex, toks in zip(examples, outs):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        pred, ok = score(text, ex.answer)
        correct += ok
        lines.append(json.dumps({
            "prompt": render(tokenizer, ex, cfg.system).prompt, "output": text,
            "extracted": pred, "gold": ex.answer, "correct": ok,
        }, ensure_ascii=False))
    atomic_write_text(run / "samples.jsonl", "\n".join(lines) + "\n")
    n = len(examples)
    metrics = {
        "task": cfg.task, "n": n, "correct": correct, "accuracy": correct / n,
        "mean_new_tokens": sum(len(t) for t in outs) / n,
    }
    run.write_metrics(metrics)
    return metrics
