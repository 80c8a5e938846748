import json

import torch

from elmkit.data import encode_prompt
from elmkit.data.synthetic import arithmetic_examples
from elmkit.eval import EvalConfig, evaluate, generate_greedy
from elmkit.eval.math import score_gsm8k


def test_left_padded_batches_generate_like_single_prompts(make_model, tokenizer, family):
    model = make_model(family)
    exs = arithmetic_examples(5, seed=4)
    exs[0] = exs[0].__class__("A much longer question that pads the others: " + exs[0].instruction)
    prompts = [encode_prompt(tokenizer, ex) for ex in exs]
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=5, progress=False)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0]
              for p in prompts]
    assert batched == single
    assert all(len(o) <= 12 for o in batched)


def test_evaluate_writes_metrics_and_samples(tiny_dir, tmp_path):
    exs = arithmetic_examples(6, seed=5)
    cfg = EvalConfig(task="gsm8k", batch_size=4, max_new_tokens=8, device="cpu")
    m = evaluate(tiny_dir, exs, tmp_path / "ev", cfg, progress=False)
    assert m["n"] == 6 and 0 <= m["accuracy"] <= 1
    cfg_written = json.loads((tmp_path / "ev" / "config.json").read_text())
    assert cfg_written["command"] == "eval" and cfg_written["max_new_tokens"] == 8
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["accuracy"] == m["accuracy"] and "torch" in metrics["env"]
    rows = [json.loads(l) for l in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row, ex in zip(rows, exs):
        assert set(row) == {"prompt", "output", "extracted", "gold", "correct"}
        assert row["gold"] == ex.answer and ex.instruction in row["prompt"]
        assert (row["extracted"], row["correct"]) == score_gsm8k(row["output"], row["gold"])
    assert sum(r["correct"] for r in rows) == m["correct"]


def test_evaluate_scores_a_model_that_knows_the_answers(tiny_dir, tmp_path, tokenizer):
    """A stub LM that emits each reference answer: accuracy must be exactly 1."""
    exs = arithmetic_examples(4, seed=6)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()

        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            outs = []
            for row, mask in zip(input_ids, attention_mask):
                text = tokenizer.decode(row[mask.bool()])
                ex = next(e for e in exs if e.instruction in text)
                ans = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                outs.append(ans[:max_new_tokens])
            T = max(map(len, outs))
            new = torch.tensor([o + [tokenizer.pad_token_id] * (T - len(o)) for o in outs])
            return torch.cat([input_ids, new], dim=1)

    m = evaluate(Oracle(), exs, tmp_path / "o", EvalConfig(max_new_tokens=64), tokenizer=tokenizer,
                 progress=False)
    assert m["accuracy"] == 1.0

