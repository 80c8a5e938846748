"""Local lm-eval tasks: any MosaicML JSONL file in --data-dir, commonsense7, --lm-eval-include, and
the immediate error for a hub task on a machine without the hub.

Files are written into tmp_path and scored on tiny random models; where the numbers matter they are
checked against log-likelihoods computed here by hand. Nothing here needs the network: offline is
simulated (HF_HUB_OFFLINE=1, or a failing socket).
"""

import json
import socket
import time

import pytest
import torch

pytest.importorskip("lm_eval")

from test_harness import write_synthetic  # noqa: E402

from elmkit import cli  # noqa: E402
from elmkit.data.formats import DataFormatError  # noqa: E402
from elmkit.eval import EvalConfig, evaluate, harness  # noqa: E402
from elmkit.eval.harness import SUITES, plan_tasks, run_lm_eval, task_config  # noqa: E402
from elmkit.models.tiny import tiny_model  # noqa: E402

CUE = "\nAnswer:"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arc_rows(n=6):
    """ARC-Challenge in MosaicML's multiple-choice schema."""
    rows = []
    for i in range(n):
        choices = [f"{i + 3} kilograms", "a rock", f"the {i}th planet", "warm water"]
        rows.append({"query": f"Question: Which of these weighs {i + 3} kilograms?",
                     "choices": choices, "gold": i % 4})
    return rows


def sentence_rows(n=6):
    """HellaSwag / OpenBookQA shape: the query is the start of a sentence the choice completes."""
    return [{"query": f"A man puts {i} cups of flour in a bowl. He",
             "choices": ["stirs it with a spoon.", f"flies to {i} moons.", "sings to the bowl."],
             "gold": i % 3} for i in range(n)]


def wino_rows(n=6):
    """WinoGrande in MosaicML's partial-scoring schema (gold set later)."""
    things = [("trophy", "suitcase"), ("ball", "window"), ("cat", "box"),
              ("boat", "bridge"), ("car", "garage"), ("piano", "door")]
    rows = []
    for i in range(n):
        a, b = things[i % len(things)]
        head = f"The {a} does not fit into the {b} because the "
        rows.append({"context_options": [head + a, head + b], "continuation": "is too big.", "gold": 0})
    return rows


def loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens."""
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([tok(context + continuation, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]  # (T, vocab)
    return sum(logp[i - 1, ids[0, i]].item() for i in range(n_ctx, ids.shape[1]))


def choice_acc(model, tok, rows, cue: str) -> tuple[float, float]:
    """acc / acc_norm by hand: prompt = trimmed query + cue, continuation = " " + choice."""
    acc = acc_norm = 0
    for r in rows:
        lls = torch.tensor([loglik(model, tok, r["query"].strip() + cue, " " + c) for c in r["choices"]],
                           dtype=torch.float64)
        lens = torch.tensor([float(len(c)) for c in r["choices"]], dtype=torch.float64)
        acc += int(lls.argmax()) == r["gold"]
        acc_norm += int((lls / lens).argmax()) == r["gold"]
    return acc / len(rows), acc_norm / len(rows)


def partial_pick(model, tok, row) -> int:
    """WinoGrande by hand: the context option after which " " + continuation is likeliest."""
    lls = [loglik(model, tok, ctx, " " + row["continuation"]) for ctx in row["context_options"]]
    return max(range(len(lls)), key=lls.__getitem__)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_model("qwen2", num_layers=2, hidden_size=32)


def test_winogrande_partial_scoring_matches_a_hand_computed_argmax(tmp_path, model, tokenizer):
    # One document per file, so each task's acc is that document's verdict. The gold of every other
    # document is set against the hand-computed pick, so both verdicts are checked.
    rows = wino_rows()
    want = []
    for i, r in enumerate(rows):
        pick = partial_pick(model, tokenizer, r)
        r["gold"] = pick if i % 2 == 0 else 1 - pick
        want.append(float(i % 2 == 0))
        write_jsonl(tmp_path / f"wino{i}.jsonl", [r])
    write_jsonl(tmp_path / "winogrande.jsonl", rows)
    names = [f"elmkit_wino{i}" for i in range(len(rows))]
    r = run_lm_eval(model, tokenizer, names + ["elmkit_winogrande"], data_dir=tmp_path)
    assert [r["tasks"][t]["acc"] for t in names] == want
    # The whole file: the mean of the verdicts; no acc_norm (the options are contexts, not answers).
    assert r["tasks"]["elmkit_winogrande"] == {"acc": pytest.approx(sum(want) / len(want)), "n": len(rows)}
    assert task_config("elmkit_winogrande", tmp_path)["doc_to_choice"] == "context_options"


def test_commonsense7_scores_each_file_with_its_cue(tmp_path, model, tokenizer):
    d = write_synthetic(tmp_path / "cs", n=5)
    rows = {"arc_challenge": arc_rows(5), "hellaswag": sentence_rows(5), "openbook_qa": sentence_rows(5),
            "winogrande": wino_rows(5)}
    for i, r in enumerate(rows["winogrande"]):
        r["gold"] = i % 2
    for name, lines in rows.items():
        write_jsonl(d / f"{name}.jsonl", lines)
    m = evaluate(model, out=tmp_path / "run", cfg=EvalConfig(suite="commonsense7"), tokenizer=tokenizer,
                 data_dir=d)
    assert list(m["tasks"]) == list(SUITES["commonsense7"])
    assert m["suite_mean"]["commonsense7"] == pytest.approx(
        sum(t["acc"] for t in m["tasks"].values()) / 7)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"] == m["tasks"]
    # "\nAnswer:" after ARC-Challenge's query; nothing after HellaSwag's and OpenBookQA's.
    for name, cue in (("arc_challenge", CUE), ("hellaswag", ""), ("openbook_qa", "")):
        acc, acc_norm = choice_acc(model, tokenizer, rows[name], cue)
        want = {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": 5}
        assert m["tasks"][f"elmkit_{name}"] == want, name
    picks = [partial_pick(model, tokenizer, r) == r["gold"] for r in rows["winogrande"]]
    assert m["tasks"]["elmkit_winogrande"]["acc"] == pytest.approx(sum(picks) / len(picks))


def test_eval_command_scores_any_file_by_its_name(tiny_dir, tmp_path):
    d = tmp_path / "data"
    write_jsonl(d / "arc_challenge.jsonl", arc_rows())
    write_jsonl(d / "winogrande.jsonl", wino_rows())
    assert cli.main(["eval", "--model", str(tiny_dir), "--suite", "local", "--data-dir", str(d),
                     "--limit", "4", "--out", str(tmp_path / "all")]) == 0
    m = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert set(m["tasks"]) == {"elmkit_arc_challenge", "elmkit_winogrande"}
    assert set(m["tasks"]["elmkit_arc_challenge"]) == {"acc", "acc_norm", "n"}
    assert set(m["tasks"]["elmkit_winogrande"]) == {"acc", "n"}
    assert all(t["n"] == 4 for t in m["tasks"].values())
    assert m["suite_mean"]["local"] == pytest.approx(sum(t["acc"] for t in m["tasks"].values()) / 2)
    # The same tasks named one by one give the same numbers.
    assert cli.main(["eval", "--model", str(tiny_dir), "--lm-eval-tasks", "elmkit_winogrande",
                     "elmkit_arc_challenge", "--data-dir", str(d), "--limit", "4",
                     "--out", str(tmp_path / "named")]) == 0
    assert json.loads((tmp_path / "named" / "metrics.json").read_text())["tasks"] == m["tasks"]


def test_a_file_in_neither_schema_is_one_clear_error(tiny_dir, tmp_path, capsys):
    d = tmp_path / "data"
    write_jsonl(d / "mine.jsonl", [arc_rows(1)[0], {"question": "Why?", "answers": ["a", "b"], "label": 1}])
    rc = cli.main(["eval", "--model", str(tiny_dir), "--lm-eval-tasks", "elmkit_mine", "--data-dir", str(d),
                   "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{d / 'mine.jsonl'}, line 2: matches neither accepted schema" in err
    assert '"choices": [str, ...]' in err and '"context_options": [str, ...]' in err
    # The records are checked one by one, each failure naming its line.
    bad = {"mixed": [arc_rows(1)[0], wino_rows(1)[0]],
           "gold": [{**arc_rows(1)[0], "gold": 4}],
           "broken": ["not json"]}
    for name, rows in bad.items():
        path = d / f"{name}.jsonl"
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl, line 2: a partial scoring record after "
                                              r"multiple choice ones"):
        task_config("elmkit_mixed", d)
    with pytest.raises(DataFormatError, match=r"gold\.jsonl, line 1: gold must be an index into choices "
                                              r"\(0\.\.3\), got 4"):
        task_config("elmkit_gold", d)
    with pytest.raises(DataFormatError, match=r"broken\.jsonl, line 1: not JSON"):
        task_config("elmkit_broken", d)


def test_commonsense7_names_every_missing_file(tiny_dir, tmp_path, capsys):
    d = write_synthetic(tmp_path / "cs", n=2)
    with pytest.raises(FileNotFoundError, match="lacks hellaswag.jsonl, winogrande.jsonl, "
                                                "arc_challenge.jsonl, openbook_qa.jsonl, needed by "
                                                "suite commonsense7"):
        plan_tasks(["commonsense7"], d)
    rc = cli.main(["eval", "--model", str(tiny_dir), "--suite", "commonsense7", "--data-dir", str(d),
                   "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "hellaswag.jsonl, winogrande.jsonl, arc_challenge.jsonl, openbook_qa.jsonl" in err
    assert plan_tasks(["commonsense"], d).names == SUITES["commonsense"]  # the 3-task suite still runs


def test_a_hub_task_offline_fails_at_once_naming_the_local_file(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    rc = cli.main(["eval", "--model", str(tiny_dir), "--lm-eval-tasks", "arc_challenge",
                   "--out", str(tmp_path / "e")])
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "arc_challenge needs the Hugging Face hub, which is not reachable (HF_HUB_OFFLINE=1 is set)" in err
    assert "put arc_challenge.jsonl (MosaicML format) in --data-dir" in err
    assert "--lm-eval-tasks elmkit_arc_challenge" in err

    # No variable set and no connection: the socket's failure says so; lm-eval's openbookqa is
    # MosaicML's openbook_qa.jsonl. A local task beside it changes nothing.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)

    def refuse(address, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    d = write_synthetic(tmp_path / "cs", n=2)
    with pytest.raises(ValueError, match=r"openbookqa needs the Hugging Face hub, which is not reachable "
                                         r"\(huggingface.co:443 did not answer within 2 s\); put "
                                         r"openbook_qa.jsonl"):
        plan_tasks(["commonsense", "openbookqa"], d)
    # A YAML of one's own that reads the hub is held to the same rule.
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "hub_arc.yaml").write_text("task: hub_arc\ndataset_path: allenai/ai2_arc\n"
                                      "output_type: multiple_choice\n")
    with pytest.raises(ValueError, match="hub_arc needs the Hugging Face hub"):
        plan_tasks(["hub_arc"], include_path=inc)


def test_hub_probe_answers_without_the_network(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    tried = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout=None):
        tried.append((address, timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    assert harness.hub_unreachable() is None and tried == [(("huggingface.co", 443), 2.0)]
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    assert harness.hub_unreachable() is None and tried[-1][0] == ("mirror.local", 8080)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert harness.hub_unreachable() == "HF_DATASETS_OFFLINE=1 is set"


def test_lm_eval_include_runs_a_task_yaml_of_ones_own(tiny_dir, tmp_path, capsys):
    d = tmp_path / "data"
    data = write_jsonl(d / "arc_challenge.jsonl", arc_rows())
    inc = tmp_path / "my_tasks"
    inc.mkdir()
    # The same prompt as elmkit_arc_challenge, so the same numbers.
    (inc / "my_arc.yaml").write_text(f"""task: my_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query | trim}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
""")
    assert cli.main(["eval", "--model", str(tiny_dir), "--lm-eval-tasks", "my_arc", "elmkit_arc_challenge",
                     "--lm-eval-include", str(inc), "--data-dir", str(d), "--out", str(tmp_path / "e")]) == 0
    tasks = json.loads((tmp_path / "e" / "metrics.json").read_text())["tasks"]
    assert tasks["my_arc"] == {"acc": tasks["elmkit_arc_challenge"]["acc"], "n": 6}
    plan = plan_tasks(["my_arc"], include_path=inc)
    assert not plan.registry and not plan.hub  # no registry index, and the run stays offline

    rc = cli.main(["eval", "--model", str(tiny_dir), "--lm-eval-include", str(inc),
                   "--out", str(tmp_path / "x")])
    assert rc == 2 and "--lm-eval-include needs --lm-eval-tasks" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(tiny_dir), "--lm-eval-tasks", "my_arc", "--lm-eval-include",
                   str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err
