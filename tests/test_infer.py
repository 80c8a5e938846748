"""The fast decoder gives the reference generate()'s tokens, for dense and ELM models."""

import sys

import pytest
import torch

from elmkit.infer import DecodeConfig, Decoder, StepConfig, generate
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


def _elm(settings, seed=0, family="qwen2", device="cpu", hidden_size=32):
    m = tiny_model(family, seed=seed, num_layers=6, hidden_size=hidden_size).to(device)
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
    with pytest.raises(ValueError, match="compile must be one of"):
        StepConfig(compile="max")
    with pytest.raises(ValueError, match="attention must be one of"):
        StepConfig(attention="flash")
    with pytest.raises(ValueError, match="head dimension of at least 16"):  # this model's is 8
        Decoder(model, 1, 16, step=StepConfig(compile="step", attention="flex"))
    with pytest.raises(ValueError, match="compiled step on a GPU"):
        Decoder(tiny_model("qwen2", num_layers=2, hidden_size=64), 1, 16,
                step=StepConfig(compile="step", attention="flex"))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError):
        dec.generate(ids, cfg=DecodeConfig(max_new_tokens=4))


# -- the packed projections and the compiled step ---------------------------------------------


def test_packing_changes_no_weight_and_saves_identically(tmp_path):
    """Packing makes q/k/v and gate/up row views of one matrix each: same values, same parameter
    count, nothing copied by a second decoder, and save/load gives the same model."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2", num_layers=3, hidden_size=32)  # Qwen2: q/k/v carry biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(p.numel() for p in model.parameters())
    dec = Decoder(model, 1, 16)
    assert sum(p.numel() for p in model.parameters()) == n
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    a, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    W, b, sizes = dec.packed[1]["qkv"]
    assert sizes == [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
    assert a.k_proj.weight.data_ptr() == W[sizes[0]:].data_ptr()
    assert a.v_proj.bias.data_ptr() == b[sizes[0] + sizes[1]:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == dec.packed[1]["gu"][0][mlp.gate_proj.out_features:].data_ptr()
    again = Decoder(model, 1, 16)  # reuses the packed matrices
    assert again.packed[1]["qkv"][0].data_ptr() == W.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())


def test_packing_skips_modules_it_cannot_stack():
    """A LoRA-wrapped projection is not a plain Linear: that group runs module by module and the
    tokens are still generate()'s."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", num_layers=2, hidden_size=32),
                           LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    model = model.base_model.model  # the wrapped transformers model
    dec = Decoder(model, 3, 24)
    assert all("qkv" not in p and "gu" not in p for p in dec.packed.values())
    ids, mask = _prompts()
    out, _ = dec.generate(ids, mask, DecodeConfig(max_new_tokens=8))
    assert torch.equal(out, _reference(model, ids, mask, 8))


def test_packing_leaves_shared_offloaded_and_inference_mode_weights_usable():
    """Weights shared between layers, modules offloaded by accelerate and a decoder built under
    inference_mode: the tokens are still generate()'s and the model still trains."""
    from accelerate import cpu_offload

    model = tiny_model("llama", num_layers=3, hidden_size=32)
    layers = model.model.layers
    layers[2].self_attn.q_proj.weight = layers[1].self_attn.q_proj.weight  # shared across layers
    ids, mask = _prompts()
    ref = _reference(model, ids, mask, 6)
    with torch.inference_mode():
        dec = Decoder(model, 3, 16)
        out, _ = dec.generate(ids, mask, DecodeConfig(max_new_tokens=6))
    assert torch.equal(out, ref)
    assert "qkv" not in dec.packed[1] and "qkv" not in dec.packed[2] and "qkv" in dec.packed[0]
    assert not layers[0].self_attn.q_proj.weight.is_inference()
    model(ids).logits.sum().backward()  # packed weights are ordinary leaves
    assert layers[0].self_attn.k_proj.weight.grad is not None
    off = tiny_model("llama", num_layers=2, hidden_size=32)
    ref = _reference(off, ids, mask, 4)
    for layer in off.model.layers:
        cpu_offload(layer, execution_device=torch.device("cpu"))  # weights on meta, hooks load them
    dec = Decoder(off, 3, 16)
    assert all(not p for p in dec.packed.values())
    assert torch.equal(dec.generate(ids, mask, DecodeConfig(max_new_tokens=4))[0], ref)


