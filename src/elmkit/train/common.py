"""Pieces every elmkit training loop shares: the LR schedule, checkpoints, the loss plot.

A checkpoint is a folder ``step_XXXXXX/`` holding ``weights.safetensors`` (the tensors the loop
trains), ``optimizer.pt`` (optimizer state and RNG state; tensors only, loaded with
``weights_only=True``) and ``state.json`` (step, settings fingerprint, anything else the loop
needs). It is written under a temporary name and renamed, so a crash never leaves a half-written
checkpoint that resume would pick up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import save_figure, write_json


def cosine_lr(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then half-cosine from ``peak`` to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))


def batch_indices(n: int, batch_size: int, k: int, per_epoch: int, seed: int) -> list[int]:
    """Indices of batch k of a run: slot k % per_epoch of epoch k // per_epoch's seeded
    permutation of range(n). A pure function of (seed, k), which is what makes resume exact."""
    epoch, pos = divmod(k, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)[pos * batch_size:(pos + 1) * batch_size].tolist()


def fingerprint(settings: dict, ignore: tuple[str, ...] = ()) -> str:
    """Short hash of the settings that change the result (``ignore`` lists those that don't)."""
    keep = {k: v for k, v in settings.items() if k not in ignore}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, torch.Tensor], opt,
                    state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the ``keep`` newest."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = ckpt_dir / f"step_{step:06d}", ckpt_dir / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(tmp / "weights.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    optim = opt if isinstance(opt, dict) else opt.state_dict()  # a state dict gathered by the caller
    torch.save({"optimizer": optim, "rng": rng}, tmp / "optimizer.pt")
    write_json(tmp / "state.json", {"step": step, **state})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in sorted(ckpt_dir.glob("step_*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def checkpoint_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def check_fingerprint(path: Path, expected: str) -> None:
    if checkpoint_state(path).get("fingerprint") != expected:
        raise ValueError(f"{path} was written by a run with different settings; use a new --out "
                         "or delete its checkpoints/ to start over")


def load_checkpoint(path: Path, opt) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore the optimizer (None: leave it to the caller, who finds its state dict under
    state["optimizer"]) and the RNG state; returns (weights, state.json)."""
    # map to CPU: RNG states must stay CPU ByteTensors, and load_state_dict moves the
    # optimizer's tensors to the parameters' device itself
    blob = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    if opt is not None:
        opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    state = checkpoint_state(path)
    if opt is None:
        state["optimizer"] = blob["optimizer"]
    return load_file(str(path / "weights.safetensors")), state


def plot_curves(png: Path, panels: list[tuple[str, list[float], list[float], dict]]) -> None:
    """One panel per (y label, xs, ys, axis settings); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3), squeeze=False)
    for ax, (label, xs, ys, opts) in zip(axes[0], panels):
        ax.plot(xs, ys, lw=0.9, marker="o" if len(xs) < 30 else None)
        ax.set(xlabel="step", ylabel=label, **opts)
    fig.tight_layout()
    save_figure(fig, png)
