"""Calibration batches: the token sequences that depth/width methods score layers on."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Calibration:
    """Right-padded token sequences, (n, T) each.

    ``target_mask`` marks the tokens that count in a calibration loss (NLL, perplexity): the answer
    tokens of instruction examples, every real token of plain text (None).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor | None = None

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], max_len: int = 256) -> Calibration:
        if not texts:
            raise ValueError("calibration needs at least one text")
        return _from_ids(tokenizer, [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len]
                                     for t in texts])

    @classmethod
    def from_examples(cls, tokenizer, examples, max_len: int = 256, keep: str = "head") -> Calibration:
        """Task text as a model sees it: each example's rendered prompt followed by its answer;
        the answer tokens are the loss targets. A longer example keeps its first ``max_len``
        tokens (``keep="head"``) or its last (``"tail"``: the answer survives the cut)."""
        from .chat import IGNORE_INDEX, encode

        if not examples:
            raise ValueError("calibration needs at least one example")
        if keep not in ("head", "tail"):
            raise ValueError(f"keep must be head or tail, got {keep!r}")
        feats = [encode(tokenizer, e, 1 << 30) for e in examples]
        cut = slice(0, max_len) if keep == "head" else slice(-max_len, None)
        return _from_ids(tokenizer, [f["input_ids"][cut] for f in feats],
                         [[int(t != IGNORE_INDEX) for t in f["labels"][cut]] for f in feats])

    @classmethod
    def from_training(cls, tokenizer, data: Sequence, max_len: int = 512) -> Calibration:
        """Training data in calibration form, for the methods that train on it (a replacement
        layer, DarwinLM's candidates): instruction examples as ``from_examples``, plain texts as
        every window of ``max_len`` tokens of every document (``text_features``), all tokens
        targets."""
        if not data:
            raise ValueError("no training data")
        if not isinstance(data[0], str):
            return cls.from_examples(tokenizer, data, max_len)
        from .collate import text_features

        seqs = [f["input_ids"] for f in text_features(tokenizer, data, max_len)]
        return _from_ids(tokenizer, seqs, [[1] * len(q) for q in seqs])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) per batch, all-pad columns dropped."""
        for ids, mask, _ in self.target_batches(batch_size, device):
            yield ids, mask

    def target_batches(self, batch_size: int, device=None
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask, target_mask) per batch, all-pad columns dropped."""
        target = self.target_mask if self.target_mask is not None else self.attention_mask
        for i in range(0, len(self), batch_size):
            ids, mask = self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size]
            keep = int(mask.sum(1).max())  # drop all-pad columns (right padding)
            yield (ids[:, :keep].to(device), mask[:, :keep].to(device),
                   (target[i:i + batch_size, :keep] * mask[:, :keep]).to(device))


@dataclass(frozen=True)
class CalibConfig:
    """One calibration spec for every method: where the sequences come from, how many, how long."""

    source: str | None = None
    """Text (.txt/.raw), text JSONL or instruction-data file; default: the command's --data."""
    samples: int = 32
    """Number of calibration sequences."""
    seq_len: int = 128
    """Tokens per sequence (shorter documents are used whole, right-padded)."""
    seed: int = 0
    """Seed for which documents and which windows are drawn."""

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("--calib.samples must be >= 1 and --calib.seq-len >= 2")

    def build(self, tokenizer, default: str | Path | Sequence | None = None) -> Calibration:
        """Draw the sequences from ``source`` (or ``default``: a file or a list of examples).

        A plain-text file is one token stream cut into random ``seq_len`` windows (SLEB style);
        JSONL documents or examples give one random window each from ``samples`` random documents
        (SLM / Shortened-LLaMA style); instruction examples are rendered with the chat template,
        cut to their last ``seq_len`` tokens (so the answer stays) and their answer tokens are the
        loss targets.
        """
        src = self.source if self.source is not None else default
        if src is None:
            raise ValueError("no calibration data: pass --data or --calib.source")
        g = random.Random(self.seed)
        # windows start with BOS where the tokenizer has one (Llama), as a model sees any text
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise FileNotFoundError(f"calibration source {path} does not exist")
            if path.suffix in (".txt", ".raw"):
                from .formats import decode_utf8

                ids = tokenizer(decode_utf8(path.read_bytes(), path), add_special_tokens=False)["input_ids"]
                n_win = len(ids) // self.seq_len
                if n_win == 0:
                    raise ValueError(f"{path} has {len(ids)} tokens, fewer than --calib.seq-len "
                                     f"{self.seq_len}")
                starts = sorted(g.sample(range(n_win), min(self.samples, n_win)))
                return _from_ids(tokenizer, [bos + ids[s * self.seq_len:(s + 1) * self.seq_len - len(bos)]
                                             for s in starts])
            from .formats import detect_format, read_examples, read_text

            docs = read_text(path) if detect_format(path) == "text" else read_examples(path)
        else:
            docs = list(src)
        if not docs:
            raise ValueError("the calibration source holds no documents")
        picked = g.sample(range(len(docs)), min(self.samples, len(docs)))
        if not isinstance(docs[0], str):  # instruction examples: prompt + answer, answer is the target
            return Calibration.from_examples(tokenizer, [docs[i] for i in picked], self.seq_len, "tail")
        seqs = []
        for i in picked:
            ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"]
            n = self.seq_len - len(bos)
            start = g.randrange(len(ids) - n + 1) if len(ids) > n else 0
            seqs.append(bos + ids[start:start + n])
        return _from_ids(tokenizer, seqs)


def _from_ids(tokenizer, seqs: list[list[int]], targets: list[list[int]] | None = None) -> Calibration:
    keep = [i for i, q in enumerate(seqs) if len(q) >= 2]
    if not keep:
        raise ValueError("every calibration sequence is shorter than 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(seqs[i]) for i in keep)
    ids = torch.full((len(keep), width), pad, dtype=torch.long)
    mask = torch.zeros(len(keep), width, dtype=torch.long)
    target = torch.zeros(len(keep), width, dtype=torch.long) if targets is not None else None
    for row, i in enumerate(keep):
        ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
        mask[row, :len(seqs[i])] = 1
        if target is not None:
            target[row, :len(targets[i])] = torch.tensor(targets[i])
    return Calibration(ids, mask, target)