def test_decoder_keeps_the_solver_it_was_built_with():
    """The step is built for the ELM's settings at construction; changing model.config later
    changes nothing in this decoder (a new one picks it up)."""
    elm = _elm(dict(max_iter=6, tol=1e-3))
    ids, mask = _prompts()
    ref = _reference(elm, ids, mask, 8)
    dec = Decoder(elm, 3, 20)
    elm.config.tol = 0.0
    out, stats = dec.generate(ids, mask, DecodeConfig(max_new_tokens=8))
    assert torch.equal(out, ref) and stats.block_evaluations < 6
    _, fixed = Decoder(elm, 3, 20).generate(ids, mask, DecodeConfig(max_new_tokens=8))
    assert fixed.block_evaluations == 6


COMPILED = [("dense", "math"), ("elm-fixed", "sdpa"), ("elm-adaptive", "math"), ("elm-adaptive-9", "sdpa")]


@pytest.mark.parametrize("kind,attention", COMPILED, ids=lambda x: x)
def test_compiled_step_equals_generate(kind, attention):
    """The whole step through torch.compile (here on the CPU's inductor backend) gives generate()'s
    tokens and the eager step's evaluation counts, on the first (compiling) and a later call."""
    model = {"dense": lambda: tiny_model("qwen2", num_layers=3, hidden_size=32),
             "elm-fixed": lambda: _elm(dict(max_iter=3)),
             "elm-adaptive": lambda: _elm(dict(max_iter=5, tol=1e-2, tol_mode="rel", solver="anderson")),
             # more pieces than dynamo's eight variants per code object: each has a code of its own
             "elm-adaptive-9": lambda: _elm(dict(max_iter=9, tol=1e-9)),
             }[kind]()
    ids, mask = _prompts()
    ref = _reference(model, ids, mask, 10)
    eager = Decoder(model, 3, 20)
    _, want = eager.generate(ids, mask, DecodeConfig(max_new_tokens=10))
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    dec = Decoder(model, 3, 20, step=StepConfig(compile="step", attention=attention))
    for _ in range(2):
        out, stats = dec.generate(ids, mask, DecodeConfig(max_new_tokens=10))
        assert torch.equal(out, ref)
        if kind == "elm-adaptive-9":
            # at tol 1e-9 the residual sits at float32's rounding, where compiled and eager kernels
            # round differently: the stop may move by one evaluation, so only the tokens must agree
            assert stats.block_evaluations > 8
        else:
            assert stats.block_evaluations == want.block_evaluations
    assert counters["stats"]["unique_graphs"] > graphs  # the step ran compiled
    if kind not in ("dense", "elm-adaptive-9"):
        assert torch.equal(dec.evals, eager.evals)


