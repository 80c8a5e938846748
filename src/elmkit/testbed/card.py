"""The model card written next to a testbed model: how it was made and what it reached."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..io import atomic_write_text, write_json


def write_recipe(model_dir: Path, cfg, preset: str | None) -> None:
    """testbed.json: what is needed to regenerate the model's data splits."""
    write_json(model_dir / "testbed.json", {
        "preset": preset, "seed": cfg.seed, "problems": asdict(cfg.problems),
        "train_examples": cfg.train_examples, "val_examples": cfg.val_examples,
        "test_examples": cfg.test_examples,
    })


def read_recipe(model_dir: Path) -> dict:
    """testbed.json of a model folder, with ``problems`` as a ProblemConfig."""
    from .problems import ProblemConfig

    path = Path(model_dir) / "testbed.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no testbed.json: it is not a testbed model")
    recipe = json.loads(path.read_text())
    return {**recipe, "problems": ProblemConfig(**recipe["problems"])}


def write_card(model_dir: Path, cfg, preset: str | None, command: str, train: dict, ev: dict) -> None:
    """README.md (the human card) and card.json (the same numbers, for scripts)."""
    card = {"command": command, "preset": preset, "config": asdict(cfg), "training": train,
            "evaluation": ev}
    write_json(model_dir / "card.json", card)
    p = cfg.problems
    sg = ev["shortgpt"]
    kept = "n/a" if sg["retained"] is None else f"{sg['retained']:.1%} of dense"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [elmkit, testbed, qwen2, arithmetic]",
        "---",
        f"# elmkit testbed: `{preset or 'custom'}`",
        "",
        "A Qwen2-architecture decoder (GQA, RoPE, RMSNorm, SwiGLU) with a byte-level tokenizer,",
        "trained from scratch by elmkit on seeded multi-step arithmetic word problems with",
        "chain-of-thought answers ending in `The answer is: N`. It is the reference model that",
        "elmkit's tests and benchmarks compress; it knows nothing else.",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Recipe",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {cfg.layers} layers, d={cfg.hidden}, {cfg.heads} query / {cfg.kv_heads} KV heads, "
        f"MLP {cfg.intermediate}, {train['parameters']:,} parameters |",
        f"| problems | {p.min_steps}-{p.max_steps} steps, amounts of {p.digits} digit(s), start "
        f"{p.start_digits} digits, factors 2-{p.max_factor}, values <= {p.max_value} |",
        f"| data | {cfg.train_examples:,} train / {cfg.val_examples:,} validation / "
        f"{cfg.test_examples:,} test problems (disjoint by question hash), seed {cfg.seed} |",
        f"| training | {cfg.steps:,} steps x {cfg.batch_size} problems, AdamW lr {cfg.lr} "
        f"(warm-up {cfg.warmup}, cosine to {cfg.min_lr}), wd {cfg.weight_decay}, clip {cfg.clip} |",
        f"| hardware | {train['device']}, {train['torch_threads']} threads; "
        f"training wall time {train['train_time_s'] / 60:.1f} min |",
        "",
        "## Results (greedy decoding, exact match of the final answer)",
        "",
        "| model | layers | test accuracy |",
        "|---|---|---|",
        f"| dense | {cfg.layers} | **{ev['dense_accuracy']:.3f}** ({ev['test_examples']} problems) |",
        f"| ShortGPT, {sg['ratio']:.0%} of layers removed (layers {sg['removed_layers']}), no healing "
        f"| {cfg.layers - len(sg['removed_layers'])} | {sg['accuracy']:.3f} "
        f"({kept}) |",
        "",
        "The second row is the depth check: deleting a quarter of the layers by block influence",
        "must cost most of the accuracy, or the model would be too shallow for depth compression",
        "to mean anything.",
        "",
        f"Block influence per layer: {json.dumps([round(s, 4) for s in sg['block_influence']])}",
        "",
    ]
    atomic_write_text(model_dir / "README.md", "\n".join(lines))
