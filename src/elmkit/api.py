"""Small top-level commands: ``info``, ``remove_layers`` and the ``demo`` main job."""

from __future__ import annotations

from pathlib import Path

from .io import RunDir, atomic_write_text


def info(model: str | Path) -> dict:
    """Describe a model: family, layer count, parameter count, attention layout."""
    from .models import count_parameters, family_of, load_model

    m = load_model(model, dtype="float32", device="cpu")
    c = m.config
    return {
        "model": str(model),
        "family": family_of(m).name,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "parameters": count_parameters(m),
    }


def _parse_layers(layers: str | list[int] | tuple[int, ...]) -> list[int]:
    if isinstance(layers, str):
        try:
            return [int(x) for x in layers.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise ValueError(f"--layers must be comma-separated integers, got {layers!r}") from e
    return [int(x) for x in layers]


def remove_layers(model: str | Path, layers: str | list[int], out: str | Path) -> dict:
    """Delete decoder layers by index and save the shorter model (stock HF format)."""
    from .models import count_parameters, load_model, load_tokenizer, remove_layers_

    drop = _parse_layers(layers)
    run = RunDir(out)
    run.write_config("remove-layers", model=str(model), layers=drop)
    tok = load_tokenizer(model)
    m = load_model(model, dtype="float32", device="cpu")
    n0, p0 = m.config.num_hidden_layers, count_parameters(m)
    remove_layers_(m, drop)
    m.save_pretrained(str(run / "model"), safe_serialization=True)
    tok.save_pretrained(str(run / "model"))
    metrics = {
        "removed": sorted(set(drop)), "layers_before": n0, "layers_after": m.config.num_hidden_layers,
        "params_before": p0, "params_after": count_parameters(m),
    }
    run.write_metrics(metrics)
    return metrics


def demo(out: str | Path = "runs/demo") -> dict:
    """The main job on the embedded default: fine-tune, evaluate and compress a model end to end.

    Uses a tiny model built from config and a seeded arithmetic task, so it runs in a few
    minutes on a CPU with no downloads. Writes report.md into ``out``.
    """
    import torch

    from .data import byte_tokenizer
    from .data.synthetic import arithmetic_examples
    from .eval import EvalConfig, evaluate
    from .models import count_parameters
    from .models.tiny import tiny_model
    from .train import FinetuneConfig, finetune

    run = RunDir(out)
    run.write_config("demo")
    torch.manual_seed(0)
    base_dir = run / "base"
    tiny_model("qwen2", num_layers=6, hidden_size=64).save_pretrained(str(base_dir))
    byte_tokenizer().save_pretrained(str(base_dir))
    examples = arithmetic_examples(288, seed=0)
    train, test = examples[:256], examples[256:]

    ecfg = EvalConfig(task="gsm8k", batch_size=16, max_new_tokens=32, device="cpu")
    rows = [("dense, random init", base_dir, evaluate(base_dir, test, run / "eval_base", ecfg))]
    ft = finetune(base_dir, train, run / "finetune", FinetuneConfig(
        r=8, alpha=16, dropout=0.0, lr=3e-3, min_lr=3e-4, batch_size=16, max_steps=60,
        max_len=128, save_every=30, device="cpu"))
    tuned = run / "finetune" / "model"
    rows.append(("dense, LoRA-tuned", tuned, evaluate(tuned, test, run / "eval_tuned", ecfg)))
    rm = remove_layers(tuned, [3, 4], run / "removed")
    short = run / "removed" / "model"
    rows.append(("2 layers removed", short, evaluate(short, test, run / "eval_removed", ecfg)))

    from .models import load_model

    table = ["| model | layers | params | accuracy |", "|---|---|---|---|"]
    for name, path, m in rows:
        mod = load_model(path, dtype="float32", device="cpu")
        table.append(f"| {name} | {mod.config.num_hidden_layers} | {count_parameters(mod):,} "
                     f"| {m['accuracy']:.3f} ({m['correct']}/{m['n']}) |")
    report = "\n".join([
        "# elmkit demo",
        "",
        "A tiny Qwen2-architecture model (random init, byte-level tokenizer) is LoRA-fine-tuned",
        "on 256 seeded arithmetic questions, evaluated on 32 held-out ones with the GSM8K scorer,",
        "then shortened by layer removal. It shows the pipeline end to end; the accuracy of a",
        "randomly initialised tiny model is not meant to be high.",
        "",
        *table,
        "",
        f"LoRA training loss: {ft['first_loss']:.3f} -> {ft['final_loss']:.3f} "
        f"over {ft['steps']} steps (curve: finetune/loss.png).",
        "",
    ])
    atomic_write_text(run / "report.md", report)
    metrics = {"rows": [{"model": n, "accuracy": m["accuracy"]} for n, _, m in rows],
               "lora_first_loss": ft["first_loss"], "lora_final_loss": ft["final_loss"],
               "layers_removed": rm["removed"]}
    run.write_metrics(metrics)
    print(report)
    return metrics
