"""Evaluation: one entry point, ``evaluate(model, data, out, cfg)``, for every task.

* gsm8k / math: batched greedy answers scored by the final answer (``math.py``);
* humaneval / mbpp: completions run in a sandbox, pass@k (``code.py``, ``sandbox.py``);
* perplexity: strided-window perplexity of a text file, e.g. WikiText-2 (``perplexity.py``);
* --suite commonsense / commonsense7 / local, --lm-eval-tasks: lm-evaluation-harness, offline for
  MosaicML JSONL files in --data-dir and the user's own task YAMLs (``harness.py``).

Every run writes ``metrics.json`` (and ``samples.jsonl`` for generation tasks) into ``out``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..data.chat import encode_prompt, render
from ..data.formats import Example, read_examples
from ..io import RunDir, atomic_write_text
from .generate import generate_greedy
from .math import SCORERS, extract_gsm8k, extract_math, gsm8k_equal, math_equal
from .sandbox import SandboxConfig

CODE_TASKS = ("humaneval", "mbpp")
TASKS = (*SCORERS, *CODE_TASKS, "perplexity")

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
    """What to evaluate and how."""

    task: Literal["gsm8k", "math", "humaneval", "mbpp", "perplexity"] = "gsm8k"
    """gsm8k / math (final-answer accuracy), humaneval / mbpp (pass@k), perplexity (a text file)."""
    suite: Literal["commonsense", "commonsense7", "local"] | None = None
    """Run an lm-eval suite over --data-dir instead of --task: commonsense (arc_easy, boolq, piqa .jsonl),
    commonsense7 (also hellaswag, winogrande, arc_challenge, openbook_qa), local (every *.jsonl)."""
    lm_eval_tasks: tuple[str, ...] = ()
    """lm-eval tasks by name: elmkit_<name> scores <name>.jsonl in --data-dir, a task of
    --lm-eval-include, or one of lm-eval's registry (e.g. arc_challenge; needs the Hugging Face hub)."""
    lm_eval_include: str | None = None
    """A folder of your own lm-eval task YAMLs (lm-eval's include_path); name its tasks on --lm-eval-tasks."""
    format: str = "auto"
    """Data format of --data for gsm8k/math: auto, alpaca, gsm8k, metamath or math."""
    limit: int | None = None
    """Evaluate only the first N examples / problems / documents per task (perplexity: N windows)."""
    batch_size: int = 8
    """Sequences generated or scored together."""
    max_new_tokens: int = 256
    """Generation budget per answer or completion."""
    system: str | None = None
    """Optional system message for the chat template (gsm8k/math)."""
    samples: int = 1
    """Code: completions per problem (n in pass@k)."""
    temperature: float = 0.0
    """Code: sampling temperature (0: greedy, one sample per problem)."""
    top_p: float = 0.95
    """Code: nucleus sampling mass when temperature > 0."""
    pass_k: tuple[int, ...] = (1,)
    """Code: the k of pass@k reported (each <= samples)."""
    shots: int = 0
    """MBPP: worked examples in the prompt (0-3, the paper's tasks 2-4)."""
    workers: int = 2
    """Code: programs run in parallel in the sandbox."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Code: limits of each sandboxed program (--sandbox.timeout-s, --sandbox.memory-mb, ...)."""
    window: int | None = None
    """Perplexity: tokens per window (default: the model's context, at most 2048)."""
    stride: int | None = None
    """Perplexity: tokens between window starts (default: the window, disjoint chunks)."""
    seed: int = 0
    """Seed for sampling."""
    dtype: str = "auto"
    """Model dtype: auto (bf16 on a GPU that has it, else float32), float32, bfloat16."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:1 ..."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.suite not in (None, "commonsense", "commonsense7", "local"):
            raise ValueError(f"--suite must be commonsense, commonsense7 or local, got {self.suite!r}")
        if self.lm_eval_include is not None and not self.lm_eval_tasks:
            raise ValueError("--lm-eval-include needs --lm-eval-tasks naming the tasks to run from it")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be positive")
        if self.samples < 1 or self.workers < 1 or any(k < 1 for k in self.pass_k):
            raise ValueError("--samples, --workers and --pass-k must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError("--samples > 1 needs --temperature > 0 (greedy gives one completion)")


def evaluate(
    model,
    data: str | Path | list[Example] | None = None,
    out: str | Path = "runs/eval",
    cfg: EvalConfig = EvalConfig(),
    tokenizer=None,
    progress: bool = True,
    data_dir: str | Path | None = None,
) -> dict:
    """Evaluate a model on one task (or an lm-eval suite); returns the metrics written to
    ``out/metrics.json``.

    Args:
        model: a model folder / hub id, or an already loaded causal LM.
        data: gsm8k/math: a data file with gold answers (or a list of examples); humaneval: the
            HumanEval .jsonl(.gz); mbpp: mbpp.jsonl (test split = task_id 11-510); perplexity: a
            text file (WikiText-2's wiki.test.raw is normalised). Not used by --suite.
        out: run folder to write config.json, metrics.json and samples.jsonl into.
        cfg: task, limits and generation settings.
        tokenizer: needed when ``model`` is an object; loaded from the folder otherwise.
        data_dir: --suite, elmkit_<name> tasks: the folder of MosaicML JSONL files, <name>.jsonl
            (multiple choice {query, choices, gold} or partial scoring {context_options,
            continuation, gold}).
    """
    from ..models.loading import load_model, load_tokenizer

    run = RunDir(out)
    run.write_config(
        "eval", model=str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        data=str(data) if data is None or isinstance(data, (str, Path)) else f"<{len(data)} examples>",
        data_dir=str(data_dir) if data_dir is not None else None, **asdict(cfg))
    lm_eval_run = cfg.suite is not None or bool(cfg.lm_eval_tasks)
    if data is None and not lm_eval_run:
        raise ValueError(f"--data is required for --task {cfg.task}")
    if lm_eval_run:  # files read and the hub tried before the model loads: mistakes fail first
        from .harness import plan_tasks

        tasks = plan_tasks(([cfg.suite] if cfg.suite else []) + list(cfg.lm_eval_tasks), data_dir,
                           cfg.lm_eval_include)
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, cfg.dtype, cfg.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer when the model is an object")
    model.eval()

    if lm_eval_run:
        from .harness import run_lm_eval

        metrics = run_lm_eval(model, tokenizer, tasks, data_dir=data_dir, limit=cfg.limit,
                              batch_size=cfg.batch_size, device=str(next(model.parameters()).device))
    elif cfg.task == "perplexity":
        from .perplexity import perplexity, read_text_file

        metrics = {"task": "perplexity", "data": str(data),
                   **perplexity(model, tokenizer, read_text_file(data), cfg.window, cfg.stride,
                                max_windows=cfg.limit, progress=progress)}
    elif cfg.task in CODE_TASKS:
        from .code import evaluate_code, read_problems

        problems = read_problems(cfg.task, data, cfg.shots)[: cfg.limit]
        metrics, records = evaluate_code(
            model, tokenizer, problems, cfg.task, cfg.samples, cfg.temperature, cfg.top_p, cfg.pass_k,
            cfg.max_new_tokens, cfg.batch_size, cfg.sandbox, cfg.workers, cfg.seed, progress)
        atomic_write_text(run / "samples.jsonl", "\n".join(json.dumps(r, ensure_ascii=False)
                                                           for r in records) + "\n")
    else:
        metrics = _evaluate_math(model, tokenizer, data, run, cfg, progress)
    run.write_metrics(metrics)
    return metrics


def _evaluate_math(model, tokenizer, data, run: RunDir, cfg: EvalConfig, progress: bool) -> dict:
    examples = read_examples(data, cfg.format) if isinstance(data, (str, Path)) else list(data)
    examples = examples[: cfg.limit] if cfg.limit else examples
    if not examples:
        raise ValueError("no examples to evaluate")
    missing = [i for i, ex in enumerate(examples) if ex.answer is None]
    if missing:
        raise ValueError(f"examples {missing[:5]} have no gold answer; math evaluation needs one")
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
    return {
        "task": cfg.task, "n": n, "correct": correct, "accuracy": correct / n,
        "mean_new_tokens": sum(len(t) for t in outs) / n,
    }
