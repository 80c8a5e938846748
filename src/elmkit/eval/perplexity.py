"""Perplexity of a text with a strided window (the usual evaluation of fixed-context LMs).

The text is tokenized once. Windows of ``window`` tokens start every ``stride`` tokens; in each,
only the tokens not scored by an earlier window count, so with stride < window every token after
the first is predicted exactly once, with at least ``window - stride`` tokens of context (except near
the start):

    ppl = exp( sum_t -log p(x_t | x_<t within its window) / tokens counted )

stride == window gives disjoint chunks (the GPTQ / SLM / SLEB style, e.g. window 128 or 2048): the
first token of each chunk is then not predicted. The result reports the tokens counted.

WikiText-2 (``read_wikitext2``): the raw test file holds the 2,891 non-empty rows of the HF
``wikitext-2-raw-v1`` test split joined with CRLF; we take those rows and join them with "\\n\\n",
close to the common ``"\\n\\n".join(test["text"])`` except that the split's empty rows are gone (so
figures are comparable to each other, not digit-for-digit to papers).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.formats import decode_utf8


def read_wikitext2(path: str | Path) -> str:
    """The WikiText-2 raw test text, normalised as documented above."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = [r for r in decode_utf8(path.read_bytes(), path).replace("\r\n", "\n").split("\n") if r.strip()]
    return "\n\n".join(rows)


def read_text_file(path: str | Path) -> str:
    """A text file for perplexity: WikiText-2's raw file is normalised, anything else read as is."""
    path = Path(path)
    if path.name.startswith("wiki.") and path.suffix == ".raw":
        return read_wikitext2(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return decode_utf8(path.read_bytes(), path)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, max_windows: int | None = None, progress: bool = True
               ) -> dict:
    """Strided-window perplexity of ``text``; returns ppl, nll, tokens counted, windows, window, stride.

    ``max_tokens`` cuts the text after that many tokens; ``max_windows`` scores only the first that
    many windows (``elmkit eval --task perplexity --limit N``).
    """
    if window is None:
        window = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    stride = stride or window
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window {window}, stride {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"need at least one window, got {max_windows}")
    # the whole text at once: verbose=False, the "longer than the maximum length" warning is moot here
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, counted, done = 0.0, 0, 1  # done: tokens [0, done) already predicted (token 0 never is)
    starts = range(0, max(ids.numel() - 1, 1), stride)
    # a window that reaches the end is the last one, so count only up to it
    last = next((i for i, b in enumerate(starts) if b + window >= ids.numel()), len(starts) - 1)
    starts = starts[: min(last + 1, max_windows or len(starts))]
    for begin in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(begin + window, ids.numel())
        chunk = ids[begin:end].to(device)[None]  # (1, W)
        logits = model(chunk, use_cache=False).logits[0, :-1].float()  # (W-1, V)
        targets = chunk[0, 1:]
        first = max(done, begin + 1) - (begin + 1)  # skip targets an earlier window scored
        if first < targets.numel():
            nll += float(F.cross_entropy(logits[first:], targets[first:], reduction="sum"))
            counted += targets.numel() - first
        done = end
    model.train(was_training)
    return {"ppl": math.exp(nll / counted), "nll": nll / counted, "tokens": counted,
            "text_tokens": int(ids.numel()), "windows": len(starts), "window": window, "stride": stride}
