"""Strided-window perplexity and the WikiText-2 normalisation."""

import math

import pytest
import torch

from elmkit.eval.perplexity import perplexity, read_text_file, read_wikitext2

TEXT = "The quick brown fox jumps over the lazy dog. " * 6


def test_one_window_equals_the_model_loss(make_model, tokenizer):
    model = make_model("llama", num_layers=2)
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    r = perplexity(model, tokenizer, TEXT, window=ids.shape[1], progress=False)
    assert r["tokens"] == ids.shape[1] - 1 and r["window"] == ids.shape[1]
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_strided_windows_score_every_token_once(make_model, tokenizer):
    model = make_model("qwen2", num_layers=2)
    n = len(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    r = perplexity(model, tokenizer, TEXT, window=64, stride=16, progress=False)
    assert r["tokens"] == n - 1 and r["stride"] == 16
    disjoint = perplexity(model, tokenizer, TEXT, window=64, progress=False)
    assert disjoint["tokens"] == n - math.ceil(n / 64)  # the first token of every chunk has no context
    # with the context kept, a real model would do better; here we only check both are finite and > 1
    assert 1 < r["ppl"] < 1e6 and 1 < disjoint["ppl"] < 1e6
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, TEXT, window=16, stride=32)


def test_max_windows_scores_exactly_the_first_windows(make_model, tokenizer):
    model = make_model("llama", num_layers=2)
    n = len(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert n > 3 * 32  # the text has more than the windows asked for
    first2 = perplexity(model, tokenizer, TEXT, window=32, max_windows=2, progress=False)
    cut = perplexity(model, tokenizer, TEXT, window=32, max_tokens=64, progress=False)  # the same 2 chunks
    assert first2["windows"] == cut["windows"] == 2 and first2["tokens"] == 2 * 31
    assert first2["ppl"] == pytest.approx(cut["ppl"], rel=1e-6)
    strided = perplexity(model, tokenizer, TEXT, window=32, stride=8, max_windows=3, progress=False)
    assert strided["windows"] == 3 and strided["tokens"] == 31 + 2 * 8
    whole = perplexity(model, tokenizer, TEXT, window=32, max_windows=10_000, progress=False)
    assert whole["windows"] == math.ceil(n / 32) and whole["tokens"] == n - math.ceil(n / 32)
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, tokenizer, TEXT, window=32, max_windows=0)


def test_wikitext2_normalisation(shared_data):
    text = read_wikitext2(shared_data / "wikitext2" / "wiki.test.raw")
    assert "\r" not in text and text.count("\n\n") == 2890  # 2,891 non-empty rows
    assert text.startswith(" = Robert Boulter = ")
    assert read_text_file(shared_data / "wikitext2" / "wiki.test.raw") == text


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_file(tmp_path / "nope.txt")
