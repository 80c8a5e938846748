import pytest
import torch
from checks import assert_cached_equals_full, assert_layers_consistent
from transformers import AutoConfig, AutoModelForCausalLM

from elmkit.models import (
    UnsupportedModelError,
    capture_hidden_states,
    count_parameters,
    family_of,
    get_layers,
    head_logits,
    insert_layer_,
    layer_inputs,
    remove_layers_,
    replace_span_,
    run_layers,
)


def _ids(B=2, T=9, V=259, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


def _left_pad_mask(B=2, T=9):
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # first row is left-padded by 3
    return mask


def test_family_table_covers_four_families(make_model, family):
    assert family_of(make_model(family)).name == family


def test_unsupported_family_names_the_supported_ones():
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        family_of(gpt2)


def test_run_layers_matches_model_hidden_states(make_model, family):
    model = make_model(family)
    ids, mask = _ids(), _left_pad_mask()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ctx = layer_inputs(model, ids, mask)
        h = run_layers(model, ctx.hidden, ctx, 0, 2)
        torch.testing.assert_close(h, ref[2], atol=0, rtol=0)
        h = run_layers(model, h, ctx, 2, 5)  # a range in the middle, continuing by hand
        torch.testing.assert_close(h, ref[5], atol=0, rtol=0)
        h = run_layers(model, h, ctx, 5, 6)
        torch.testing.assert_close(head_logits(model, h), model(ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)
        states = capture_hidden_states(model, ids, mask)
    assert sorted(states) == list(range(7))
    for i in range(6):  # transformers records the input of each layer and the last output
        torch.testing.assert_close(states[i], ref[i], atol=0, rtol=0)


def test_remove_two_layers_keeps_generate_cache_and_save_exact(make_model, family, tmp_path):
    model = make_model(family)
    p0 = count_parameters(model)
    per_layer = count_parameters(get_layers(model)[0])
    remove_layers_(model, [2, 4])
    assert_layers_consistent(model)
    assert count_parameters(model) == p0 - 2 * per_layer
    assert_cached_equals_full(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.num_hidden_layers == 4
    assert_layers_consistent(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, atol=0, rtol=0)


def test_removed_model_equals_running_the_kept_layers(make_model):
    model = make_model("qwen2")
    ids = _ids()
    with torch.no_grad():
        ctx = layer_inputs(model, ids)
        h = ctx.hidden
        for i in (0, 1, 3, 5):
            h = run_layers(model, h, ctx, i, i + 1)
        expected = head_logits(model, h)
        remove_layers_(model, [2, 4])
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)


def test_mixed_layer_types_are_filtered(make_model, tmp_path):
    # Qwen2 with sliding window on layers >= 3: layer_types must follow the kept layers.
    model = make_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=3)
    assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    remove_layers_(model, [0, 5])
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert_layers_consistent(model)
    ids = _ids(T=12)
    with torch.no_grad():
        ctx = layer_inputs(model, ids)
        by_hand = head_logits(model, run_layers(model, ctx.hidden, ctx, 0, 4))
        torch.testing.assert_close(model(ids).logits, by_hand, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.layer_types == model.config.layer_types


def test_replace_span_and_insert(make_model, family):
    model = make_model(family)
    layers = get_layers(model)
    import copy

    fresh = copy.deepcopy(layers[1])
    replace_span_(model, 1, 4, fresh)  # 6 -> 4 layers; `fresh` sits at index 1
    assert_layers_consistent(model)
    assert get_layers(model)[1] is fresh and model.config.num_hidden_layers == 4
    assert_cached_equals_full(model)
    extra = copy.deepcopy(fresh)
    insert_layer_(model, extra, at=4)  # append at the end
    assert_layers_consistent(model)
    assert get_layers(model)[4] is extra and model.config.num_hidden_layers == 5
    assert_cached_equals_full(model)


def test_bad_surgery_requests_fail_clearly(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="0..5"):
        remove_layers_(model, [6])
    with pytest.raises(ValueError, match="all 6 layers"):
        remove_layers_(model, range(6))
    with pytest.raises(ValueError, match="span"):
        replace_span_(model, 3, 3, torch.nn.Identity())
    with pytest.raises(ValueError, match="outside"):
        run_layers(model, torch.zeros(1, 2, 32), None, 4, 9)


def test_surgery_rejects_a_module_placed_twice(make_model):
    model = make_model("qwen2")
    with pytest.raises(ValueError, match="already a layer"):
        insert_layer_(model, get_layers(model)[3], at=4)
    with pytest.raises(ValueError, match="kept layers"):
        replace_span_(model, 1, 3, get_layers(model)[4])
    with pytest.raises(ValueError, match="sliding_attention"):
        import copy

        insert_layer_(model, copy.deepcopy(get_layers(model)[0]), 2, "sliding_attention")


def test_a_span_covering_every_layer_can_be_replaced(make_model):
    import copy

    model = make_model("llama")
    replace_span_(model, 0, 6, copy.deepcopy(get_layers(model)[0]))
    assert_layers_consistent(model)
    assert model.config.num_hidden_layers == 1
    assert_cached_equals_full(model)
