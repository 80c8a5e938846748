"""Greedy exact-match accuracy of a model on testbed problems (the issue-2 GSM8K scorer)."""

from __future__ import annotations

import torch

from ..data.chat import encode_prompt
from ..data.formats import Example
from ..eval.generate import generate_greedy
from ..eval.math import score_gsm8k


@torch.no_grad()
def test_accuracy(model, tokenizer, examples: list[Example], batch_size: int = 64,
                  progress: bool = False) -> float:
    """Fraction of problems whose generated final answer equals the gold one."""
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    # budget: the longest reference answer plus slack, so a correct chain is never cut off
    budget = max(len(tokenizer(ex.output)["input_ids"]) for ex in examples) + 16
    outs = generate_greedy(model, tokenizer, prompts, budget, batch_size, progress)
    correct = sum(score_gsm8k(tokenizer.decode(o, skip_special_tokens=True), ex.answer)[1]
                  for o, ex in zip(outs, examples))
    model.train(was_training)
    return correct / len(examples)


def evaluate_testbed(model_dir, n_test: int | None = None, shortgpt_ratio: float = 0.25,
                     batch_size: int | None = None, progress: bool = True) -> dict:
    """Dense test accuracy, and accuracy after ShortGPT deletes ``shortgpt_ratio`` of the layers.

    The test problems are regenerated from the recipe stored with the model (``testbed.json``),
    so the same 1,000 problems are used wherever this runs.
    """
    from pathlib import Path

    from ..data.calibration import Calibration
    from ..methods import shortgpt
    from ..models.loading import load_model, load_tokenizer
    from .card import read_recipe
    from .problems import make_split

    model_dir = Path(model_dir)
    recipe = read_recipe(model_dir)
    problems = recipe["problems"]
    n = n_test or recipe["test_examples"]
    test = make_split("test", n, problems, recipe["seed"])
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32")
    if batch_size is None:  # a GPU generates many sequences for the price of one
        batch_size = 250 if next(model.parameters()).is_cuda else 64
    dense = test_accuracy(model, tok, test, batch_size, progress)

    # Calibration: 64 validation problems, prompt and answer, as ShortGPT would see task text.
    calib_ex = make_split("validation", 64, problems, recipe["seed"])
    calib = Calibration.from_examples(tok, calib_ex, 512)
    p = shortgpt.plan(model, calib, shortgpt.ShortGPTConfig(ratio=shortgpt_ratio))
    shortgpt.apply_(model, p)
    pruned = test_accuracy(model, tok, test, batch_size, progress)
    return {
        "test_examples": n, "dense_accuracy": dense,
        "shortgpt": {"ratio": shortgpt_ratio, "removed_layers": list(p.drop),
                     "block_influence": [round(s, 6) for s in p.scores],
                     "accuracy": pruned, "retained": pruned / dense if dense else None},
    }
