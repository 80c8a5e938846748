"""Training on N processes through accelerate: DDP or FSDP2, launched by ``accelerate launch`` or
``torchrun``; one process (the plain ``python`` / ``elmkit`` call) needs none of it.

    accelerate launch --config_file configs/accelerate/ddp.yaml  -m elmkit elm ...   # DDP
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m elmkit elm ...   # FSDP2
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py train ...                    # DDP

What the loops do with it (each says so where it matters):

- the global batch is the configured batch; rank r takes sequences r, r + N, ... of it, so N
  processes see the same examples per step as one;
- losses are weighted by each rank's share of the global token count before the gradient average,
  so the gradient is the one-process gradient of the same global batch (not a mean of per-rank
  means, which weights short sequences' tokens more);
- checkpoints hold the full trained tensors and the full optimizer state, gathered to rank 0 and
  written by it alone (torch.distributed.checkpoint's full-state-dict API, which reads DDP and
  FSDP2 modules alike); every rank resumes from them, with any number of processes;
- metrics are reduced across ranks; progress bars and files come from rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Where this process stands: rank, world size, device, the accelerate object when N > 1."""

    rank: int = 0
    world: int = 1
    accelerator: object | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def kind(self) -> str:
        """single, ddp or fsdp."""
        if self.accelerator is None:
            return "single"
        return "fsdp" if "FSDP" in str(self.accelerator.distributed_type) else "ddp"

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator is not None else None

    def shard(self, items: list) -> list:
        """This rank's part of a global list: items r, r + N, ..."""
        return items[self.rank::self.world]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor; unchanged with one process)."""
        if self.world == 1:
            return x.clone()
        y = x.clone()
        torch.distributed.all_reduce(y)
        return y

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


_STATE: dict[str, Dist] = {}


def launched() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Dist:
    """This process's Dist; the first call under a multi-process launch creates the accelerator
    (DDP or FSDP2 as the launch configured it; a loop sets its DDP options before ``prepare``)."""
    if "dist" in _STATE:
        return _STATE["dist"]
    if not launched():
        d = Dist()
    else:
        from accelerate import Accelerator

        acc = Accelerator(cpu=not torch.cuda.is_available())
        d = Dist(acc.process_index, acc.num_processes, acc)
    _STATE["dist"] = d
    return d


def full_state(model, opt=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The trainable tensors (and the optimizer state, by parameter name) of a DDP/FSDP2-wrapped or
    plain ``model``, whole, on the CPU of rank 0 (empty elsewhere). Collective: every rank calls."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=o)
    # a frozen weight tied to another name (lm_head / embed_tokens) slips through ignore_frozen_params
    trained = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in weights.items() if k in trained}
    optim = get_optimizer_state_dict(model, opt, options=o) if opt is not None else None
    return weights, optim


def load_full_state(model, weights: dict[str, torch.Tensor], opt=None, optim: dict | None = None) -> None:
    """Inverse of ``full_state``: rank 0's whole tensors are broadcast and sharded as the model is."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, broadcast_from_rank0=torch.distributed.is_initialized(),
                         strict=False)
    set_model_state_dict(model, weights, options=o)
    if opt is not None and optim is not None:
        set_optimizer_state_dict(model, opt, optim, options=o)
        # torch first gives every parameter a state (a zero-gradient step); one that had none when
        # saved (never stepped, e.g. LoRA above the ELM block while lambda_ce = 0) must have none
        saved = set(optim.get("state", {}))
        for name, p in model.named_parameters():
            if name.removeprefix("module.") not in saved:
                opt.state.pop(p, None)
