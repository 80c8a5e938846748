"""The fast decoder gives the reference generate()'s tokens, for dense and ELM models."""

import pytest
import torch

from elmkit.infer import DecodeConfig, Decoder, generate
from elmkit.methods import elm as elm_method
from elmkit.models.adapters import UnsupportedModelError
from elmkit.models.elm_solvers import NonFiniteError
from elmkit.models.tiny import tiny_model

ELM_SETTINGS = [
    dict(max_iter=4),
    dict(max_iter=6, tol=1e-3),
    dict(max_iter=6, tol=1e-3, solver="anderson"),
    dict(max_iter=6, tol=1e-2, tol_mode="rel", solver="anderson"),
    dict(max_iter=3, kv_mode="per_iter"),
]


def _prompts(B=3, T=7, seed=1, pad=(3, 1, 0)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pad[:B]):
        mask[b, :n] = 0
    ids[mask == 0] = 256  # the pad id of tiny models (generate() masks it even without a mask)
    return ids, mask


def _reference(model, ids, mask, n):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)[:, ids.shape[1]:]


def _elm(settings, seed=0, family="qwen2", device="cpu"):
    m = tiny_model(family, seed=seed, num_layers=6, hidden_size=32).to(device)
    return elm_method.apply_(m, elm_method.plan(m, start=1, span=3, **settings))


def test_dense_greedy_equals_generate(family):
    model = tiny_model(family, num_layers=4, hidden_size=32)
    for ids, m in (_prompts(pad=(0, 0, 0)), _prompts()):  # equal lengths, then left padding
        ref = _reference(model, ids, m, 12)
        out, stats = generate(model, ids, m, DecodeConfig(max_new_tokens=12))
        assert torch.equal(out, ref)
        assert stats.new_tokens == 12 and stats.block_evaluations is None


