"""The testbed: a reference model that elmkit trains for itself (tiny on CPU, base on GPU).

``train`` pretrains a preset, evaluates it (dense accuracy, and the ShortGPT depth check) and
writes the model card; ``evaluate`` re-measures a testbed model; ``data`` writes the splits.
The trained tiny model ships inside the package: ``TINY_PATH`` (or ``--model testbed:tiny``).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from ..io import RunDir, atomic_write_text
from ..models.sources import TINY_PATH  # noqa: E402  (one home for where models live)
from .pretrain import PRESETS, PretrainConfig
from .problems import ProblemConfig, make_problem, make_split, split_of, stream, to_records

__all__ = ["PRESETS", "TINY_PATH", "PretrainConfig", "ProblemConfig", "data", "evaluate",
           "make_problem", "make_split", "split_of", "stream", "to_records", "train"]


def train(out: str | Path, preset: str = "tiny", cfg: PretrainConfig | None = None,
          progress: bool = True) -> dict:
    """Pretrain a testbed model, evaluate it on its test split and write its model card.

    ``cfg`` overrides the preset's settings (the CLI builds it from --preset plus options).
    The model lands in ``out/model`` with README.md (card), card.json and testbed.json.
    """
    from .accuracy import evaluate_testbed
    from .card import write_card, write_recipe
    from .pretrain import pretrain

    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = cfg or PRESETS[preset]
    run = RunDir(out)  # its clock times the whole command
    command = "elmkit testbed train " + " ".join(shlex.quote(a) for a in _argv_or(preset, out))
    metrics = pretrain(out, cfg, preset, progress)
    model_dir = Path(out) / "model"
    write_recipe(model_dir, cfg, preset)
    ev = evaluate_testbed(model_dir, progress=progress)
    write_card(model_dir, cfg, preset, command, metrics, ev)
    result = {**metrics, **ev, "command": command}
    run.write_metrics(result)
    return result


def evaluate(model: str | Path, out: str | Path, n: int | None = None, shortgpt_ratio: float = 0.25,
             batch_size: int | None = None) -> dict:
    """Greedy accuracy of a testbed model on its test split, and after ShortGPT removal."""
    from ..models.sources import resolve
    from .accuracy import evaluate_testbed

    run = RunDir(out)
    run.write_config("testbed eval", model=str(model), n=n, shortgpt_ratio=shortgpt_ratio)
    ev = evaluate_testbed(resolve(model), int(n) if n else None, float(shortgpt_ratio),
                          int(batch_size) if batch_size else None)
    run.write_metrics(ev)
    return ev


def data(out: str | Path, preset: str = "tiny", n_train: int | None = None) -> dict:
    """Write a preset's train / validation / test problems as ELM/Alpaca JSON files."""
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    sizes = {"train": int(n_train or cfg.train_examples), "validation": cfg.val_examples,
             "test": cfg.test_examples}
    run = RunDir(out)
    run.write_config("testbed data", preset=preset, problems=asdict(cfg.problems), sizes=sizes)
    for split, n in sizes.items():
        exs = make_split(split, n, cfg.problems, cfg.seed)
        atomic_write_text(run / f"{split}.json", json.dumps(to_records(exs), indent=1))
    run.write_metrics({"sizes": sizes})
    return {"out": str(out), "sizes": sizes}


def _argv_or(preset: str, out) -> list[str]:
    """The options this process was started with (for the card), or a minimal equivalent."""
    argv = sys.argv[1:]
    if len(argv) >= 2 and argv[:2] == ["testbed", "train"]:
        return argv[2:]
    return ["--preset", preset, "--out", str(out)]
