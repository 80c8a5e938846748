"""Reverse-order pruning: delete the last n decoder layers (Lu et al., ICLR 2026, arXiv 2411.15558).

"Reassessing Layer Pruning in LLMs: New Insights and Methods". For a model of N decoder layers
the rule keeps layers 0 .. N-n-1 and deletes N-n .. N-1, so the original final layer goes too. The
token embedding, the final norm and the LM head stay. Nothing is scored, so no calibration data is
read: ``elmkit compress reverse`` still takes --data (every compress command draws its calibration
set the same way), but the result depends on neither it nor --batch-size and --calib.*.

The paper heals the pruned model by partial-layer fine-tuning: the final norm, the LM head and
every parameter of the last three kept layers train, the embeddings stay frozen (their best
setting, "lm_head + last three layers"). In elmkit this is a mode of the fine-tune::

    elmkit compress reverse --model M --data D --out runs/rev --ratio 0.25
    elmkit finetune --model runs/rev/model --data alpaca.json --out runs/rev-ft \\
        --mode partial --partial-layers 3 --lr 1e-5 --warmup-steps 100 --epochs 2

Models whose LM head is tied to the embedding (SmolLM2, Gemma) are left out by the paper; see
``--tied-head`` of ``elmkit finetune``.

Differences from the official code, on purpose:

* n comes from --n-remove / --ratio; the released script hard-codes 24 (or 20) kept layers for
  the reverse order, whatever its --remove_layer says.
* The layers are deleted in place (config, layer indices and per-layer config lists renumbered)
  rather than copied into a freshly built model; the weights that remain are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.calibration import Calibration
from ..models.adapters import num_layers, remove_layers_
from .common import DepthTarget


@dataclass(frozen=True)
class ReverseConfig(DepthTarget):
    """How many of the last layers go (n_remove or ratio); batch_size is unused (nothing is scored)."""


@dataclass(frozen=True)
class ReversePlan:
    drop: tuple[int, ...]
    """Layer indices to delete (sorted): the last n of the model."""


def plan(model, calib: Calibration | None, cfg: ReverseConfig, progress: bool = False) -> ReversePlan:
    """The last k layers; ``calib`` and ``progress`` are accepted for a uniform interface."""
    n = num_layers(model)
    k = cfg.count(n)
    return ReversePlan(tuple(range(n - k, n)))


def apply_(model, p: ReversePlan):
    """Delete the plan's layers in place; the plan must end at the model's last layer."""
    n = num_layers(model)
    if p.drop and p.drop != tuple(range(n - len(p.drop), n)):
        raise ValueError(f"plan drops layers {list(p.drop)}, not the last {len(p.drop)} of this "
                         f"model's {n}; make the plan on this model")
    return remove_layers_(model, p.drop)


def compress_(model, calib: Calibration | None, cfg: ReverseConfig, train=None, progress: bool = True):
    """plan + apply_ in place; training-free (``train`` is ignored, heal with ``finetune``)."""
    p = plan(model, calib, cfg, progress)
    apply_(model, p)
    return p, {}