@pytest.mark.parametrize("settings", ELM_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_elm_greedy_equals_generate(settings):
    elm = _elm(settings)
    for ids, m in (_prompts(pad=(0, 0, 0)), _prompts()):
        ref = _reference(elm, ids, m, 10)
        out, stats = generate(elm, ids, m, DecodeConfig(max_new_tokens=10))
        assert torch.equal(out, ref)
        assert 1 <= stats.block_evaluations <= settings["max_iter"]
        assert stats.block_evaluations <= stats.block_launches <= settings["max_iter"]


def test_elm_adaptive_counts_match_reference_solver():
    """Per-token evaluation counts equal those of the block's own solve on the same tokens."""
    elm = _elm(dict(max_iter=8, tol=1e-3, solver="anderson"))
    ids, _ = _prompts(B=2, pad=(0, 0))
    dec = Decoder(elm, 2, 24)
    out, _ = dec.generate(ids, cfg=DecodeConfig(max_new_tokens=6))
    counts = []
    handle = elm.block.register_forward_hook(lambda mod, a, o: counts.append(mod.last_info.iterations))
    elm.generate(ids, max_new_tokens=6, do_sample=False)
    handle.remove()
    ref = torch.cat([c[:, -1:] for c in counts[1:]], 1)  # (B, 5): decode steps after the first
    assert torch.equal(dec.evals[:, 1:6].cpu(), ref)


def test_stops_at_eos_and_pads():
    model = tiny_model("qwen2", num_layers=2, hidden_size=32)
    ids, _ = _prompts(B=2, pad=(0, 0))
    free, _ = generate(model, ids, cfg=DecodeConfig(max_new_tokens=8, stop_at_eos=False))
    model.generation_config.eos_token_id = int(free[0, 2])  # make row 0 stop at its third token
    out, _ = generate(model, ids, cfg=DecodeConfig(max_new_tokens=8))
    assert torch.equal(out, _reference(model, ids, None, 8)[:, :out.shape[1]])
    assert (out[0, 3:] == model.generation_config.pad_token_id).all()


def test_sampling_is_seeded_and_top_k_bounded():
    model = tiny_model("llama", num_layers=2, hidden_size=32)
    ids, mask = _prompts()
    cfg = DecodeConfig(max_new_tokens=16, temperature=1.0, top_k=5, seed=3)
    a, _ = generate(model, ids, mask, cfg)
    b, _ = generate(model, ids, mask, cfg)
    c, _ = generate(model, ids, mask, DecodeConfig(max_new_tokens=16, temperature=1.0, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k = 1 is greedy
    g, _ = generate(model, ids, mask, DecodeConfig(max_new_tokens=16, temperature=0.7, top_k=1))
    assert torch.equal(g, _reference(model, ids, mask, 16))


def test_cache_bytes_one_step_vs_dense():
    """The ELM's one-step cache is (N - M + 1) / N of the dense cache, to the byte."""
    dense = tiny_model("qwen2", num_layers=6, hidden_size=32)
    n_dense = Decoder(dense, 2, 64).cache_bytes()
    one = Decoder(_elm(dict(max_iter=4)), 2, 64).cache_bytes()
    per = Decoder(_elm(dict(max_iter=4, kv_mode="per_iter")), 2, 64).cache_bytes()
    assert one * 6 == n_dense * (6 - 3 + 1)
    assert per * 6 == n_dense * (6 - 3 + 4)


def test_bad_input_is_refused():
    model = tiny_model("qwen2", num_layers=2, hidden_size=32)
    dec = Decoder(model, 2, 16)
    ids, mask = _prompts(B=2, T=6, pad=(0, 0))
    with pytest.raises(ValueError, match="batch size 2"):
        dec.generate(ids[:1], cfg=DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="cache length"):
        dec.generate(ids, cfg=DecodeConfig(max_new_tokens=11))
    right = mask.clone()
    right[0, -2:] = 0
    with pytest.raises(ValueError, match="left padded"):
        dec.generate(ids, right, DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Decoder(model, 1, 10**6)
    with pytest.raises(UnsupportedModelError, match="naive and anderson"):
        Decoder(_elm(dict(max_iter=4, solver="broyden")), 1, 16)
    with pytest.raises(ValueError):
        DecodeConfig(max_new_tokens=0)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError):
        dec.generate(ids, cfg=DecodeConfig(max_new_tokens=4))


# -- on a GPU: the captured graphs ---------------------------------------------------------------


def _fp32_exact():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [None, *ELM_SETTINGS], ids=lambda s: "dense" if s is None else
                         "-".join(f"{k}={v}" for k, v in s.items()))
def test_cuda_graphs_equal_eager_and_generate(settings):
    _fp32_exact()
    model = tiny_model("qwen2", num_layers=6, hidden_size=64).cuda() if settings is None \
        else _elm(settings, device="cuda")
    ids, mask = (t.cuda() for t in _prompts(B=4, T=9, pad=(4, 0, 2, 1)))
    ref = _reference(model, ids, mask, 20)
    dec = Decoder(model, 4, 40)
    for _ in range(2):  # the second call replays the graphs captured by the first
        out, stats = dec.generate(ids, mask, DecodeConfig(max_new_tokens=20))
        assert torch.equal(out, ref)
    eager, _ = Decoder(model, 4, 40, cuda_graphs=False).generate(ids, mask, DecodeConfig(max_new_tokens=20))
    assert torch.equal(eager, ref)
    if settings is not None:
        assert stats.block_evaluations <= stats.block_launches <= settings["max_iter"]


@pytest.mark.gpu
def test_cuda_graph_sampling_is_seeded():
    model = tiny_model("llama", num_layers=2, hidden_size=64).cuda()
    ids, mask = (t.cuda() for t in _prompts())
    dec = Decoder(model, 3, 40)
    cfg = DecodeConfig(max_new_tokens=24, temperature=1.0, top_k=8, seed=5)
    a, _ = dec.generate(ids, mask, cfg)
    b, _ = dec.generate(ids, mask, cfg)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_bf16_testbed_greedy_equals_generate():
    """On the trained tiny testbed in bf16, the graphs give generate()'s tokens."""
    from elmkit.data.chat import encode_prompt
    from elmkit.models.loading import load_model, load_tokenizer
    from elmkit.testbed import TINY_PATH
    from elmkit.testbed.card import read_recipe
    from elmkit.testbed.problems import make_split

    model = load_model(TINY_PATH, dtype="bfloat16", device="cuda")
    tokenizer = load_tokenizer(TINY_PATH)
    recipe = read_recipe(TINY_PATH)
    examples = make_split("test", 16, recipe["problems"], recipe["seed"])
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(p)) + p for p in prompts]).cuda()
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(p) for p in prompts])[:, None]).long().cuda()
    ref = _reference(model, ids, mask, 48)
    out, _ = generate(model, ids, mask, DecodeConfig(max_new_tokens=48))
    assert torch.equal(out, ref[:, :out.shape[1]])


def test_cli_generate_matches_reference():
    """`elmkit generate` on the shipped testbed gives the text of model.generate."""
    import contextlib
    import io
    import json

    from elmkit.cli import main
    from elmkit.models.loading import load_model, load_tokenizer
    from elmkit.testbed import TINY_PATH

    prompt = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["generate", "--model", "testbed:tiny", "--prompt", prompt, "--max-new-tokens", "40"])
    got = json.loads(buf.getvalue()[buf.getvalue().index("{"):])
    tok, model = load_tokenizer(TINY_PATH), load_model(TINY_PATH, dtype="float32", device="cpu")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):]
    assert got["text"] == tok.decode(ref, skip_special_tokens=True)
    assert got["new_tokens"] >= 1 and got["tokens_per_s"] > 0
