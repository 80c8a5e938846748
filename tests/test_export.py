"""``elmkit export --format gguf``: the file is read back by the gguf package's reader and by
transformers' own GGUF loader, and must describe the source model exactly (tiny seeded models)."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from checks import deci_logits
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from elmkit import cli
from elmkit.data import byte_tokenizer
from elmkit.data.tokenizer import CHAT_TEMPLATE
from elmkit.export import TYPES, ExportConfig, export
from elmkit.export import gguf as gguf_export
from elmkit.models import remove_layers_
from elmkit.models.tiny import tiny_model

TEXT = ("The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs on.\n"
        "12 + 30 = 42, and 7 * 6 = 42 too. hello hello world, hello there!")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with real merges, specials first (ids 0-2, as in SmolLM2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# name -> (family, model overrides, layers removed after init, tokenizer)
CASES = {
    "llama": ("llama", {}, (), "bpe"),
    # tied embedding, and an embedding padded past the tokenizer (llama.cpp wants one token per row)
    "llama-tied-padded": ("llama", {"tie_word_embeddings": True, "pad": 5}, (), "bpe"),
    "qwen2": ("qwen2", {}, (), "bpe"),
    "qwen3": ("qwen3", {"head_dim": 128}, (), "bpe"),
    "qwen3-head16": ("qwen3", {"head_dim": 16}, (), "bpe"),
    "mistral": ("mistral", {}, (), "bpe"),
    "qwen2-depth-pruned": ("qwen2", {"num_layers": 5}, (1, 3), "byte"),
    "llama-depth-pruned": ("llama", {"num_layers": 5}, (0, 4), "byte"),
}


def make_folder(root: Path, case: str):
    """Save the case's model and tokenizer into root/<case>; returns (model, the tokenizer as loaded
    from the folder, folder). Loaded, since transformers reads a qwen2 folder's tokenizer as
    Qwen2Tokenizer (Qwen2's split regex) whatever tokenizer.json says, and elmkit exports that."""
    family, kw, drop, tok_kind = CASES[case]
    kw = dict(kw)
    tok = bpe_tokenizer() if tok_kind == "bpe" else byte_tokenizer()
    vocab = len(tok) + kw.pop("pad", 0)
    kw.setdefault("num_layers", 3)
    model = tiny_model(family, seed=1, vocab_size=vocab, hidden_size=64, num_heads=4, num_kv_heads=2,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    if drop:
        remove_layers_(model, list(drop))
    folder = root / f"tiny-{case}"  # not named exactly "mistral": transformers would pick its arch
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder), folder


def export_to(folder: Path, root: Path, type_: str) -> Path:
    """Export into a folder of its own (transformers would read the source's tokenizer files)."""
    out = root / f"gguf-{folder.name}-{type_}" / "model.gguf"
    export(folder, out, ExportConfig(type=type_), progress=False)
    return out


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def expected_tensors(model) -> dict[str, str]:
    """GGUF name -> transformers parameter name, written out by hand for these families."""
    c, names = model.config, {}
    names["token_embd.weight"] = "model.embed_tokens.weight"
    names["output_norm.weight"] = "model.norm.weight"
    if not c.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    if c.model_type == "qwen3":
        parts |= {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    params = dict(model.named_parameters())
    for i in range(c.num_hidden_layers):
        for g, h in parts.items():
            for suffix in ("weight", "bias"):
                if f"model.layers.{i}.{h}.{suffix}" in params:
                    names[f"blk.{i}.{g}.{suffix}"] = f"model.layers.{i}.{h}.{suffix}"
    return names


def hf_rows(model, name: str, arch: str, t: torch.Tensor) -> torch.Tensor:
    """Undo llama.cpp's llama row order of Q/K: file row 2i of a head is row i, 2i+1 is i + d/2."""
    if arch != "llama" or not (".attn_q." in name or ".attn_k." in name):
        return t
    c = model.config
    heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
    d = t.shape[0] // heads
    out = torch.empty_like(t)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + i] = t[h * d + 2 * i]
            out[h * d + i + d // 2] = t[h * d + 2 * i + 1]
    return out


# ---------------------------------------------------------------------------------------------
# What the file holds, read back by the gguf package
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_the_file_holds_the_architecture_the_tensors_and_the_tokenizer(case, tmp_path):
    model, tok, folder = make_folder(tmp_path, case)
    r = gguf.GGUFReader(export_to(folder, tmp_path, "f32"))
    c = model.config
    arch = {"mistral": "llama"}.get(c.model_type, c.model_type)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert field(r, "general.architecture") == arch
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
    for key, want in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                      ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                      ("attention.head_count", c.num_attention_heads),
                      ("attention.head_count_kv", c.num_key_value_heads),
                      ("attention.key_length", head_dim), ("attention.value_length", head_dim),
                      ("rope.dimension_count", head_dim), ("vocab_size", c.vocab_size)):
        assert field(r, f"{arch}.{key}") == want, key
    assert math.isclose(field(r, f"{arch}.rope.freq_base"), c.rope_parameters["rope_theta"])
    assert math.isclose(field(r, f"{arch}.attention.layer_norm_rms_epsilon"), c.rms_norm_eps, rel_tol=1e-6)

    # every tensor where llama.cpp looks for it, at the source's shape (the file lists dims reversed),
    # with the source's values: exact at f32, Llama's Q/K rows in llama.cpp's order
    names = expected_tensors(model)
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(names)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        p = params[names[name]].detach()
        assert tuple(int(s) for s in reversed(t.shape)) == tuple(p.shape), name
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        stored = torch.from_numpy(np.array(t.data)).reshape(p.shape)
        assert torch.equal(hf_rows(model, name, arch, stored), p), name
    if arch == "llama":  # the reorder is real: the stored rows differ from transformers' order
        assert not torch.equal(torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)),
                               params["model.layers.0.self_attn.q_proj.weight"].detach())

    # the tokenizer: one token per embedding row, merges in order, specials marked, template
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == c.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), c.vocab_size)]
    types = field(r, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert types[len(vocab):] == [gguf.TokenType.UNUSED] * (c.vocab_size - len(vocab))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert (len(merges) > 0) == (CASES[case][3] == "bpe")
    pre = "qwen2" if type(tok).__name__ == "Qwen2Tokenizer" else "gpt-2"
    assert field(r, "tokenizer.ggml.pre") == (pre if merges else "default")
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(r, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    if tok.bos_token_id is not None:
        assert field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template


# ---------------------------------------------------------------------------------------------
# Loaded back by transformers' GGUF loader
# ---------------------------------------------------------------------------------------------


def skip_unless_transformers_reads(case: str) -> None:
    """transformers reads a GGUF llama/qwen2/qwen3 config through a fixed key table; where the table
    lacks a key the model needs, that case cannot load, whatever the file says."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    family, kw, _, _ = CASES[case]
    if family == "qwen3" and kw.get("head_dim", 128) != 128 \
            and "attention.key_length" not in GGUF_CONFIG_MAPPING["qwen3"]:
        pytest.skip("this transformers reads no head_dim from a qwen3 GGUF (Qwen3Config's default 128 "
                    "applies); the file's key_length is checked by the reader test")


@pytest.mark.parametrize("case", list(CASES))
def test_stock_exports_load_into_transformers_with_the_source_logits(case, tmp_path):
    skip_unless_transformers_reads(case)
    model, _, folder = make_folder(tmp_path, case)
    x = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
    for type_, atol in (("f32", 1e-5), ("f16", 2e-2)):
        out = export_to(folder, tmp_path, type_)
        back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
        assert back.config.num_hidden_layers == model.config.num_hidden_layers
        assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
        with torch.no_grad():
            got = back(x).logits
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"{case} at {type_}")
        if type_ == "f32":  # every weight exact, not only the logits
            sd = back.state_dict()
            for k, v in model.state_dict().items():
                assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_the_tokenizer_loads_into_transformers_and_tokenizes_the_same(kind, tmp_path):
    case = "llama" if kind == "bpe" else "qwen2-depth-pruned"
    _, tok, folder = make_folder(tmp_path, case)
    out = export_to(folder, tmp_path, "f16")
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    chat = tok.apply_chat_template([{"role": "user", "content": "hello fox, 12 + 30?"}], tokenize=False,
                                   add_generation_prompt=True)
    for text in (TEXT, "  spaces\tand\nnew lines, ünïcödé €", chat):
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
        assert back.decode(back(text)["input_ids"]) == text
    assert back.chat_template == tok.chat_template
    assert (back.eos_token, back.pad_token) == (tok.eos_token, tok.pad_token)


# ---------------------------------------------------------------------------------------------
# Weight types
# ---------------------------------------------------------------------------------------------


def step_bound(w: np.ndarray, type_: str) -> np.ndarray:
    """Largest error allowed per weight: one quantisation step of its block of 32 (f16/bf16: relative)."""
    if type_ == "f32":
        return np.zeros_like(w)
    if type_ in ("f16", "bf16"):
        return np.abs(w) * (2.0 ** -11 if type_ == "f16" else 2.0 ** -8) + 1e-7
    blocks = w.reshape(w.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    step = {"q8_0": amax / 127, "q4_0": amax / 8 * 1.01,
            "q4_1": (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15}[type_]
    return np.broadcast_to(step * 1.01 + 1e-6, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("type_", list(TYPES))
def test_each_type_stores_the_matrices_within_its_error(type_, tmp_path):
    model, _, folder = make_folder(tmp_path, "qwen2")  # qwen2: rows as they are, biases stay f32
    out = export_to(folder, tmp_path, type_)
    r = gguf.GGUFReader(out)
    names = expected_tensors(model)
    params = dict(model.named_parameters())
    want = gguf.GGMLQuantizationType[type_.upper()]
    for t in r.tensors:
        p = params[names[t.name]].detach().numpy()
        assert tuple(int(s) for s in reversed(t.shape)) == p.shape, t.name
        if p.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            continue
        # the output matrix stays 8-bit in the 4-bit types
        expect = gguf.GGMLQuantizationType.Q8_0 if type_.startswith("q4") and t.name == "output.weight" \
            else want
        assert t.tensor_type == expect, t.name
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(p.shape)
        bound = step_bound(p, "q8_0" if expect == gguf.GGMLQuantizationType.Q8_0 else type_)
        assert np.all(np.abs(got - p) <= bound), (t.name, float(np.abs(got - p).max()))
    assert field(r, "general.file_type") == TYPES[type_][1]
    if type_ == "q8_0":  # and the model still computes what the source does, to 8-bit precision
        back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
        x = torch.arange(24).reshape(2, 12)
        with torch.no_grad():
            a, b = model(x).logits, back(x).logits
        assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_llama3_rope_scaling_is_stored_as_llama_cpp_frequency_factors(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama", vocab_size=259, num_layers=2, hidden_size=64, rope_parameters=rope)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    r = gguf.GGUFReader(export_to(tmp_path / "m", tmp_path, "f16"))
    (freqs,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32
    # llama.cpp divides each default frequency by its factor: that must be transformers' llama3 table
    d = model.config.head_dim
    default = 1.0 / 500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    torch.testing.assert_close(default / torch.from_numpy(np.array(freqs.data)).double(), scaled.double(),
                               rtol=1e-5, atol=0)

    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    model = tiny_model("qwen2", vocab_size=259, num_layers=2, hidden_size=64, rope_parameters=linear)
    model.save_pretrained(tmp_path / "lin")
    byte_tokenizer().save_pretrained(tmp_path / "lin")
    r = gguf.GGUFReader(export_to(tmp_path / "lin", tmp_path, "f16"))
    assert field(r, "qwen2.rope.scaling.type") == "linear"
    assert field(r, "qwen2.rope.scaling.factor") == 4.0


def test_pre_tokenizer_regexes_are_the_ones_transformers_maps_to_those_names():
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    for regex, name in gguf_export.PRE_SPLITS.items():
        assert mapping.GGUF_PRE_TOKENIZER_SPLITS[name] == regex, name


# ---------------------------------------------------------------------------------------------
# Slim (width-pruned) models as llama.cpp's deci
# ---------------------------------------------------------------------------------------------


def slim_case(family: str, **kw):
    """A tiny model cut to widths that exercise every deci rule: 4 query heads over 2 KV heads, and
    per layer: (0) query heads 0-2 (KV head 0 serves two, head 1 one: written twice), fewer MLP
    channels, FLAP output biases; (1) attention removed, its bias a constant before a kept MLP;
    (2) query heads 1 and 3, MLP removed with a bias; (3) both removed, both biases left; (4) query
    heads kept out of order (2, 0, 3, 1: regrouped behind their KV heads, none repeated); (5) the
    last layer, both branches removed, no bias."""
    from elmkit.models.slim import LayerKeep, to_slim

    dense = tiny_model(family, seed=3, vocab_size=300, num_layers=6, hidden_size=64, num_heads=4,
                       num_kv_heads=2, **kw)
    g = torch.Generator().manual_seed(0)

    def b():
        return torch.randn(64, generator=g) * 0.1

    keep = [LayerKeep([0, 1, 2], [0, 1], range(0, 96, 2), o_bias=b(), down_bias=b()),
            LayerKeep([], [], range(40), o_bias=b()),
            LayerKeep([1, 3], [0, 1], [], down_bias=b()),
            LayerKeep([], [], [], o_bias=b(), down_bias=b()),
            LayerKeep([2, 0, 3, 1], [1, 0], range(10, 42)),
            LayerKeep([], [], [])]
    return to_slim(dense, keep)


def export_slim(tmp_path: Path, family: str) -> tuple:
    slim = slim_case(family, tie_word_embeddings=family == "qwen2")
    folder = tmp_path / f"slim-{family}"
    slim.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "f32" / "m.gguf"
    return slim, out, export(folder, out, ExportConfig(type="f32"), progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_slim_model_exports_as_deci_and_computes_the_same_logits(tmp_path, family):
    slim, out, info = export_slim(tmp_path, family)
    assert slim.config.slim_layers[4]["q_to_kv"] == [0, 1, 0, 1]  # heads 2, 0, 3, 1 -> KV 1, 0, 1, 0
    assert info["architecture"] == "deci"
    assert info["layout"] == {"head_count": [3, 0, 2, 0, 4, 0], "head_count_kv": [3, 0, 2, 0, 2, 0],
                              "feed_forward_length": [48, 40, 1, 1, 32, 1], "kv_heads_repeated": 1}
    r = gguf.GGUFReader(out)
    assert field(r, "deci.attention.head_count") == [3, 0, 2, 0, 4, 0]
    assert field(r, "deci.feed_forward_length") == [48, 40, 1, 1, 32, 1]
    names = {t.name for t in r.tensors}
    assert "blk.1.attn_norm.weight" not in names and "blk.1.attn_q.weight" not in names
    assert "blk.0.ffn_down.bias" in names and "blk.0.attn_output.bias" in names
    assert "blk.4.ffn_down.bias" not in names and "blk.5.ffn_down.bias" not in names  # zeros left out
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert ("output.weight" in names) == (family == "llama")

    ids = [5, 17, 99, 3, 250, 42, 7, 7, 1]
    with torch.no_grad():
        want = slim(torch.tensor([ids])).logits[0].float()
    got = deci_logits(out, ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_runs_the_deci_file_with_the_source_logits(tmp_path, family):
    """Where llama-cpp-python is installed (benchmarks/edge_gguf.py builds it): llama.cpp itself,
    f32 file and f32 KV cache, every position's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    slim, out, _ = export_slim(tmp_path, family)
    ids = [5, 17, 99, 3, 250, 42, 7, 7, 1]
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(out), n_ctx=32, logits_all=True, n_threads=1, type_k=f32, type_v=f32,
                          verbose=False)
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    llm.close()
    with torch.no_grad():
        want = slim(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_deci_regroups_query_heads_behind_their_kv_heads():
    assert gguf_export._regroup([0, 0, 1, 1]) == ([0, 1, 2, 3], [0, 1])
    assert gguf_export._regroup([1, 0, 1, 0]) == ([1, 3, 0, 2], [0, 1])  # reordered only
    assert gguf_export._regroup([0, 0, 1, 0]) == ([0, 1, 3, 2], [0, 0, 0, 1])  # KV head 0 three times
    assert gguf_export._regroup([0, 0, 1, 1, 1, 1]) == ([0, 1, 2, 3, 4, 5], [0, 1, 1])  # runs of 2


def test_deci_refuses_what_llama_cpp_cannot_run(tmp_path):
    from elmkit.models.slim import LayerKeep, to_slim

    dense = tiny_model("qwen3", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
    q3 = to_slim(dense, [LayerKeep([0, 1], [0], range(10))] * 2)
    q3.save_pretrained(tmp_path / "q3")
    with pytest.raises(ValueError, match="slim qwen3 model.*deci graph.*no per-head q/k norm"):
        export(tmp_path / "q3", tmp_path / "q3.gguf", progress=False)
    dense = tiny_model("llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
    first = to_slim(dense, [LayerKeep([], [], range(10)), LayerKeep([0], [0], range(10))])
    first.save_pretrained(tmp_path / "first")
    byte_tokenizer().save_pretrained(tmp_path / "first")
    with pytest.raises(ValueError, match="layer 0 has no attention heads left"):
        export(tmp_path / "first", tmp_path / "first.gguf", progress=False)


# ---------------------------------------------------------------------------------------------
# What fails, and how
# ---------------------------------------------------------------------------------------------


def one_error_line(capsys, argv) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("elmkit export: error: ")
    return err


def test_elm_recurrent_slim_and_bad_options_fail_with_one_clear_line(tmp_path, capsys):
    from elmkit.methods import elm as E
    from elmkit.methods import recurrence as R

    dense = tiny_model("qwen2", num_layers=4, hidden_size=32)
    E.apply_(dense, E.plan(dense, start=1, span=2)).save_pretrained(tmp_path / "elm")
    dense = tiny_model("qwen2", num_layers=4, hidden_size=32)
    rec = R.apply_(dense, R.plan(dense, R.RecurrenceConfig(prelude=1, core_len=2)))
    rec.save_pretrained(tmp_path / "rec")
    for d in ("elm", "rec"):
        byte_tokenizer().save_pretrained(tmp_path / d)
    out = str(tmp_path / "x.gguf")
    capsys.readouterr()  # the saves' progress bars

    err = one_error_line(capsys, ["export", "--model", str(tmp_path / "elm"), "--out", out])
    assert "is an ELM" in err and "elmkit generate" in err and "transformers" in err
    err = one_error_line(capsys, ["export", "--model", str(tmp_path / "rec"), "--out", out])
    assert "recurrent" in err and "elmkit generate" in err
    err = one_error_line(capsys, ["export", "--model", str(tmp_path / "elm"), "--out", out, "--type", "q4_k"])
    assert "--type must be one of f32, f16, bf16, q8_0, q4_0, q4_1, got 'q4_k'" in err
    err = one_error_line(capsys, ["export", "--model", str(tmp_path / "elm"), "--out", out,
                                  "--format", "onnx"])
    assert "--format must be one of gguf" in err
    err = one_error_line(capsys, ["export", "--model", str(tmp_path / "nowhere"), "--out", out])
    assert "does not exist" in err
    assert not Path(out).exists()


def test_values_beyond_f16_are_refused_at_f16_and_kept_at_bf16(tmp_path):
    model, _, folder = make_folder(tmp_path, "qwen2")
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] = 1e5  # bf16 and f32 hold it, f16 would make it inf
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match="model.embed_tokens.weight has values beyond f16's range"):
        export(folder, tmp_path / "f16.gguf", ExportConfig(type="f16"), progress=False)
    assert not (tmp_path / "f16.gguf").exists()
    r = gguf.GGUFReader(export_to(folder, tmp_path, "bf16"))
    (emb,) = [t for t in r.tensors if t.name == "token_embd.weight"]
    got = gguf.quants.dequantize(np.array(emb.data), emb.tensor_type).reshape(model.config.vocab_size, -1)
    assert got[3, 5] == pytest.approx(1e5, rel=2 ** -8)


def test_cli_writes_the_file_and_help_explains_the_types(tmp_path, capsys):
    _, _, folder = make_folder(tmp_path, "llama")
    out = tmp_path / "cli" / "m.gguf"
    capsys.readouterr()
    assert cli.main(["export", "--model", str(folder), "--format", "gguf", "--out", str(out),
                     "--type", "q8_0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["architecture"] == "llama" and result["bytes"] == out.stat().st_size
    assert result["tensor_types"] == {"f32": 7, "q8_0": 23}  # 3 layers x (2 norms | 7 matrices) + 3
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    help_ = " ".join(capsys.readouterr().out.split())
    for word in ("--format", "--type", "q4_1", "Norms and biases stay f32", "ELM"):
        assert word in help_, word


def test_an_interrupted_export_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    _, _, folder = make_folder(tmp_path, "qwen2")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_text("the previous export")
    calls = []

    def encode_then_fail(t, weights):
        calls.append(t.name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(t, weights)

    real = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", encode_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(folder, out, progress=False)
    assert out.read_text() == "the previous export"
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# The real model, where it has been fetched
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_at_q4_1_reproduces_the_published_files_tensors(tmp_path):
    """The fetched SmolLM2 folder was dequantized from llama.cpp's own Q4_1 file; written back at
    q4_1 every tensor must be the published one byte for byte (Q/K row order, block layout, the
    q8_0 embedding), which checks the layout against llama.cpp's converter, not only transformers."""
    from elmkit.models.sources import NAMED, named_dir

    folder = named_dir("smollm2-135m")
    published = folder / Path(NAMED["smollm2-135m"].member).name
    if not published.is_file():
        pytest.skip("smollm2-135m has not been fetched (elmkit fetch smollm2-135m)")
    out = tmp_path / "smollm2.q4_1.gguf"
    export(folder, out, ExportConfig(type="q4_1"), progress=False)
    a, b = gguf.GGUFReader(published), gguf.GGUFReader(out)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        assert np.array_equal(np.array(t.data), np.array(tb[name].data)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                "llama.rope.freq_base", "llama.attention.head_count_kv", "general.file_type"):
        assert field(a, key) == field(b, key), key
