"""Calibration batches: the token sequences that depth/width methods score layers on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .collate import pad_batch


@dataclass
class Calibration:
    """Right-padded token sequences, (n, T) each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], max_len: int = 256) -> Calibration:
        if not texts:
            raise ValueError("calibration needs at least one text")
        feats = [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"][:max_len]}
                 for t in texts]
        feats = [f for f in feats if f["input_ids"]]
        b = pad_batch(feats, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        return cls(b["input_ids"], b["attention_mask"])

    @classmethod
    def from_examples(cls, tokenizer, examples, max_len: int = 256) -> Calibration:
        """Task text as a model sees it: each example's rendered prompt followed by its answer."""
        from .chat import render

        return cls.from_texts(tokenizer, [(lambda r: r.prompt + r.completion)(render(tokenizer, e))
                                          for e in examples], max_len)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            ids, mask = self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size]
            keep = int(mask.sum(1).max())  # drop all-pad columns (right padding)
            yield ids[:, :keep].to(device), mask[:, :keep].to(device)
