"""EfficientLLM (pruning-aware pretraining): each group type removes exactly what is counted, the
masked model is the cut model, dead groups score lowest, the schedule lands on the target."""

import json

import pytest
import torch
from checks import assert_cached_equals_full

from elmkit import cli
from elmkit.methods import efficientllm as ef
from elmkit.models import count_parameters, get_layers, load_model
from elmkit.models.tiny import tiny_model


def _train(m, pruner, steps, seed=0, lr=1e-3, ids=None):
    """``steps`` steps of training with the pruner's hooks; random (4, 12) batches unless ``ids``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    m.train()
    recs = []
    fixed = ids
    for step in range(1, steps + 1):
        ids = fixed if fixed is not None else torch.randint(0, 256, (4, 12), generator=g)
        m(input_ids=ids, labels=ids).loss.backward()
        pruner.after_backward()
        opt.step()
        opt.zero_grad()
        pruner.after_step()
        rec = pruner.step(step, ids, torch.ones_like(ids))
        if rec:
            recs.append(rec)
    m.eval()
    return recs


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("types", [("head",), ("channel",), ("hidden",), ("head", "channel", "hidden")])
def test_each_group_type_cuts_exactly_what_is_counted(family, types):
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=3, hidden_size=32)
    p0 = count_parameters(m)
    frac = 0.85 if types == ("head",) else 0.7
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=2, end=8, interval=2, types=types, min_hidden=4),
                   int(frac * p0), 10)
    recs = _train(m, pr, 10)
    removed = {t: sum(r[f"removed_{t}"] for r in recs) for t in ef.TYPES}
    assert sum(removed.values()) > 0 and (len(types) > 1 or removed[types[0]] > 0)
    assert all(removed[t] == 0 for t in ef.TYPES if t not in types)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = m(ids).logits
    cut = pr.finish()
    assert count_parameters(cut) == ef.param_count(m, pr.state) == recs[-1]["params"]
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, masked, atol=1e-5, rtol=1e-5)
    assert_cached_equals_full(cut)


def test_hidden_pruning_is_exact_on_a_loaded_tied_model(tmp_path):
    """A model loaded from a folder (transformers kernelizes its forwards on train()/eval()) with
    tied embeddings: the masked model still normalises over the kept channels, so the cut model
    computes what was trained (an earlier replaced ``forward`` was silently undone by train())."""
    torch.manual_seed(0)
    tiny_model("llama", num_layers=3, hidden_size=32, tie_word_embeddings=True).save_pretrained(tmp_path)
    m = load_model(tmp_path, dtype="float32")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=2, end=8, interval=2, types=("hidden",), min_hidden=4),
                   int(0.8 * count_parameters(m)), 10)
    recs = _train(m, pr, 10)
    assert sum(r["removed_hidden"] for r in recs) > 0
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = m(ids).logits
    cut = pr.finish()
    assert cut.lm_head.weight is cut.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, masked, atol=1e-5, rtol=1e-5)


def test_schedule_hits_the_target_at_the_target_step():
    torch.manual_seed(0)
    m = tiny_model("qwen2", num_layers=3, hidden_size=32)
    p0 = count_parameters(m)
    target = int(0.6 * p0)
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=3, end=11, interval=4), target, 14)
    assert pr.budget(3) == p0 and pr.budget(11) == target and pr.budget(14) == target
    assert [s for s in range(15) if pr.is_pruning_step(s)] == [7, 11]
    recs = _train(m, pr, 14)
    assert [r["step"] for r in recs] == [7, 11]
    assert recs[0]["params"] <= pr.budget(7) < p0
    largest = 3 * 32 + 2 * 8 * (2 * 32 + 1)  # a channel is 3d; no group costs more than a head + its KV
    assert target - 4 * largest <= recs[-1]["params"] <= target
    assert ef.param_count(m, pr.state) == recs[-1]["params"]


def test_dead_groups_have_the_lowest_saliency():
    torch.manual_seed(0)
    m = tiny_model("llama", num_layers=2, hidden_size=32)
    c = m.config
    hd = c.hidden_size // c.num_attention_heads
    layer = get_layers(m)[1]
    group = c.num_attention_heads // c.num_key_value_heads
    with torch.no_grad():  # channel 5 and KV head 1 with its query heads, in layer 1, contribute nothing
        layer.mlp.gate_proj.weight[5] = 0
        layer.mlp.up_proj.weight[5] = 0
        layer.mlp.down_proj.weight[:, 5] = 0
        layer.self_attn.q_proj.weight[group * hd:2 * group * hd] = 0
        layer.self_attn.o_proj.weight[:, group * hd:2 * group * hd] = 0
        layer.self_attn.k_proj.weight[hd:2 * hd] = 0
        layer.self_attn.v_proj.weight[hd:2 * hd] = 0
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=0, end=4, interval=4), int(0.9 * count_parameters(m)), 4)
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    m(input_ids=ids, labels=ids).loss.backward()
    pr.after_backward()
    scores = pr.saliency()
    channels = sorted((s, k) for s, t, k in scores if t == "channel")
    heads = sorted((s, k) for s, t, k in scores if t == "head")
    assert channels[0] == (0.0, (1, 5))
    assert sorted(k for _, k in heads[:group]) == [(1, h) for h in range(group, 2 * group)]
    assert all(sc == 0.0 for sc, _ in heads[:group]) and heads[group][0] > 0


def test_state_round_trips_through_a_checkpoint():
    torch.manual_seed(0)
    m = tiny_model("qwen2", num_layers=2, hidden_size=32)
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=1, end=4, interval=1), int(0.7 * count_parameters(m)), 6)
    _train(m, pr, 3)
    tensors, state = pr.state_dict()
    state = json.loads(json.dumps(state))
    torch.manual_seed(0)
    m2 = tiny_model("qwen2", num_layers=2, hidden_size=32)
    m2.load_state_dict(m.state_dict())
    pr2 = ef.Pruner(m2, ef.EfficientLLMConfig(start=1, end=4, interval=1), pr.target, 6)
    pr2.load_state_dict(tensors, state)
    assert pr2.state == pr.state and pr2.acc_n == pr.acc_n
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits)


def test_uniform_end_state_gives_a_stock_model():
    torch.manual_seed(0)
    m = tiny_model("qwen2", num_layers=2, hidden_size=32).eval()
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=0, end=2), int(0.5 * count_parameters(m)), 2)
    for i in range(2):  # the same cut in every layer: drop KV group 1 and half the channels
        pr.state.heads[i], pr.state.kv[i] = [0, 1], [0]
        pr.state.channels[i] = list(range(0, m.config.intermediate_size, 2))
    pr.state.hidden = list(range(0, 32, 2)) + [1, 3]
    pr.state.hidden.sort()
    pr._rebuild_zero()
    pr.after_step()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        masked = m(ids).logits
    cut = pr.finish()
    assert cut.config.model_type == "qwen2" and cut.config.hidden_size == 18
    assert cut.config.num_attention_heads == 2 and cut.config.num_key_value_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, masked, atol=1e-5, rtol=1e-5)


def test_bad_settings_say_what_to_fix():
    m = tiny_model("qwen2", num_layers=2, hidden_size=32)
    with pytest.raises(ValueError, match="not smaller"):
        ef.Pruner(m, ef.EfficientLLMConfig(start=0, end=2), count_parameters(m), 4)
    with pytest.raises(ValueError, match="must end after it starts"):
        ef.Pruner(m, ef.EfficientLLMConfig(start=5, end=3), 100, 10)
    with pytest.raises(ValueError, match="--prune.types"):
        ef.EfficientLLMConfig(types=("layers",))
    with pytest.raises(ValueError, match="neither a number nor a preset"):
        ef.resolve_target("huge", m)
    assert ef.resolve_target("0.5", m) == round(0.5 * count_parameters(m))


def test_pretrain_command_prunes_while_training(tmp_path):
    out = tmp_path / "p"
    rc = cli.main(["pretrain", "--preset", "tiny", "--out", str(out), "--prune-to", "0.7", "--steps", "12",
                   "--train-examples", "300", "--batch-size", "4", "--test-examples", "8",
                   "--eval-every", "0", "--save-every", "100", "--prune.start", "2", "--prune.end", "8",
                   "--prune.interval", "3"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model = load_model(out / "model", dtype="float32", device="cpu")
    assert count_parameters(model) == metrics["parameters"] <= metrics["target_parameters"]
    assert (out / "architecture.png").is_file() and (out / "model" / "testbed.json").is_file()
    arch = json.loads((out / "architecture.json").read_text())
    assert [h["step"] for h in arch["history"]] == [5, 8]
