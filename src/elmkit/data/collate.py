"""Batching: padding (right for training, left for generation) and packing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .chat import IGNORE_INDEX, encode_many


def pad_batch(
    features: Sequence[dict[str, list[int]]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and ``labels`` when present) to the longest; returns (B, T) tensors."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not features:
        raise ValueError("cannot batch zero examples")
    T = max(len(f["input_ids"]) for f in features)
    has_labels = "labels" in features[0]
    ids = torch.full((len(features), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), T), dtype=torch.long)
    labels = torch.full((len(features), T), IGNORE_INDEX, dtype=torch.long)
    for b, f in enumerate(features):
        n = len(f["input_ids"])
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[b, sl] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[b, sl] = 1
        if has_labels:
            labels[b, sl] = torch.tensor(f["labels"], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if has_labels:
        out["labels"] = labels
    return out


def pack(features: Sequence[dict[str, list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut into full blocks of ``seq_len`` tokens (the tail is dropped).

    Examples attend across their boundaries inside a block, the usual trade of packing for
    pretraining-style data; labels keep each example's own mask.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    ids: list[int] = []
    labels: list[int] = []
    for f in features:
        ids.extend(f["input_ids"])
        labels.extend(f.get("labels", f["input_ids"]))
    n = len(ids) // seq_len
    return [
        {"input_ids": ids[i * seq_len:(i + 1) * seq_len], "labels": labels[i * seq_len:(i + 1) * seq_len]}
        for i in range(n)
    ]


def training_features(tokenizer, data: Sequence, max_len: int) -> list[dict[str, list[int]]]:
    """Features of training data: instruction examples (targets: their answers) or plain texts
    (``text_features``: every token a target)."""
    if not data:
        raise ValueError("no training data")
    if isinstance(data[0], str):
        return text_features(tokenizer, data, max_len)
    return encode_many(tokenizer, data, max_len)


def text_features(tokenizer, texts: Sequence[str], seq_len: int) -> list[dict[str, list[int]]]:
    """Plain text as training features: each document cut into windows of ``seq_len`` tokens
    (BOS first when the tokenizer has one; a short last window is kept if it has 2+ tokens);
    every token is a target."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    if not texts:
        raise ValueError("no texts to train on")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    n = seq_len - len(bos)
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        for i in range(0, len(ids), n):
            w = bos + ids[i:i + n]
            if len(w) >= 2:
                out.append({"input_ids": w, "labels": list(w)})
    if not out:
        raise ValueError("the texts hold no window of 2 or more tokens")
    return out