def test_autotuned_step_equals_generate(monkeypatch):
    """StepConfig(autotune=True) hands max_autotune to torch.compile and gives generate()'s tokens;
    refused where nothing is compiled. On a CPU inductor keeps ATen's matmuls (its C++ GEMM
    templates need frozen weights), so the templates themselves are checked by the GPU test below."""
    model = tiny_model("qwen2", num_layers=2, hidden_size=32)
    ids, mask = _prompts()
    ref = _reference(model, ids, mask, 6)
    compile_, options = torch.compile, []

    def recording(fn, **kw):
        options.append(kw.get("options", {}))
        return compile_(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    dec = Decoder(model, 3, 16, step=StepConfig(compile="step", autotune=True))
    assert dec.autotune
    assert torch.equal(dec.generate(ids, mask, DecodeConfig(max_new_tokens=6))[0], ref)
    assert options and all(o.get("max_autotune") for o in options)
    assert not Decoder(model, 3, 16, step=StepConfig(autotune=True)).autotune  # "auto" on a CPU: eager
    with pytest.raises(ValueError, match='autotune times the matmuls of the compiled step'):
        StepConfig(compile="ops", autotune=True)


@pytest.mark.parametrize("settings", [None, *ELM_SETTINGS], ids=lambda s: "dense" if s is None else
                         "-".join(f"{k}={v}" for k, v in s.items()))
def test_triton_attention_equals_generate(settings):
    """attention="triton" (elmkit.decode_attention; here in Triton's interpreter) gives generate()'s
    tokens and the default step's evaluation counts."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    model = tiny_model("qwen2", num_layers=3, hidden_size=32) if settings is None else _elm(settings)
    ids, mask = _prompts()
    ref = _reference(model, ids, mask, 8)
    _, want = Decoder(model, 3, 20).generate(ids, mask, DecodeConfig(max_new_tokens=8))
    out, stats = Decoder(model, 3, 20, step=StepConfig(attention="triton")).generate(
        ids, mask, DecodeConfig(max_new_tokens=8))
    assert torch.equal(out, ref)
    assert stats.block_evaluations == want.block_evaluations


def test_triton_attention_refuses_a_compiled_cpu_step():
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    with pytest.raises(ValueError, match="only under Triton's interpreter"):
        Decoder(tiny_model("qwen2", num_layers=2, hidden_size=32), 1, 16,
                step=StepConfig(compile="step", attention="triton"))


def test_auto_attention_is_triton_only_in_a_compiled_gpu_step(monkeypatch):
    """attention="auto" picks the Triton kernels where they were measured (a compiled step on a
    CUDA GPU of compute capability 8.0+), SDPA elsewhere; a CPU decoder runs SDPA."""
    from elmkit.infer import _auto_attention

    cuda = torch.device("cuda")
    assert _auto_attention(torch.device("cpu"), True) == "sdpa"
    assert _auto_attention(cuda, False) == "sdpa"  # eager and "ops" steps were not timed with it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert _auto_attention(cuda, True) == "sdpa"  # no bf16 dots before compute capability 8.0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    try:
        import triton  # noqa: F401
        want = "triton"
    except ImportError:
        want = "sdpa"
    assert _auto_attention(cuda, True) == want
    monkeypatch.setitem(sys.modules, "triton", None)  # not installed: import fails
    assert _auto_attention(cuda, True) == "sdpa"
    assert Decoder(tiny_model("qwen2", num_layers=2, hidden_size=32), 1, 16).attention == "sdpa"


def test_compiled_sampling_is_seeded():
    model = tiny_model("llama", num_layers=2, hidden_size=32)
    ids, mask = _prompts()
    dec = Decoder(model, 3, 24, step=StepConfig(compile="step"))
    cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, top_k=5, seed=3)
    a, _ = dec.generate(ids, mask, cfg)
    b, _ = dec.generate(ids, mask, cfg)
    c, _ = dec.generate(ids, mask, DecodeConfig(max_new_tokens=12, temperature=1.0, top_k=5, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- on a GPU: the captured graphs ---------------------------------------------------------------


def _fp32_exact():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# StepConfig() runs the Triton attention on a GPU of compute capability 8.0+ ("auto"); "sdpa" is
# the step it replaced
STEPS = [StepConfig(), StepConfig(attention="sdpa"), StepConfig(attention="math"),
         StepConfig(attention="flex"), StepConfig(attention="triton"),
         StepConfig(compile="ops", pack=False),
         StepConfig(compile="none", pack=False)]


@pytest.mark.gpu
@pytest.mark.parametrize("step", STEPS, ids=lambda s: f"{s.compile}-{s.attention}-pack{int(s.pack)}")
@pytest.mark.parametrize("settings", [None, *ELM_SETTINGS], ids=lambda s: "dense" if s is None else
                         "-".join(f"{k}={v}" for k, v in s.items()))
def test_cuda_graphs_equal_eager_and_generate(settings, step):
    _fp32_exact()
    model = tiny_model("qwen2", num_layers=6, hidden_size=64).cuda() if settings is None \
        else _elm(settings, device="cuda", hidden_size=64)  # head dimension 16: flex's least
    ids, mask = (t.cuda() for t in _prompts(B=4, T=9, pad=(4, 0, 2, 1)))
    ref = _reference(model, ids, mask, 20)
    dec = Decoder(model, 4, 40, step=step)
    for _ in range(2):  # the second call replays the graphs captured by the first
        out, stats = dec.generate(ids, mask, DecodeConfig(max_new_tokens=20))
        assert torch.equal(out, ref)
    eager, _ = Decoder(model, 4, 40, cuda_graphs=False).generate(ids, mask, DecodeConfig(max_new_tokens=20))
    assert torch.equal(eager, ref)
    if settings is not None:
        assert stats.block_evaluations <= stats.block_launches <= settings["max_iter"]


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [None, ELM_SETTINGS[3]], ids=["dense", "elm-adaptive"])
def test_autotuned_cuda_graphs_equal_generate(settings):
    """StepConfig(autotune=True) on a GPU: Triton GEMM templates timed against cuBLAS, inside the
    Decoder's own CUDA graphs (two settings only: each compilation times every matmul)."""
    test_cuda_graphs_equal_eager_and_generate(settings, StepConfig(autotune=True))


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
