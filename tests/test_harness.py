"""lm-eval integration: the commonsense tasks run offline, and saved elmkit models load in lm-eval.

The synthetic tests write small JSONL files of the gauntlet format into tmp_path, so CI (which has no
../shared/data) still runs lm-eval for real; the real files are used when they are present.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from elmkit.eval import harness  # noqa: E402
from elmkit.eval.harness import SUITES, run_lm_eval, task_config, wrap_model  # noqa: E402
from elmkit.methods import elm as elm_method  # noqa: E402
from elmkit.models import remove_layers_  # noqa: E402
from elmkit.models.tiny import tiny_model  # noqa: E402

LIMIT = 8
TASKS = SUITES["commonsense"]


def write_synthetic(folder, n: int = 12):
    """arc_easy / boolq / piqa JSONL files in the gauntlet format, shaped like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"arc_easy": [], "boolq": [], "piqa": []}
    for i in range(n):
        arc = [f"{i + 1} apples", "the moon", f"{i * 7} grams of salt in water", "blue"]
        g = i % 4
        arc[0], arc[g] = arc[g], arc[0]  # move the right answer to position g
        rows["arc_easy"].append({"query": f"Question: How many apples are there after {i} plus one?",
                                 "choices": arc, "gold": g})
        rows["boolq"].append({"query": f"Passage: The box holds {i} red balls and {i + 2} blue ones.\n"
                                       f"Question: are there more blue balls than red?",
                              "choices": ["no", "yes"], "gold": (i + 1) % 2})
        piqa = ["Twist the lid counterclockwise.", f"Throw jar {i} into the sea and wait."]
        rows["piqa"].append({"query": f"Question: How do I open jar number {i}?\n",
                             "choices": piqa if i % 2 == 0 else piqa[::-1], "gold": i % 2})
    for name, lines in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic(tmp_path / "commonsense")


def check_summary(r, n=LIMIT):
    assert set(r["tasks"]) == set(TASKS)
    for name in TASKS:
        row = r["tasks"][name]
        assert set(row) == {"acc", "acc_norm", "n"}, row
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
        assert row["n"] == n
    mean = sum(r["tasks"][t]["acc"] for t in TASKS) / len(TASKS)
    assert r["suite_mean"]["commonsense"] == pytest.approx(mean)
    assert r["lm_eval_version"]


def reference_scores(model, tokenizer, folder, name, limit):
    """acc / acc_norm computed by hand: prompt "<query>\\nAnswer:", continuation " <choice>"."""
    file = task_config(name, folder)["dataset_kwargs"]["data_files"]["test"]
    docs = [json.loads(line) for line in open(file)][:limit]
    acc = acc_norm = 0
    for doc in docs:
        prompt = doc["query"].strip() + "\nAnswer:"
        n_ctx = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        lls = []
        for choice in doc["choices"]:
            ids = torch.tensor([tokenizer(prompt + " " + choice, add_special_tokens=False).input_ids])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            lls.append(sum(logp[i - 1, ids[0, i]].item() for i in range(n_ctx, ids.shape[1])))
        lls = torch.tensor(lls, dtype=torch.float64)
        lens = torch.tensor([float(len(c)) for c in doc["choices"]], dtype=torch.float64)
        acc += int(lls.argmax()) == doc["gold"]
        acc_norm += int((lls / lens).argmax()) == doc["gold"]
    return acc / len(docs), acc_norm / len(docs)


def test_commonsense_on_synthetic_files(synthetic, tokenizer, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    model = tiny_model("qwen2", num_layers=2, hidden_size=32)
    first = run_lm_eval(model, tokenizer, tasks=["commonsense"], data_dir=synthetic, limit=LIMIT)
    check_summary(first)
    assert first["limit"] == LIMIT and first["num_fewshot"] is None
    # Offline mode is for the call only.
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    # Same model, same documents: the same numbers (str paths and a bare suite name work too).
    again = run_lm_eval(model, tokenizer, tasks="commonsense", data_dir=str(synthetic), limit=LIMIT)
    assert again["tasks"] == first["tasks"]
    # lm-eval scored the prompt we meant: the numbers match a hand-rolled loglikelihood ranking.
    for name in TASKS:
        acc, acc_norm = reference_scores(model, tokenizer, synthetic, name, LIMIT)
        assert first["tasks"][name]["acc"] == pytest.approx(acc), name
        assert first["tasks"][name]["acc_norm"] == pytest.approx(acc_norm), name


def test_commonsense_on_real_files(shared_data, tokenizer):
    data_dir = shared_data / "commonsense"
    if not all((data_dir / f"{t}.jsonl").is_file() for t in ("arc_easy", "boolq", "piqa")):
        pytest.skip("shared/data/commonsense is incomplete")
    model = tiny_model("qwen2", num_layers=2, hidden_size=32)
    first = run_lm_eval(model, tokenizer, tasks=["commonsense"], data_dir=data_dir, limit=10)
    check_summary(first, n=10)
    again = run_lm_eval(model, tokenizer, tasks=["commonsense"], data_dir=data_dir, limit=10)
    assert again["tasks"] == first["tasks"]


def test_depth_pruned_folder_loads_in_lm_eval(tmp_path, synthetic, tokenizer):
    model = tiny_model("qwen2", num_layers=3, hidden_size=32)
    remove_layers_(model, [1])
    folder = tmp_path / "pruned"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))

    # lm-eval's own hf loader reads the folder: two layers, and the same numbers as the model itself.
    lm = wrap_model(folder, tokenizer, via_lm_eval_loader=True)
    assert lm.model.config.num_hidden_layers == 2 and len(lm.model.model.layers) == 2
    theirs = run_lm_eval(folder, tokenizer, tasks=["commonsense"], data_dir=synthetic, limit=LIMIT,
                         via_lm_eval_loader=True)
    check_summary(theirs)
    ours = run_lm_eval(folder, tasks=["commonsense"], data_dir=synthetic, limit=LIMIT)  # elmkit loader
    in_memory = run_lm_eval(model, tokenizer, tasks=["commonsense"], data_dir=synthetic, limit=LIMIT)
    assert theirs["tasks"] == ours["tasks"] == in_memory["tasks"]


