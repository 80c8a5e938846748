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
    """The main job on the embedded default: compress the shipped testbed model and heal it.

    Takes the trained tiny testbed model (``testbed:tiny``), measures its accuracy on 200
    held-out problems, deletes a quarter of its layers with ShortGPT, measures again, heals the
    shortened model with LoRA on 2,000 training problems, and measures once more. A few minutes
    on a 2-core CPU; writes report.md into ``out``.
    """
    import json

    from .data.calibration import Calibration
    from .data.chat import render
    from .eval import EvalConfig, evaluate
    from .io import write_json
    from .methods import shortgpt
    from .models import count_parameters, load_model, load_tokenizer
    from .models.loading import resolve_model_path
    from .testbed.problems import ProblemConfig, make_split
    from .train import FinetuneConfig, finetune

    run = RunDir(out)
    run.write_config("demo", model="testbed:tiny")
    dense_dir = Path(resolve_model_path("testbed:tiny"))
    recipe = json.loads((dense_dir / "testbed.json").read_text())
    problems, seed = ProblemConfig(**recipe["problems"]), recipe["seed"]
    test = make_split("test", 200, problems, seed)
    train = make_split("train", 2_000, problems, seed)
    ecfg = EvalConfig(task="gsm8k", batch_size=64, max_new_tokens=160)

    rows = []
    dense = load_model(dense_dir, dtype="float32")
    tok = load_tokenizer(dense_dir)
    rows.append(("dense (testbed:tiny)", dense, evaluate(dense, test, run / "eval_dense", ecfg, tok)))

    calib = Calibration.from_texts(tok, [(lambda r: r.prompt + r.completion)(render(tok, ex))
                                         for ex in make_split("validation", 64, problems, seed)])
    plan = shortgpt.plan(dense, calib, shortgpt.ShortGPTConfig(ratio=0.25))
    write_json(run / "shortgpt" / "plan.json", plan)
    short = shortgpt.apply_(load_model(dense_dir, dtype="float32"), plan)
    short.save_pretrained(str(run / "shortgpt" / "model"))
    tok.save_pretrained(str(run / "shortgpt" / "model"))
    rows.append((f"ShortGPT: layers {list(plan.drop)} removed", short,
                 evaluate(short, test, run / "eval_shortgpt", ecfg, tok)))

    heal = finetune(run / "shortgpt" / "model", train, run / "healed", FinetuneConfig(
        r=16, alpha=32, dropout=0.0, lr=2e-3, min_lr=2e-4, warmup_steps=10, batch_size=16,
        max_steps=200, max_len=256, save_every=100))
    healed = load_model(run / "healed" / "model", dtype="float32")
    rows.append(("ShortGPT + LoRA healing (200 steps)", healed,
                 evaluate(healed, test, run / "eval_healed", ecfg, tok)))

    base_acc = rows[0][2]["accuracy"]
    table = ["| model | layers | params | accuracy | retained |", "|---|---|---|---|---|"]
    for name, model, m in rows:
        kept = f"{m['accuracy'] / base_acc:.1%}" if base_acc else "n/a"
        table.append(f"| {name} | {model.config.num_hidden_layers} | {count_parameters(model):,} "
                     f"| {m['accuracy']:.3f} ({m['correct']}/{m['n']}) | {kept} |")
    report = "\n".join([
        "# elmkit demo",
        "",
        "The shipped testbed model (12 layers, trained by elmkit on arithmetic word problems) is",
        "shortened by a quarter with ShortGPT, then healed with LoRA; accuracy is greedy exact",
        "match on 200 held-out problems.",
        "",
        *table,
        "",
        f"LoRA healing loss: {heal['first_loss']:.3f} -> {heal['final_loss']:.3f} "
        "(curve: healed/loss.png). Block influence per layer: "
        f"{[round(x, 4) for x in plan.scores]}.",
        "",
    ])
    atomic_write_text(run / "report.md", report)
    metrics = {"rows": [{"model": n, "layers": mod.config.num_hidden_layers,
                         "accuracy": m["accuracy"]} for n, mod, m in rows],
               "removed_layers": list(plan.drop)}
    run.write_metrics(metrics)
    print(report)
    return metrics
