"""ShortGPT: delete the layers that change the hidden state least (Men et al., 2024, arXiv 2403.03853).

Block influence of layer i, over calibration tokens t (padding excluded)::

    BI_i = 1 - E_t[ cos(x_{i,t}, x_{i+1,t}) ]        x_i: input of layer i, x_{i+1}: its output

The n layers with the lowest BI are removed in one shot (not necessarily contiguous), with no
healing. Differences from the official code, on purpose: BI is a mean over non-pad tokens rather than
a sum (same ranking for one calibration set), and the last layer is scored on its pre-norm output
(the official code compares against transformers' post-norm last hidden state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.calibration import Calibration
from ..models.adapters import layer_inputs, num_layers, remove_layers_, run_layers
from .common import DepthTarget


@dataclass(frozen=True)
class ShortGPTConfig(DepthTarget):
    """How many layers ShortGPT removes (n_remove or ratio)."""


@dataclass(frozen=True)
class ShortGPTPlan:
    drop: tuple[int, ...]
    """Layer indices to delete (sorted)."""
    scores: tuple[float, ...]
    """Block influence of every layer."""


@torch.no_grad()
def block_influence(model, calib: Calibration, batch_size: int = 8) -> list[float]:
    """BI of every layer, averaged over non-pad calibration tokens."""
    device = next(model.parameters()).device
    n = num_layers(model)
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for ids, mask in calib.batches(batch_size, device):
        ctx = layer_inputs(model, ids, mask)
        h, valid = ctx.hidden, mask.bool()  # (B, T, d), (B, T)
        for i in range(n):
            out = run_layers(model, h, ctx, i, i + 1)
            cos = torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)  # (B, T)
            cos = torch.nan_to_num(cos, nan=0.5)
            total[i] += (1 - cos)[valid].double().sum().cpu()
            h = out
        count += int(valid.sum())
    return (total / max(count, 1)).tolist()


def plan(model, calib: Calibration, cfg: ShortGPTConfig, progress: bool = False) -> ShortGPTPlan:
    """The k lowest-BI layers (one forward pass: ``progress`` is accepted for a uniform interface)."""
    n = num_layers(model)
    k = cfg.count(n)
    scores = block_influence(model, calib, cfg.batch_size)
    drop = sorted(sorted(range(n), key=lambda i: scores[i])[:k])
    return ShortGPTPlan(tuple(drop), tuple(scores))


def apply_(model, p: ShortGPTPlan):
    return remove_layers_(model, p.drop)


def compress_(model, calib: Calibration, cfg: ShortGPTConfig, train=None, progress: bool = True):
    """plan + apply_ in place; training-free (``train`` is ignored)."""
    p = plan(model, calib, cfg)
    apply_(model, p)
    return p, {}
