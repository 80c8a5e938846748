"""LoRA recovery on a slim (width-pruned) model: adapters sit on the slim layers' projections, and the
merged result is again a slim model that loads (also in a process without elmkit) and computes what
the unmerged adapter model computes."""

import json

import pytest
import torch
from checks import assert_loads_with_remote_code_only
from peft import PeftModel
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import Calibration
from elmkit.data.synthetic import arithmetic_examples
from elmkit.methods import llm_pruner as lp
from elmkit.models import LayerKeep, SlimForCausalLM, count_parameters, to_slim
from elmkit.models.tiny import tiny_model
from elmkit.train import FinetuneConfig, finetune

CFG = FinetuneConfig(r=4, alpha=8, dropout=0.1, lr=2e-2, min_lr=2e-3, batch_size=8,
                     max_steps=4, save_every=4, max_len=96, seed=3, device="cpu")
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _llm_pruned(dense):
    g = torch.Generator().manual_seed(0)
    calib = Calibration(torch.randint(0, 256, (6, 16), generator=g), torch.ones(6, 16, dtype=torch.long))
    return lp.apply_(dense, lp.plan(dense, calib, lp.LLMPrunerConfig(ratio=0.5, layer_start=1, layer_end=3)))


def _branches_removed(dense):
    """Layer 1 without attention, layer 2 without MLP: those branches have no projection to adapt."""
    c = dense.config
    heads, kv, ch = range(c.num_attention_heads), range(c.num_key_value_heads), range(c.intermediate_size)
    keep = [LayerKeep(heads, kv, ch), LayerKeep([], [], ch[::2]), LayerKeep([0, 1], [0], []),
            LayerKeep(heads, kv, ch)]
    return to_slim(dense, keep)


@pytest.mark.parametrize("make_slim, n_adapted", [(_llm_pruned, 4 * 7), (_branches_removed, 4 * 7 - 4 - 3)])
def test_lora_on_a_slim_model_merges_into_a_slim_model(make_slim, n_adapted, tokenizer, tmp_path):
    slim = make_slim(tiny_model("qwen2", seed=0, num_layers=4, hidden_size=32))
    slim.save_pretrained(tmp_path / "slim")
    tokenizer.save_pretrained(tmp_path / "slim")

    m = finetune(tmp_path / "slim", arithmetic_examples(32, seed=1), tmp_path / "run", CFG, progress=False)
    assert m["steps"] == 4

    out = tmp_path / "run" / "model"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slim"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slim.SlimForCausalLM"
    assert (out / "modeling_slim.py").is_file() and (out / "configuration_slim.py").is_file()

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    n_base = count_parameters(base)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    lora = [n for n, mod in adapted.named_modules() if hasattr(mod, "lora_A")]
    assert len(lora) == n_adapted and {n.split(".")[-1] for n in lora} == PROJECTIONS

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(merged, SlimForCausalLM)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert count_parameters(merged) == n_base == count_parameters(slim)
    assert merged.config.slim_layers == slim.config.slim_layers

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, unmerged, before = merged(ids).logits, adapted(ids).logits, slim(ids).logits
    assert (got - before).abs().max() > 1e-3  # training changed the model
    torch.testing.assert_close(got, unmerged, atol=1e-4, rtol=0)
    assert_loads_with_remote_code_only(out, ids, got, tmp_path)
