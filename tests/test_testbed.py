import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from elmkit.data import byte_tokenizer, encode, encode_many, pad_batch, read_examples
from elmkit.testbed import TINY_PATH, ProblemConfig, make_split, split_of, to_records
from elmkit.testbed.pretrain import PRESETS, _batch, pretrain

CFG = ProblemConfig(min_steps=1, max_steps=5, digits=2, max_value=999)
_LINE = re.compile(r"^[A-Z][a-z ]*(?: \d+)?(?: away)?: (\d+) ([-+*/]) (\d+) = (\d+)\.$")


def test_splits_are_disjoint_and_hash_assigned():
    train = make_split("train", 5000, CFG, seed=0)
    val = make_split("validation", 300, CFG, seed=0)
    test = make_split("test", 1000, CFG, seed=0)
    texts = [{e.instruction for e in s} for s in (train, val, test)]
    assert [len(t) for t in texts] == [5000, 300, 1000]  # distinct inside each split
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert all(split_of(e.instruction) == "test" for e in test)
    # the test set does not depend on how much training data was asked for
    assert make_split("test", 1000, CFG, seed=0) == test


def test_generation_is_deterministic_for_a_seed():
    assert make_split("train", 200, CFG, seed=7) == make_split("train", 200, CFG, seed=7)
    assert make_split("train", 200, CFG, seed=7) != make_split("train", 200, CFG, seed=8)


def test_every_chain_of_thought_is_correct_arithmetic():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b}
    for ex in make_split("train", 2000, CFG, seed=1):
        *steps, last = ex.output.split("\n")
        assert CFG.min_steps <= len(steps) <= CFG.max_steps
        assert ex.instruction.count(".") == len(steps) + 1  # start sentence + one per step
        start = int(re.search(r"has (\d+)", ex.instruction).group(1))
        value = start
        for line in steps:
            m = _LINE.match(line)
            assert m, line
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == value and ops[op](a, b) == r and 1 <= r <= CFG.max_value, line
            value = r
        assert last == f"The answer is: {value}" and ex.answer == str(value)


def test_records_are_elm_alpaca_json(tmp_path):
    exs = make_split("validation", 20, CFG, seed=0)
    p = tmp_path / "val.json"
    p.write_text(json.dumps(to_records(exs)))
    assert read_examples(p) == exs  # same reader and gold answers as real data


def test_bad_problem_configs_fail_clearly():
    with pytest.raises(ValueError, match="--max-steps"):
        ProblemConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="--max-factor"):
        ProblemConfig(max_factor=7)
    with pytest.raises(ValueError, match="split must be one of"):
        make_split("dev", 3)


def test_encode_many_equals_encode(tokenizer):
    exs = make_split("train", 50, CFG, seed=2)
    assert encode_many(tokenizer, exs, 128) == [encode(tokenizer, e, 128) for e in exs]


def test_batches_are_a_pure_function_of_step_and_cover_the_epoch():
    cfg = dataclasses.replace(PRESETS["tiny"], batch_size=4, seed=3)
    feats = [{"input_ids": [i] * (1 + i % 7), "labels": [i]} for i in range(64)]
    first = [_batch(feats, s, cfg) for s in range(16)]  # 16 steps x 4 = one epoch
    assert first == [_batch(feats, s, cfg) for s in range(16)]
    seen = sorted(f["labels"][0] for b in first for f in b)
    assert seen == list(range(64))


def test_causal_only_loss_equals_masked_loss(make_model, tokenizer):
    # pretraining drops the padding mask for right-padded batches; the loss must not change
    model = make_model("qwen2")
    batch = pad_batch([encode(tokenizer, e, 200) for e in make_split("train", 6, CFG, 0)],
                      tokenizer.pad_token_id)
    with torch.no_grad():
        masked = model(**batch).loss
        causal = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(masked, causal, atol=1e-6, rtol=0)


SMALL = dataclasses.replace(
    PRESETS["tiny"], layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64,
    train_examples=256, val_examples=4, test_examples=8, steps=6, batch_size=4, save_every=2,
    eval_every=0, device="cpu", problems=ProblemConfig(1, 2))


class Stop(Exception):
    pass


def _stop_at(n):
    def on_step(step, loss):
        if step == n:
            raise Stop

    return on_step


def test_pretrain_resumes_to_identical_weights(tmp_path):
    pretrain(tmp_path / "a", SMALL, progress=False)
    with pytest.raises(Stop):
        pretrain(tmp_path / "b", SMALL, progress=False, on_step=_stop_at(5))
    assert (tmp_path / "b/checkpoints/step_000004/weights.safetensors").is_file()
    pretrain(tmp_path / "b", SMALL, progress=False)
    wa = load_file(str(tmp_path / "a/model/model.safetensors"))
    wb = load_file(str(tmp_path / "b/model/model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
    assert not (tmp_path / "b" / "checkpoints").exists()  # cleaned up once finished
    assert json.loads((tmp_path / "a/train_log.jsonl").read_text().splitlines()[-1])["step"] == 6


# --- the shipped tiny model --------------------------------------------------------------------



def test_shipped_tiny_loads_offline_like_a_hub_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_PATH)
    tok = AutoTokenizer.from_pretrained(TINY_PATH)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers >= 12
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    s = "Mia has 23 pens."
    assert tok(s)["input_ids"] == byte_tokenizer()(s)["input_ids"]
    assert tok.chat_template
    card = json.loads((TINY_PATH / "card.json").read_text())
    assert card["command"].startswith("elmkit testbed train --preset tiny")
    assert card["evaluation"]["dense_accuracy"] >= 0.9
    assert card["evaluation"]["shortgpt"]["retained"] <= 0.6
    assert card["training"]["train_time_s"] <= 20 * 60
    assert (TINY_PATH / "README.md").is_file()


def test_shipped_tiny_solves_held_out_problems(tmp_path):
    from elmkit.testbed import evaluate

    m = evaluate("testbed:tiny", tmp_path / "ev", n=100, shortgpt_ratio=0.25)
    assert m["dense_accuracy"] >= 0.85
    assert m["shortgpt"]["accuracy"] <= 0.6 * m["dense_accuracy"]
    assert len(m["shortgpt"]["removed_layers"]) == 3
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["test_examples"] == 100


def test_testbed_data_command_writes_the_splits(tmp_path):
    from elmkit import cli

    assert cli.main(["testbed", "data", "--out", str(tmp_path / "d"), "--n-train", "50"]) == 0
    sizes = {s: len(json.loads((tmp_path / "d" / f"{s}.json").read_text()))
             for s in ("train", "validation", "test")}
    assert sizes == {"train": 50, "validation": PRESETS["tiny"].val_examples,
                     "test": PRESETS["tiny"].test_examples}


def test_public_names_are_not_shadowed_by_submodules():
    import elmkit.testbed as tb
    from elmkit.testbed import accuracy, pretrain  # noqa: F401  (import every submodule)

    assert callable(tb.evaluate) and callable(tb.train) and callable(tb.data)