def test_saved_elm_loads_in_lm_eval_with_remote_code(tmp_path, synthetic, tokenizer):
    dense = tiny_model("qwen2", num_layers=4, hidden_size=32)
    elm = elm_method.apply_(dense, elm_method.plan(dense, start=1, span=2, max_iter=2))
    folder = tmp_path / "elm"
    elm.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert (folder / "modeling_elm.py").is_file()
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    ours = run_lm_eval(elm, tokenizer, tasks=["commonsense"], data_dir=synthetic, limit=LIMIT)
    check_summary(ours)

    # In this process transformers prefers elmkit's registered ELM class over the folder's code, so
    # the remote-code path is checked in a process where elmkit cannot be imported at all.
    configs = [task_config(t, synthetic) for t in TASKS]
    script = f"""
import json, sys
sys.modules["elmkit"] = None  # elmkit must not be importable here
from transformers import PreTrainedTokenizerFast
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
folder = {str(folder)!r}
lm = HFLM(pretrained=folder, trust_remote_code=True, backend="causal", dtype="float32", device="cpu",
          batch_size=8, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder))
assert type(lm.model).__module__.startswith("transformers_modules"), type(lm.model).__module__
out = simple_evaluate(model=lm, tasks=json.loads({json.dumps(configs)!r}), limit={LIMIT},
                      task_manager=TaskManager(include_defaults=False), bootstrap_iters=0, log_samples=False)
print("RESULT " + json.dumps({{t: out["results"][t] for t in {list(TASKS)!r}}}))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    theirs = json.loads(line[len("RESULT "):])
    for name in TASKS:
        assert theirs[name]["acc,none"] == pytest.approx(ours["tasks"][name]["acc"]), name
        assert theirs[name]["acc_norm,none"] == pytest.approx(ours["tasks"][name]["acc_norm"]), name


def test_bad_input_gives_clear_errors(tmp_path, synthetic, tokenizer):
    model = tiny_model("qwen2", num_layers=1, hidden_size=32)
    with pytest.raises(ValueError, match="unknown elmkit task"):
        run_lm_eval(model, tokenizer, tasks=["elmkit_hellaswag"], data_dir=synthetic)
    with pytest.raises(ValueError, match="no tasks"):
        run_lm_eval(model, tokenizer, tasks=[], data_dir=synthetic)
    with pytest.raises(ValueError, match="needs data_dir"):
        run_lm_eval(model, tokenizer, tasks=["commonsense"])
    with pytest.raises(FileNotFoundError, match="arc_easy.jsonl"):
        run_lm_eval(model, tokenizer, tasks=["commonsense"], data_dir=tmp_path / "nowhere")
    (synthetic / "boolq.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"boolq\.jsonl.*gauntlet"):
        run_lm_eval(model, tokenizer, tasks=["commonsense"], data_dir=synthetic)
    with pytest.raises(ValueError, match="tokenizer"):
        run_lm_eval(model, tasks=["elmkit_piqa"], data_dir=synthetic)


@pytest.mark.slow
def test_unknown_suite_name_is_a_value_error(synthetic, tokenizer, monkeypatch):
    # Not an elmkit name, so lm-eval's registry is indexed (several seconds) before it is rejected.
    # The hub is taken to answer: offline, a registry name fails earlier, for want of the hub.
    monkeypatch.setattr(harness, "hub_unreachable", lambda: None)
    model = tiny_model("qwen2", num_layers=1, hidden_size=32)
    with pytest.raises(ValueError, match="unknown task or suite 'commonsens'"):
        run_lm_eval(model, tokenizer, tasks=["commonsens"], data_dir=synthetic)


def test_eval_command_perplexity_and_commonsense_suite(tiny_dir, tmp_path):
    import json
    import math

    from elmkit import cli

    text = tmp_path / "t.txt"
    text.write_text("A small text to measure. " * 20)
    assert cli.main(["eval", "--model", str(tiny_dir), "--task", "perplexity", "--data", str(text),
                     "--window", "64", "--stride", "32", "--out", str(tmp_path / "p")]) == 0
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert m["window"] == 64 and m["stride"] == 32
    assert m["tokens"] == len("A small text to measure. " * 20) - 1
    assert m["ppl"] > 1 and m["windows"] == math.ceil((m["text_tokens"] - 64) / 32) + 1
    assert cli.main(["eval", "--model", str(tiny_dir), "--task", "perplexity", "--data", str(text),
                     "--window", "64", "--stride", "32", "--limit", "2", "--out", str(tmp_path / "p2")]) == 0
    m = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert m["windows"] == 2 and m["tokens"] == 63 + 32  # --limit counts windows
    d = write_synthetic(tmp_path / "cs")
    assert cli.main(["eval", "--model", str(tiny_dir), "--suite", "commonsense", "--data-dir", str(d),
                     "--limit", "4", "--out", str(tmp_path / "c")]) == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert set(m["tasks"]) == {"elmkit_arc_easy", "elmkit_boolq", "elmkit_piqa"}
    assert all(t["n"] == 4 and 0 <= t["acc"] <= 1 for t in m["tasks"].values())
    assert cli.main(["eval", "--model", str(tiny_dir), "--task", "perplexity",
                     "--out", str(tmp_path / "x")]) == 2
